"""Weight quantization of one linear layer: the quantizer grid, round-to-nearest (RTN) and the GPTQ solver; and,
last, the command line `python gptq.py`, which runs the layer-by-layer driver (layerwise.py) on a model.

GPTQ: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (arXiv 2210.17323), following the IST-DASLab reference `gptq.py` (`fasterquant`).
Symbols as there: W (out, in) the weight, H (in, in) the Hessian of the layer's inputs (hessian.py),
Hinv the upper Cholesky factor of H⁻¹, Q the quantized columns, Err the scaled errors of one block.
Quantizing column j to q adds error (w - q); GPTQ compensates by moving the not-yet-quantized columns k > j
by -(w - q) / Hinv_jj · Hinv_jk (the optimal update of Optimal Brain Surgeon, with H⁻¹ kept in Cholesky form).
Blocks of `block_size` columns get these updates immediately; later columns get them in one matmul per block.

Quantizer grid (the reference's and compressed-tensors'):
  codes are unsigned integers in [0, 2^bits - 1]; Ŵ = scale · (code - zero), one (scale, zero) per output row
  and group of `group_size` consecutive input columns (-1: one group spanning the row, "per channel").
  asymmetric: the range [min(w, 0), max(w, 0)] is cut into 2^bits - 1 steps, zero = round(-min / scale);
  symmetric:  scale = max|w| / ((2^bits - 1) / 2), zero = 2^(bits-1) fixed (not stored).
  compressed-tensors stores signed codes (code - 2^(bits-1)) and adds the offset back when packing, so the
  packed int32 words are identical (packing itself lives with the runtime: model.pack_int32).

Deliberate differences from the reference code, each for correctness or honest reporting:
  * dynamic group parameters are computed from the group's columns as they are at that moment (including the
    block's pending lazy updates); the reference reads stale columns when group_size < block_size. With the
    defaults (group_size == block_size == 128) both are the same.
  * symmetric range is always [-max|w|, max|w|] (the reference clips rows without negative weights).
  * a failed Cholesky retries with 10x the damping, at most `max_retries` times, counted in the result; if all
    fail, GPTQError. Never an identity Hessian.
  * act_order with groups requires static_groups: the output format has no g_idx, so groups must stay
    contiguous in the original column order.
Does not: capture activations or build Hessians (hessian.py), search scales (ecs.py), search clipping ranges,
choose a method (methods.py) or walk a model (layerwise.py). Imports only torch at module level: the CLI
imports the driver when it runs.

The same GPTQ for all experts of an MoE layer at once, as one batched problem, is gptq_batched.py; gptq() here
stays the reference.

Run the tests:  python -m pytest -q tests/test_gptq.py tests/test_gptq_batched.py
Solver speed:   OMP_NUM_THREADS=1 python bench/gptq_solver.py --experts 16 --reference-experts 2
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

BITS = (2, 3, 4, 8)  # supported weight widths
DAMP_ESCALATION = 10.0  # each Cholesky retry multiplies the damping by this


class GPTQError(RuntimeError):
    """The damped Hessian could not be Cholesky-factorized at any damping tried. The message names the
    matrix, its shape and the dampings."""


# ----------------------------------------------------------------------------------------------------------
# Quantizer grid


def n_groups(in_features: int, group_size: int) -> int:
    """Number of column groups per row; a last partial group is allowed (ceil)."""
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def _group_len(in_features: int, group_size: int) -> int:
    return in_features if group_size == -1 else group_size


def _expand(t: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """Per-group (out, n_groups) -> per-column (out, in)."""
    return t.repeat_interleave(_group_len(in_features, group_size), dim=1)[:, :in_features]


def _check_grid(bits: int, group_size: int, name: str):
    if bits not in BITS:
        raise ValueError(f"{name}: bits={bits} is not supported; use one of {BITS}")
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"{name}: group_size={group_size}; use a positive group size or -1 (per output channel)")


def quant_params(W: torch.Tensor, *, bits: int, sym: bool, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """scale, zero (out,) for one group of columns W (out, g) (or (..., g) -> (...); the group along `dim`).
    zero is integer-valued (float tensor)."""
    maxq = 2**bits - 1
    lo, hi = W.amin(dim=dim), W.amax(dim=dim)
    zeros = torch.zeros_like(lo)
    xmin = torch.minimum(lo, zeros)  # the range always contains 0, so zero lands in [0, maxq]
    xmax = torch.maximum(hi, zeros)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = xmax == xmin  # an all-zero row: any scale works; the reference uses [-1, 1]
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, 2 ** (bits - 1)) if sym else torch.round(-xmin / scale)
    return scale, zero


def group_params(W: torch.Tensor, *, bits: int, group_size: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """scale, zero (out, n_groups) for W (out, in), groups of `group_size` consecutive columns (-1: one)."""
    params = [quant_params(Wg, bits=bits, sym=sym) for Wg in W.split(_group_len(W.shape[1], group_size), dim=1)]
    return torch.stack([s for s, _ in params], 1), torch.stack([z for _, z in params], 1)


def quantize(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *, bits: int, group_size: int):
    """Integer codes (out, in) uint8 in [0, 2^bits - 1]: clamp(round(W / scale) + zero)."""
    s, z = _expand(scale, W.shape[1], group_size), _expand(zero.to(scale.dtype), W.shape[1], group_size)
    return torch.clamp(torch.round(W / s) + z, 0, 2**bits - 1).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, *, bits: int,
               group_size: int) -> torch.Tensor:
    """Ŵ = scale · (codes - zero), in scale's dtype; zero None means symmetric (zero = 2^(bits-1))."""
    in_features = codes.shape[1]
    z = 2 ** (bits - 1) if zero is None else _expand(zero.to(scale.dtype), in_features, group_size)
    return (codes.to(scale.dtype) - z) * _expand(scale, in_features, group_size)


