"""Weight quantization of linear layers: the quantizer grid, round-to-nearest (RTN) and the GPTQ solver; below
them (last section) the CLI driver that walks a model layer by layer.

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
Does not: capture activations or build Hessians (hessian.py), search scales (ecs.py), search clipping ranges.

gptq_batched / gptq_batched_shared: the same GPTQ for all experts of an MoE layer at once (one batched problem,
as many torch ops as one expert; less work than gptq(): see the comment above it). gptq() stays the reference.

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


# ----------------------------------------------------------------------------------------------------------
# GPTQ for all experts of a layer at once (batched)
#
# The experts of an MoE layer share their shapes but not their Hessians. gptq_batched solves E of them as one
# problem: every torch op below works on all experts, so a layer costs as many ops (GPU kernel launches) as one
# expert. gptq() above stays the readable reference; the two are tested equal (tests/test_gptq_batched.py).
# The batched path also does less work and fewer passes over memory, which is what makes it faster on a CPU:
#
#  * Factorization, in³/3 flops instead of gptq()'s 4·in³/3 (Cholesky, cholesky_inverse, Cholesky): a Cholesky
#    run backwards, H = R Rᵀ with R upper triangular (reverse_cholesky; it equals J chol(J H J) J, J the index
#    reversal). Then H⁻¹ = R⁻ᵀ R⁻¹ and Hinv = R⁻¹: upper triangular with a positive diagonal, so it is the upper
#    Cholesky factor of H⁻¹ that gptq() uses. Hinv itself is never formed; the sweep needs only
#  * its diagonal blocks Hinv_bb = R_bb⁻¹ (B x B), and
#  * the pending updates of each block b = [i1, i2). gptq() pushes Err[:, :i1] Hinv[:i1, b] into the later
#    columns after every block ("right-looking"). With D = W - Q (the original weights minus the quantized ones)
#    one has D = Err Hinv (column j: w_j - q_j = Σ_{i<=j} Err_i Hinv_ij), so Err = D R; and R Hinv = I at block
#    row :i1, block column b reads R[:i1, :i1] Hinv[:i1, b] = -R[:i1, b] Hinv_bb. Hence
#        W_b - Err[:, :i1] Hinv[:i1, b] = W_b + D[:, :i1] G_b,    G_b = R[:i1, b] Hinv_bb  (i1, B),
#    one matmul with inner dimension i1 when block b starts ("left-looking").
#  * The sweep works on Wᵀ (E, in, out): a column of W (of every row, every expert) is one contiguous row, and
#    every update is a plain bmm with no transposed copies. Inside a block, sub-blocks of SUB_BLOCK columns get
#    the block's earlier updates when they start (left-looking again: one bmm with inner dimension up to B),
#    and are swept column by column as in gptq(), each column's error pushed into the sub-block's later columns
#    by one rank-1 op. With Hn = Hinv with row i divided by Hinv_ii, gptq()'s Err_i Hinv_il = U_i Hn_il for
#    U = W - Q, so the sweep carries U and needs no division per column; the loss Σ Err² = Σ U² / Hinv_ii².
# The result does not depend on these choices in exact arithmetic; in floats they reorder sums, which can flip a
# rounding tie (rare, and then the rest of that row follows another, equally good, path: see the tests).
# act_order (static groups): each expert's columns are permuted by its own descending H_jj before the sweep and
# back after it; the group params, computed before, are looked up per column through perm // g (gptq()'s g_idx).

SUB_BLOCK = 16  # columns swept one by one (rank-1 updates) before a bmm brings in their errors
CHOL_BLOCK = 128  # block columns of reverse_cholesky (its bmm does nearly all of the work)
ROW_PAD = 16  # floats of padding after each row of the sweep's Wᵀ (see gptq_batched)
CPU_EXPERT_CHUNK = 16  # experts per sweep on a CPU: their blocks stay in cache (elsewhere: all experts at once)


def _check_batched_args(W, H, bits, group_size, block_size, percdamp, act_order, static_groups, names):
    _check_grid(bits, group_size, "gptq_batched")
    if act_order and group_size != -1 and not static_groups:
        raise ValueError(f"gptq_batched: act_order with group_size={group_size} needs static_groups=True (the "
                         "packed format has no g_idx, so groups must stay contiguous in the original column order)")
    if W.dim() != 3 or tuple(H.shape) != (W.shape[0], W.shape[2], W.shape[2]):
        raise ValueError(f"gptq_batched: W {tuple(W.shape)} must be (E, out, in) and H {tuple(H.shape)} "
                         "(E, in, in)")
    if block_size <= 0 or percdamp < 0:
        raise ValueError(f"gptq_batched: block_size={block_size} must be > 0 and percdamp={percdamp} >= 0")
    if names is not None and len(names) != W.shape[0]:
        raise ValueError(f"gptq_batched: {len(names)} names for {W.shape[0]} matrices; give one per expert")
    # NaN/inf entries are not looked for here (a pass over W and H costs 4% of the solve): they make the
    # factorization fail (H) or the loss non-finite (W), and _raise_not_finite then names them.


def _raise_not_finite(what: str, bad: torch.Tensor, names):
    """ValueError naming the experts e with bad[e] (E,) bool, if any: their `what` has NaN/inf entries."""
    if bool(bad.any()):
        which = [names[e] if names else f"expert {e}" for e in bad.nonzero().flatten().tolist()]
        raise ValueError(f"gptq_batched: {what} has NaN/inf entries for {', '.join(which)}; fix the weights / "
                         "calibration inputs first")


def reverse_cholesky(A: torch.Tensor, *, block: int = CHOL_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """R (E, n, n) upper triangular with A = R Rᵀ for symmetric A (E, n, n), computed in place in A (only its
    upper triangle is read). This is J chol(J A J) J (J reverses the index order) without the flipped copies:
    the blocked Cholesky run from the last block column to the first. Per block column b = [k1, k2), with the
    columns right of it already factorized,
        P = A[:k2, b] - R[:k2, k2:] R[b, k2:]ᵀ          (one bmm: nearly all of the n³/3 flops)
        R_bb = J chol(J P[b] J) J                        (LAPACK on a block x block matrix)
        R[:k1, b] = P[:k1] R_bb⁻ᵀ                        (a bmm with the block x block inverse: faster here than a
                                                          triangular solve, whose operands torch copies)
    Returns R (the storage of A) and ok (E,) bool: False where a diagonal block was not positive definite."""
    E, n, _ = A.shape
    ok = torch.ones(E, dtype=torch.bool, device=A.device)
    for k2 in range(n, 0, -block):
        k1 = max(0, k2 - block)
        P = A[:, :k2, k1:k2]  # (E, k2, B) column block b, rows above and at the diagonal block
        if k2 < n:
            P.baddbmm_(A[:, :k2, k2:], A[:, k1:k2, k2:].transpose(1, 2), alpha=-1)
        L, info = torch.linalg.cholesky_ex(P[:, k1:].flip((-2, -1)))  # (E, B, B)
        ok &= (info == 0) & torch.isfinite(torch.diagonal(L, dim1=-2, dim2=-1)).all(1)
        R_bb = L.flip((-2, -1))  # (E, B, B) upper
        if k1 > 0:
            R_bb_inv = torch.linalg.solve_triangular(R_bb, torch.eye(k2 - k1, dtype=A.dtype, device=A.device),
                                                     upper=True)  # (E, B, B)
            P[:, :k1] = P[:, :k1] @ R_bb_inv.transpose(1, 2)
        P[:, k1:] = R_bb
        A[:, k2:, k1:k2] = 0  # below the diagonal
    return A, ok


def damped_reverse_cholesky(H: torch.Tensor, *, percdamp: float = 0.01, max_retries: int = 3,
                            names: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """R (E, in, in) upper triangular with H_e + damp_e·I = R_e R_eᵀ (reverse_cholesky), in H's dtype; R⁻¹ is
    gptq()'s Hinv (section comment above). damp_e = percdamp · mean(diag H_e) as in damped_inverse_cholesky; the
    experts whose factorization fails are retried, alone, with 10x their damping, at most max_retries times.
    Returns R, damp (E,) float64, retries (E,) int64; raises GPTQError naming the experts that failed at every
    damping."""
    E = H.shape[0]
    damp0 = percdamp * torch.diagonal(H, dim1=-2, dim2=-1).mean(-1).double()  # (E,)
    damp, retries = damp0.clone(), torch.zeros(E, dtype=torch.int64)
    todo, R = torch.arange(E), None
    for attempt in range(max_retries + 1):
        damp[todo] = damp0[todo] * DAMP_ESCALATION**attempt
        if R is None:  # a copy, factorized in place; rows padded as in gptq_batched (faster bmms)
            Hd = H.new_empty(H.shape[:-1] + (H.shape[-1] + ROW_PAD,))[..., :H.shape[-1]].copy_(H)
        else:  # the experts that failed: (fewer, in, in)
            Hd = H[todo]
        torch.diagonal(Hd, dim1=-2, dim2=-1).add_(damp[todo, None].to(H.dtype))
        R_todo, ok = reverse_cholesky(Hd)
        if R is None:
            R = R_todo  # failed experts are overwritten by a retry below, or we raise
        elif bool(ok.any()):
            R[todo[ok]] = R_todo[ok]
        todo = todo[~ok]
        if len(todo) == 0:
            return R, damp, retries
        if attempt == 0:  # a NaN/inf entry also fails the factorization: say so instead of retrying
            H_todo = H[todo].flatten(1)  # (failed, in·in)
            bad = torch.zeros(E, dtype=torch.bool)
            bad[todo] = ~(torch.isfinite(H_todo.amax(1)) & torch.isfinite(H_todo.amin(1)))
            _raise_not_finite("H", bad, names)
        retries[todo] += 1
    names = names or [f"expert {e}" for e in range(E)]
    raise GPTQError(f"gptq_batched: Cholesky of the damped Hessian H {tuple(H.shape[1:])} failed for "
                    f"{', '.join(names[e] for e in todo.tolist())} with damping up to "
                    f"{DAMP_ESCALATION**max_retries:g}x percdamp={percdamp} times mean(diag H): H is not positive "
                    "semi-definite; check its tokens/weights, accumulate in float64, or raise percdamp / max_retries")


def _block_edges(in_f: int, block_size: int, g: int) -> list[tuple[int, int]]:
    """[(i1, i2)] blocks of the batched sweep. With groups of g > 0 columns block_size is rounded to a multiple of
    g, so a group never straddles two blocks (the result does not depend on the block size, only its rounding)."""
    if g:
        block_size = g * max(1, round(block_size / g))
    return [(i1, min(i1 + block_size, in_f)) for i1 in range(0, in_f, block_size)]


def _sub_edges(B: int, g: int) -> list[tuple[int, int]]:
    """[(s1, s2)] sub-blocks of a block of B columns that starts at a multiple of g (group length): cut every
    SUB_BLOCK columns and at every group start, so a sub-block lies in one group."""
    cuts = sorted(set(range(0, B, SUB_BLOCK)) | set(range(0, B, g)) | {B})
    return list(zip(cuts[:-1], cuts[1:]))


def _sweep_columns(Ws, Hn_s, s, lo, hi, K, U):
    """The column-by-column part of GPTQ for one sub-block of n columns of all experts, as in gptq()'s
    _quantize_blocks. Ws (E, n, out): row i is column i of every row of W, with every earlier update applied
    except this sub-block's own (modified); Hn_s (E, n, n) its block of Hinv with row i divided by Hinv_ii;
    s (E, out) the group's scale, lo = -zero and hi = maxq - zero its code range shifted by the zero point
    (or each (E, n, out): one per column, with act_order)
    (clamp(round(w/s) + zero, 0, maxq) - zero = clamp(round(w/s), lo, hi) exactly: small integers in floats).
    gptq()'s Err_i = (w_i - q_i) / Hinv_ii times Hinv_il is U_i Hn_il with U_i = w_i - q_i, so each column's
    update of the sub-block's later columns is one rank-1 op for all experts, without the division. Writes
    codes - zero and U, each (E, n, out), into K, U."""
    n = Ws.shape[1]
    per_column = s.dim() == 3
    for i in range(n):
        w = Ws[:, i]  # (E, out)
        si, loi, hii = (s[:, i], lo[:, i], hi[:, i]) if per_column else (s, lo, hi)
        k = torch.div(w, si, out=K[:, i]).round_().clamp_(loi, hii)  # code - zero
        u = torch.addcmul(w, k, si, value=-1, out=U[:, i])  # w - q, q = (code - zero) · s
        if i + 1 < n:  # w_l -= U_i Hn_il for the later columns l of the sub-block
            Ws[:, i + 1:].addcmul_(Hn_s[:, i, i + 1:, None], u[:, None], value=-1)


def _sweep_block(W1, Hn1, inv_d2, codes1, Q1, U1, K1, scale, zero, sq_err, *, i1: int, g: int, dynamic: bool,
                 bits: int, sym: bool, col_group=None):
    """GPTQ's sweep over one block of B columns of all experts, in the transposed layout: W1 (E, B, out) is the
    block with every earlier block's updates (modified), Hn1 (E, B, B) = Hinv_bb with row i divided by Hinv_ii,
    inv_d2 (E, B) = 1 / Hinv_ii². Sub-block [s1, s2) gets the block's earlier updates when it starts
    (left-looking again: one bmm with inner dimension up to B). A group that starts inside the block first gets
    them for all of its columns, so its scale sees current weights, as in gptq(). Writes the block's codes and Q
    into codes1, Q1 (E, B, out) and the group params into scale, zero (E, out, n_groups) at group starts; adds
    Σ Err² = Σ U² / Hinv_ii² to sq_err (E, out). Scratch: U1 (U = W - Q, then its squares) and K1 (E, B, out).
    col_group (E, in) (act_order): the group of each (permuted) column; static params looked up per column."""
    B, maxq = W1.shape[1], 2**bits - 1
    a = 0  # rows of the current group have every update from the block's columns < a
    for s1, s2 in _sub_edges(B, g):
        if col_group is not None:  # act_order: each column its own group's (static) params, (E, n, out)
            if s1:
                W1[:, s1:s2].baddbmm_(Hn1[:, :s1, s1:s2].mT, U1[:, :s1], alpha=-1)
            idx = col_group[:, None, i1 + s1:i1 + s2].expand(-1, scale.shape[1], -1)  # (E, out, n)
            s, z = scale.gather(2, idx).mT.contiguous(), zero.gather(2, idx).mT.contiguous()
            _sweep_columns(W1[:, s1:s2], Hn1[:, s1:s2, s1:s2], s, -z, maxq - z, K1[:, s1:s2], U1[:, s1:s2])
            torch.mul(K1[:, s1:s2], s, out=Q1[:, s1:s2])
            codes1[:, s1:s2] = K1[:, s1:s2].add_(z)
            continue
        grp = (i1 + s1) // g
        if dynamic and (i1 + s1) % g == 0:  # a group starts: bring all of its columns up to date first
            a, ge = s1, min(s1 + g, B)
            if s1:  # (E, g, out) -= (E, g, s1) @ (E, s1, out)
                W1[:, s1:ge].baddbmm_(Hn1[:, :s1, s1:ge].mT, U1[:, :s1], alpha=-1)
            scale[..., grp], zero[..., grp] = quant_params(W1[:, s1:ge], bits=bits, sym=sym, dim=1)
        elif s1 > a:  # (E, n, out) -= (E, n, s1 - a) @ (E, s1 - a, out)
            W1[:, s1:s2].baddbmm_(Hn1[:, a:s1, s1:s2].mT, U1[:, a:s1], alpha=-1)
        if s1 == 0 or (i1 + s1) % g == 0:  # the block or a group starts: the group's params, once
            s, z = scale[..., grp].contiguous(), zero[..., grp].contiguous()  # (E, out)
            lo, hi, g1 = -z, maxq - z, s1
        _sweep_columns(W1[:, s1:s2], Hn1[:, s1:s2, s1:s2], s, lo, hi, K1[:, s1:s2], U1[:, s1:s2])
        if s2 == B or (i1 + s2) % g == 0:  # the group's (or block's) last sub-block: its Q and codes at once
            K = K1[:, g1:s2]
            torch.mul(K, s[:, None], out=Q1[:, g1:s2])  # Q = (code - zero) · s, as gptq()
            codes1[:, g1:s2] = K.add_(z[:, None])  # code = (code - zero) + zero, as uint8
    sq_err[:, None].baddbmm_(inv_d2[:, None], U1.square_())  # (E, 1, B) @ (E, B, out); U1 is done with


def _sweep_batched(WT, R, scale, zero, codes, sq_err, *, bits: int, sym: bool, block_size: int, g: int,
                   dynamic: bool, col_group=None):
    """The GPTQ sweep of all experts in the transposed layout: WT (E, in, out) holds Wᵀ, so a column of every
    row of W is one contiguous row and every block update is a plain bmm. R (E, in, in) from
    damped_reverse_cholesky; scale, zero (E, out, n_groups) (filled at group starts if dynamic). During the sweep
    the finished rows of WT hold Dᵀ = (W - Q)ᵀ; on return WT holds Qᵀ = dequantize(codes)ᵀ, as computed in the
    sweep (Q = (code - zero) · scale).
    Writes codes (E, in, out) uint8 (transposed too) and adds Σ_j Err_j² (gptq()'s loss times 2) to sq_err
    (E, out)."""
    E, in_f, out_f = WT.shape
    edges = _block_edges(in_f, block_size, g if g < in_f else 0)  # blocks hold whole groups
    B = max(i2 - i1 for i1, i2 in edges)  # block buffers, allocated once (fresh memory is slow to touch)
    W1_, U1_, K1_ = (WT.new_empty(E * B * (out_f + ROW_PAD)) for _ in range(3))  # rows padded as WT's
    Q = WT.new_empty(E, in_f, out_f + ROW_PAD)[..., :out_f]  # Qᵀ, block by block; WT holds Dᵀ meanwhile
    G_ = R.new_empty(E * in_f * B)
    for i1, i2 in edges:
        W1, U1, K1 = (_view(t, E, i2 - i1, out_f + ROW_PAD)[..., :out_f] for t in (W1_, U1_, K1_))
        eye = torch.eye(i2 - i1, dtype=R.dtype, device=R.device)
        Hinv1 = torch.linalg.solve_triangular(R[:, i1:i2, i1:i2], eye, upper=True)  # (E, B, B) Hinv_bb = R_bb⁻¹
        if i1 == 0:
            W1.copy_(WT[:, :i2])
        else:  # every earlier block's updates at once: W_b + D[:, :i1] G_b (section comment), transposed:
            GT = torch.bmm(Hinv1.mT, R[:, :i1, i1:i2].mT, out=_view(G_, E, i2 - i1, i1))  # (E, B, i1) G_bᵀ
            torch.baddbmm(WT[:, i1:i2], GT.to(WT.dtype), WT[:, :i1], out=W1)  # (E, B, i1) @ (E, i1, out)
        d = torch.diagonal(Hinv1, dim1=-2, dim2=-1)  # (E, B) Hinv_ii
        _sweep_block(W1, (Hinv1 / d[..., None]).to(WT.dtype), d.pow(-2).to(WT.dtype), codes[:, i1:i2],
                     Q[:, i1:i2], U1, K1, scale, zero, sq_err, i1=i1, g=g, dynamic=dynamic, bits=bits, sym=sym,
                     col_group=col_group)
        WT[:, i1:i2] -= Q[:, i1:i2]  # from now on these rows of WT are Dᵀ = (W - Q)ᵀ
    WT.copy_(Q)


def _view(flat: torch.Tensor, *shape: int) -> torch.Tensor:
    """The first prod(shape) elements of a flat buffer as a contiguous tensor of that shape."""
    return flat[:math.prod(shape)].view(shape)


@torch.no_grad()
def gptq_batched(W: torch.Tensor | Sequence[torch.Tensor], H: torch.Tensor, *, bits: int, group_size: int = 128,
                 sym: bool = False, block_size: int = 128, percdamp: float = 0.01, act_order: bool = False,
                 static_groups: bool = False, max_retries: int = 3, names: Sequence[str] | None = None,
                 expert_chunk: int | None = None) -> list[GPTQResult]:
    """GPTQ of E matrices of one shape at once, each with its own Hessian: W (E, out, in), H (E, in, in), e.g.
    one projection of every expert of an MoE layer (W may also be a list of such stacks that share H, solved as
    their row concatenation: see gptq_batched_shared). Same arguments and results as [gptq(W[e], H[e]) for e]
    (equal codes up to float rounding: tests/test_gptq_batched.py), act_order (with static groups) included.
    Damping escalates per expert. names: one per expert, for error messages. expert_chunk: experts per sweep
    (default CPU_EXPERT_CHUNK on a CPU, all of them elsewhere); it changes speed and op count, not results.
    Each result's codes and W_hat are (out, in) views of (in, out) storage (the solver's layout)."""
    Ws = [W] if isinstance(W, torch.Tensor) else list(W)
    bad_chunk = expert_chunk is not None and expert_chunk < 1
    if any(w.dim() != 3 or w.shape[::2] != Ws[0].shape[::2] for w in Ws) or bad_chunk:
        raise ValueError(f"gptq_batched: W {[tuple(w.shape) for w in Ws]} must be (E, out, in) stacks with the same "
                         f"E and in, and expert_chunk={expert_chunk} positive (or None)")
    dtype, sizes = _compute_dtype(Ws[0]), [w.shape[1] for w in Ws]
    E, in_f = Ws[0].shape[0], Ws[0].shape[2]
    # (E, in, out): the sweep's transposed layout; rows padded by ROW_PAD floats, which speeds up its bmms by
    # about 7% (a row stride of 1536 or 2048 floats makes MKL's accesses collide in the cache)
    WT = Ws[0].new_empty((E, in_f, sum(sizes) + ROW_PAD), dtype=dtype)[..., :sum(sizes)]
    for w, WT_w in zip(Ws, WT.split(sizes, dim=2)):  # in slices of 32 rows of W: a plain .mT copy is 3x slower
        for r in range(0, w.shape[1], 32):
            WT_w[..., r:r + 32].copy_(w[:, r:r + 32].detach().mT)
    _check_batched_args(WT.mT, H, bits, group_size, block_size, percdamp, act_order, static_groups, names)
    out_f = WT.shape[2]
    dead = torch.diagonal(H, dim1=-2, dim2=-1) == 0  # (E, in) channels no token reached
    if bool(dead.any()):
        H = H.clone()
        torch.diagonal(H, dim1=-2, dim2=-1)[dead] = 1
        WT.masked_fill_(dead[:, :, None], 0)
    g, dynamic = _group_len(in_f, group_size), group_size != -1 and not static_groups
    if dynamic:  # filled group by group during the sweep
        scale = torch.empty(E, out_f, n_groups(in_f, group_size), dtype=dtype, device=WT.device)
        zero = torch.empty_like(scale)
    else:  # per channel, or static groups: from W before any update, as group_params
        params = [quant_params(WT[:, a:a + g], bits=bits, sym=sym, dim=1) for a in range(0, in_f, g)]
        scale, zero = (torch.stack(t, dim=-1) for t in zip(*params))  # (E, out, n_groups)
    perm = col_group = None
    if act_order:  # each expert's columns (rows of WT) by its descending H_jj, as gptq(); un-permuted below
        perm = torch.argsort(torch.diagonal(H, dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)  # (E, in)
        WT = WT.gather(1, perm[..., None].expand(-1, -1, out_f))
        H = H.gather(1, perm[..., None].expand(-1, -1, in_f)).gather(2, perm[:, None].expand(-1, in_f, -1))
        col_group = perm // g
    R, damp, retries = damped_reverse_cholesky(H.detach(), percdamp=percdamp, max_retries=max_retries,
                                               names=names)
    codes = torch.empty(E, in_f, out_f, dtype=torch.uint8, device=WT.device)
    sq_err = torch.zeros(E, out_f, dtype=dtype, device=WT.device)
    chunk = expert_chunk if expert_chunk is not None else CPU_EXPERT_CHUNK if WT.device.type == "cpu" else E
    for c in range(0, E, chunk):  # the sweep, `chunk` experts at a time (the same results for any chunk)
        e = slice(c, c + chunk)
        _sweep_batched(WT[e], R[e], scale[e], zero[e], codes[e], sq_err[e], bits=bits, sym=sym,
                       block_size=block_size, g=g, dynamic=dynamic,
                       col_group=None if col_group is None else col_group[e])  # WT now holds Ŵᵀ
    if act_order:  # rows back to the original column order
        inv = torch.argsort(perm, dim=-1)[..., None].expand(-1, -1, out_f)
        codes, WT = codes.gather(1, inv), WT.gather(1, inv)
    row_loss = sq_err / 2
    _raise_not_finite("W", ~torch.isfinite(row_loss).all(1), names)  # NaN/inf weights make their rows' loss NaN
    zero = None if sym else zero.to(torch.uint8)
    damp, retries, n_dead = damp.tolist(), retries.tolist(), dead.sum(1).tolist()
    codes, W_hat = codes.mT, WT.mT  # (E, out, in) views
    return [GPTQResult(codes=codes[e], scale=scale[e], zero=None if zero is None else zero[e], W_hat=W_hat[e],
                       damp=damp[e], retries=retries[e], row_loss=row_loss[e], n_dead=n_dead[e])
            for e in range(E)]


@torch.no_grad()
def gptq_batched_shared(Ws: Sequence[torch.Tensor], H: torch.Tensor, **kwargs) -> list[list[GPTQResult]]:
    """gptq_batched of several stacks of matrices that read the same inputs, e.g. Ws = [gate (E, I, in),
    up (E, I, in)] of every expert, with one Hessian per expert H (E, in, in) (as gptq_shared for one expert).
    Returns one list per matrix of Ws, with one result per expert. kwargs as for gptq_batched()."""
    sizes = [W.shape[1] for W in Ws]
    per_expert = [_split_rows(r, sizes) for r in gptq_batched(list(Ws), H, **kwargs)]
    return [list(rs) for rs in zip(*per_expert)]


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


# ---- CLI driver (sequential layer-by-layer loop) ----
#
#   python gptq.py --bits 3                      # default: VEQ-MA on the bundled tiny model and calib/
#   python gptq.py --method gptq --bits 4 --group-size 32 --model DIR --calib calib/ --out quantized/
#
# For each decoder layer l (inputs produced by the already-quantized layers < l):
#   1. load layer l from the checkpoint (one layer in memory at a time);
#   2. [awq | smoothquant | veq-me | ecs] search per-channel scales on the layer's float inputs and fold them in
#      (ecs.py); [ecs-faq | ecmfq] first read the layer's attention for FAQ's token weights (hessian.py);
#   3. run the layer on every calibration sample with hooks on every nn.Linear: accumulate one Hessian per
#      distinct input (q/k/v share one, an expert's gate/up share one), experts seeing only their routed
#      tokens, each token weighted as the method says (token_weights below);
#   4. quantize every linear (RTN or GPTQ), swap it for a packed QuantLinear;
#   5. recompute the layer's outputs with the quantized weights (+ DeepStack), write the layer atomically.
# Router, norms, embeddings, vision tower and lm_head stay in float.

import argparse  # noqa: E402
from dataclasses import asdict  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import calibrate  # noqa: E402
import data  # noqa: E402
import model as model_lib  # noqa: E402
from hessian import Hessian  # noqa: E402

METHODS = ("veq-ma", "gptq", "rtn", "awq", "smoothquant", "smoothquant-gptq", "veq-me", "veq", "ecs", "ecs-faq",
           "ecmfq")
# method -> scale search before quantizing (veq = VEQ-ME scales then VEQ-MA GPTQ: an extension, not in the paper)
SCALED = {"awq": "awq", "smoothquant": "smoothquant", "smoothquant-gptq": "smoothquant", "veq-me": "veq-me",
          "veq": "veq-me", "ecs": "ecs", "ecs-faq": "ecs", "ecmfq": "ecs"}
RTN_SOLVER = ("rtn", "awq", "smoothquant", "veq-me")  # methods that round to nearest after any scaling
MA_WEIGHTS = ("veq-ma", "veq")  # methods whose Hessians use VEQ-MA token weights
FAQ_WEIGHTS = ("ecs-faq", "ecmfq")  # methods whose Hessians and ECS loss use FAQ's fusion weights
ECS_LOSSES = ("trimmed", "huber", "mse")  # --ecs-loss: ecs.trimmed_squared_error(0.01), ecs.huber(0.1), MSE
ECS_OMEGAS = ("freq", "prob", "veq")  # --ecs-omega: see ecs_omega
# ECMFQ = ECS scales + FAQ-weighted GPTQ on a MACS-selected calibration set (calibrate.py --select macs)
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.")


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


@dataclass
class LayerInput:
    """One calibration sample flowing through the decoder: hidden states (1, T, D), the per-forward inputs,
    and which positions are image tokens (T,)."""

    x: torch.Tensor
    ctx: object
    is_vis: torch.Tensor


def token_weights(q: QuantArgs, gamma: float, is_vis, p=None, fusion=None):
    """Per-token Hessian weights c_j for the tokens of one linear's input (None = all 1, plain GPTQ).
    VEQ-MA (arXiv 2602.01037, eq. 7): c_j = p_j^λ · α_j on an expert's routed tokens, with p_j the router
    weight of that expert for token j and α_j = γ for text, 1 for image tokens; non-expert linears get α_j
    alone (or nothing with plain_dense). FAQ: c_j = w_j · p_j on experts, w_j elsewhere, with w_j the fusion
    weight (hessian.fusion_weights) of those tokens. Returns (n,) or None."""
    if q.method in FAQ_WEIGHTS:
        return fusion.double() if p is None else fusion.double() * p.double()
    if q.method not in MA_WEIGHTS:
        return None
    alpha = torch.where(is_vis, 1.0, gamma if q.modality else 1.0).double()
    if p is None:  # attention, shared expert, dense MLP
        return None if q.plain_dense else alpha
    affinity = p.double() ** q.lam if q.affinity else torch.ones_like(alpha)
    return affinity * alpha


class LayerCapture:
    """Forward hooks on every nn.Linear of one decoder layer and on its router, accumulating one Hessian per
    distinct input tensor. An expert's linears see only the rows routed to it: `run_experts` feeds expert e
    the tokens torch.where(topk_idx == e) in token order, and the router hook records topk for this forward."""

    def __init__(self, layer: nn.Module, q: QuantArgs, gamma: float):
        self.q, self.gamma = q, gamma
        self.H: dict[str, Hessian] = {}  # input key -> accumulator
        self.key_of: dict[str, str] = {}  # linear name -> input key
        self.tokens: dict[str, list[int]] = {}  # input key -> [n_text, n_vis]
        self.pool: Hessian | None = None  # all tokens entering the MoE block (for starved experts)
        self.moe_inputs: list[torch.Tensor] = []
        self.is_vis, self.fusion, self.routing, self._seen = None, None, None, {}
        self.handles = [mod.register_forward_pre_hook(self._linear_hook(name))
                        for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)]
        gate = getattr(getattr(layer, "mlp", None), "gate", None)
        if gate is not None and not isinstance(gate, nn.Linear):  # a router (kept float)
            self.handles.append(gate.register_forward_hook(self._router_hook))

    def start_sample(self, is_vis, fusion=None):
        """is_vis (T,) of the next sample; fusion (T,) its FAQ weights (FAQ methods only)."""
        self.is_vis, self.fusion, self.routing, self._seen = is_vis, fusion, None, {}

    def _router_hook(self, module, args, out):
        x = args[0].reshape(-1, args[0].shape[-1])
        self.routing = (out[0], out[1].float())  # topk_idx (T, k), topk_w (T, k)
        if self.pool is None:
            self.pool = Hessian(x.shape[-1], dtype=torch.float64)
        self.pool.add(x)
        self.moe_inputs.append(x.detach())

    def _linear_hook(self, name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            # same tensor object -> same Hessian; the tensor is kept so its id cannot be reused in this forward
            key = self._seen.setdefault(id(args[0]), (args[0], name))[1]
            self.key_of.setdefault(name, key)
            if key != name:  # already accumulated for this forward by the first reader
                return
            m = _EXPERT.match(name)
            tok = slice(None)
            if m:
                tok, slot = torch.where(self.routing[0] == int(m.group(1)))
                p = self.routing[1][tok, slot]
            else:
                p = None
            is_vis, fusion = self.is_vis[tok], None if self.fusion is None else self.fusion[tok]
            if key not in self.H:
                self.H[key], self.tokens[key] = Hessian(x.shape[-1], dtype=torch.float64), [0, 0]
            self.H[key].add(x, token_weights(self.q, self.gamma, is_vis, p, fusion))
            self.tokens[key][0] += int((~is_vis).sum())
            self.tokens[key][1] += int(is_vis.sum())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def pooled_hessian(layer, name: str, cap: LayerCapture) -> torch.Tensor:
    """For an expert with (almost) no routed tokens: the Hessian of what its linear would see if every MoE
    token were routed to it (gate/up: the MoE input; down: that expert's activations on the MoE input)."""
    if name.endswith("down_proj"):
        expert = layer.get_submodule(name.rsplit(".", 1)[0])
        H = Hessian(expert.down_proj.in_features, dtype=torch.float64)
        for x in cap.moe_inputs:
            H.add(F.silu(expert.gate_proj(x)) * expert.up_proj(x))
        return H.finalize(release=True, dtype=torch.float32)
    return cap.pool.finalize(dtype=torch.float32)


def input_groups(layer, cap: LayerCapture, prefix: str) -> dict[str, list[str]]:
    """Hessian key -> the linears reading that input. An expert no token reached reads the same (absent) input
    with its gate and up, so they stay one group, as for every other expert."""
    by_key: dict[str, list[str]] = {}
    for name, mod in layer.named_modules():
        if isinstance(mod, nn.Linear):
            if name not in cap.key_of and not _EXPERT.match(name):
                raise RuntimeError(f"{prefix}{name}: no calibration token reached this linear")
            key = cap.key_of.get(name) or (name[:-len("up_proj")] + "gate_proj" if name.endswith("up_proj") else name)
            by_key.setdefault(key, []).append(name)
    return by_key


def solve_batched(layer, keys: list[str], by_key, H: dict, q: QuantArgs, prefix: str) -> dict:
    """All experts' gate/up (one Hessian each) in one gptq_batched_shared call, all down_proj in one
    gptq_batched call: same results as the per-expert loop up to float rounding ties (tests/test_gptq_batched)."""
    out = {}
    for role in ("gate_proj", "down_proj"):
        ks = [k for k in keys if k.endswith(role)]
        if not ks:
            continue
        stacks = [torch.stack([layer.get_submodule(by_key[k][j]).weight.float() for k in ks])
                  for j in range(len(by_key[ks[0]]))]  # per reader of the input: (E, out, in)
        Hs = H[ks[0]].new_empty((len(ks),) + tuple(H[ks[0]].shape))  # (E, in, in)
        for e, k in enumerate(ks):  # each expert's Hessian moves into the stack (no second copy of all of them)
            Hs[e] = H.pop(k)
            H[k] = Hs[e]
        res = gptq_batched_shared(stacks, Hs, bits=q.bits, group_size=q.group_size, sym=q.sym,
                                  block_size=q.block_size, percdamp=q.percdamp, act_order=q.act_order,
                                  static_groups=q.static_groups, names=[prefix + k for k in ks])
        for e, k in enumerate(ks):
            out[k] = [res[j][e] for j in range(len(stacks))]
    return out


def quantize_linears(layer, cap: LayerCapture, q: QuantArgs, prefix: str) -> dict:
    """Quantize every linear of the layer from its captured Hessian (GPTQ) or directly (RTN), swap each for a
    packed QuantLinear, and return the per-linear report."""
    by_key = input_groups(layer, cap, prefix)
    starved = {k: _EXPERT.match(k) is not None and (q.all_experts_hessian or
                                                    (cap.H[k].n_tokens if k in cap.H else 0) < q.min_expert_tokens)
               for k in by_key}  # quantized from the pooled Hessian: every token entering the MoE block
    H = {k: pooled_hessian(layer, k, cap) if starved[k] else cap.H[k].finalize(release=True, dtype=torch.float32)
         for k in by_key}  # float32, as the solvers take it; the float64 sums are released one by one
    results = {}
    if q.batched_experts and q.method not in RTN_SOLVER:
        results = solve_batched(layer, [k for k in by_key if _EXPERT.match(k)], by_key, H, q, prefix)
    for key, names in by_key.items():
        if key in results:  # solved by the batched path
            continue
        W = [layer.get_submodule(n).weight.float() for n in names]
        if q.method in RTN_SOLVER:
            results[key] = [rtn(w, bits=q.bits, group_size=q.group_size, sym=q.sym) for w in W]
        else:
            results[key] = gptq_shared(W, H[key], bits=q.bits, group_size=q.group_size, sym=q.sym,
                                       block_size=q.block_size, percdamp=q.percdamp, act_order=q.act_order,
                                       static_groups=q.static_groups, name=prefix + key)
    report = {}
    for key, names in by_key.items():
        n_text, n_vis = cap.tokens.get(key, (0, 0))
        for name, r in zip(names, results[key]):
            lin = layer.get_submodule(name)
            ql = model_lib.QuantLinear.from_codes(r.codes, r.scale, r.zero, bits=q.bits, group_size=q.group_size,
                                                  sym=q.sym, abits=q.abits if q.abits < 16 else None)
            report[name] = {"tokens_text": n_text, "tokens_vis": n_vis, "pooled_hessian": starved[key],
                            "damp": getattr(r, "damp", None), "cholesky_retries": getattr(r, "retries", 0),
                            "rel_error": relative_output_error(lin.weight.float(), r.W_hat, H[key])}
            parent, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, attr, ql.to(lin.weight.device))
    return report


