"""The quantization methods as data: one record (`Method`) per method, and the settings of a run (`QuantArgs`).

A method is three choices made per decoder layer by the driver (layerwise.py), plus what it needs from calib/:
  * scales: a per-channel scale search run on every scaling group of the layer before quantizing (AWQ,
    SmoothQuant, VEQ-ME, ECS; ecs.py holds their math), or None;
  * solver: "gptq" (from the token-weighted Hessians) or "rtn" (round to nearest; the Hessians then only measure
    the error that is reported);
  * token_weights: the weight c_j of each token in a linear's Hessian H = 2/Σc · Σ_j c_j x_j x_jᵀ (hessian.py):
    none (plain GPTQ), VEQ-MA's p_j^λ · α_j, or FAQ's fusion weights;
  * needs: calib/'s γ (`needs_gamma`), a MACS-selected calib/ (`needs_macs`), FAQ's per-layer fusion weights
    from the layer's attention (`fusion`: one extra float forward of each layer).
Formulas and choices: docs/methods.md (the section of each method is named in its description).

A new method is one record. In this file, add it to METHODS; from outside (a fork's script, a test), call
`register(Method(...))` before quantize_model / gptq.main. Its pieces are plain functions with these signatures:
  * token weights  fn(q: QuantArgs, gamma: float, is_vis (n,) bool, p (n,) | None, fusion (n,) | None)
                   -> (n,) float64 weights >= 0, or None for all 1. The n rows are the tokens reaching one linear;
                   p is the router weight of those tokens for the expert the linear belongs to (None outside the
                   routed experts); fusion their FAQ weights (None unless the method sets fusion=True);
  * scale search   fn(g: ScalingGroup, q: QuantArgs) -> (s (d,) > 0, report dict for report.json). The driver
                   folds 1/s into g.producer and s into every consumer and the router (layerwise.fold_group).
An unknown method name is an error (`get`).

Does not: run the model or read files (layerwise.py, calibrate.py), or solve (gptq.py, gptq_batched.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import ecs

ECS_LOSSES = ("trimmed", "huber", "mse")  # --ecs-loss: ecs.trimmed_squared_error(0.01), ecs.huber(0.1), MSE
ECS_OMEGAS = ("freq", "prob", "veq")  # --ecs-omega: see ecs_omega


@dataclass
class QuantArgs:
    """Everything that decides the quantized weights (written to report.json and the output config)."""

    method: str = "veq-ma"
    bits: int = 3
    group_size: int = 128
    sym: bool = False
    abits: int = 16
    act_order: bool = True  # GPTQ columns by descending H_jj (llm-compressor's default `actorder: static`)
    static_groups: bool = True  # group params from W before the sweep (needed with act_order: no g_idx)
    block_size: int = 128
    percdamp: float = 0.01
    min_expert_tokens: int = 1  # experts with fewer routed tokens are quantized from the pooled MoE Hessian
    all_experts_hessian: bool = False  # every expert from the pooled Hessian: all MoE tokens (llm-compressor's)
    batched_experts: bool = False  # solve all experts of a layer as one batched GPTQ problem
    quantize_vision: bool = False  # also quantize the vision tower's / projector's linears
    lam: float = 1.0  # VEQ-MA: exponent λ on the router probability p
    gamma: float | None = None  # VEQ: text weight γ (VEQ-MA's α on text tokens); None -> calib/'s gamma
    gamma_source: str = "grad"  # which calib/ gamma: "grad" (the paper's |dL/dx| ratio) or "grad_x_input"
    use_gamma: bool = True  # VEQ-ME ablation: γ = 1 in S_e
    use_beta: bool = True  # VEQ-ME ablation: β = 1 in S_e
    affinity: bool = True  # VEQ-MA: use p^λ (False: p = 1)
    modality: bool = True  # VEQ-MA: use α (False: α = 1)
    plain_dense: bool = False  # VEQ-MA: attention / shared / dense layers unweighted (default: weighted by α)
    eta: float = 0.5  # FAQ: w_j = (1 − η) + η φ_j / mean(φ)
    ecs_loss: str = "trimmed"  # ECS's ρ: "trimmed" (top 1% token errors dropped), "huber" or "mse"
    ecs_omega: str = "freq"  # ECS's ω_e: "freq" (routing frequency), "prob" (mean router prob), "veq" (S_e)
    ecs_percentile: float = 99.9  # ECS's m_X: this percentile of |X| per channel
    ecs_grid: int = 21  # ECS: α = 0, 1/(n−1), ..., 1


def check_args(q: QuantArgs):
    """Refuse an unknown method and out-of-range settings before any work."""
    get(q.method)
    if q.ecs_loss not in ECS_LOSSES or q.ecs_omega not in ECS_OMEGAS:
        raise ValueError(f"--ecs-loss {q.ecs_loss!r} / --ecs-omega {q.ecs_omega!r}: expected one of {ECS_LOSSES} "
                         f"and one of {ECS_OMEGAS}")
    if not 0 <= q.eta < 1 or not 0 < q.ecs_percentile <= 100 or q.ecs_grid < 2:
        raise ValueError(f"--eta {q.eta} must be in [0, 1), --ecs-percentile {q.ecs_percentile} in (0, 100], "
                         f"--ecs-grid {q.ecs_grid} >= 2")


# ----------------------------------------------------------------------------------------------------------
# Token weights: c_j of each token in a linear's Hessian (docs/methods.md §2.2, §3.3, §4.2)


def plain_weights(q: QuantArgs, gamma: float, is_vis, p=None, fusion=None):
    """GPTQ: every token weighs 1."""
    return None


def veq_ma_weights(q: QuantArgs, gamma: float, is_vis, p=None, fusion=None):
    """VEQ-MA (arXiv 2602.01037, eq. 7): c_j = p_j^λ · α_j on an expert's routed tokens, with p_j the router
    weight of that expert for token j and α_j = γ for text, 1 for image tokens; non-expert linears get α_j alone
    (or nothing with plain_dense)."""
    alpha = torch.where(is_vis, 1.0, gamma if q.modality else 1.0).double()
    if p is None:  # attention, shared expert, dense MLP
        return None if q.plain_dense else alpha
    affinity = p.double() ** q.lam if q.affinity else torch.ones_like(alpha)
    return affinity * alpha


def faq_weights(q: QuantArgs, gamma: float, is_vis, p=None, fusion=None):
    """FAQ (docs/methods.md §4.2): c_j = w_j · p_j on experts, w_j elsewhere, with w_j the fusion weight of the
    token (hessian.fusion_weights)."""
    return fusion.double() if p is None else fusion.double() * p.double()


# ----------------------------------------------------------------------------------------------------------
# Scale searches (docs/methods.md §1.4, §2.3, §2.4, §3.2, §4.1): what each one sees of a scaling group


@dataclass
class ScalingGroup:
    """One scaling group of a decoder layer as a scale search sees it (built by layerwise.search_and_fold from
    model.scaling_groups and model.layer_structure). Names are relative to the layer."""

    producer: str  # the norm (or linear) whose output is divided by s
    consumers: list[str]  # the linears reading it, multiplied by s along their input columns
    router: str | None  # the router reading it too (an MoE block's norm), kept float; None elsewhere
    attention: bool  # the consumers are attention linears
    X: torch.Tensor  # (n, d) float32 input of the group: every calibration token (an expert's down_proj: its own)
    readers: list[ecs.Consumer]  # one per reader: an expert's gate_proj and up_proj stacked; rows = routed tokens
    experts: list[int | None]  # the routed expert of each reader (None: shared expert, dense MLP, attention)
    topk: torch.Tensor | None  # (n, k) the experts chosen for every token (MoE groups), else None
    token_weights: torch.Tensor | None  # (n,) FAQ's fusion weights of X's rows (methods with fusion), else None
    importance: list[float] | None  # VEQ-ME's S_e per reader (MoE groups, from calib/), else None
    mean_prob: torch.Tensor | None  # (E,) the layer's mean router probability per expert (calib/), else None


def _search_report(r: ecs.ScaleResult) -> dict:
    return {"alpha": r.alpha, "rel_error": r.rel_error, "rel_error_no_scale": r.rel_error_no_scale}


def awq_search(g: ScalingGroup, q: QuantArgs):
    """AWQ: s = x̄^α / sqrt(max x̄ · min x̄), α on a grid of 20, the least output error of the consumers
    (ecs.awq_scale)."""
    r = ecs.awq_scale(g.X, g.readers, bits=q.bits, group_size=q.group_size, sym=q.sym, abits=q.abits)
    return r.s, _search_report(r)


def veq_me_search(g: ScalingGroup, q: QuantArgs):
    """VEQ-ME: AWQ whose loss over the experts behind one norm weighs expert e by S_e = γ N_e^text + β N_e^vis;
    groups without a router run plain AWQ (a constant weight does not move the optimum)."""
    if g.router and g.importance is None:
        raise ValueError(f"{g.producer}: VEQ-ME needs S_e for the MoE block (calib/'s token counts); none given")
    r = ecs.awq_scale(g.X, g.readers, bits=q.bits, group_size=q.group_size, sym=q.sym, abits=q.abits,
                      consumer_weights=g.importance if g.router else None)
    return r.s, _search_report(r)


def smoothquant_search(g: ScalingGroup, q: QuantArgs):
    """SmoothQuant: s_j = max|X_j|^0.5 / max_e max|W_e[:, j]|^0.5, no search (ecs.smoothquant_scale)."""
    r = ecs.smoothquant_scale(g.X.abs().amax(0), [c.W for c in g.readers], alpha=0.5)
    return r.s, {"alpha": 0.5, "zero_channels": r.n_zero_channels}


def ecs_omega(g: ScalingGroup, q: QuantArgs) -> list[float]:
    """ECS's ω_e per reader of the MoE input: routing frequency n_e / N (--ecs-omega freq, the default), the
    layer's mean router probability of e (prob), or VEQ-ME's S_e (veq); a shared expert reads every token
    (frequency 1, probability 1)."""
    if q.ecs_omega == "veq":
        return g.importance
    out = []
    for r, e in zip(g.readers, g.experts):
        if e is None:
            out.append(1.0)
        elif q.ecs_omega == "freq":
            out.append(len(r.rows) / g.topk.shape[0])
        else:
            out.append(float(g.mean_prob[e]))
    return out


def ecs_loss(q: QuantArgs) -> Callable:
    """ECS's ρ chosen by --ecs-loss."""
    return {"trimmed": ecs.trimmed_squared_error(0.01), "huber": ecs.huber(0.1), "mse": ecs.squared_error}[q.ecs_loss]


