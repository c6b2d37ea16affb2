"""GPTQ for all experts of an MoE layer at once: gptq_batched / gptq_batched_shared solve E matrices of one shape,
each with its own Hessian, as one batched problem. Same arguments and results as gptq.gptq per expert (equal
codes up to float rounding ties: tests/test_gptq_batched.py); gptq.gptq stays the readable reference, and the
quantizer grid, Quantized and GPTQError are quant/grid.py's. Used by `python gptq.py --batched-experts`
(solve_batched, at the end of this file).

The experts of an MoE layer share their shapes but not their Hessians. Every torch op below works on all
experts, so a layer costs as many ops (GPU kernel launches) as one expert. The batched path also does less work
and fewer passes over memory, which is what makes it faster on a CPU:

 * Factorization, in³/3 flops instead of gptq()'s 4·in³/3 (Cholesky, cholesky_inverse, Cholesky): a Cholesky
   run backwards, H = R Rᵀ with R upper triangular (reverse_cholesky; it equals J chol(J H J) J, J the index
   reversal). Then H⁻¹ = R⁻ᵀ R⁻¹ and Hinv = R⁻¹: upper triangular with a positive diagonal, so it is the upper
   Cholesky factor of H⁻¹ that gptq() uses. Hinv itself is never formed; the sweep needs only
 * its diagonal blocks Hinv_bb = R_bb⁻¹ (B x B), and
 * the pending updates of each block b = [i1, i2). gptq() pushes Err[:, :i1] Hinv[:i1, b] into the later
   columns after every block ("right-looking"). With D = W - Q (the original weights minus the quantized ones)
   one has D = Err Hinv (column j: w_j - q_j = Σ_{i<=j} Err_i Hinv_ij), so Err = D R; and R Hinv = I at block
   row :i1, block column b reads R[:i1, :i1] Hinv[:i1, b] = -R[:i1, b] Hinv_bb. Hence
       W_b - Err[:, :i1] Hinv[:i1, b] = W_b + D[:, :i1] G_b,    G_b = R[:i1, b] Hinv_bb  (i1, B),
   one matmul with inner dimension i1 when block b starts ("left-looking").
 * The sweep works on Wᵀ (E, in, out): a column of W (of every row, every expert) is one contiguous row, and
   every update is a plain bmm with no transposed copies. Inside a block, sub-blocks of SUB_BLOCK columns get
   the block's earlier updates when they start (left-looking again: one bmm with inner dimension up to B),
   and are swept column by column as in gptq(), each column's error pushed into the sub-block's later columns
   by one rank-1 op. With Hn = Hinv with row i divided by Hinv_ii, gptq()'s Err_i Hinv_il = U_i Hn_il for
   U = W - Q, so the sweep carries U and needs no division per column; the loss Σ Err² = Σ U² / Hinv_ii².
The result does not depend on these choices in exact arithmetic; in floats they reorder sums, which can flip a
rounding tie (rare, and then the rest of that row follows another, equally good, path: see the tests).
act_order (static groups): each expert's columns are permuted by its own descending H_jj before the sweep and
back after it; the group params, computed before, are looked up per column through perm // g (gptq()'s g_idx).

Does not: build Hessians (hessian.py), choose which matrices share one (gptq.py), or pack the codes.
Run the tests:  python -m pytest -q tests/test_gptq_batched.py
Solver speed:   OMP_NUM_THREADS=1 python bench/gptq_solver.py --experts 16 --reference-experts 2
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from quant.grid import (DAMP_ESCALATION, GPTQError, Quantized, check_grid, compute_dtype, group_len, n_groups,
                        quant_params, split_rows)

SUB_BLOCK = 16  # columns swept one by one (rank-1 updates) before a bmm brings in their errors
CHOL_BLOCK = 128  # block columns of reverse_cholesky (its bmm does nearly all of the work)
ROW_PAD = 16  # floats of padding after each row of the sweep's Wᵀ (see gptq_batched)
CPU_EXPERT_CHUNK = 16  # experts per sweep on a CPU: their blocks stay in cache (elsewhere: all experts at once)


def _check_batched_args(W, H, bits, group_size, block_size, percdamp, act_order, static_groups, names):
    check_grid(bits, group_size, "gptq_batched")
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
    gptq()'s Hinv (module docstring). damp_e = percdamp · mean(diag H_e) as in gptq.damped_inverse_cholesky; the
    experts whose factorization fails are retried, alone, with 10x their damping, at most max_retries times.
    Returns R, damp (E,) float64, retries (E,) int64; raises GPTQError naming the experts that failed at every
    damping."""
    E = H.shape[0]
    damp0 = percdamp * torch.diagonal(H, dim1=-2, dim2=-1).mean(-1).double()  # (E,)
    damp, retries = damp0.clone(), torch.zeros(E, dtype=torch.int64, device=H.device)
    todo, R = torch.arange(E, device=H.device), None  # on H's device: indexed by `ok`, which is there
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
            bad = torch.zeros(E, dtype=torch.bool, device=H.device)
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
                 bits: int, sym: bool, col_group=None, clip: bool = False):
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
            scale[..., grp], zero[..., grp] = quant_params(W1[:, s1:ge], bits=bits, sym=sym, dim=1, clip=clip)
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
                   dynamic: bool, col_group=None, clip: bool = False):
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
        else:  # every earlier block's updates at once: W_b + D[:, :i1] G_b (module docstring), transposed:
            GT = torch.bmm(Hinv1.mT, R[:, :i1, i1:i2].mT, out=_view(G_, E, i2 - i1, i1))  # (E, B, i1) G_bᵀ
            torch.baddbmm(WT[:, i1:i2], GT.to(WT.dtype), WT[:, :i1], out=W1)  # (E, B, i1) @ (E, i1, out)
        d = torch.diagonal(Hinv1, dim1=-2, dim2=-1)  # (E, B) Hinv_ii
        _sweep_block(W1, (Hinv1 / d[..., None]).to(WT.dtype), d.pow(-2).to(WT.dtype), codes[:, i1:i2],
                     Q[:, i1:i2], U1, K1, scale, zero, sq_err, i1=i1, g=g, dynamic=dynamic, bits=bits, sym=sym,
                     col_group=col_group, clip=clip)
        WT[:, i1:i2] -= Q[:, i1:i2]  # from now on these rows of WT are Dᵀ = (W - Q)ᵀ
    WT.copy_(Q)