class InputCapture:
    """Hooks keeping the raw float inputs (n, d) of chosen modules of a layer (concatenated over samples) and
    every token's top-k experts (n, k), for the scale searches."""

    def __init__(self, layer, names: list[str]):
        self.X = {n: [] for n in names}
        self.topk, self.handles = [], []
        for n in names:
            self.handles.append(layer.get_submodule(n).register_forward_pre_hook(self._hook(n)))
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and not isinstance(gate, nn.Linear):
            self.handles.append(gate.register_forward_hook(lambda mod, a, out: self.topk.append(out[0])))

    def _hook(self, name):
        def hook(module, args):
            self.X[name].append(args[0].reshape(-1, args[0].shape[-1]).detach())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def group_consumers(layer, consumers: list[str], topk, ecs) -> list:
    """ecs.Consumer per reader: an expert's gate and up stacked (they read the same rows), restricted to its
    routed tokens; other readers see every token."""
    out = []
    for c in consumers:
        if c.endswith("up_proj") and c[:-len("up_proj")] + "gate_proj" in consumers:
            continue  # stacked with its gate_proj below
        W = layer.get_submodule(c).weight.float()
        if c.endswith("gate_proj"):
            W = torch.cat([W, layer.get_submodule(c[:-len("gate_proj")] + "up_proj").weight.float()])
        m = _EXPERT.match(c)
        rows = torch.where((topk == int(m.group(1))).any(-1))[0] if m and topk is not None else None
        out.append(ecs.Consumer(W=W, rows=rows, name=c))
    return out