def ecs_search(g: ScalingGroup, q: QuantArgs):
    """ECS (ECMFQ): one scale s(α) = m_X^α / m_W^(1−α) for the norm feeding router and experts, searched against
    Σ_e ω_e ρ(...) with the token weights inside ρ (ecs.ecs_scale); each SwiGLU's up -> down group likewise with
    its own tokens; attention inputs get SmoothQuant."""
    if g.attention:
        return smoothquant_search(g, q)
    r = ecs.ecs_scale(g.X, g.readers, bits=q.bits, group_size=q.group_size, sym=q.sym, abits=q.abits,
                      omega=ecs_omega(g, q) if g.router else None, token_weights=g.token_weights,
                      percentile=q.ecs_percentile, n_grid=q.ecs_grid, rho=ecs_loss(q))
    return r.s, {**_search_report(r), "zero_channels": r.n_zero_channels}


def expert_importance(experts: list[int | None], counts, gamma: float, beta: float, q: QuantArgs) -> list[float]:
    """VEQ-ME's S_e = γ·N_e^text + β·N_e^vis (arXiv 2602.01037, eq. 5) per reader of the MoE input, given the
    routed expert of each (None: a shared expert, which reads every token: N = T). counts: calib's (n_text (E,),
    n_vis (E,), T_text, T_vis) of this layer. γ, β set to 1 by the ablation flags."""
    n_text, n_vis, T_text, T_vis = counts
    g, b = (gamma if q.use_gamma else 1.0), (beta if q.use_beta else 1.0)
    return [g * (T_text if e is None else float(n_text[e])) + b * (T_vis if e is None else float(n_vis[e]))
            for e in experts]