def _view(flat: torch.Tensor, *shape: int) -> torch.Tensor:
    """The first prod(shape) elements of a flat buffer as a contiguous tensor of that shape."""
    return flat[:math.prod(shape)].view(shape)


@torch.no_grad()
def gptq_batched(W: torch.Tensor | Sequence[torch.Tensor], H: torch.Tensor, *, bits: int, group_size: int = 128,
                 sym: bool = False, block_size: int = 128, percdamp: float = 0.01, act_order: bool = False,
                 static_groups: bool = False, max_retries: int = 3, names: Sequence[str] | None = None,
                 expert_chunk: int | None = None, clip: bool = False) -> list[Quantized]:
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
    dtype, sizes = compute_dtype(Ws[0]), [w.shape[1] for w in Ws]
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
    g, dynamic = group_len(in_f, group_size), group_size != -1 and not static_groups
    if dynamic:  # filled group by group during the sweep
        scale = torch.empty(E, out_f, n_groups(in_f, group_size), dtype=dtype, device=WT.device)
        zero = torch.empty_like(scale)
    else:  # per channel, or static groups: from W before any update, as group_params
        params = [quant_params(WT[:, a:a + g], bits=bits, sym=sym, dim=1, clip=clip) for a in range(0, in_f, g)]
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
                       block_size=block_size, g=g, dynamic=dynamic, clip=clip,
                       col_group=None if col_group is None else col_group[e])  # WT now holds Ŵᵀ
    if act_order:  # rows back to the original column order
        inv = torch.argsort(perm, dim=-1)[..., None].expand(-1, -1, out_f)
        codes, WT = codes.gather(1, inv), WT.gather(1, inv)
    row_loss = sq_err / 2
    _raise_not_finite("W", ~torch.isfinite(row_loss).all(1), names)  # NaN/inf weights make their rows' loss NaN
    zero = None if sym else zero.to(torch.uint8)
    damp, retries, n_dead = damp.tolist(), retries.tolist(), dead.sum(1).tolist()
    codes, W_hat = codes.mT, WT.mT  # (E, out, in) views
    return [Quantized(codes=codes[e], scale=scale[e], zero=None if zero is None else zero[e], W_hat=W_hat[e],
                       damp=damp[e], retries=retries[e], row_loss=row_loss[e], n_dead=n_dead[e])
            for e in range(E)]


@torch.no_grad()
def gptq_batched_shared(Ws: Sequence[torch.Tensor], H: torch.Tensor, **kwargs) -> list[list[Quantized]]:
    """gptq_batched of several stacks of matrices that read the same inputs, e.g. Ws = [gate (E, I, in),
    up (E, I, in)] of every expert, with one Hessian per expert H (E, in, in) (as gptq.gptq_shared for one expert).
    Returns one list per matrix of Ws, with one result per expert. kwargs as for gptq_batched()."""
    sizes = [W.shape[1] for W in Ws]
    per_expert = [split_rows(r, sizes) for r in gptq_batched(list(Ws), H, **kwargs)]
    return [list(rs) for rs in zip(*per_expert)]


def solve_batched(layer, expert_inputs: list, H: dict, q, prefix: str) -> dict:
    """--batched-experts: all experts' gate/up (one Hessian each) in one gptq_batched_shared call, all down_proj
    in another (quant/batched.py; the per-expert results up to float rounding ties). Returns input key -> one
    result per reader."""
    per_expert: dict[int, list] = {}
    for inp in expert_inputs:
        per_expert.setdefault(inp.expert, []).append(inp)
    out = {}
    for role in zip(*per_expert.values()):  # the same input of every expert: gate/up, then down
        keys = [inp.readers[0] for inp in role]
        stacks = [torch.stack([layer.get_submodule(inp.readers[j]).weight.float() for inp in role])
                  for j in range(len(role[0].readers))]  # per reader of the input: (E, out, in)
        Hs = H[keys[0]].new_empty((len(keys),) + tuple(H[keys[0]].shape))  # (E, in, in)
        for e, k in enumerate(keys):  # each expert's Hessian moves into the stack (no second copy of all of them)
            Hs[e] = H.pop(k)
            H[k] = Hs[e]
        res = gptq_batched_shared(stacks, Hs, bits=q.bits, group_size=q.group_size, sym=q.sym,
                                  block_size=q.block_size, percdamp=q.percdamp, act_order=q.act_order,
                                  static_groups=q.static_groups, clip=q.clip, names=[prefix + k for k in keys])
        for e, k in enumerate(keys):
            out[k] = [res[j][e] for j in range(len(stacks))]
    return out