def expert_importance(consumers: list[str], counts, gamma: float, beta: float, q: QuantArgs) -> list[float]:
    """VEQ-ME's S_e = γ·N_e^text + β·N_e^vis (arXiv 2602.01037, eq. 5) per reader of the MoE input, in the order
    group_consumers lists them; a shared expert reads every token (N = T). counts: calib's (n_text (E,),
    n_vis (E,), T_text, T_vis) of this layer. γ, β set to 1 by the ablation flags."""
    n_text, n_vis, T_text, T_vis = counts
    g, b = (gamma if q.use_gamma else 1.0), (beta if q.use_beta else 1.0)
    out = []
    for c in consumers:
        if c.endswith("up_proj") and c[:-len("up_proj")] + "gate_proj" in consumers:
            continue
        m = _EXPERT.match(c)
        nt, nv = (float(n_text[int(m.group(1))]), float(n_vis[int(m.group(1))])) if m else (T_text, T_vis)
        out.append(g * nt + b * nv)
    return out


def ecs_omega(readers, consumers: list[str], topk, q: QuantArgs, importance=None, mean_prob=None) -> list[float]:
    """ECS's ω_e per reader of the MoE input (group_consumers order): routing frequency n_e / N (default),
    the layer's mean router probability of e (calib/), or VEQ-ME's S_e; a shared expert reads every token
    (frequency 1, probability 1)."""
    if q.ecs_omega == "veq":
        return importance(consumers)
    out = []
    for r in readers:
        m = _EXPERT.match(r.name)
        if m is None:
            out.append(1.0)
        elif q.ecs_omega == "freq":
            out.append(len(r.rows) / topk.shape[0])
        else:
            out.append(float(mean_prob[int(m.group(1))]))
    return out


