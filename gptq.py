"""GPTQ, and `python gptq.py`: quantize a Mixture-of-Experts VLM layer by layer with any method of the table below.

    python gptq.py --bits 3                       VEQ-MA on the bundled tiny model and calib/ (python calibrate.py)
    python gptq.py --method gptq --bits 4 --group-size 32 --model DIR --calib calib/ --out quantized/
    torchrun --nproc-per-node N gptq.py ...       the same flags over N processes (quant/distributed.py)

Read this file top to bottom: (1) the GPTQ solver for one matrix, (2) the methods as data, (3) the layer loop
quantize_model, whose steps are the algorithm, (4) the command line. Read next, in the order the loop calls them:
model.py (load a layer), arch/blocks.py (its router and experts), hessian.py (the token-weighted Hessians of its
linears), quant/grid.py (the grid and the packed weight), quant/folders.py (calib/ and the output on disk).

(1) GPTQ: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (arXiv 2210.17323), following the IST-DASLab reference `gptq.py` (`fasterquant`).
Symbols as there: W (out, in) the weight, H (in, in) the Hessian of the layer's inputs (hessian.py),
Hinv the upper Cholesky factor of H⁻¹, Q the quantized columns, Err the scaled errors of one block.
Quantizing column j to q adds error (w - q); GPTQ compensates by moving the not-yet-quantized columns k > j
by -(w - q) / Hinv_jj · Hinv_jk (the optimal update of Optimal Brain Surgeon, with H⁻¹ kept in Cholesky form).
Blocks of `block_size` columns get these updates immediately; later columns get them in one matmul per block.
The grid (scale, zero, codes) is quant/grid.py's. Deliberate differences from the reference code, each for
correctness or honest reporting:
  * dynamic group parameters are computed from the group's columns as they are at that moment (including the
    block's pending lazy updates); the reference reads stale columns when group_size < block_size. With the
    defaults (group_size == block_size == 128) both are the same.
  * symmetric range is always [-max|w|, max|w|] (the reference clips rows without negative weights).
  * a failed Cholesky retries with 10x the damping, at most `max_retries` times, counted in the result; if all
    fail, GPTQError. Never an identity Hessian.
  * act_order with groups requires static_groups: the output format has no g_idx, so groups must stay
    contiguous in the original column order.
The same GPTQ for all experts of a layer as one batched problem is quant/batched.py (--batched-experts,
solve_batched).

(2) A method is a record: a scale search run before quantizing (ecs.py), a solver (GPTQ or RTN), the weight c_j
of each token in the Hessians (hessian.py), and its own options (which become command-line flags).

(3) The loop, for each decoder layer l (its inputs made by the already-quantized layers < l), docs/methods.md §1.3:
  load layer l  ->  [scale search, folded]  ->  token-weighted Hessians of every linear  ->  solve and pack every
  linear  ->  save the layer  ->  its quantized outputs are the next layer's inputs.
Router, norms, embeddings and lm_head stay float; --quantize-vision quantizes the vision tower first
(quant/vision.py). Before any work it prints where vLLM would run the output (quant/servable.py; --vllm: refuse).
Several processes and timing are passed in (quant/distributed.py's Group, a phase timer) and do nothing in the
plain one-process run; the finished layers go to OUT.partial/ (quant/folders.py's Partial), which --resume reads.

Tests: python -m pytest -q tests/test_gptq.py tests/test_pipeline.py
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
import os
import sys
import time
from typing import Callable, Sequence

import torch

from data.processor import vision_inputs
from data.samples import SHAPES_SPECS
import ecs
import eval as evaluation
import hessian
from hessian import LayerCapture, no_timer, relative_output_error
import model as model_lib
from quant import distributed, servable
from quant.batched import solve_batched
from quant.folders import CalibSet, Partial, export_fake_quant, write_output
from quant.grid import (BITS, DAMP_ESCALATION, GPTQError, QuantLinear, Quantized, check_grid, compute_dtype,
                        dequantize, dequantize_once, group_len, group_params, n_groups, quant_params, rtn, split_rows)
from quant.scales import layer_fusion_weights, search_and_fold
from quant.vision import quantize_vision_tower


# ----------------------------------------------------------------------------------------------------------
# (1) GPTQ for one matrix


def damped_inverse_cholesky(H: torch.Tensor, *, percdamp: float = 0.01, max_retries: int = 3,
                            name: str = "weight") -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor U of (H + damp·I)⁻¹ = Uᵀ U (in, in), in H's dtype, with damp = percdamp ·
    mean(diag H), escalated 10x after each failure. Returns (U, damp, retries); raises GPTQError if
    1 + max_retries attempts all fail (H indefinite or NaN)."""
    idx = torch.arange(H.shape[0], device=H.device)
    damp0 = percdamp * float(torch.diagonal(H).mean())
    tried = []
    for retries in range(max_retries + 1):
        damp = damp0 * DAMP_ESCALATION**retries
        tried.append(damp)
        Hd = H.clone()
        Hd[idx, idx] += damp
        L, info = torch.linalg.cholesky_ex(Hd)  # H + damp·I = L Lᵀ
        if int(info) != 0:
            continue
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)  # (H + damp·I)⁻¹ = Uᵀ U
        if int(info) == 0 and bool(torch.isfinite(U).all()):
            return U, damp, retries
    raise GPTQError(f"{name}: Cholesky of the damped Hessian H {tuple(H.shape)} failed with damping "
                    f"{', '.join(f'{d:.3g}' for d in tried)} (percdamp={percdamp}, mean diag "
                    f"{float(torch.diagonal(H).mean()):.3g}): H is not positive semi-definite; check its "
                    "tokens/weights, accumulate in float64, or raise percdamp / max_retries")


