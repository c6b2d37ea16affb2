"""Per-input-channel scales folded into the previous op: the AWQ and SmoothQuant searches, and the shared core
that VEQ-ME and ECMFQ's expert-consensus smoothing (ECS) build on. Tensors in, tensors out.

The transformation (both papers): a linear reading X (n, d) computes X Wᵀ = (X / s)(W · s)ᵀ for any s (d,) > 0.
Dividing the producer of X by s (an RMSNorm weight, or the output rows of the previous linear) and multiplying
the consumers' input columns by s changes nothing in float; it changes what the quantizers see.
  * AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization", arXiv 2306.00978): s(α) = x̄^α, normalized by
    sqrt(max · min), with x̄ the mean |X| per channel; α on a grid of n_grid in [0, 1); keep the α whose
    scaled-and-quantized consumers have the lowest output MSE. Optional clip search (awq_clip).
  * SmoothQuant (Xiao et al., "SmoothQuant", arXiv 2211.10438): s_j = max|X_j|^α / max|W_j|^(1−α), α = 0.5,
    no search; it moves activation outliers into the weights so that 8-bit activations survive.
  * MBQ (Li et al., "MBQ: Modality-Balanced Quantization for Large VLMs", arXiv 2412.19509): AWQ's candidates,
    the loss over language and image tokens only, image tokens weighted by a gradient sensitivity ratio r and
    MBQ's absolute error as ρ (mbq_search).
  * ECS, ECMFQ's expert-consensus smoothing (OpenReview BUWB15t291; only its abstract is public, so this is the
    reconstruction in docs/methods.md §4.1): SmoothQuant's form s(α) = m_X^α / m_W^(1−α) searched over 21 α in
    [0, 1], with m_X a robust (99.9th percentile) activation range and m_W the ω-weighted consensus of the
    experts' weight ranges, against the ω-weighted error of all experts with routed tokens under an outlier-robust
    ρ (trimmed MSE or Huber), activations quantized as deployed (ecs_scale).
Symbols as in the papers: X (n, d) the inputs, W_e (out_e, d) the weight of consumer e, s (d,) the scale,
α the migration strength, x̄ (d,) the mean |X|; here also w_e the weight of consumer e in the loss (VEQ-ME's S_e,
ECS's ω_e) and c_j the weight of token j (FAQ's fusion weight).

The searches minimize, over candidate scales s,
    L(s) = Σ_e w_e Σ_{j∈R(e)} c_j ||x_j W_eᵀ − Q_A(x_j / s) Q_W(W_e · s)ᵀ||²  /  Σ_e w_e Σ_{j∈R(e)} c_j out_e
(a weighted mean squared error per output element; the denominator does not depend on s), where R(e) are the
rows of X consumer e reads (all of them, or the tokens routed to expert e), Q_W the RTN grid of quant/grid.py and
Q_A the identity (abits=16) or per-token dynamic symmetric fake-quant (abits=8, for W4A8 / W8A8).
`search_scale` evaluates L on any list of candidate scales; `awq_scale` is it with AWQ's candidates. VEQ-ME is
`awq_scale` with consumer_weights = S_e; ECS is `search_scale` with its own candidates (m_X^α / m_W^(1−α)) and
an outlier-robust `rho` in place of `squared_error`.

MoE rule (docs/methods.md §1.4): the scale in front of an MoE block is one s (d,) for the RMSNorm that feeds the
router, every routed expert and every shared expert. Fold 1/s into the norm (fold_into_norm) and multiply s
into *every* linear that reads that norm (scale_consumer): the router weight too (it stays in float, and its
logits are then unchanged, so the same experts are chosen with the same weights), and any other reader such as
a shared-expert gate. Forgetting the router changes routing.

Choices, where the references leave room or this code differs from them:
  * the loss is measured at each consumer's own output (per expert, routed tokens only), not at the output of
    the whole block as in the llm-awq code; this is the form VEQ-ME's Σ_e S_e ||W_e X_e − Ŵ_e X_e||² takes.
    Stack an expert's gate_proj and up_proj into one consumer (RTN is row-wise, so this changes nothing).
  * consumer_weights and the shared token_weights are divided by their largest value first, so "all equal"
    reproduces the unweighted search bit for bit; a consumer with weight 0 is skipped.
  * awq_clip clamps each group to [r·min(w, 0), r·max(w, 0)] (gptq.py's grid range; symmetric: llm-awq's
    [−r·max|w|, r·max|w|]); r = 1, 1 − 1/n_grid, ... reaches 1 − max_shrink (llm-awq stops one step short).
Does not: capture activations, decide which linears form a scaling group (the model exposes that as data),
quantize the final weights (gptq.py), or handle norms of the form (1 + w) · x̂ (none in Qwen3-VL / Kimi-VL).

Usage (one scaling group: an RMSNorm weight g feeding an MoE block): r = awq_scale(X, [Consumer(W_e, rows=idx_e)
    for ...], bits=4, group_size=128, sym=False); g = fold_into_norm(g, r.s); W = scale_consumer(W, r.s) for the
    router and every W_e; print(r.alpha, r.rel_error_no_scale, r.rel_error).
Last in this file: the searches as the methods table in gptq.py calls them (ScalingGroup, awq_search, ...).
Read next: quant/scales.py (how the layer loop captures a group's inputs and folds the scale).
Run the tests:  python -m pytest -q tests/test_ecs.py
"""