def ecs_loss(q: QuantArgs):
    import ecs

    return {"trimmed": ecs.trimmed_squared_error(0.01), "huber": ecs.huber(0.1), "mse": ecs.squared_error}[q.ecs_loss]


def layer_fusion_weights(layer, acts, eta: float) -> list[torch.Tensor]:
    """FAQ: one float forward of the layer per sample with its attention probabilities handed to
    hessian.fusion_scores (model.decoder_attention's probs_hook), then hessian.fusion_weights over the set.
    Returns one (T,) weight tensor per sample."""
    from hessian import fusion_scores, fusion_weights

    scores = []
    try:
        with torch.no_grad():
            for smp in acts:
                layer.self_attn.probs_hook = lambda p, v=smp.is_vis: scores.append(fusion_scores(p[0], v))
                layer(smp.x, smp.ctx)
    finally:
        del layer.self_attn.probs_hook
    return fusion_weights(scores, [smp.is_vis for smp in acts], eta)


def search_and_fold(layer, groups, acts, q: QuantArgs, importance=None, fusion=None, mean_prob=None) -> dict:
    """AWQ / SmoothQuant / VEQ-ME / ECS (ecs.py) on each scaling group of the layer: capture the group's float
    input X (the router's input for the MoE block), search the per-channel scale s, then fold 1/s into the
    producer and s into every consumer and the router (kept float, so routing is unchanged). ECS: SmoothQuant
    on attention inputs, ecs_scale on MLP groups (the MoE block: all experts; up -> down: one expert) with
    FAQ's weights (fusion, per sample) as token weights. Returns per-group reports."""
    import ecs

    source = {p: (r if r else cons[0]) for p, cons, r in groups}  # a module whose input is the group's X
    cap = InputCapture(layer, sorted(set(source.values())))
    try:
        with torch.no_grad():
            for smp in acts:
                layer(smp.x, smp.ctx)
    finally:
        cap.remove()
    topk = torch.cat(cap.topk) if cap.topk else None
    report = {}
    for producer, consumers, router in groups:
        if not cap.X[source[producer]]:  # an expert no calibration token reached: nothing to scale on
            report[producer] = {"skipped": "no tokens"}
            continue
        X = torch.cat(cap.X[source[producer]]).float()
        readers = group_consumers(layer, consumers, topk if router else None, ecs)
        attention_group = all(c.startswith("self_attn.") for c in consumers)
        if SCALED[q.method] == "ecs" and not attention_group:
            c = torch.cat(fusion) if fusion is not None else None  # (N,) every token of the layer
            expert = _EXPERT.match(producer)
            if c is not None and expert is not None:  # an expert's down_proj: its routed tokens, in order
                c = c[torch.where((topk == int(expert.group(1))).any(-1))[0]]
            omega = ecs_omega(readers, consumers, topk, q, importance, mean_prob) if router else None
            r = ecs.ecs_scale(X, readers, bits=q.bits, group_size=q.group_size, sym=q.sym, abits=q.abits,
                              omega=omega, token_weights=c, percentile=q.ecs_percentile, n_grid=q.ecs_grid,
                              rho=ecs_loss(q))
            s, report[producer] = r.s, {"alpha": r.alpha, "rel_error": r.rel_error,
                                        "rel_error_no_scale": r.rel_error_no_scale,
                                        "zero_channels": r.n_zero_channels}
        elif SCALED[q.method] in ("awq", "veq-me"):
            S = importance(consumers) if SCALED[q.method] == "veq-me" and router else None  # VEQ-ME: S_e
            r = ecs.awq_scale(X, readers, bits=q.bits, group_size=q.group_size, sym=q.sym, abits=q.abits,
                              consumer_weights=S)
            s, report[producer] = r.s, {"alpha": r.alpha, "rel_error": r.rel_error,
                                        "rel_error_no_scale": r.rel_error_no_scale}
        else:
            r = ecs.smoothquant_scale(X.abs().amax(0), [c.W for c in readers], alpha=0.5)
            s, report[producer] = r.s, {"alpha": 0.5, "zero_channels": r.n_zero_channels}
        fold_group(layer, producer, consumers, router, s, ecs)
    return report


