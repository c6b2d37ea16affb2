"""--clip: MSE-clipped group ranges (quant/grid.py's clip_search, the GPTQ reference's Quantizer(mse=True)):
the chosen range is a brute-force search's, GPTQ with H = I is clipped RTN, the batched solver agrees with
gptq() per expert, and clipping never raises the error it minimizes."""

import pytest
import torch

import gptq
from quant.batched import gptq_batched
from quant.grid import CLIP_GRID, CLIP_MAX_SHRINK, CLIP_NORM, group_params, quant_params, rtn
from test_gptq_batched import compare, problem


def gen(seed):
    return torch.Generator().manual_seed(seed)


def brute_force(w, bits, sym):
    """One row w (g,) in float64 with plain Python: the shrink p of the least sum |w - q(w)|^2.4, its scale."""
    maxq = 2**bits - 1
    lo, hi = min(float(w.min()), 0.0), max(float(w.max()), 0.0)
    if sym:
        hi = max(-lo, hi)
        lo = -hi
    best = None
    for i in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
        p = 1 - i / CLIP_GRID
        scale = (p * hi - p * lo) / maxq
        zero = 2 ** (bits - 1) if sym else round(-p * lo / scale)
        err = sum(abs((min(max(round(x / scale) + zero, 0), maxq) - zero) * scale - x) ** CLIP_NORM
                  for x in w.tolist())
        if best is None or err < best[0]:
            best = (err, scale, zero)
    return best


@pytest.mark.parametrize("bits,sym", [(2, False), (2, True), (3, False), (4, True)])
def test_the_range_is_the_brute_force_searchs(bits, sym):
    W = torch.randn(12, 32, generator=gen(bits), dtype=torch.float64)
    W[3] *= 0.01
    scale, zero = quant_params(W, bits=bits, sym=sym, clip=True)
    for r in range(W.shape[0]):
        _, s, z = brute_force(W[r], bits, sym)
        assert float(scale[r]) == pytest.approx(s, rel=1e-12) and float(zero[r]) == z
    s0, _ = quant_params(W, bits=bits, sym=sym)
    assert bool((scale < s0).any()) and bool((scale <= s0).all())  # some ranges shrunk, none widened


def test_clipping_never_raises_its_error_and_is_off_by_default():
    W = torch.randn(64, 128, generator=gen(0))
    for bits in (2, 3, 4):
        plain, clipped = rtn(W, bits=bits, group_size=32), rtn(W, bits=bits, group_size=32, clip=True)
        e = lambda r: (r.W_hat - W).abs().pow(CLIP_NORM).reshape(64, 4, 32).sum(-1)  # noqa: E731
        assert bool((e(clipped) <= e(plain) * (1 + 1e-6)).all())
        assert float(e(clipped).sum()) < float(e(plain).sum())
    assert torch.equal(group_params(W, bits=3, group_size=32, sym=False)[0],
                       group_params(W, bits=3, group_size=32, sym=False, clip=False)[0])


@pytest.mark.parametrize("sym", [False, True])
def test_gptq_with_identity_hessian_is_clipped_rtn(sym):
    W = torch.randn(16, 48, generator=gen(1))
    for static in (False, True):
        r = gptq.gptq(W, torch.eye(48), bits=2, group_size=16, sym=sym, block_size=20, clip=True,
                      static_groups=static)
        ref = rtn(W, bits=2, group_size=16, sym=sym, clip=True)
        assert torch.equal(r.codes, ref.codes) and torch.equal(r.scale, ref.scale)


@pytest.mark.parametrize("act_order", [False, True])
def test_batched_matches_gptq_per_expert_with_clipping(act_order):
    W, H = problem(dtype=torch.float64)
    kw = dict(bits=2, group_size=16, sym=False, block_size=16, clip=True, act_order=act_order,
              static_groups=act_order)
    assert compare(W, H, 1e-9, **kw) == 0
    plain = gptq_batched(W, H, **{**kw, "clip": False})
    assert any(not torch.equal(a.scale, b.scale) for a, b in zip(gptq_batched(W, H, **kw), plain))