from __future__ import annotations

from dataclasses import dataclass
import math
import statistics
from typing import Callable, NamedTuple, Sequence

import torch

from quant.grid import compute_dtype, fake_quant_act, rtn

AWQ_S_MIN = 1e-4  # llm-awq clamps x̄^α at this before normalizing, so channels with x̄ = 0 get a finite scale
ABITS = (2, 3, 4, 8, 16)  # activation widths; 16 means activations stay in float


# ----------------------------------------------------------------------------------------------------------
# Inputs: consumers, weights, activation fake-quant


@dataclass
class Consumer:
    """One linear reading the scaled channels. Give rows (tokens routed to an expert) or X (its own inputs),
    or neither (it reads every row of the shared X)."""
    W: torch.Tensor  # (out_e, d)
    rows: torch.Tensor | None = None  # (n_e,) int64 row indices into the shared X
    X: torch.Tensor | None = None  # (n_e, d) its own inputs, instead of rows
    token_weights: torch.Tensor | None = None  # (n_e,) c_j for its loss, used as given; None: from the shared ones
    name: str = ""


def _as_consumers(consumers) -> list[Consumer]:
    if isinstance(consumers, (torch.Tensor, Consumer)) or len(consumers) == 0:
        raise ValueError("consumers: pass a non-empty list of Consumer entries or (out, d) weight tensors")
    out = []
    for i, c in enumerate(consumers):
        c = c if isinstance(c, Consumer) else Consumer(W=c)
        out.append(Consumer(c.W, c.rows, c.X, c.token_weights, c.name or f"consumers[{i}]"))
    return out


def _weights(w, n: int, name: str, dtype, device) -> torch.Tensor:
    """Validated non-negative weights (n,), divided by their max (so all-equal weights become exactly 1);
    None -> ones."""
    if w is None:
        return torch.ones(n, dtype=dtype, device=device)
    w = torch.as_tensor(w, dtype=dtype, device=device)
    if w.shape != (n,):
        raise ValueError(f"{name}: shape {tuple(w.shape)}, expected ({n},): one weight per entry")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not bool((w > 0).any()):
        raise ValueError(f"{name}: weights must be finite, >= 0 and not all 0; got min {float(w.min()):.3g}, "
                         f"max {float(w.max()):.3g}")
    return w / w.max()


def _check_2d(t: torch.Tensor, d: int | None, name: str):
    if t.dim() != 2 or (d is not None and t.shape[1] != d):
        want = "(rows, d)" if d is None else f"(rows, {d})"
        raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {want}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: has NaN/inf entries; fix the weights / captured activations first")


# ----------------------------------------------------------------------------------------------------------
# The objective L(s)