def fold_group(layer, producer: str, consumers: list[str], router: str | None, s, ecs):
    """Producer output / s (a norm's weight, or a linear's output rows), consumers' input columns * s."""
    prod = layer.get_submodule(producer)
    with torch.no_grad():
        if isinstance(prod, nn.Linear):
            prod.weight.copy_(ecs.fold_into_linear_rows(prod.weight, s)[0])
        else:
            prod.weight.copy_(ecs.fold_into_norm(prod.weight, s))
        for name in consumers + ([router] if router else []):
            mod = layer.get_submodule(name)
            mod.weight.copy_(ecs.scale_consumer(mod.weight, s))


def run_layer(m, i: int, samples: list) -> list:
    """The layer's outputs (+ DeepStack injection) for every sample."""
    layer = m.layers[i]
    with torch.no_grad(), model_lib.dequantize_once(layer):
        return [LayerInput(m.after_layer(i, layer(s.x, s.ctx), s.ctx), s.ctx, s.is_vis) for s in samples]


def quantize_vision_tower(m, proc, samples, q: QuantArgs, device) -> dict:
    """--quantize-vision: GPTQ (RTN for the RTN methods) every nn.Linear of the vision tower and projector from
    the Hessians of their inputs on the calibration images (unweighted, all patches), before the decoder
    loop, so the decoder is calibrated on the quantized tower's features. The patch embedding stays float."""
    linears = {f"v{j}.{n}": mod for j, root in enumerate(m.vision_modules())
               for n, mod in root.named_modules() if isinstance(mod, nn.Linear)}
    H = {k: Hessian(mod.in_features, dtype=torch.float64) for k, mod in linears.items()}
    handles = [mod.register_forward_pre_hook(lambda mod_, a, k=k: H[k].add(a[0])) for k, mod in linears.items()]
    try:
        with torch.no_grad():
            for s in samples:
                if s.image is not None:
                    e = data.encode_sample(proc, s)
                    m.embed(e["input_ids"].to(device), **{k: v.to(device) for k, v in data.vision_inputs(e).items()})
    finally:
        for h in handles:
            h.remove()
    report = {}
    for k, lin in linears.items():
        Hk, W = H[k].finalize(), lin.weight.float()
        r = rtn(W, bits=q.bits, group_size=q.group_size, sym=q.sym) if q.method in RTN_SOLVER else \
            gptq(W, Hk.float(), bits=q.bits, group_size=q.group_size, sym=q.sym, block_size=q.block_size,
                 percdamp=q.percdamp, name=k)
        ql = model_lib.QuantLinear.from_codes(r.codes, r.scale, r.zero, bits=q.bits, group_size=q.group_size,
                                              sym=q.sym, bias=None if lin.bias is None else lin.bias.float())
        root = m.vision_modules()[int(k[1:k.index(".")])]
        parent, _, attr = k[k.index(".") + 1:].rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, attr, ql.to(lin.weight.device))
        report[k] = {"tokens": H[k].n_tokens, "rel_error": relative_output_error(W, r.W_hat, Hk)}
    return report