def _current_columns(W, W1, Err1, Hinv, i1: int, i: int, i2: int, g: int) -> torch.Tensor:
    """Columns j .. j+g-1 (j = i1 + i) as the column-by-column algorithm sees them at column j: inside the
    block they are in W1; beyond it, W still lacks this block's pending updates Err1[:, :i] @ Hinv[...]."""
    inside = W1[:, i:i + g]  # (out, <= g)
    end = i1 + i + g
    if end <= i2:
        return inside
    beyond = W[:, i2:end] - Err1[:, :i] @ Hinv[i1:i1 + i, i2:end]
    return torch.cat([inside, beyond], dim=1)


def _quantize_blocks(W, Hinv, scale, zero, col_group, *, bits: int, block_size: int, dynamic_g: int,
                     sym: bool, clip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPTQ sweep over W (out, in) in its (possibly permuted) column order. col_group (in,) is the group
    of each column; if dynamic_g > 0, the params of group j // dynamic_g are computed when column j starts it
    (written into scale/zero (out, n_groups)). Modifies W. Returns codes (out, in) uint8 and row_loss (out,)."""
    out_f, in_f = W.shape
    maxq = 2**bits - 1
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8, device=W.device)
    row_loss = torch.zeros(out_f, dtype=W.dtype, device=W.device)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()  # (out, B) the block, updated column by column
        Err1 = torch.zeros_like(W1)  # (out, B) scaled errors, applied to the later blocks in one matmul
        Hinv1 = Hinv[i1:i2, i1:i2]  # (B, B)
        for i in range(i2 - i1):
            j = i1 + i
            if dynamic_g and j % dynamic_g == 0:
                cols = _current_columns(W, W1, Err1, Hinv, i1, i, i2, dynamic_g)
                scale[:, j // dynamic_g], zero[:, j // dynamic_g] = quant_params(cols, bits=bits, sym=sym, clip=clip)
            w, s, z = W1[:, i], scale[:, col_group[j]], zero[:, col_group[j]]  # (out,) each
            c = torch.clamp(torch.round(w / s) + z, 0, maxq)  # this column's codes
            q = (c - z) * s
            codes[:, j] = c  # (cast to uint8 by the copy)
            d, dw = Hinv1[i, i], w - q
            row_loss += dw**2 / d**2 / 2
            err = torch.div(dw, d, out=Err1[:, i])  # (out,)
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]  # compensate in the block's remaining columns
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update: (out, B) @ (B, in - i2)
    return codes, row_loss


def _check_gptq_args(W, H, bits, group_size, block_size, percdamp, act_order, static_groups, name):
    check_grid(bits, group_size, name)
    if W.dim() != 2 or tuple(H.shape) != (W.shape[1], W.shape[1]):
        raise ValueError(f"{name}: W {tuple(W.shape)} must be (out, in) and H {tuple(H.shape)} (in, in)")
    if block_size <= 0 or percdamp < 0:
        raise ValueError(f"{name}: block_size={block_size} must be > 0 and percdamp={percdamp} >= 0")
    if act_order and group_size != -1 and not static_groups:
        raise ValueError(f"{name}: act_order with group_size={group_size} needs static_groups=True (the packed "
                         "format has no g_idx, so groups must stay contiguous in the original column order)")
    for t, what in ((W, "W"), (H, "H")):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: {what} has NaN/inf entries; fix the weights / calibration inputs first")


@torch.no_grad()
def gptq(W: torch.Tensor, H: torch.Tensor, *, bits: int, group_size: int = 128, sym: bool = False,
         block_size: int = 128, percdamp: float = 0.01, act_order: bool = False, static_groups: bool = False,
         max_retries: int = 3, clip: bool = False, name: str = "weight") -> Quantized:
    """GPTQ-quantize W (out, in) given the Hessian H (in, in) of its inputs (any positive scale, e.g.
    hessian.Hessian.finalize()). Computes in float32 (float64 if W is); the Cholesky runs in H's dtype.
    act_order: quantize columns by descending H_jj. static_groups: group params from W before any update.
    clip: MSE-clipped group ranges (quant/grid.py's clip_search, the reference's mse=True).
    name: used in error messages (pass the tensor's checkpoint name)."""
    _check_gptq_args(W, H, bits, group_size, block_size, percdamp, act_order, static_groups, name)
    dtype = compute_dtype(W)
    in_f = W.shape[1]
    W = W.detach().to(dtype).clone()  # (out, in), updated in place by the sweep
    H = H.detach().clone()  # (in, in)
    dead = torch.diagonal(H) == 0  # (in,) channels no token reached: nothing to preserve there
    H[dead, dead] = 1
    W[:, dead] = 0
    g = group_len(in_f, group_size)
    dynamic = group_size != -1 and not static_groups
    if dynamic:  # filled group by group during the sweep
        scale = torch.empty(W.shape[0], n_groups(in_f, group_size), dtype=dtype, device=W.device)
        zero = torch.empty_like(scale)
    else:  # per-channel, or static groups: computed up front on the un-permuted W
        scale, zero = group_params(W, bits=bits, group_size=group_size, sym=sym, clip=clip)
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order \
        else torch.arange(in_f, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv, damp, retries = damped_inverse_cholesky(H, percdamp=percdamp, max_retries=max_retries, name=name)
    codes, row_loss = _quantize_blocks(W, Hinv.to(dtype), scale, zero, (perm // g).tolist(), bits=bits,
                                       block_size=block_size, dynamic_g=g if dynamic else 0, sym=sym, clip=clip)
    codes = codes[:, torch.argsort(perm)]  # back to the original column order
    zero_out = None if sym else zero.to(torch.uint8)
    return Quantized(codes=codes, scale=scale, zero=zero_out,
                      W_hat=dequantize(codes, scale, zero_out, bits=bits, group_size=group_size),
                      damp=damp, retries=retries, row_loss=row_loss, n_dead=int(dead.sum()))


@torch.no_grad()
def gptq_shared(Ws: Sequence[torch.Tensor], H: torch.Tensor, **kwargs) -> list[Quantized]:
    """GPTQ of several matrices that read the same inputs (an expert's gate_proj and up_proj), sharing one
    Hessian, one damping and one Cholesky. GPTQ treats rows independently, so this equals quantizing each
    matrix on its own. kwargs as for gptq()."""
    return split_rows(gptq(torch.cat(list(Ws), dim=0), H, **kwargs), [W.shape[0] for W in Ws])


# ----------------------------------------------------------------------------------------------------------
# (2) The methods as data


@dataclass(frozen=True)
class Option:
    """One knob of a method: its name in Settings.options, default, help, and how it reaches the command line
    (`--name-with-dashes`, or `flag`; a bool default True becomes a `--no-...` switch)."""

    name: str
    default: object
    help: str
    type: Callable | None = None  # argparse type (None: bool switch)
    choices: tuple | None = None
    flag: str | None = None
    check: Callable | None = None  # value -> error text or None

    @property
    def cli(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


VEQ = (  # arXiv 2602.01037; docs/methods.md §3
    Option("lam", 1.0, "VEQ-MA: exponent λ on the router probability p", float),
    Option("gamma", None, "VEQ: text-token weight γ (default: calib/'s gamma)", float),
    Option("gamma_source", "grad", "calib/'s gamma: the paper's mean |dL/dx| ratio, or the scale-free |x * dL/dx|",
           str, ("grad", "grad_x_input")),
    Option("use_gamma", True, "VEQ-ME ablation: gamma = 1 in S_e", flag="--no-gamma"),
    Option("use_beta", True, "VEQ-ME ablation: beta = 1 in S_e", flag="--no-beta"),
    Option("affinity", True, "VEQ-MA ablation: p = 1", flag="--no-affinity"),
    Option("modality", True, "VEQ-MA ablation: alpha = 1", flag="--no-modality"),
    Option("plain_dense", False, "VEQ-MA: no modality weights outside the experts"),
)
FAQ = (Option("eta", 0.5, "FAQ: w = (1 - eta) + eta * phi / mean(phi)", float,
              check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)"),)
ECS = (  # ECMFQ's expert-consensus smoothing; docs/methods.md §4.1
    Option("ecs_loss", "trimmed", "ECS loss: MSE with the top 1%% token errors dropped, Huber, or plain MSE", str,
           tuple(ecs.ECS_LOSSES)),
    Option("ecs_omega", "freq", "ECS expert weights: routing frequency, mean router probability, or VEQ-ME's S_e",
           str, ecs.ECS_OMEGAS),
    Option("ecs_percentile", 99.9, "ECS: percentile of |X| for m_X", float,
           check=lambda v: None if 0 < v <= 100 else "must be in (0, 100]"),
    Option("ecs_grid", 21, "ECS: number of alphas in [0, 1]", int, check=lambda v: None if v >= 2 else "must be >= 2"),
)
MBQ = (  # arXiv 2412.19509 and its code; docs/methods.md §2.5
    Option("mbq_reweight", True, "MBQ: image tokens weighted by calib/'s sensitivity ratio r (off: all tokens 1)",
           flag="--no-mbq-reweight"),
    Option("mbq_loss", "mae", "MBQ's loss: absolute error (its configs) or squared", str, tuple(ecs.MBQ_LOSSES)),
    Option("mbq_language", "answer", "MBQ's language tokens: the answer's (its code) or those scoring it", str,
           ("answer", "scored")),
)


@dataclass(frozen=True)
class Method:
    """One quantization method. token_weights: fn(q, gamma, is_vis (n,), p (n,) | None, fusion (n,) | None) ->
    (n,) float64 weights >= 0 or None (all 1), for the n tokens reaching one linear (p: their router weight for
    its expert, None outside the routed experts; fusion: FAQ's weights). scales: fn(g: ecs.ScalingGroup, q) ->
    (s (d,) > 0, report dict); the loop folds 1/s into the group's producer and s into its readers."""

    name: str  # --method
    description: str
    solver: str = "gptq"  # "gptq" or "rtn"
    scales: Callable | None = None  # scale search run on every scaling group before quantizing; None: no scaling
    token_weights: Callable = hessian.plain_weights  # c_j of each token in the Hessians
    fusion: bool = False  # compute FAQ's fusion weights per layer (passed to token_weights and the scale search)
    needs_gamma: bool = False  # refuses a calib/ without γ (unless --gamma, --no-modality or --no-gamma)
    needs_macs: bool = False  # refuses a calib/ not selected by MACS (calibrate.py --select macs)
    needs_sensitivity: bool = False  # refuses a calib/ without MBQ's sensitivities (unless --no-mbq-reweight)
    options: tuple[Option, ...] = ()  # its knobs

    def __post_init__(self):
        if self.solver not in ("gptq", "rtn") or not callable(self.token_weights) or \
                (self.scales is not None and not callable(self.scales)):
            raise ValueError(f"method {self.name!r}: solver must be 'gptq' or 'rtn', token_weights a function and "
                             "scales a function or None (gptq.Method)")


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("veq-ma", "VEQ-MA: GPTQ with expert Hessians weighted by p^λ · α (§3.3)",
           token_weights=hessian.veq_ma_weights, needs_gamma=True, options=VEQ),
    Method("gptq", "GPTQ, every token weighing 1 (§2.2)"),
    Method("rtn", "round to nearest (§2.1)", solver="rtn"),
    Method("awq", "AWQ scales, then RTN (§2.3)", solver="rtn", scales=ecs.awq_search),
    Method("smoothquant", "SmoothQuant scales (α = 0.5), then RTN (§2.4)", solver="rtn",
           scales=ecs.smoothquant_search),
    Method("mbq", "MBQ: AWQ's search on image tokens weighted by r and answer tokens, then RTN (§2.5)",
           solver="rtn", scales=ecs.mbq_search, needs_sensitivity=True, options=MBQ),
    Method("smoothquant-gptq", "SmoothQuant scales, then GPTQ (§2.4)", scales=ecs.smoothquant_search),
    Method("veq-me", "VEQ-ME: AWQ with experts weighted by S_e, then RTN (§3.2)", solver="rtn",
           scales=ecs.veq_me_search, needs_gamma=True, options=VEQ),
    Method("veq", "VEQ-ME scales, then VEQ-MA GPTQ: not in the paper (§3.4)", scales=ecs.veq_me_search,
           token_weights=hessian.veq_ma_weights, needs_gamma=True, options=VEQ),
    Method("ecs", "ECS scales, then GPTQ (§4.1)", scales=ecs.ecs_search, options=ECS),
    Method("ecs-faq", "ECS with FAQ token weights, then FAQ-weighted GPTQ (§4.1, §4.2)", scales=ecs.ecs_search,
           token_weights=hessian.faq_weights, fusion=True, options=FAQ + ECS),
    Method("ecmfq", "ECMFQ: ecs-faq on a MACS-selected calib/ (§4.4)", scales=ecs.ecs_search,
           token_weights=hessian.faq_weights, fusion=True, needs_macs=True, options=FAQ + ECS),
)}


def register(method: Method) -> Method:
    """Add a method at run time (a fork's script, a test); its name must be new."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} exists already; pick another name")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The record of a method name; an unknown name is an error."""
    if name not in METHODS:
        raise ValueError(f"--method {name!r}: unknown; expected one of {', '.join(METHODS)} (or register() it)")
    return METHODS[name]


def all_options() -> dict[str, Option]:
    """Every method's options by name, in table order (methods share VEQ's, FAQ's, ECS's)."""
    return {o.name: o for m in METHODS.values() for o in m.options}


@dataclass
class Settings:
    """What decides the quantized weights (report.json's `args`): the settings every method shares, and the
    methods' own options by name (every declared option, at its default unless set)."""

    method: str = "veq-ma"
    bits: int = 3
    group_size: int = 128
    sym: bool = False
    abits: int = 16  # 8: per-token int8 activations (W4A8)
    act_order: bool = True  # GPTQ columns by descending H_jj (llm-compressor's default `actorder: static`)
    static_groups: bool = True  # group params from W before the sweep (needed with act_order: no g_idx)
    block_size: int = 128
    percdamp: float = 0.01
    clip: bool = False  # MSE-clipped group ranges (quant/grid.py's clip_search; the GPTQ reference's mse=True)
    min_expert_tokens: int = 1  # experts with fewer routed tokens are quantized from the pooled MoE Hessian
    all_experts_hessian: bool = False  # every expert from the pooled Hessian: all MoE tokens (llm-compressor's)
    batched_experts: bool = False  # solve all experts of a layer as one batched GPTQ problem
    quantize_vision: bool = False  # also quantize the vision tower's / projector's linears
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        declared = all_options()
        unknown = sorted(set(self.options) - set(declared))
        if unknown:
            raise ValueError(f"options {unknown}: no method declares them; known: {', '.join(declared)}")
        self.options = {k: self.options.get(k, o.default) for k, o in declared.items()}

    @classmethod
    def of(cls, **kw) -> "Settings":
        """Settings from flat keywords, the shared settings and any method's options alike (as `args()` writes
        them): Settings.of(method="veq-ma", bits=4, lam=0.5)."""
        shared = {f.name for f in fields(cls)} - {"options"}
        return cls(**{k: v for k, v in kw.items() if k in shared},
                   options={k: v for k, v in kw.items() if k not in shared})

    def args(self) -> dict:
        """The flat record written to report.json and the output config."""
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}, **self.options}

    def check(self):
        """Refuse an unknown method and out-of-range options before any work."""
        method = get_method(self.method)
        check_grid(self.bits, self.group_size, "--bits/--group-size")
        for name, o in all_options().items():
            v = self.options[name]
            why = None if o.choices is None or v in o.choices else f"expected one of {o.choices}"
            why = why or (o.check(v) if o.check else None)
            if why:
                raise ValueError(f"{o.cli} {v!r}: {why}")
        return method


# ----------------------------------------------------------------------------------------------------------
# (3) The layer loop


def quantize_model(model: str, calib: str = "calib", out: str = "quantized", q: Settings | None = None,
                   resume: bool = False, device: str = "cpu", command: str | None = None,
                   overwrite: bool = False, dtype: torch.dtype = torch.float32,
                   group: distributed.Group | None = None, timer: Callable = no_timer, vllm: str | None = None) -> dict:
    """Quantize `model` with calib/'s samples into `out` (written to out.partial/ layer by layer, then renamed;
    refused before any work unless out is empty or a previous output). Returns the run report (out/report.json).
    device, dtype: where the layers run and their weights' dtype (bfloat16 on a GPU); Hessians accumulate in
    float64 and the solvers run in float32 either way. group: several processes (distributed.init), the samples
    split across them and each layer's linears solved across them; rank 0 alone writes. None: one process.
    vllm: a quant/servable.py target (--vllm) that must load the output, else a ValueError before any work."""
    q = q or Settings()
    method = q.check()
    served = servable.check(model_lib.load_config(model), q.args(), vllm)  # report.json's `vllm`
    model_lib.resolve_device(device)  # before any work: a device this machine lacks is an error naming --device
    group = distributed.check_group(group, device)
    group.log("\n".join(servable.summary(served)))
    t0 = time.time()
    inputs = [model, calib]
    partial = Partial(out, inputs, resume, overwrite, command, group)
    cal = CalibSet.load(calib)
    gamma = check_calib(cal, calib, model, q, method, group)  # VEQ's γ, and a calib/ the method can use
    group, samples = group.take(cal.samples)  # this rank's share (every sample in one process)
    m = model_lib.load_model(model, dtype=dtype, device=device, lazy_layers=True)
    solve = solver(q, method)
    report = {"method": q.method, "bits": q.bits, "group_size": q.group_size, "abits": q.abits, "sym": q.sym,
              "model": model, "calib": calib, "gamma": gamma, "n_samples": len(cal.samples), "seed": cal.seed,
              "command": command or " ".join(sys.argv), "args": q.args(), "vllm": served,
              "vision": quantize_vision_tower(m, samples, q, solver(q, method, act_order=False), group)
              if q.quantize_vision else None,
              "layers": {}}
    acts = embed(m, samples, device)  # the decoder's inputs of every sample
    partial.start()
    for i in range(len(m.layers)):
        if partial.done(i):  # --resume: this layer was finished by an earlier run
            report["layers"][str(i)] = partial.restore(m, i, q)
        else:
            rep = quantize_layer(m, i, acts, cal, q, method, gamma, solve, group, timer)
            report["layers"][str(i)] = partial.save(m, i, rep)
        with timer("forward"):
            acts = run_layer(m, i, acts)  # the quantized layer's outputs: the next layer's inputs
        m.unload_layer(i)
    return finish(m, model, out, q, method, partial, report, inputs, overwrite, t0, group)


def quantize_layer(m, i: int, acts: list, cal: CalibSet, q: Settings, method: Method, gamma, solve: Callable,
                   group: distributed.Group, timer: Callable) -> dict:
    """Decoder layer i, in place: load it, [FAQ's fusion weights, the scale search folded in], the token-weighted
    Hessians of its linears on its float inputs `acts`, then every linear solved and packed. Returns its report."""
    with timer("load"):
        layer = m.load_layer(i)
    with timer("fusion"):
        fusion = layer_fusion_weights(layer, acts, q.options["eta"], group) if method.fusion else None
    with timer("scales"):
        scales = search_and_fold(layer, m.scaling_groups(i), acts, q, method, cal.layer_counts(i), gamma, fusion,
                                 group, ecs.mbq_ratios(cal.mbq, i, q.options["mbq_language"])) if method.scales else {}
    with timer("capture"):
        cap = capture_hessians(layer, acts, method, q, gamma, fusion, group, timer)
    linears = quantize_linears(layer, cap, q, method, solve, m.layer_prefix(i), group, timer)
    return {"linears": linears, "scales": scales, "hessian_gflop": cap.flop / 1e9}


def check_calib(cal: CalibSet, calib: str, model: str, q: Settings, method: Method, group) -> float | None:
    """VEQ's text weight γ (--gamma, or calib/'s: the paper's gradient ratio or the scale-free one); refuses a
    calib/ the method cannot use, before any work."""
    o = q.options
    gamma = o["gamma"] if o["gamma"] is not None else \
        {"grad": cal.gamma, "grad_x_input": cal.gamma_grad_x_input}[o["gamma_source"]]
    if method.needs_gamma and gamma is None and (o["modality"] and o["use_gamma"]):
        raise ValueError(f"{calib}/calib.json has no gamma (calibrate.py --no-gamma?); pass --gamma or --no-modality")
    if method.needs_sensitivity and o["mbq_reweight"] and cal.mbq is None:
        raise ValueError(f"{calib}/calib.json has no MBQ sensitivities (calibrate.py --no-gamma, or an older "
                         "calibrate.py): re-run `python calibrate.py`, or pass --no-mbq-reweight")
    if method.needs_macs and cal.selection != "macs":
        raise ValueError(f"--method {q.method} quantizes on a MACS-selected calibration set, but {calib}/ was "
                         f"selected by {cal.selection!r}: run `python calibrate.py --select macs --out {calib}` "
                         "first, or use a method without MACS (ecs-faq: ecmfq's quantizer on any calib/)")
    if os.path.abspath(cal.model) != os.path.abspath(model):
        group.log(f"note: {calib}/ was made with --model {cal.model}, quantizing {model}", file=sys.stderr)
    return gamma


def solver(q: Settings, method: Method, act_order: bool = True) -> Callable:
    """solve(Ws, H, name) -> one Quantized per matrix of Ws (which read the same input): GPTQ from H, or RTN.
    act_order=False: the original column order with dynamic groups whatever q says (the vision tower's)."""
    if method.solver == "rtn":
        return lambda Ws, H, name: [rtn(W, bits=q.bits, group_size=q.group_size, sym=q.sym, clip=q.clip) for W in Ws]
    order = dict(act_order=q.act_order, static_groups=q.static_groups) if act_order else {}
    return lambda Ws, H, name: gptq_shared(Ws, H, bits=q.bits, group_size=q.group_size, sym=q.sym,
                                           block_size=q.block_size, percdamp=q.percdamp, clip=q.clip, name=name,
                                           **order)


def embed(m, samples: list[dict], device) -> list[hessian.LayerInput]:
    """The decoder inputs of every calibration sample (prompt + gold answer, teacher forced, batch 1)."""
    out = []
    with torch.no_grad():
        for s in samples:
            vision = {k: v.to(device) for k, v in vision_inputs(s).items()}
            x, ctx = m.embed(s["input_ids"].to(device), **vision)
            out.append(hessian.LayerInput(x, ctx, s["is_vis"][0].to(device), s["labels"][0].to(device) != -100))
    return out


def capture_hessians(layer, acts, method: Method, q: Settings, gamma, fusion, group, timer) -> LayerCapture:
    """Run the float layer on every sample with hooks on its linears: one token-weighted Hessian per input,
    an expert's from its routed tokens only, with c_j = the method's token_weights (hessian.LayerCapture)."""
    if fusion is not None:  # fusion covers every sample: this rank's j-th is global_index(j)
        fusion = [fusion[group.global_index(j)] for j in range(len(acts))]
    cap = LayerCapture(layer, lambda is_vis, p, fus: method.token_weights(q, gamma or 1.0, is_vis, p, fus), timer)
    try:
        with torch.no_grad():
            for b in range(0, len(acts), distributed.SAMPLE_BLOCK):  # a block: the same samples on any rank count
                cap.run_block(layer, acts[b:b + distributed.SAMPLE_BLOCK],
                              None if fusion is None else fusion[b:b + distributed.SAMPLE_BLOCK])
    finally:
        cap.remove()
    return cap


def quantize_linears(layer, cap: LayerCapture, q: Settings, method: Method, solve: Callable, prefix: str,
                     group: distributed.Group, timer: Callable = no_timer) -> dict:
    """Solve every linear of the layer from its Hessian, swap it for a packed QuantLinear, and return the
    per-linear report. An expert with fewer than --min-expert-tokens routed tokens (every expert with
    --all-experts-hessian) is solved from the pooled Hessian of all tokens entering its MoE block."""
    distributed.reduce_capture(group, layer, cap)  # several processes: each Hessian summed on the rank solving it
    starved = cap.starved(q.min_expert_tokens, q.all_experts_hessian, prefix)
    inputs = distributed.own_inputs(group, cap, starved)  # this rank's share of the inputs (all in one process)
    with timer("finalize"):
        H = {k: cap.final_hessian(layer, k, starved[k]) for k in inputs}
    cap.release_moe_inputs()
    results = {}
    with timer("solve"):
        if q.batched_experts and method.solver == "gptq":
            results = solve_batched(layer, [inp for inp in inputs.values() if inp.expert is not None], H, q, prefix)
        for key, inp in inputs.items():
            if key not in results:
                results[key] = solve([layer.get_submodule(n).weight.float() for n in inp.readers], H[key], prefix + key)
    report = {}
    for key, inp in inputs.items():
        n_text, n_vis = cap.tokens.get(key, (0, 0))
        for name, r in zip(inp.readers, results.pop(key)):  # each result (with its W_hat) freed once packed
            lin = layer.get_submodule(name)
            with timer("error"):
                err = relative_output_error(lin.weight.float(), r.W_hat, H[key])
            with timer("pack"):
                ql = QuantLinear.from_codes(r.codes, r.scale, r.zero, bits=q.bits, group_size=q.group_size,
                                            sym=q.sym, abits=q.abits if q.abits < 16 else None)
                layer.set_submodule(name, ql.to(lin.weight.device))
            report[name] = {"tokens_text": n_text, "tokens_vis": n_vis, "pooled_hessian": starved[key],
                            "damp": r.damp, "cholesky_retries": r.retries, "rel_error": err}
    with timer("share"):  # several processes: every rank gets the others' packed linears and report entries
        return distributed.share_layer(group, layer, cap.structure, report, lambda lin: QuantLinear(
            lin.in_features, lin.out_features, bits=q.bits, group_size=q.group_size, sym=q.sym,
            abits=q.abits if q.abits < 16 else None))


def run_layer(m, i: int, samples: list) -> list:
    """Layer i's outputs (+ DeepStack injection) for every sample, SAMPLE_BLOCK samples per forward_many."""
    layer, out = m.layers[i], []
    with torch.no_grad(), dequantize_once(layer):
        for b in range(0, len(samples), distributed.SAMPLE_BLOCK):
            block = samples[b:b + distributed.SAMPLE_BLOCK]
            ys = layer.forward_many([s.x for s in block], [s.ctx for s in block])
            out += [hessian.LayerInput(m.after_layer(i, y, s.ctx), s.ctx, s.is_vis, s.is_answer)
                    for y, s in zip(ys, block)]
    return out


def finish(m, model, out, q, method, partial, report, inputs, overwrite, t0, group) -> dict:
    """The run's totals into the report; rank 0 assembles out/ from the finished layers (quant/folders.py)."""
    report["seconds"] = time.time() - t0
    report["pooled_hessian_linears"] = [f"{i}:{k}" for i, rep in report["layers"].items()
                                        for k, r in rep["linears"].items() if r["pooled_hessian"]]
    report["cholesky_retries"] = sum(r["cholesky_retries"] for rep in report["layers"].values()
                                     for r in rep["linears"].values())
    if group.rank == 0:
        write_output(m, model, out, q.args(), method.solver, partial.path, report, inputs, overwrite)
    distributed.barrier(group)  # every rank returns once OUT/ is in place
    how = "error measured on" if method.solver == "rtn" else "quantized from"
    which = ("with --all-experts-hessian" if q.all_experts_hessian
             else f"with < {q.min_expert_tokens} calibration tokens")
    group.log(f"wrote {out}/ ({q.method}, W{q.bits} g{q.group_size} A{q.abits}) in {report['seconds']:.1f}s; "
              f"{len(report['pooled_hessian_linears'])} expert linears {which} ({how} the layer's pooled MoE "
              f"Hessian), {report['cholesky_retries']} Cholesky retries")
    return report


# ----------------------------------------------------------------------------------------------------------
# (4) The command line


def main(argv=None):
    listing = "; ".join(f"{m.name}: {m.description}" for m in METHODS.values())
    p = argparse.ArgumentParser(description="Quantize an MoE VLM layer by layer (gptq.py).",
                                epilog=f"methods (§: docs/methods.md): {listing}")
    p.add_argument("--model", default=model_lib.DEFAULT_MODEL, help="float checkpoint folder")
    p.add_argument("--calib", default="calib", help="calibration folder written by calibrate.py")
    p.add_argument("--out", default="quantized",
                   help="output checkpoint folder (replaced only if it is a previous output of gptq.py or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and OUT.partial/, OUT/fake-quant/) "
                   "even if not written by this tool; the model and calib folders are never replaced")
    p.add_argument("--method", default="veq-ma", choices=list(METHODS), help="quantization method")
    p.add_argument("--bits", type=int, default=3, choices=BITS, help="weight bits")
    p.add_argument("--group-size", type=int, default=128, help="input columns per scale group; -1 = per channel")
    p.add_argument("--sym", action="store_true", help="symmetric weights (no zero point)")
    p.add_argument("--abits", type=int, default=16, choices=(8, 16), help="8: per-token int8 activations (W4A8)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True, help="GPTQ columns by "
                   "descending H_jj, with static groups (the default; --no-act-order: the original column order "
                   "with group params computed as the sweep reaches each group)")
    p.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=None,
                   help="group params from W before the sweep (default: with --act-order only)")
    p.add_argument("--percdamp", type=float, default=0.01, help="GPTQ damping, fraction of mean(diag H)")
    p.add_argument("--clip", action="store_true", help="MSE-clipped group ranges (GPTQ reference's mse=True)")
    p.add_argument("--min-expert-tokens", type=int, default=1,
                   help="experts with fewer routed calibration tokens use the layer's pooled MoE Hessian")
    p.add_argument("--all-experts-hessian", action="store_true", help="every expert's Hessian from every token "
                   "entering its MoE block, routed or not (as llm-compressor's MoE calibration; token weights off); "
                   "costs E/top-k times the routed Hessian and expert-forward work of the capture")
    p.add_argument("--quantize-vision", action="store_true",
                   help="also quantize the vision tower's and projector's linears (patch embedding stays float)")
    p.add_argument("--batched-experts", action="store_true",
                   help="GPTQ all experts of a layer as one batched problem (same result up to rounding ties)")
    for o in all_options().values():  # the methods' own knobs
        if o.type is None:
            p.add_argument(o.cli, dest=o.name, action="store_false" if o.default else "store_true", help=o.help)
        else:
            p.add_argument(o.cli, dest=o.name, type=o.type, default=o.default, choices=o.choices, help=o.help)
    p.add_argument("--vllm", nargs="?", const="cuda-tp1", choices=servable.TARGETS,
                   help="refuse before any work what vLLM could not run there (quant/servable.py; default cuda-tp1)")
    p.add_argument("--fake-quant", action="store_true",
                   help="also write OUT/fake-quant/: dequantized weights in the original float layout")
    p.add_argument("--resume", action="store_true", help="continue from the last finished layer in OUT.partial/")
    p.add_argument("--no-eval", action="store_true", help="skip the closing comparison with the float model")
    p.add_argument("--eval-n", type=int, default=200, help="held-out samples for the closing comparison")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N (an error if absent)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the layers' weights and "
                   "activations (bfloat16 on a GPU: half the memory); Hessians accumulate in float64, solve in float32")
    a = p.parse_args(argv)
    flat = {k: v for k, v in vars(a).items() if k in Settings().args() and k != "static_groups"}
    q = Settings.of(**flat, static_groups=a.act_order if a.static_groups is None else a.static_groups)
    command = "python gptq.py " + " ".join(argv if argv is not None else sys.argv[1:])
    dtype = getattr(torch, a.dtype)
    group = distributed.init(a.device)  # under torchrun: this rank of WORLD_SIZE processes; else one process
    try:
        report = quantize_model(a.model, a.calib, a.out, q, resume=a.resume, device=group.device, command=command,
                                overwrite=a.overwrite, dtype=dtype, group=group, vllm=a.vllm)
    finally:
        distributed.close(group)
    if group.rank != 0:  # rank 0 alone exports and evaluates the output
        return report
    if a.fake_quant:
        export_fake_quant(a.out, os.path.join(a.out, "fake-quant"), [a.model, a.calib], a.overwrite)
        print(f"wrote {a.out}/fake-quant/ (dequantized weights, original layout)")
    if CalibSet.read_json(a.calib)["data"] in SHAPES_SPECS and not a.no_eval:  # the bundled benchmark: compare
        result = evaluation.evaluate(a.out, reference=a.model, n=a.eval_n, device=a.device, dtype=dtype,
                                     command=command)
        print(evaluation.markdown(result))
    return report


if __name__ == "__main__":
    main()