def squared_error(err: torch.Tensor, c: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """ρ for the AWQ objective: Σ_j c_j ||err_j||². err (n_e, out_e) the output error of one consumer, c (n_e,)
    the token weights, y (n_e, out_e) its float output (unused here; a robust ρ may scale by it). ECS swaps in
    trimmed_squared_error or huber, which have the same signature."""
    return (c * err.square().sum(dim=1)).sum()


def absolute_error(err: torch.Tensor, c: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """ρ = Σ_j c_j Σ_o |err_jo|: MBQ's default loss (its loss_mode "mae")."""
    return (c * err.abs().sum(dim=1)).sum()


def trimmed_squared_error(trim: float = 0.01) -> Callable:
    """ρ that drops the ⌊trim · n_e⌋ tokens with the largest ||err_j||² (one consumer at a time), then sums
    c_j ||err_j||² over the rest: a few outlier tokens cannot decide the scale. trim = 0 is squared_error."""
    if not 0 <= trim < 1:
        raise ValueError(f"trim={trim}: the trimmed share of tokens must be in [0, 1)")

    def rho(err, c, y=None):
        e = err.square().sum(dim=1)  # (n_e,)
        n_drop = int(trim * e.shape[0])
        if n_drop == 0:
            return (c * e).sum()
        keep = e.argsort()[: e.shape[0] - n_drop]  # ascending: the largest errors are cut
        return (c[keep] * e[keep]).sum()
    return rho


def huber(delta: float = 0.1) -> Callable:
    """ρ = Σ_j c_j h(u_j), Huber on each token's RMS output error u_j = ||err_j|| / sqrt(out_e):
    h(u) = u² for u <= δ_e, 2 δ_e u − δ_e² above, with δ_e = delta · RMS(y) of that consumer's float output
    (so the threshold is relative: 0.1 = errors above 10% of a typical output value grow linearly). Multiplied by
    out_e so that it equals squared_error where every u_j <= δ_e."""
    if delta <= 0:
        raise ValueError(f"delta={delta}: the Huber threshold (relative to the output RMS) must be > 0")

    def rho(err, c, y):
        out = err.shape[1]
        u = err.square().sum(dim=1).div(out).sqrt()  # (n_e,)
        d = delta * y.square().mean().sqrt().double()  # 0-dim, on y's device (no sync), as the float it was
        h = torch.where(u <= d, u.square(), 2 * d * u - d * d)
        return (c * h).sum() * out
    return rho


@dataclass
class _Term:  # one consumer, ready for the loss
    name: str
    W: torch.Tensor  # (out_e, d)
    X: torch.Tensor  # (n_e, d) its inputs (a gathered copy for routed rows)
    c: torch.Tensor  # (n_e,) token weights c_j
    w: float  # consumer weight w_e, largest 1
    Y: torch.Tensor  # (n_e, out_e) float reference X_e W_eᵀ


def _term_inputs(c: Consumer, X, c_shared, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(X_e (n_e, d), c (n_e,)) of one consumer."""
    if c.rows is not None and c.X is not None:
        raise ValueError(f"{c.name}: give rows (indices into the shared X) or X (its own inputs), not both")
    if c.X is not None:
        _check_2d(c.X, X.shape[1], f"{c.name}.X")
        Xe, ce = c.X.to(dtype), torch.ones(c.X.shape[0], dtype=dtype, device=X.device)
    elif c.rows is not None:
        rows = torch.as_tensor(c.rows, device=X.device)
        if rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64, torch.bool):
            raise ValueError(f"{c.name}.rows: expected a 1-D integer index (or bool mask), got "
                             f"{rows.dtype} {tuple(rows.shape)}")
        if rows.dtype != torch.bool and rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= X.shape[0]):
            raise ValueError(f"{c.name}.rows: indices outside [0, {X.shape[0]}) (the rows of the shared X)")
        Xe, ce = X[rows], c_shared[rows]
    else:
        Xe, ce = X, c_shared
    if c.token_weights is not None:
        ce = torch.as_tensor(c.token_weights, dtype=dtype, device=X.device)
        if ce.shape != (Xe.shape[0],) or not bool(torch.isfinite(ce).all()) or bool((ce < 0).any()):
            raise ValueError(f"{c.name}.token_weights: need {Xe.shape[0]} finite weights >= 0, one per input row")
    return Xe, ce


def _prepare(X, consumers, consumer_weights, token_weights) -> tuple[list[_Term], float, float]:
    """The terms of L, its denominator Σ_e w_e Σ_j c_j out_e, and the reference power Σ_e w_e Σ_j c_j ||y_j||²
    divided by the same denominator (so L / power is a relative output error)."""
    _check_2d(X, None, "X")
    dtype = compute_dtype(X)
    X = X.to(dtype)
    consumers = _as_consumers(consumers)
    w = _weights(consumer_weights, len(consumers), "consumer_weights", torch.float64, "cpu").tolist()
    c_shared = _weights(token_weights, X.shape[0], "token_weights", dtype, X.device)
    terms, denom, power = [], 0.0, 0.0
    for c, w_e in zip(consumers, w):
        _check_2d(c.W, X.shape[1], f"{c.name}.W")
        Xe, ce = _term_inputs(c, X, c_shared, dtype)
        if w_e == 0 or Xe.shape[0] == 0:
            continue  # weight 0 or no routed tokens: no part in L
        W = c.W.to(dtype)
        Y = Xe @ W.T  # (n_e, out_e)
        terms.append(_Term(c.name, W, Xe, ce, w_e, Y))
        denom += w_e * float(ce.sum()) * W.shape[0]
        power += w_e * float(squared_error(Y, ce))
    if denom == 0:
        raise ValueError("consumers: no consumer has tokens with positive weight, so the loss is empty; check "
                         "rows / token_weights / consumer_weights")
    return terms, denom, power / denom


def _loss(terms: list[_Term], s, *, bits, group_size, sym, abits, rho, denom) -> torch.Tensor:
    """L(s): each consumer's inputs divided by s (then Q_A), its weight times s (then RTN). A 0-dim float64 tensor
    on the data's device, summed in the consumers' order (the values of Python floats, without a GPU sync per
    consumer)."""
    total = torch.zeros((), dtype=torch.float64, device=s.device)
    for t in terms:
        Xq = fake_quant_act(t.X / s, bits=abits)  # (n_e, d)
        W_hat = rtn(t.W * s, bits=bits, group_size=group_size, sym=sym).W_hat  # (out_e, d)
        total = total + t.w * rho(t.Y - Xq @ W_hat.T, t.c, t.Y).double()
    return total / denom


@torch.no_grad()
def scale_loss(X, consumers, s, *, bits: int, group_size: int, sym: bool, abits: int = 16,
               consumer_weights=None, token_weights=None, rho=squared_error) -> float:
    """L(s) for one scale s (d,) (module docstring); arguments as for awq_scale."""
    if abits not in ABITS:
        raise ValueError(f"abits={abits} is not supported; use one of {ABITS} (16: activations in float)")
    terms, denom, _ = _prepare(X, consumers, consumer_weights, token_weights)
    s = torch.as_tensor(s, dtype=terms[0].W.dtype if terms else None, device=X.device)
    return float(_loss(terms, s, bits=bits, group_size=group_size, sym=sym, abits=abits, rho=rho, denom=denom))


# ----------------------------------------------------------------------------------------------------------
# Searches


@dataclass
class ScaleResult:
    s: torch.Tensor  # (d,) the best scale: fold 1/s into the producer, s into every consumer
    alpha: float  # the α that produced it
    alphas: torch.Tensor  # (n_candidates,) float64
    losses: torch.Tensor  # (n_candidates,) float64, L at each candidate
    loss_no_scale: float  # L(s = 1): quantizing without any scaling
    ref_power: float  # Σ w c ||y||² / the same denominator as L: L / ref_power is a relative output error
    n_zero_channels: int = 0  # channels whose statistic was 0 (AWQ: x̄_j = 0), guarded as the search says

    @property
    def loss(self) -> float:
        return float(self.losses.min())

    @property
    def rel_error(self) -> float:
        return self.loss / self.ref_power

    @property
    def rel_error_no_scale(self) -> float:
        return self.loss_no_scale / self.ref_power


@torch.no_grad()
def search_scale(X, consumers, candidates: Sequence[tuple[float, torch.Tensor]], *, bits: int, group_size: int,
                 sym: bool, abits: int = 16, consumer_weights=None, token_weights=None,
                 rho: Callable = squared_error) -> ScaleResult:
    """Evaluate L (module docstring) at each candidate (α, s (d,)) and keep the lowest (the first, on ties).
    X (n, d) float; consumers: Consumer entries or (out_e, d) tensors; consumer_weights (E,) w_e; token_weights
    (n,) c_j for the shared X; rho(err (n_e, out_e), c (n_e,), y (n_e, out_e)) -> scalar. Computes in float32 (float64 if X is)."""
    if abits not in ABITS:
        raise ValueError(f"abits={abits} is not supported; use one of {ABITS} (16: activations in float)")
    if len(candidates) == 0:
        raise ValueError("candidates: empty; pass at least one (alpha, s) pair")
    terms, denom, power = _prepare(X, consumers, consumer_weights, token_weights)
    dtype, d = terms[0].W.dtype, X.shape[1]
    kw = dict(bits=bits, group_size=group_size, sym=sym, abits=abits, rho=rho, denom=denom)
    if any(s.shape != (d,) for _, s in candidates):
        alpha = next(a for a, s in candidates if s.shape != (d,))
        raise ValueError(f"candidates: s at alpha={alpha} must be ({d},), finite and > 0")
    S = torch.stack([s.to(dtype=dtype, device=X.device) for _, s in candidates])  # (n_candidates, d)
    bad = (~torch.isfinite(S) | (S <= 0)).any(1).tolist()  # one device sync for all the candidates' checks
    if any(bad):
        raise ValueError(f"candidates: s at alpha={candidates[bad.index(True)][0]} must be ({d},), finite and > 0")
    losses = torch.stack([_loss(terms, s, **kw) for s in S]).tolist()  # one sync, not one per candidate
    alphas = [float(alpha) for alpha, _ in candidates]
    for alpha, loss in zip(alphas, losses):
        if not loss == loss or loss == float("inf"):
            raise ValueError(f"loss at alpha={alpha} is {loss}: the scaled weights or inputs overflowed")
    unscaled = (S == 1).all(1).tolist()  # the candidates with s = 1 (AWQ's alpha = 0)
    loss_no_scale = losses[unscaled.index(True)] if any(unscaled) else \
        float(_loss(terms, torch.ones(d, dtype=dtype, device=X.device), **kw))
    best = min(range(len(losses)), key=losses.__getitem__)
    return ScaleResult(s=candidates[best][1].to(dtype), alpha=alphas[best],
                       alphas=torch.tensor(alphas, dtype=torch.float64, device="cpu"),  # reported numbers
                       losses=torch.tensor(losses, dtype=torch.float64, device="cpu"), loss_no_scale=loss_no_scale,
                       ref_power=power)


def mean_abs(X: torch.Tensor, token_weights=None) -> torch.Tensor:
    """AWQ's activation statistic x̄ (d,) = Σ_j c_j |x_j| / Σ_j c_j over the rows of X (n, d)."""
    c = _weights(token_weights, X.shape[0], "token_weights", compute_dtype(X), X.device)
    return (c[:, None] * X.to(c.dtype).abs()).sum(dim=0) / c.sum()


def awq_candidates(x_bar: torch.Tensor, n_grid: int = 20) -> list[tuple[float, torch.Tensor]]:
    """(α, s(α)) for α = i / n_grid, i = 0 .. n_grid−1: s = max(x̄^α, AWQ_S_MIN) / sqrt(max · min) (d,).
    α = 0 gives s = 1 exactly."""
    if n_grid < 1:
        raise ValueError(f"n_grid={n_grid}; use at least 1 (1: only alpha = 0, no scaling)")
    out = []
    for i in range(n_grid):
        alpha = i / n_grid
        s = x_bar.pow(alpha).clamp(min=AWQ_S_MIN)  # (d,); 0^0 = 1, so α = 0 is all ones
        out.append((alpha, s / (s.max() * s.min()).sqrt()))
    return out


@torch.no_grad()
def awq_scale(X, consumers, *, bits: int, group_size: int, sym: bool, n_grid: int = 20, consumer_weights=None,
              token_weights=None, abits: int = 16) -> ScaleResult:
    """AWQ's scale search for one scaling group: X (n, d) the producer's output, read by every consumer (all
    rows, or the rows routed to it). Returns the ScaleResult; alpha = 0 (s = 1) when scaling does not help.
    Channels with x̄_j = 0 (no input reached them) get s_j from the AWQ_S_MIN floor; counted in
    n_zero_channels."""
    x_bar = mean_abs(X, token_weights)  # (d,)
    r = search_scale(X, consumers, awq_candidates(x_bar, n_grid), bits=bits, group_size=group_size, sym=sym,
                     abits=abits, consumer_weights=consumer_weights, token_weights=token_weights)
    r.n_zero_channels = int((x_bar == 0).sum())
    return r


class ClipResult(NamedTuple):
    W: torch.Tensor  # (out, d) clipped weight, to be quantized with the same grid
    ratio: torch.Tensor  # (out, n_groups) chosen r per row and group (1: not clipped)
    err_before: float  # Σ over groups of the per-group output error, without clipping (on the sampled tokens)
    err_after: float  # the same with the chosen ratios


def _clip_group(Wg, Xg, ratios, *, bits, sym):
    """Best ratio per row for one group: Wg (out, g), Xg (n, g). Returns (W clipped, ratio (out,), err0, err)."""
    hi = Wg.max(dim=1, keepdim=True).values.clamp(min=0)  # (out, 1)
    lo = Wg.min(dim=1, keepdim=True).values.clamp(max=0)
    Y = Xg @ Wg.T  # (n, out): this group's share of the output
    best_err = torch.full((Wg.shape[0],), float("inf"), dtype=Wg.dtype, device=Wg.device)
    best_W, best_r, err0 = Wg.clone(), torch.ones_like(best_err), None
    for r in ratios:
        Wc = torch.clamp(Wg, lo * r, hi * r)
        err = (Y - Xg @ rtn(Wc, bits=bits, group_size=-1, sym=sym).W_hat.T).square().sum(dim=0)  # (out,)
        err0 = err if err0 is None else err0
        better = err < best_err  # strict: ties keep the larger ratio
        best_err, best_r = torch.where(better, err, best_err), torch.where(better, r, best_r)
        best_W[better] = Wc[better]
    return best_W, best_r, float(err0.sum()), float(best_err.sum())


@torch.no_grad()
def awq_clip(W: torch.Tensor, X: torch.Tensor, *, bits: int, group_size: int, sym: bool, n_grid: int = 20,
             max_shrink: float = 0.5, max_tokens: int = 512) -> ClipResult:
    """AWQ's clip search: per row and group, shrink the range to r·[min, max] with r = 1 − i/n_grid down to
    1 − max_shrink, keeping the r with the lowest error of that group's partial output X_g W_gᵀ over (at most
    max_tokens, evenly strided) rows of X (n, d). Run it on the scaled weight W·s with inputs X/s."""
    _check_2d(X, None, "X")
    _check_2d(W, X.shape[1], "W")
    if n_grid < 1 or not 0 <= max_shrink < 1:
        raise ValueError(f"n_grid={n_grid} must be >= 1 and max_shrink={max_shrink} in [0, 1)")
    dtype = compute_dtype(X)
    W, X = W.to(dtype), X.to(dtype)
    X = X[:: max(1, -(-X.shape[0] // max_tokens))]  # llm-awq samples 512 tokens the same way
    g = X.shape[1] if group_size == -1 else group_size
    ratios = [1 - i / n_grid for i in range(int(round(max_shrink * n_grid)) + 1)]
    parts = [_clip_group(Wg, Xg, ratios, bits=bits, sym=sym) for Wg, Xg in zip(W.split(g, 1), X.split(g, 1))]
    return ClipResult(W=torch.cat([p[0] for p in parts], dim=1), ratio=torch.stack([p[1] for p in parts], 1),
                      err_before=sum(p[2] for p in parts), err_after=sum(p[3] for p in parts))


class SmoothScale(NamedTuple):
    s: torch.Tensor  # (d,)
    n_zero_channels: int  # channels with max|X_j| = 0 or max_e max|W_e[:, j]| = 0: s_j = 1 there


@torch.no_grad()
def smoothquant_scale(X_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float = 0.5) -> SmoothScale:
    """SmoothQuant: s_j = max|X_j|^α / max_e max|W_e[:, j]|^(1−α). X_absmax (d,) the running max|X| per
    channel over the calibration tokens; weights: the consumers' (out_e, d) weights. A channel with no
    activation (nothing to migrate) or all-zero weight columns (it adds nothing to any output) would get
    s_j = 0 or inf; it gets s_j = 1 and is counted in n_zero_channels. Computed in float32 (float64 if given)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha}: the migration strength must be in [0, 1]")
    if X_absmax.dim() != 1 or bool((X_absmax < 0).any()) or not bool(torch.isfinite(X_absmax).all()):
        raise ValueError(f"X_absmax: expected (d,) finite max|X| >= 0 per channel, got {tuple(X_absmax.shape)}")
    if len(weights) == 0:
        raise ValueError("weights: pass the (out, d) weights of every linear that reads these channels")
    dtype, d = compute_dtype(X_absmax), X_absmax.shape[0]
    for i, W in enumerate(weights):
        _check_2d(W, d, f"weights[{i}]")
    w_max = torch.stack([W.to(dtype).abs().amax(dim=0) for W in weights]).amax(dim=0)  # (d,)
    a_max = X_absmax.to(dtype)
    zero = (a_max == 0) | (w_max == 0)
    s = a_max.pow(alpha) / w_max.pow(1 - alpha)
    return SmoothScale(torch.where(zero, torch.ones_like(s), s), int(zero.sum()))


# ----------------------------------------------------------------------------------------------------------
# ECS: expert-consensus smoothing (ECMFQ, reconstructed from its abstract; docs/methods.md §4.1)


def robust_absmax(X: torch.Tensor, percentile: float = 99.9) -> torch.Tensor:
    """m_X (d,): the given percentile of |X_j| over the rows of X (n, d), a per-channel activation range that a
    handful of outlier tokens cannot set (100: the plain max, as SmoothQuant). Nearest-rank: the
    ⌈percentile/100 · n⌉-th smallest value."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile={percentile}: must be in (0, 100]")
    k = max(1, min(X.shape[0], math.ceil(percentile / 100 * X.shape[0])))
    return X.abs().kthvalue(k, dim=0).values


def consensus_weight_max(weights: Sequence[torch.Tensor], omega) -> torch.Tensor:
    """m_W (d,) = Σ_e ω_e max_o |W_e[o, j]| / Σ_e ω_e: the experts' per-channel weight ranges, averaged with
    their importance ω_e (a consumer with ω_e = 0, e.g. an expert no calibration token reached, does not count).
    SmoothQuant takes the max over consumers instead; one rarely used expert with a large column would then
    set the scale for all of them."""
    dtype = compute_dtype(weights[0])
    w = _weights(omega, len(weights), "omega", dtype, weights[0].device)
    col_max = torch.stack([W.to(dtype).abs().amax(dim=0) for W in weights])  # (E, d)
    return (w[:, None] * col_max).sum(dim=0) / w.sum()


def ecs_candidates(m_X: torch.Tensor, m_W: torch.Tensor, n_grid: int = 21) -> list[tuple[float, torch.Tensor]]:
    """(α, s(α) = m_X^α / m_W^(1−α)) for α = i / (n_grid − 1), i = 0 .. n_grid − 1 (both ends included).
    Channels with m_X = 0 or m_W = 0 (nothing to migrate) get s = 1, as in smoothquant_scale."""
    if n_grid < 2:
        raise ValueError(f"n_grid={n_grid}; use at least 2 (alpha = 0 and 1)")
    zero = (m_X == 0) | (m_W == 0)
    out = []
    for i in range(n_grid):
        alpha = i / (n_grid - 1)
        s = m_X.pow(alpha) / m_W.pow(1 - alpha)
        out.append((alpha, torch.where(zero, torch.ones_like(s), s)))
    return out


@torch.no_grad()
def ecs_scale(X, consumers, *, bits: int, group_size: int, sym: bool, abits: int = 8, omega=None,
              token_weights=None, percentile: float = 99.9, n_grid: int = 21,
              rho: Callable | None = None) -> ScaleResult:
    """ECS for one scaling group: one scale s for the producer of X (n, d) shared by all consumers (the router,
    every routed expert with tokens, the shared experts), chosen on the α grid of ecs_candidates with
    m_X = robust_absmax(X, percentile) and m_W = consensus_weight_max(consumers' W, ω), minimizing
        Σ_e ω_e ρ( X_e W_eᵀ − Q_A(X_e / s) Q_W(W_e · s)ᵀ )       (token weights c_j inside ρ: FAQ's w_j)
    with activations fake-quantized as deployed (abits). ρ defaults to trimmed_squared_error(0.01).
    With one consumer, ρ = squared_error and percentile = 100 this is SmoothQuant's formula searched over α
    (tests/test_ecs.py)."""
    consumers = _as_consumers(consumers)
    _check_2d(X, None, "X")
    m_X = robust_absmax(X.to(compute_dtype(X)), percentile)  # (d,)
    m_W = consensus_weight_max([c.W for c in consumers], omega)
    r = search_scale(X, consumers, ecs_candidates(m_X, m_W, n_grid), bits=bits, group_size=group_size, sym=sym,
                     abits=abits, consumer_weights=omega, token_weights=token_weights,
                     rho=trimmed_squared_error(0.01) if rho is None else rho)
    r.n_zero_channels = int(((m_X == 0) | (m_W == 0)).sum())
    return r


# ----------------------------------------------------------------------------------------------------------
# Folding: exact in float. Computed in float32 (float64 if given), returned in the input's dtype.


def _check_s(s: torch.Tensor, d: int, name: str):
    if s.shape != (d,) or not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ValueError(f"{name}: s must be ({d},), finite and > 0; got {tuple(s.shape)}")


def _f(t: torch.Tensor) -> torch.Tensor:
    return t.to(compute_dtype(t))


def fold_into_norm(norm_weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """RMSNorm weight (d,) / s: the norm's output becomes X / s. In front of an MoE block, also scale the router
    weight and every routed and shared expert that reads this norm with scale_consumer (module docstring)."""
    _check_s(s, norm_weight.shape[0] if norm_weight.dim() == 1 else -1, "fold_into_norm")
    return (_f(norm_weight) / _f(s)).to(norm_weight.dtype)


def fold_into_linear_rows(W_prev: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None = None):
    """Previous linear W_prev (d, in) and its bias (d,): output row j divided by s_j, so its output becomes
    X / s (exact through any later op that is linear per channel, e.g. up_proj's output times act(gate)).
    Returns (W_prev / s[:, None], bias / s or None)."""
    _check_s(s, W_prev.shape[0], "fold_into_linear_rows")
    W = (_f(W_prev) / _f(s)[:, None]).to(W_prev.dtype)
    return W, None if bias is None else (_f(bias) / _f(s)).to(bias.dtype)


def scale_consumer(W: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Consumer W (out, d) times s along its input columns: (X / s)(W · s)ᵀ = X Wᵀ."""
    _check_s(s, W.shape[1], "scale_consumer")
    return (_f(W) * _f(s)[None, :]).to(W.dtype)


# ----------------------------------------------------------------------------------------------------------
# The searches as the methods of gptq.py's table call them: fn(g: ScalingGroup, q: gptq.Settings) -> (s, report)
# (docs/methods.md §1.4, §2.3, §2.4, §3.2, §4.1)


ECS_LOSSES = {"trimmed": trimmed_squared_error(0.01), "huber": huber(0.1), "mse": squared_error}  # --ecs-loss
ECS_OMEGAS = ("freq", "prob", "veq")  # --ecs-omega: see ecs_omega


@dataclass
class ScalingGroup:
    """One scaling group of a decoder layer as a scale search sees it (built by quant/scales.py's search_and_fold from
    the model's scaling_groups and layer_structure). Names are relative to the layer."""

    producer: str  # the norm (or linear) whose output is divided by s
    consumers: list[str]  # the linears reading it, multiplied by s along their input columns
    router: str | None  # the router reading it too (an MoE block's norm), kept float; None elsewhere
    attention: bool  # the consumers are attention linears
    X: torch.Tensor  # (n, d) float32 input of the group: every calibration token (an expert's down_proj: its own)
    readers: list[Consumer]  # one per reader: an expert's gate_proj and up_proj stacked; rows = routed tokens
    experts: list[int | None]  # the routed expert of each reader (None: shared expert, dense MLP, attention)
    topk: torch.Tensor | None  # (n, k) the experts chosen for every token (MoE groups), else None
    token_weights: torch.Tensor | None  # (n,) FAQ's fusion weights of X's rows (methods with fusion), else None
    importance: list[float] | None  # VEQ-ME's S_e per reader (MoE groups, from calib/), else None
    mean_prob: torch.Tensor | None  # (E,) the layer's mean router probability per expert (calib/), else None
    is_vis: torch.Tensor | None = None  # (n,) bool: X's rows that are image tokens
    is_answer: torch.Tensor | None = None  # (n,) bool: answer tokens (labels != -100)
    is_scored: torch.Tensor | None = None  # (n,) bool: tokens whose logits predict an answer token
    sensitivity: tuple[float, float] | None = None  # MBQ's (attention, MLP) r of this layer (mbq_ratios), or None


def _search_report(r: ScaleResult) -> dict:
    return {"alpha": r.alpha, "rel_error": r.rel_error, "rel_error_no_scale": r.rel_error_no_scale}


def awq_search(g: ScalingGroup, q):
    """AWQ: s = x̄^α / sqrt(max x̄ · min x̄), α on a grid of 20, the least output error of the consumers
    (awq_scale)."""
    r = awq_scale(g.X, g.readers, bits=q.bits, group_size=q.group_size, sym=q.sym, abits=q.abits)
    return r.s, _search_report(r)


def veq_me_search(g: ScalingGroup, q):
    """VEQ-ME: AWQ whose loss over the experts behind one norm weighs expert e by S_e = γ N_e^text + β N_e^vis;
    groups without a router run plain AWQ (a constant weight does not move the optimum)."""
    if g.router and g.importance is None:
        raise ValueError(f"{g.producer}: VEQ-ME needs S_e for the MoE block (calib/'s token counts); none given")
    r = awq_scale(g.X, g.readers, bits=q.bits, group_size=q.group_size, sym=q.sym, abits=q.abits,
                      consumer_weights=g.importance if g.router else None)
    return r.s, _search_report(r)


def smoothquant_search(g: ScalingGroup, q):
    """SmoothQuant: s_j = max|X_j|^0.5 / max_e max|W_e[:, j]|^0.5, no search (smoothquant_scale)."""
    r = smoothquant_scale(g.X.abs().amax(0), [c.W for c in g.readers], alpha=0.5)
    return r.s, {"alpha": 0.5, "zero_channels": r.n_zero_channels}


def ecs_omega(g: ScalingGroup, q) -> list[float]:
    """ECS's ω_e per reader of the MoE input: routing frequency n_e / N (--ecs-omega freq, the default), the
    layer's mean router probability of e (prob), or VEQ-ME's S_e (veq); a shared expert reads every token
    (frequency 1, probability 1)."""
    if q.options["ecs_omega"] == "veq":
        return g.importance
    out = []
    for r, e in zip(g.readers, g.experts):
        if e is None:
            out.append(1.0)
        elif q.options["ecs_omega"] == "freq":
            out.append(len(r.rows) / g.topk.shape[0])
        else:
            out.append(float(g.mean_prob[e]))
    return out


def ecs_loss(q) -> Callable:
    """ECS's ρ chosen by --ecs-loss."""
    return ECS_LOSSES[q.options["ecs_loss"]]


def ecs_search(g: ScalingGroup, q):
    """ECS (ECMFQ): one scale s(α) = m_X^α / m_W^(1−α) for the norm feeding router and experts, searched against
    Σ_e ω_e ρ(...) with the token weights inside ρ (ecs_scale); each SwiGLU's up -> down group likewise with
    its own tokens; attention inputs get SmoothQuant."""
    if g.attention:
        return smoothquant_search(g, q)
    r = ecs_scale(g.X, g.readers, bits=q.bits, group_size=q.group_size, sym=q.sym, abits=q.abits,
                      omega=ecs_omega(g, q) if g.router else None, token_weights=g.token_weights,
                      percentile=q.options["ecs_percentile"], n_grid=q.options["ecs_grid"], rho=ecs_loss(q))
    return r.s, {**_search_report(r), "zero_channels": r.n_zero_channels}


def expert_importance(experts: list[int | None], counts, gamma: float, options: dict) -> list[float]:
    """VEQ-ME's S_e = γ·N_e^text + β·N_e^vis (arXiv 2602.01037, eq. 5) per reader of the MoE input, given the
    routed expert of each (None: a shared expert, which reads every token: N = T), with β = T_text / T_vis.
    counts: calib's (n_text (E,), n_vis (E,), T_text, T_vis) of this layer. γ, β set to 1 by the ablation flags
    (options use_gamma, use_beta)."""
    n_text, n_vis, T_text, T_vis = counts
    beta = T_text / max(1, T_vis)
    g, b = (gamma if options["use_gamma"] else 1.0), (beta if options["use_beta"] else 1.0)
    return [g * (T_text if e is None else float(n_text[e])) + b * (T_vis if e is None else float(n_vis[e]))
            for e in experts]


MBQ_LOSSES = {"mae": absolute_error, "mse": squared_error}  # --mbq-loss


def mbq_ratios(sens: dict | None, i: int, language: str = "answer") -> tuple[float, float] | None:
    """MBQ's image weight r of layer i's attention and MLP scaling groups: r = max(r_i, median_l r_l) (its run_mbq),
    r_l = image / language sensitivity of layer l (calib/'s mean|dL/dy|, calibrate.Sensitivity); None without."""
    if sens is None:
        return None
    r = {y: [v / t for v, t in zip(sens[f"{y}_vis"], sens[f"{y}_{language}"])] for y in ("attn", "mlp")}
    return max(r["attn"][i], statistics.median(r["attn"])), max(r["mlp"][i], statistics.median(r["mlp"]))


def mbq_search(g: ScalingGroup, q):
    """MBQ (thu-nics/MBQ auto_scale.py): AWQ's candidates (x̄ over every token); a loss over the language and
    image tokens only, image tokens weighted by the layer's r (r_attn in attention groups, else r_mlp):
      mae (default): c_j = 1 (language), r (image), ρ = |err|: (Σ_lang |e| + r Σ_img |e|) / ((n_lang + n_img) out);
      mse: c_j = 1 / n_lang, r / n_img, ρ = err²: Σ_lang e² / (n_lang out) + r Σ_img e² / (n_img out).
    --no-mbq-reweight: every token weighs 1 (MBQ's reweight=False); with --mbq-loss mse that is AWQ exactly.
    A group none of whose tokens count (an expert only prompt tokens reach) keeps s = 1, MBQ's α = 0."""
    c, o = None, q.options
    if o["mbq_reweight"]:
        if g.sensitivity is None or g.is_vis is None:
            raise ValueError(f"{g.producer}: MBQ needs calib/'s sensitivities and the tokens' modality; none given")
        img, lang = g.is_vis.double(), (g.is_answer if o["mbq_language"] == "answer" else g.is_scored).double()
        if o["mbq_loss"] == "mse":
            img, lang = img / max(1.0, float(img.sum())), lang / max(1.0, float(lang.sum()))
        c = lang + g.sensitivity[0 if g.attention else 1] * img
        if not bool(c.any()):
            return torch.ones(g.X.shape[1], dtype=g.X.dtype), {"alpha": 0.0, "skipped": "no language or image tokens"}
    r = search_scale(g.X, g.readers, awq_candidates(mean_abs(g.X)), bits=q.bits, group_size=q.group_size, sym=q.sym,
                     abits=q.abits, token_weights=c, rho=MBQ_LOSSES[o["mbq_loss"]])
    return r.s, _search_report(r)