def embed_samples(m, proc, samples, device) -> list:
    """Decoder inputs of every calibration sample (prompt + gold answer, teacher forced, batch 1)."""
    out = []
    with torch.no_grad():
        for s in samples:
            b = data.encode_qa_batch(proc, [s])
            vision = {k: v.to(device) for k, v in data.vision_inputs(b).items()}
            x, ctx = m.embed(b["input_ids"].to(device), **vision)
            out.append(LayerInput(x, ctx, b["is_vis"][0].to(device)))
    return out


def layer_state(m, i: int) -> dict:
    """Layer i's tensors under their checkpoint names (packed linears, float norms and router)."""
    prefix = m.layer_prefix(i)
    return {prefix + k: v.detach().contiguous() for k, v in m.layers[i].state_dict().items()}


def save_atomic(tensors: dict, path: str, metadata: dict | None = None):
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def restore_layer(m, i: int, path: str, q: QuantArgs):
    """Resume: rebuild layer i from its saved result (QuantLinear shells, then the saved tensors)."""
    from safetensors.torch import load_file

    layer = m.load_layer(i)
    model_lib.to_quant_shells(layer, bits=q.bits, group_size=q.group_size, sym=q.sym,
                              abits=q.abits if q.abits < 16 else None)
    sd = load_file(path)
    prefix = m.layer_prefix(i)
    layer.load_state_dict({k[len(prefix):]: v for k, v in sd.items()}, strict=True)




def quantization_config(q: QuantArgs, ignore: list[str]) -> dict:
    """compressed-tensors `pack-quantized` description of what was done (vLLM / llm-compressor read it)."""
    weights = {"num_bits": q.bits, "type": "int", "symmetric": q.sym, "dynamic": False, "observer": "minmax",
               "strategy": "channel" if q.group_size == -1 else "group",
               "group_size": None if q.group_size == -1 else q.group_size,
               "actorder": "static" if q.act_order and q.method not in RTN_SOLVER else None}
    acts = None if q.abits >= 16 else {"num_bits": q.abits, "type": "int", "symmetric": True, "dynamic": True,
                                        "strategy": "token"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
            "ignore": ignore, "moe_vlm_quant": asdict(q)}