class Quantized(NamedTuple):
    codes: torch.Tensor  # (out, in) uint8
    scale: torch.Tensor  # (out, n_groups)
    zero: torch.Tensor | None  # (out, n_groups) uint8; None when symmetric
    W_hat: torch.Tensor  # (out, in) dequantized


def _compute_dtype(W: torch.Tensor) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 else torch.float32


@torch.no_grad()
def rtn(W: torch.Tensor, *, bits: int, group_size: int = 128, sym: bool = False) -> Quantized:
    """Round-to-nearest with min/max (or symmetric max-abs) group parameters. W (out, in), any float dtype;
    computed in float32 (float64 if W is)."""
    _check_grid(bits, group_size, "rtn")
    W = W.detach().to(_compute_dtype(W))
    scale, zero = group_params(W, bits=bits, group_size=group_size, sym=sym)
    codes = quantize(W, scale, zero, bits=bits, group_size=group_size)
    zero_out = None if sym else zero.to(torch.uint8)
    return Quantized(codes, scale, zero_out, dequantize(codes, scale, zero_out, bits=bits, group_size=group_size))


# ----------------------------------------------------------------------------------------------------------
# GPTQ for one matrix


@dataclass
class GPTQResult:
    codes: torch.Tensor  # (out, in) uint8 in [0, 2^bits - 1], original column order
    scale: torch.Tensor  # (out, n_groups) float32 (float64 if W was)
    zero: torch.Tensor | None  # (out, n_groups) uint8; None when symmetric (implicit 2^(bits-1))
    W_hat: torch.Tensor  # (out, in) = dequantize(codes, scale, zero): dead columns are 0
    damp: float  # absolute value added to diag(H): percdamp · mean(diag H) · 10^retries
    retries: int  # Cholesky failures before success (each escalated the damping 10x)
    row_loss: torch.Tensor  # (out,) GPTQ's objective per row: Σ_j (w_j - q_j)² / Hinv_jj² / 2
    n_dead: int  # input columns with H_jj == 0 (no input ever reached them)

    @property
    def loss(self) -> float:
        return float(self.row_loss.sum())


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
                     sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
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
                scale[:, j // dynamic_g], zero[:, j // dynamic_g] = quant_params(cols, bits=bits, sym=sym)
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
    _check_grid(bits, group_size, name)
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
         max_retries: int = 3, name: str = "weight") -> GPTQResult:
    """GPTQ-quantize W (out, in) given the Hessian H (in, in) of its inputs (any positive scale, e.g.
    hessian.Hessian.finalize()). Computes in float32 (float64 if W is); the Cholesky runs in H's dtype.
    act_order: quantize columns by descending H_jj. static_groups: group params from W before any update.
    name: used in error messages (pass the tensor's checkpoint name)."""
    _check_gptq_args(W, H, bits, group_size, block_size, percdamp, act_order, static_groups, name)
    dtype = _compute_dtype(W)
    in_f = W.shape[1]
    W = W.detach().to(dtype).clone()  # (out, in), updated in place by the sweep
    H = H.detach().clone()  # (in, in)
    dead = torch.diagonal(H) == 0  # (in,) channels no token reached: nothing to preserve there
    H[dead, dead] = 1
    W[:, dead] = 0
    g = _group_len(in_f, group_size)
    dynamic = group_size != -1 and not static_groups
    if dynamic:  # filled group by group during the sweep
        scale = torch.empty(W.shape[0], n_groups(in_f, group_size), dtype=dtype, device=W.device)
        zero = torch.empty_like(scale)
    else:  # per-channel, or static groups: computed up front on the un-permuted W
        scale, zero = group_params(W, bits=bits, group_size=group_size, sym=sym)
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order \
        else torch.arange(in_f, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv, damp, retries = damped_inverse_cholesky(H, percdamp=percdamp, max_retries=max_retries, name=name)
    codes, row_loss = _quantize_blocks(W, Hinv.to(dtype), scale, zero, (perm // g).tolist(), bits=bits,
                                       block_size=block_size, dynamic_g=g if dynamic else 0, sym=sym)
    codes = codes[:, torch.argsort(perm)]  # back to the original column order
    zero_out = None if sym else zero.to(torch.uint8)
    return GPTQResult(codes=codes, scale=scale, zero=zero_out,
                      W_hat=dequantize(codes, scale, zero_out, bits=bits, group_size=group_size),
                      damp=damp, retries=retries, row_loss=row_loss, n_dead=int(dead.sum()))


@torch.no_grad()
def gptq_shared(Ws: Sequence[torch.Tensor], H: torch.Tensor, **kwargs) -> list[GPTQResult]:
    """GPTQ of several matrices that read the same inputs (an expert's gate_proj and up_proj), sharing one
    Hessian, one damping and one Cholesky. GPTQ treats rows independently, so this equals quantizing each
    matrix on its own. kwargs as for gptq()."""
    return _split_rows(gptq(torch.cat(list(Ws), dim=0), H, **kwargs), [W.shape[0] for W in Ws])


def _split_rows(r: GPTQResult, sizes: Sequence[int]) -> list[GPTQResult]:
    """One GPTQResult of row-concatenated matrices -> one result per matrix (`sizes` rows each)."""
    zeros = r.zero.split(sizes) if r.zero is not None else [None] * len(sizes)
    return [GPTQResult(codes=c, scale=s, zero=z, W_hat=w, damp=r.damp, retries=r.retries, row_loss=l,
                       n_dead=r.n_dead)
            for c, s, z, w, l in zip(r.codes.split(sizes), r.scale.split(sizes), zeros, r.W_hat.split(sizes),
                                     r.row_loss.split(sizes))]


@torch.no_grad()
def relative_output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ). With H ∝ Σ x xᵀ this is ||(W - Ŵ) X||² / ||W X||²: the layer's relative
    output error on the calibration tokens, without the tokens. In H's dtype (float32 in the driver: a reported
    figure, good to ~1e-6 relative; float64 would double the time of the two (out, in, in) matmuls, which at
    real width took about a quarter of a 128-expert layer's quantization time)."""
    dtype = torch.float64 if H.dtype == torch.float64 else torch.float32
    W, H = W.to(dtype), H.to(dtype)
    dW = W - W_hat.to(dtype)
    return float(((dW @ H) * dW).sum(dtype=torch.float64) / ((W @ H) * W).sum(dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------------
# The command line: python gptq.py --bits 3 (VEQ-MA on the bundled tiny model and calib/; README "Quick start")
#
#   python gptq.py --method gptq --bits 4 --group-size 32 --model DIR --calib calib/ --out quantized/
#   torchrun --nproc-per-node N gptq.py ...   (the same flags; samples and solves split over N processes:
#                                              distributed.py, README "Several processes / GPUs")
#
# The methods are methods.METHODS; the loop is layerwise.quantize_model; the output export.py's.


def main(argv=None):
    import argparse
    import os
    import sys

    import calibrate
    import data
    import distributed
    import export
    import layerwise
    import methods

    listing = "; ".join(f"{m.name}: {m.description}" for m in methods.METHODS.values())
    p = argparse.ArgumentParser(description="Quantize an MoE VLM layer by layer (layerwise.py).",
                                epilog=f"methods (§: docs/methods.md): {listing}")
    p.add_argument("--model", default=calibrate.DEFAULT_MODEL, help="float checkpoint folder")
    p.add_argument("--calib", default="calib", help="calibration folder written by calibrate.py")
    p.add_argument("--out", default="quantized",
                   help="output checkpoint folder (replaced only if it is a previous output of gptq.py or empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out (and OUT.partial/, OUT/fake-quant/) even if not written by this tool; "
                        "the model and calib folders are never replaced")
    p.add_argument("--method", default="veq-ma", choices=list(methods.METHODS), help="quantization method")
    p.add_argument("--bits", type=int, default=3, choices=BITS, help="weight bits")
    p.add_argument("--group-size", type=int, default=128, help="input columns per scale group; -1 = per channel")
    p.add_argument("--sym", action="store_true", help="symmetric weights (no zero point)")
    p.add_argument("--abits", type=int, default=16, choices=(8, 16), help="8: per-token int8 activations (W4A8)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ columns by descending H_jj, with static groups (the default; --no-act-order: the "
                        "original column order with group params computed as the sweep reaches each group)")
    p.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=None,
                   help="group params from W before the sweep (default: with --act-order only)")
    p.add_argument("--percdamp", type=float, default=0.01, help="GPTQ damping, fraction of mean(diag H)")
    p.add_argument("--min-expert-tokens", type=int, default=1,
                   help="experts with fewer routed calibration tokens use the layer's pooled MoE Hessian")
    p.add_argument("--all-experts-hessian", action="store_true",
                   help="every expert's Hessian from every token entering its MoE block, routed or not (as "
                        "llm-compressor's MoE calibration; token weights off); costs E/top-k times the routed "
                        "Hessian and expert-forward work of the capture")
    p.add_argument("--quantize-vision", action="store_true",
                   help="also quantize the vision tower's and projector's linears (patch embedding stays float)")
    p.add_argument("--batched-experts", action="store_true",
                   help="GPTQ all experts of a layer as one batched problem (same result up to rounding ties)")
    p.add_argument("--lam", type=float, default=1.0, help="VEQ-MA: exponent on the router probability")
    p.add_argument("--gamma", type=float, default=None, help="VEQ-MA: text-token weight (default: calib/'s gamma)")
    p.add_argument("--gamma-source", default="grad", choices=("grad", "grad_x_input"),
                   help="calib/'s gamma: the paper's mean |dL/dx| ratio, or the scale-free |x * dL/dx| ratio")
    p.add_argument("--no-gamma", action="store_true", help="VEQ-ME ablation: gamma = 1 in S_e")
    p.add_argument("--no-beta", action="store_true", help="VEQ-ME ablation: beta = 1 in S_e")
    p.add_argument("--no-affinity", action="store_true", help="VEQ-MA ablation: p = 1")
    p.add_argument("--no-modality", action="store_true", help="VEQ-MA ablation: alpha = 1")
    p.add_argument("--plain-dense", action="store_true", help="VEQ-MA: no modality weights outside the experts")
    p.add_argument("--eta", type=float, default=0.5, help="FAQ: w = (1 - eta) + eta * phi / mean(phi)")
    p.add_argument("--ecs-loss", default="trimmed", choices=methods.ECS_LOSSES,
                   help="ECS loss: MSE with the top 1%% token errors dropped, Huber, or plain MSE")
    p.add_argument("--ecs-omega", default="freq", choices=methods.ECS_OMEGAS,
                   help="ECS expert weights: routing frequency, mean router probability, or VEQ-ME's S_e")
    p.add_argument("--ecs-percentile", type=float, default=99.9, help="ECS: percentile of |X| for m_X")
    p.add_argument("--ecs-grid", type=int, default=21, help="ECS: number of alphas in [0, 1]")
    p.add_argument("--fake-quant", action="store_true",
                   help="also write OUT/fake-quant/: dequantized weights in the original float layout")
    p.add_argument("--resume", action="store_true", help="continue from the last finished layer in OUT.partial/")
    p.add_argument("--no-eval", action="store_true", help="skip the closing comparison with the float model")
    p.add_argument("--eval-n", type=int, default=200, help="held-out samples for the closing comparison")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N (an error if absent)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="the layers' weights and activations (bfloat16 on a GPU: half the memory); Hessians are "
                        "accumulated in float64 and solved in float32 either way")
    a = p.parse_args(argv)
    q = methods.QuantArgs(method=a.method, bits=a.bits, group_size=a.group_size, sym=a.sym, abits=a.abits,
                  act_order=a.act_order, percdamp=a.percdamp,
                  static_groups=a.act_order if a.static_groups is None else a.static_groups,
                  min_expert_tokens=a.min_expert_tokens, all_experts_hessian=a.all_experts_hessian, lam=a.lam,
                  gamma=a.gamma, affinity=not a.no_affinity,
                  modality=not a.no_modality, plain_dense=a.plain_dense, use_gamma=not a.no_gamma,
                  use_beta=not a.no_beta, gamma_source=a.gamma_source, batched_experts=a.batched_experts,
                  quantize_vision=a.quantize_vision, eta=a.eta, ecs_loss=a.ecs_loss, ecs_omega=a.ecs_omega,
                  ecs_percentile=a.ecs_percentile, ecs_grid=a.ecs_grid)
    command = "python gptq.py " + " ".join(argv if argv is not None else sys.argv[1:])
    dtype = getattr(torch, a.dtype)
    group = distributed.init(a.device)  # under torchrun: this rank of WORLD_SIZE processes; else one process
    try:
        report = layerwise.quantize_model(a.model, a.calib, a.out, q, resume=a.resume, device=group.device,
                                          command=command, overwrite=a.overwrite, dtype=dtype, group=group)
    finally:
        distributed.close(group)
    if group.rank != 0:  # rank 0 alone exports and evaluates the output
        return report
    if a.fake_quant:
        export.export_fake_quant(a.out, os.path.join(a.out, "fake-quant"), [a.model, a.calib], a.overwrite)
        print(f"wrote {a.out}/fake-quant/ (dequantized weights, original layout)")
    cal = calibrate.load(a.calib)
    if cal["data"] in data.SHAPES_SPECS and not a.no_eval:
        import eval as evaluation

        result = evaluation.evaluate(a.out, reference=a.model, n=a.eval_n, device=a.device, dtype=dtype,
                                     command=command)
        print(evaluation.markdown(result))
    return report


# Names that moved out of gptq.py when it was split, still reachable as gptq.X for bench/ and older scripts:
# imported from their new home on first use, so that `import gptq` itself stays torch-only.
_MOVED = {"gptq_batched": ("gptq_batched", "gptq_batched_shared", "CPU_EXPERT_CHUNK", "CHOL_BLOCK", "_block_edges",
                           "_sub_edges"),
          "methods": ("METHODS", "QuantArgs"),
          "layerwise": ("quantize_model",),
          "export": ("export_fake_quant",)}


def __getattr__(name: str):
    for module, names in _MOVED.items():
        if name in names:
            import importlib

            return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'gptq' has no attribute {name!r}")


if __name__ == "__main__":
    main()