def layer_importance(cal: dict, i: int, gamma: float | None, q: QuantArgs):
    """experts -> S_e for decoder layer i from calib/'s statistics (None outside MoE layers); β = T_text / T_vis."""
    if i not in cal["moe_layers"]:
        return None
    j = cal["moe_layers"].index(i)
    beta = cal["T_text"] / max(1, cal["T_vis"])
    counts = (cal["n_text"][j], cal["n_vis"][j], cal["T_text"], cal["T_vis"])
    return lambda experts: expert_importance(experts, counts, gamma or 1.0, beta, q)


# ----------------------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Method:
    """One quantization method (module docstring)."""

    name: str  # --method
    description: str
    solver: str = "gptq"  # "gptq" or "rtn"
    scales: Callable | None = None  # scale search run on every scaling group before quantizing; None: no scaling
    token_weights: Callable = plain_weights  # c_j of each token in the Hessians
    fusion: bool = False  # compute FAQ's fusion weights per layer (passed to token_weights and the scale search)
    needs_gamma: bool = False  # refuses a calib/ without γ (unless --gamma, --no-modality or --no-gamma)
    needs_macs: bool = False  # refuses a calib/ not selected by MACS (calibrate.py --select macs)

    def __post_init__(self):
        if self.solver not in ("gptq", "rtn") or not callable(self.token_weights) or \
                (self.scales is not None and not callable(self.scales)):
            raise ValueError(f"method {self.name!r}: solver must be 'gptq' or 'rtn', token_weights a function and "
                             "scales a function or None (see methods.py's docstring)")


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("veq-ma", "VEQ-MA: GPTQ with expert Hessians weighted by p^λ · α (§3.3)", token_weights=veq_ma_weights,
           needs_gamma=True),
    Method("gptq", "GPTQ, every token weighing 1 (§2.2)"),
    Method("rtn", "round to nearest (§2.1)", solver="rtn"),
    Method("awq", "AWQ scales, then RTN (§2.3)", solver="rtn", scales=awq_search),
    Method("smoothquant", "SmoothQuant scales (α = 0.5), then RTN (§2.4)", solver="rtn", scales=smoothquant_search),
    Method("smoothquant-gptq", "SmoothQuant scales, then GPTQ (§2.4)", scales=smoothquant_search),
    Method("veq-me", "VEQ-ME: AWQ with experts weighted by S_e, then RTN (§3.2)", solver="rtn",
           scales=veq_me_search, needs_gamma=True),
    Method("veq", "VEQ-ME scales, then VEQ-MA GPTQ: not in the paper (§3.4)", scales=veq_me_search,
           token_weights=veq_ma_weights, needs_gamma=True),
    Method("ecs", "ECS scales, then GPTQ (§4.1)", scales=ecs_search),
    Method("ecs-faq", "ECS with FAQ token weights, then FAQ-weighted GPTQ (§4.1, §4.2)", scales=ecs_search,
           token_weights=faq_weights, fusion=True),
    Method("ecmfq", "ECMFQ: ecs-faq on a MACS-selected calib/ (§4.4)", scales=ecs_search,
           token_weights=faq_weights, fusion=True, needs_macs=True),
)}


def register(method: Method) -> Method:
    """Add a method at run time (a fork's script, a test); its name must be new."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} exists already; pick another name")
    METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    """The record of a method name; an unknown name is an error."""
    if name not in METHODS:
        raise ValueError(f"--method {name!r}: unknown; expected one of {', '.join(METHODS)} (or register() it)")
    return METHODS[name]
