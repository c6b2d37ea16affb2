"""Quantizer grid, RTN and GPTQ (gptq.py), packing and the packed runtime (model.py), against oracles:
GPTQ with H = I is RTN; GPTQ's loss is ½ tr(ΔW (H + damp·I) ΔWᵀ); the result does not depend on the block size
(lazy batch updates = column-by-column updates); GPTQ beats RTN on correlated inputs; packing matches the
compressed-tensors library bit for bit and its decompressor gives back our dequantized weight."""

import pytest
import torch
import torch.nn.functional as F

import gptq
import hessian
from quant.grid import GPTQError, dequantize, group_params, rtn
from hessian import Hessian
from quant.grid import QuantLinear, fake_quant_act, pack_int32, unpack_int32

GRIDS = [(bits, gs, sym) for bits in (2, 3, 4, 8) for gs in (-1, 16, 24) for sym in (False, True)]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def correlated(n=512, d=64, seed=0, dtype=torch.float32):
    """Tokens (n, d) whose channels are strongly correlated (a random mixing of few latent factors plus noise)
    and have unequal scales: the case where GPTQ's error compensation pays off."""
    g = gen(seed)
    latent = torch.randn(n, d // 4, generator=g, dtype=torch.float64)
    mix = torch.randn(d // 4, d, generator=g, dtype=torch.float64)
    X = latent @ mix + 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return (X * torch.rand(d, generator=g, dtype=torch.float64).add(0.2)).to(dtype)


def output_error(W, W_hat, X):
    """||W Xᵀ - Ŵ Xᵀ|| on the tokens X (n, in): what GPTQ minimizes."""
    return float(((W - W_hat) @ X.T).norm())


def hessian_of(X, dtype=torch.float64):
    h = Hessian(X.shape[1], dtype=dtype)
    h.add(X)
    return h.finalize()


# ---- quantizer grid and RTN ----------------------------------------------------------------------------


@pytest.mark.parametrize("bits,group_size,sym", GRIDS)
def test_rtn_grid(bits, group_size, sym):
    W = torch.randn(8, 40, generator=gen())
    r = rtn(W, bits=bits, group_size=group_size, sym=sym)
    codes, scale, zero, W_hat = r.codes, r.scale, r.zero, r.W_hat
    n_groups = 1 if group_size == -1 else -(-40 // group_size)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    assert scale.shape == (8, n_groups) and (zero is None) == sym
    # round to nearest: every weight within half a step of its grid point
    s = scale.repeat_interleave(40 if group_size == -1 else group_size, 1)[:, :40]
    eps = torch.finfo(W.dtype).eps * W.abs()  # float rounding of w / s, at the clipped ends mostly
    assert bool(((W - W_hat).abs() <= s / 2 + 4 * eps).all())
    if sym:  # symmetric: scale = max|w| / ((2^b - 1) / 2), as compressed-tensors computes it
        amax = torch.stack([Wg.abs().amax(1) for Wg in W.split(40 if group_size == -1 else group_size, 1)], 1)
        torch.testing.assert_close(scale, amax / ((2**bits - 1) / 2))


def test_all_zero_row_quantizes_to_zero():
    W = torch.randn(4, 32, generator=gen())
    W[1] = 0
    for sym in (False, True):
        assert bool((rtn(W, bits=3, group_size=16, sym=sym).W_hat[1] == 0).all())


def test_bad_grid_raises():
    with pytest.raises(ValueError, match="bits=5 is not supported"):
        rtn(torch.randn(2, 8), bits=5)
    with pytest.raises(ValueError, match="group_size=0"):
        rtn(torch.randn(2, 8), bits=4, group_size=0)


# ---- GPTQ ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,group_size,sym", GRIDS)
def test_gptq_with_identity_hessian_is_rtn(bits, group_size, sym):
    # H = I: no correlations, so no error compensation: GPTQ reduces to rounding each weight to nearest
    W = torch.randn(16, 48, generator=gen(1))
    ref = rtn(W, bits=bits, group_size=group_size, sym=sym)
    r = gptq.gptq(W, torch.eye(48), bits=bits, group_size=group_size, sym=sym, block_size=20)
    assert torch.equal(r.codes, ref.codes)
    assert torch.equal(r.scale, ref.scale)
    assert (r.zero is None and ref.zero is None) or torch.equal(r.zero, ref.zero)
    assert torch.equal(r.W_hat, ref.W_hat)
    assert r.retries == 0 and r.damp == pytest.approx(0.01) and r.n_dead == 0


@pytest.mark.parametrize("bits,group_size,sym", [(3, -1, False), (3, 16, False), (4, 32, True), (2, 16, True)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size, sym):
    X = correlated()  # (512, 64)
    W = torch.randn(32, 64, generator=gen(2))
    H = hessian_of(X)
    r = gptq.gptq(W, H, bits=bits, group_size=group_size, sym=sym)
    ratio = output_error(W, r.W_hat, X) / output_error(W, rtn(W, bits=bits, group_size=group_size, sym=sym).W_hat, X)
    print(f"GPTQ/RTN output error, bits={bits} group={group_size} sym={sym}: {ratio:.3f}")
    assert ratio < 0.8
    # the Hessian-form error equals the explicit one on the tokens
    explicit = output_error(W, r.W_hat, X) ** 2 / float((W @ X.T).norm()) ** 2
    assert hessian.relative_output_error(W, r.W_hat, H) == pytest.approx(explicit, rel=1e-4)


@pytest.mark.parametrize("kw", [dict(group_size=-1), dict(group_size=16), dict(group_size=24, block_size=10),
                                dict(group_size=16, act_order=True, static_groups=True),
                                dict(group_size=-1, act_order=True, sym=True)])
def test_gptq_loss_is_half_the_damped_quadratic_form(kw):
    # OBS/GPTQ identity: Σ_j (w_j - q_j)² / [U_jj]² / 2 = ½ tr(ΔW (H + damp·I) ΔWᵀ), exact in exact arithmetic
    X = correlated(n=256, d=48, dtype=torch.float64)
    W = torch.randn(12, 48, generator=gen(3), dtype=torch.float64)
    H = hessian_of(X)
    r = gptq.gptq(W, H, bits=3, **kw)
    dW = W - r.W_hat
    quad = float(((dW @ (H + r.damp * torch.eye(48, dtype=torch.float64))) * dW).sum()) / 2
    assert r.loss == pytest.approx(quad, rel=1e-9)


@pytest.mark.parametrize("kw", [dict(group_size=-1), dict(group_size=16), dict(group_size=24),
                                dict(group_size=16, act_order=True, static_groups=True)])
def test_block_size_does_not_change_the_result(kw):
    # lazy batch updates are an exact reordering of the column-by-column updates (block_size=1)
    X = correlated(n=256, d=48, dtype=torch.float64)
    W = torch.randn(12, 48, generator=gen(4), dtype=torch.float64)
    H = hessian_of(X)
    ref = gptq.gptq(W, H, bits=3, block_size=1, **kw)
    for block_size in (7, 16, 128):
        r = gptq.gptq(W, H, bits=3, block_size=block_size, **kw)
        assert torch.equal(r.codes, ref.codes), block_size
        torch.testing.assert_close(r.scale, ref.scale, rtol=1e-12, atol=0)


@pytest.mark.parametrize("sym", [False, True])
def test_act_order_with_static_groups(sym):
    X = correlated()
    W = torch.randn(32, 64, generator=gen(5))
    H = hessian_of(X)
    r = gptq.gptq(W, H, bits=3, group_size=16, sym=sym, act_order=True, static_groups=True)
    # groups stay contiguous in the original column order, with params computed on the original W
    scale, zero = group_params(W, bits=3, group_size=16, sym=sym)
    assert torch.equal(r.scale, scale)
    assert sym or torch.equal(r.zero, zero.to(torch.uint8))
    assert torch.equal(dequantize(r.codes, r.scale, r.zero, bits=3, group_size=16), r.W_hat)
    # the permutation really happened (a different result from plain GPTQ), and the result is still good
    plain = gptq.gptq(W, H, bits=3, group_size=16, sym=sym, static_groups=True)
    assert not torch.equal(r.codes, plain.codes)
    assert output_error(W, r.W_hat, X) < output_error(W, rtn(W, bits=3, group_size=16, sym=sym).W_hat, X)


def test_act_order_with_dynamic_groups_is_refused():
    with pytest.raises(ValueError, match="act_order with group_size=16 needs static_groups=True"):
        gptq.gptq(torch.randn(4, 32), torch.eye(32), bits=4, group_size=16, act_order=True)


def test_dead_columns_are_zeroed_and_counted():
    X = correlated(n=256, d=32)
    X[:, [3, 17]] = 0
    W = torch.randn(8, 32, generator=gen(6))
    r = gptq.gptq(W, hessian_of(X), bits=4, group_size=16)
    assert r.n_dead == 2 and r.retries == 0
    assert bool((r.W_hat[:, [3, 17]] == 0).all()) and bool(torch.isfinite(r.W_hat).all())


def indefinite_hessian(d, neg):
    """Q diag(1, ..., 1, neg) Qᵀ: an 'H' with one negative eigenvalue (what a buggy accumulation could give)."""
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen(7), dtype=torch.float64))
    eig = torch.ones(d, dtype=torch.float64)
    eig[-1] = neg
    return Q @ torch.diag(eig) @ Q.T


def test_cholesky_failure_escalates_damping_and_counts_it():
    H = indefinite_hessian(16, neg=-0.03)  # 1% of mean diag does not cover -0.03; 10% does
    r = gptq.gptq(torch.randn(4, 16, generator=gen(8)), H, bits=4, group_size=-1)
    assert r.retries == 1
    assert r.damp == pytest.approx(0.1 * float(torch.diagonal(H).mean()))
    assert bool(torch.isfinite(r.W_hat).all())


def test_cholesky_failure_at_every_damping_raises():
    H = indefinite_hessian(16, neg=-100.0)
    with pytest.raises(GPTQError, match=r"layers\.0\.up_proj: Cholesky of the damped Hessian H \(16, 16\) failed"):
        gptq.gptq(torch.randn(4, 16), H, bits=4, group_size=-1, name="layers.0.up_proj")


def test_non_finite_inputs_raise():
    H = torch.eye(8)
    H[2, 2] = float("nan")
    with pytest.raises(ValueError, match="H has NaN/inf"):
        gptq.gptq(torch.randn(4, 8), H, bits=4)
    with pytest.raises(ValueError, match=r"W \(4, 8\) must be \(out, in\) and H \(9, 9\)"):
        gptq.gptq(torch.randn(4, 8), torch.eye(9), bits=4)


def test_shared_hessian_equals_separate_matrices():
    X = correlated(n=256, d=48, dtype=torch.float64)
    H = hessian_of(X)
    gate, up = (torch.randn(n, 48, generator=gen(9 + n), dtype=torch.float64) for n in (10, 6))
    for kw in (dict(group_size=16), dict(group_size=-1, sym=True, act_order=True)):
        shared = gptq.gptq_shared([gate, up], H, bits=3, **kw)
        for W, r in zip((gate, up), shared):
            alone = gptq.gptq(W, H, bits=3, **kw)
            assert torch.equal(r.codes, alone.codes) and torch.equal(r.W_hat, alone.W_hat)
            assert r.loss == pytest.approx(alone.loss, rel=1e-9) and r.damp == alone.damp


# ---- packing and the packed runtime (model.py) ---------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(5, 37), (3, 1), (2, 4, 64), (7, 100)])
def test_pack_round_trip(bits, shape):
    codes = torch.randint(0, 2**bits, shape, generator=gen(10)).to(torch.uint8)
    packed = pack_int32(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (*shape[:-1], -(-shape[-1] * bits // 32))
    assert torch.equal(unpack_int32(packed, bits, shape), codes)


def test_pack_layout_of_one_word():
    # 4 bits: code i in bits [4i, 4i+4) of the word, little end first; 8 codes of 15 set every bit (int32 -1)
    assert pack_int32(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), 4).item() == 0x87654321 - 2**32
    assert pack_int32(torch.full((1, 8), 15), 4).item() == -1


def test_pack_bad_input_raises():
    with pytest.raises(ValueError, match=r"codes must be integers in \[0, 7\] for bits=3"):
        pack_int32(torch.tensor([[8]]), 3)
    with pytest.raises(ValueError, match="bits=5 is not supported"):
        pack_int32(torch.tensor([[1]]), 5)
    with pytest.raises(ValueError, match=r"does not hold \(2, 40\) at 4 bits"):
        unpack_int32(torch.zeros(2, 4, dtype=torch.int32), 4, (2, 40))


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, True), (3, 16, False), (2, -1, False), (8, 24, True)])
def test_quant_linear_matches_dequantized_weight(bits, group_size, sym):
    W = torch.randn(20, 72, generator=gen(11))
    q = rtn(W, bits=bits, group_size=group_size, sym=sym)
    bias = torch.randn(20, generator=gen(12))
    layer = QuantLinear.from_codes(q.codes, q.scale, q.zero, bits=bits, group_size=group_size, sym=sym, bias=bias)
    assert torch.equal(layer.dequantize(), q.W_hat)  # same codes, same formula, after a pack/unpack
    x = torch.randn(3, 5, 72, generator=gen(13))
    assert torch.equal(layer(x), F.linear(x, q.W_hat, bias))
    assert layer.weight_shape.tolist() == [20, 72]
    names = {"weight_packed", "weight_scale", "weight_shape", "bias"} | (set() if sym else {"weight_zero_point"})
    assert set(layer.state_dict()) == names


def test_quant_linear_from_codes_checks_zero_point():
    q = rtn(torch.randn(4, 32), bits=4, group_size=16, sym=False)
    with pytest.raises(ValueError, match="sym=True but zero is given"):
        QuantLinear.from_codes(q.codes, q.scale, q.zero, bits=4, group_size=16, sym=True)


def test_activation_fake_quant_int8():
    x = torch.randn(6, 40, generator=gen(14)) * torch.linspace(0.1, 3, 40)
    x[2] = 0  # an all-zero token stays zero
    xq = fake_quant_act(x, bits=8)
    # float64 recomputation: per-token scale s = max|x| / 127 (as stored in float32), codes round(x / s)
    s = (x.abs().amax(-1, keepdim=True) / 127).double()
    s = torch.where(s == 0, 1.0, s)
    codes = torch.round(x.double() / s)
    assert bool((codes.abs() <= 127).all())
    assert torch.equal(xq, (codes * s).float())
    assert bool(((x - xq).abs() <= s.float() / 2 * (1 + 1e-6)).all())
    # the W4A8 layer: close to the float weight-only output
    q = rtn(torch.randn(16, 40, generator=gen(15)), bits=4, group_size=-1, sym=True)
    layer = QuantLinear.from_codes(q.codes, q.scale, None, bits=4, group_size=-1, sym=True, abits=8)
    y, y_ref = layer(x), F.linear(x, q.W_hat)
    assert torch.equal(y, F.linear(xq, q.W_hat))
    assert float((y - y_ref).norm() / y_ref.norm()) < 0.02


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, True), (4, 32, False), (3, 16, True), (4, -1, True)])
def test_compressed_tensors_decompresses_to_the_same_weight(bits, group_size, sym):
    """The external oracle: compressed-tensors' own pack-quantized decompressor reads our tensors."""
    ct = pytest.importorskip("compressed_tensors", reason="test extra: pip install compressed-tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    W = torch.randn(24, 64, generator=gen(16))
    q = rtn(W, bits=bits, group_size=group_size, sym=sym)
    layer = QuantLinear.from_codes(q.codes, q.scale, q.zero, bits=bits, group_size=group_size, sym=sym)
    # bit-identical packing: compressed-tensors packs signed codes (code - 2^(bits-1))
    signed = (q.codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(layer.weight_packed, pack_to_int32(signed, bits))
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, group_size=None if group_size == -1 else
                            group_size, strategy="channel" if group_size == -1 else "group")
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    sd = {k: v.data for k, v in layer.state_dict().items()}
    out = PackedQuantizationCompressor.decompress(sd, scheme)
    assert ct.__version__ and torch.equal(out["weight"], q.W_hat)