def ignored_modules(m) -> list[str]:
    """Module names that stay float: every nn.Linear outside the decoder layers, and the routers, each by its
    exact checkpoint name (as llm-compressor writes them). Exact dotted names, not `re:` patterns: vLLM renames
    exact entries with the model's checkpoint-to-vLLM prefix map before matching them against its own module
    names, but leaves `re:` entries as they are (compressed_tensors.py, CompressedTensorsConfig.apply_vllm_mapper),
    so a regex over checkpoint names misses e.g. Qwen3-VL's `language_model.model.layers.N.mlp.gate`; and vLLM's
    Qwen3-MoE router is a GateLinear built with the quantization config (qwen3_moe.py), which a `Linear` target
    then quantizes unless the ignore list matches it."""
    names = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)
             and not any(n.startswith(m.layer_prefix(i)) for i in range(len(m.layers)))]
    routers = [f"{m.layer_prefix(i)}mlp.gate" for i, layer in enumerate(m.layers) if hasattr(layer.mlp, "gate")]
    return names + routers


def write_output(m, model_dir: str, out: str, q: QuantArgs, partial: str, report: dict, inputs=(),
                 overwrite: bool = False):
    """Assemble out/: config.json with quantization_config, the weights as shards (the float non-layer tensors,
    then one shard per decoder layer: the finished per-layer files, hard-linked, so nothing is copied or held
    in memory at any depth) with model.safetensors.index.json, the tokenizer / preprocessor files, report.json.
    Written to a temporary folder and renamed (`model.publish_output_dir`: only a previous output is replaced,
    unless `overwrite`); the per-layer partial results are removed only after that."""
    tmp = model_lib.temporary_output_dir(out, "quantized")
    n = len(m.layers)
    shards = [f"model-{j + 1:05d}-of-{n + 1:05d}.safetensors" for j in range(n + 1)]
    prefixes = tuple(m.layer_prefix(i) for i in range(n))
    tensors = model_lib.checkpoint_state_dict(m, keys=[k for k in m.state_dict() if not k.startswith(prefixes)])
    save_atomic(tensors, os.path.join(tmp, shards[0]), metadata={"format": "pt"})
    for i in range(n):
        os.link(os.path.join(partial, f"layer_{i:04d}.safetensors"), os.path.join(tmp, shards[i + 1]))
    write_index(tmp, shards)
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = quantization_config(q, ignored_modules(m))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in os.listdir(model_dir):  # tokenizer, preprocessor, generation config, chat template ...
        copied = name.endswith((".json", ".jinja", ".model", ".txt")) and not name.startswith("model.safetensors")
        if copied and name not in ("config.json", model_lib.OUTPUT_MARKER):
            shutil.copy(os.path.join(model_dir, name), tmp)
    with open(os.path.join(tmp, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    model_lib.publish_output_dir(tmp, out, "quantized", inputs, overwrite)
    shutil.rmtree(partial)


def write_index(folder: str, shards: list[str]):
    """model.safetensors.index.json: every tensor name -> its shard, and the tensors' total bytes (each file's
    size less its 8-byte length prefix and JSON header)."""
    from safetensors import safe_open

    weight_map, total = {}, 0
    for name in shards:
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            total += os.path.getsize(path) - 8 - int.from_bytes(f.read(8), "little")
        with safe_open(path, framework="pt") as f:
            weight_map.update({k: name for k in f.keys()})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def export_fake_quant(quantized: str, dst: str, inputs=(), overwrite: bool = False):
    """Write the dequantized weights of a packed checkpoint in the original float layout (Hub names, fused
    Qwen experts, no quantization_config), so any harness that reads the float model (lmms-eval,
    transformers, SGLang) evaluates the quantized one unchanged. Written to a temporary folder, then renamed
    (only over a previous fake-quant export, unless `overwrite`; never into `quantized` itself or `inputs`)."""
    from safetensors.torch import save_file

    if os.path.commonpath([os.path.realpath(quantized), os.path.realpath(dst)]) == os.path.realpath(dst):
        raise model_lib.OutputError(f"--fake-quant output {dst}: would replace the quantized folder {quantized} "
                                    "it reads; choose a folder inside it (the default, OUT/fake-quant) or elsewhere")
    model_lib.check_output_dir(dst, "fake-quant", inputs, overwrite, flag="--fake-quant output")
    m = model_lib.load_model(quantized, dtype=torch.float32)
    for layer in list(m.layers) + m.vision_modules():
        for name, ql in [(n, mod) for n, mod in layer.named_modules() if isinstance(mod, model_lib.QuantLinear)]:
            lin = nn.Linear(ql.in_features, ql.out_features, bias=ql.bias is not None)
            lin.weight = nn.Parameter(ql.dequantize().float(), requires_grad=False)
            if ql.bias is not None:
                lin.bias = nn.Parameter(ql.bias.float(), requires_grad=False)
            parent, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, attr, lin)
    tmp = model_lib.temporary_output_dir(dst, "fake-quant")
    sd = {k: v.contiguous() for k, v in model_lib.checkpoint_state_dict(m).items()}
    save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(quantized, "config.json")) as f:
        cfg = json.load(f)
    cfg.pop("quantization_config")
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in os.listdir(quantized):  # tokenizer, preprocessor ...; not the packed shards or their index
        weights = name.endswith(".safetensors") or name == "model.safetensors.index.json"
        if not weights and name not in ("config.json", "report.json", model_lib.OUTPUT_MARKER) \
                and os.path.isfile(os.path.join(quantized, name)):
            shutil.copy(os.path.join(quantized, name), tmp)
    model_lib.publish_output_dir(tmp, dst, "fake-quant", inputs, overwrite, flag="--fake-quant output")


def print_layer(i: int, n_layers: int, rep: dict, t0: float, t_layer: float):
    lin = rep["linears"]
    errs = [r["rel_error"] for r in lin.values()]
    pooled = [n for n, r in lin.items() if r["pooled_hessian"]]
    retries = sum(r["cholesky_retries"] for r in lin.values())
    done = i + 1
    eta = (time.time() - t0) / done * (n_layers - done)
    print(f"layer {i:3d}/{n_layers}: {len(lin)} linears, rel. output error mean {sum(errs) / len(errs):.2e} "
          f"max {max(errs):.2e}, pooled-Hessian linears {len(pooled)}, Cholesky retries {retries}, "
          f"{t_layer:.1f}s, elapsed {time.time() - t0:.0f}s, ETA {eta:.0f}s", flush=True)


def check_ecs_args(q: QuantArgs):
    if q.ecs_loss not in ECS_LOSSES or q.ecs_omega not in ECS_OMEGAS:
        raise ValueError(f"--ecs-loss {q.ecs_loss!r} / --ecs-omega {q.ecs_omega!r}: expected one of {ECS_LOSSES} "
                         f"and one of {ECS_OMEGAS}")
    if not 0 <= q.eta < 1 or not 0 < q.ecs_percentile <= 100 or q.ecs_grid < 2:
        raise ValueError(f"--eta {q.eta} must be in [0, 1), --ecs-percentile {q.ecs_percentile} in (0, 100], "
                         f"--ecs-grid {q.ecs_grid} >= 2")


def layer_importance(cal: dict, i: int, gamma: float | None, q: QuantArgs):
    """consumers -> S_e for decoder layer i from the calibration statistics (None outside MoE layers)."""
    if i not in cal["moe_layers"]:
        return None
    j = cal["moe_layers"].index(i)
    beta = cal["T_text"] / max(1, cal["T_vis"])  # β = T_text / T_vis
    counts = (cal["n_text"][j], cal["n_vis"][j], cal["T_text"], cal["T_vis"])
    return lambda consumers: expert_importance(consumers, counts, gamma or 1.0, beta, q)


def quantize_model(model: str, calib: str = "calib", out: str = "quantized", q: QuantArgs | None = None,
                   resume: bool = False, device: str = "cpu", command: str | None = None,
                   overwrite: bool = False) -> dict:
    """The sequential loop. Returns the run report (also written to out/report.json). `out` and its
    `out.partial/` are refused before any work if they are not previous outputs (`model.check_output_dir`)."""
    q = q or QuantArgs()
    inputs = [model, calib]
    partial = out.rstrip("/") + ".partial"
    model_lib.check_output_dir(out, "quantized", inputs, overwrite)
    model_lib.check_output_dir(partial, "partial", inputs, overwrite, flag="--out's partial folder")
    if q.method not in METHODS:
        raise ValueError(f"--method {q.method!r}: expected one of {METHODS}")
    t0 = time.time()
    cal = calibrate.load(calib)
    if os.path.abspath(cal["model"]) != os.path.abspath(model):
        print(f"note: {calib}/ was made with --model {cal['model']}, quantizing {model}", file=sys.stderr)
    gamma = q.gamma if q.gamma is not None else cal.get({"grad": "gamma", "grad_x_input": "gamma_grad_x_input"}
                                                         [q.gamma_source])
    if q.method in ("veq-ma", "veq-me", "veq") and gamma is None and (q.modality and q.use_gamma):
        raise ValueError(f"{calib}/calib.json has no gamma (calibrate.py --no-gamma?); pass --gamma or --no-modality")
    if q.method == "ecmfq" and cal.get("selection") != "macs":
        raise ValueError(f"--method ecmfq quantizes on a MACS-selected calibration set, but {calib}/ was selected "
                         f"by {cal.get('selection')!r}: run `python calibrate.py --select macs --out {calib}` first, "
                         f"or use --method ecs-faq (the same quantizer on this calib/)")
    check_ecs_args(q)
    m = model_lib.load_model(model, dtype=torch.float32, device=device, lazy_layers=True)
    proc = data.load_processor(model)
    samples = calibrate.calibration_samples(cal)
    vision_report = quantize_vision_tower(m, proc, samples, q, device) if q.quantize_vision else None
    acts = embed_samples(m, proc, samples, device)
    if os.path.isdir(partial) and not resume:
        shutil.rmtree(partial)  # a previous run's partial/ (checked above), or --overwrite
    if not os.path.isdir(partial):
        model_lib.make_output_dir(partial, "partial", command)
    report = {"method": q.method, "bits": q.bits, "group_size": q.group_size, "abits": q.abits, "sym": q.sym,
              "model": model, "calib": calib, "gamma": gamma, "n_samples": len(acts), "seed": cal["seed"],
              "command": command or " ".join(sys.argv), "args": asdict(q), "vision": vision_report, "layers": {}}
    n = len(m.layers)
    for i in range(n):
        t_layer = time.time()
        path = os.path.join(partial, f"layer_{i:04d}.safetensors")
        if resume and os.path.exists(path):
            restore_layer(m, i, path, q)
            with open(path[:-len(".safetensors")] + ".json") as f:
                report["layers"][str(i)] = json.load(f)
            print(f"layer {i:3d}/{n}: restored from {path}")
        else:
            layer = m.load_layer(i)
            fusion = layer_fusion_weights(layer, acts, q.eta) if q.method in FAQ_WEIGHTS else None
            mean_prob = cal["mean_prob"][cal["moe_layers"].index(i)] if i in cal["moe_layers"] else None
            scales = search_and_fold(layer, m.scaling_groups(i), acts, q, importance=layer_importance(cal, i, gamma, q),
                                     fusion=fusion, mean_prob=mean_prob) if q.method in SCALED else {}
            cap = LayerCapture(layer, q, gamma or 1.0)
            try:
                with torch.no_grad():
                    for j, s in enumerate(acts):
                        cap.start_sample(s.is_vis, None if fusion is None else fusion[j])
                        layer(s.x, s.ctx)
            finally:
                cap.remove()
            rep = {"linears": quantize_linears(layer, cap, q, m.layer_prefix(i)), "scales": scales}
            del cap  # its Hessians (GBs at real width) must not live on into the next layer
            save_atomic(layer_state(m, i), path, metadata={"format": "pt"})
            with open(path[:-len(".safetensors")] + ".json.tmp", "w") as f:
                json.dump(rep, f)
            os.replace(path[:-len(".safetensors")] + ".json.tmp", path[:-len(".safetensors")] + ".json")
            report["layers"][str(i)] = rep
            print_layer(i, n, rep, t0, time.time() - t_layer)
        acts = run_layer(m, i, acts)
        m.unload_layer(i)
    report["seconds"] = time.time() - t0
    report["pooled_hessian_linears"] = [f"{i}:{k}" for i, rep in report["layers"].items()
                                        for k, r in rep["linears"].items() if r["pooled_hessian"]]
    report["cholesky_retries"] = sum(r["cholesky_retries"] for rep in report["layers"].values()
                                     for r in rep["linears"].values())
    write_output(m, model, out, q, partial, report, inputs, overwrite)
    how = "error measured on" if q.method in RTN_SOLVER else "quantized from"
    which = ("with --all-experts-hessian" if q.all_experts_hessian
             else f"with < {q.min_expert_tokens} calibration tokens")
    print(f"wrote {out}/ ({q.method}, W{q.bits} g{q.group_size} A{q.abits}) in {report['seconds']:.1f}s; "
          f"{len(report['pooled_hessian_linears'])} expert linears {which} ({how} the layer's pooled MoE "
          f"Hessian), {report['cholesky_retries']} Cholesky retries")
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description="Quantize an MoE VLM layer by layer (see the section comment).")
    p.add_argument("--model", default=calibrate.DEFAULT_MODEL, help="float checkpoint folder")
    p.add_argument("--calib", default="calib", help="calibration folder written by calibrate.py")
    p.add_argument("--out", default="quantized",
                   help="output checkpoint folder (replaced only if it is a previous output of gptq.py or empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out (and OUT.partial/, OUT/fake-quant/) even if not written by this tool; "
                        "the model and calib folders are never replaced")
    p.add_argument("--method", default="veq-ma", choices=METHODS, help="quantization method")
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
    p.add_argument("--ecs-loss", default="trimmed", choices=ECS_LOSSES,
                   help="ECS loss: MSE with the top 1%% token errors dropped, Huber, or plain MSE")
    p.add_argument("--ecs-omega", default="freq", choices=ECS_OMEGAS,
                   help="ECS expert weights: routing frequency, mean router probability, or VEQ-ME's S_e")
    p.add_argument("--ecs-percentile", type=float, default=99.9, help="ECS: percentile of |X| for m_X")
    p.add_argument("--ecs-grid", type=int, default=21, help="ECS: number of alphas in [0, 1]")
    p.add_argument("--fake-quant", action="store_true",
                   help="also write OUT/fake-quant/: dequantized weights in the original float layout")
    p.add_argument("--resume", action="store_true", help="continue from the last finished layer in OUT.partial/")
    p.add_argument("--no-eval", action="store_true", help="skip the closing comparison with the float model")
    p.add_argument("--eval-n", type=int, default=200, help="held-out samples for the closing comparison")
    p.add_argument("--device", default="cpu", help="torch device")
    a = p.parse_args(argv)
    q = QuantArgs(method=a.method, bits=a.bits, group_size=a.group_size, sym=a.sym, abits=a.abits,
                  act_order=a.act_order, percdamp=a.percdamp,
                  static_groups=a.act_order if a.static_groups is None else a.static_groups,
                  min_expert_tokens=a.min_expert_tokens, all_experts_hessian=a.all_experts_hessian, lam=a.lam,
                  gamma=a.gamma, affinity=not a.no_affinity,
                  modality=not a.no_modality, plain_dense=a.plain_dense, use_gamma=not a.no_gamma,
                  use_beta=not a.no_beta, gamma_source=a.gamma_source, batched_experts=a.batched_experts,
                  quantize_vision=a.quantize_vision, eta=a.eta, ecs_loss=a.ecs_loss, ecs_omega=a.ecs_omega,
                  ecs_percentile=a.ecs_percentile, ecs_grid=a.ecs_grid)
    command = "python gptq.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = quantize_model(a.model, a.calib, a.out, q, resume=a.resume, device=a.device, command=command,
                            overwrite=a.overwrite)
    if a.fake_quant:
        export_fake_quant(a.out, os.path.join(a.out, "fake-quant"), [a.model, a.calib], a.overwrite)
        print(f"wrote {a.out}/fake-quant/ (dequantized weights, original layout)")
    cal = calibrate.load(a.calib)
    if cal["data"] in data.SHAPES_SPECS and not a.no_eval:
        import eval as evaluation

        result = evaluation.evaluate(a.out, reference=a.model, n=a.eval_n, device=a.device, command=command)
        print(evaluation.markdown(result))
    return report


if __name__ == "__main__":
    main()
