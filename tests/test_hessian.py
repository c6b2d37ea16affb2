"""hessian.py against explicit float64 sums: weighting, chunking, normalization, pooling, bad input; FAQ weights."""

import pytest
import torch

from hessian import Hessian, dead_columns, fusion_scores, fusion_weights

D = 12


def explicit(X, w):
    """2/Σw · Σ_j w_j x_j x_jᵀ, one token at a time, in float64 (the oracle)."""
    X, w = X.double(), w.double()
    S = sum(w[j] * torch.outer(X[j], X[j]) for j in range(X.shape[0]))
    return S * (2.0 / w.sum())


def data(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)


def test_weighted_equals_explicit_sum_float64():
    X, w = data()
    h = Hessian(D, dtype=torch.float64)
    h.add(X, weight=w)
    torch.testing.assert_close(h.finalize(), explicit(X, w), rtol=1e-12, atol=1e-12)
    assert h.n_tokens == 50
    assert float(h.weight_sum) == pytest.approx(float(w.sum()), rel=1e-14)


def test_unweighted_is_two_over_n_xtx():
    X, _ = data()
    h = Hessian(D, dtype=torch.float64)
    h.add(X)
    torch.testing.assert_close(h.finalize(), 2.0 / X.shape[0] * X.T @ X, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h.finalize(), explicit(X, torch.ones(X.shape[0])), rtol=1e-12, atol=1e-12)


def test_normalization_ignores_a_common_weight_scale():
    X, w = data()
    a, b = Hessian(D, dtype=torch.float64), Hessian(D, dtype=torch.float64)
    a.add(X, weight=w)
    b.add(X, weight=w * 37.0)
    torch.testing.assert_close(a.finalize(), b.finalize(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_chunked_adds_equal_one_add(dtype, tol):
    X, w = data(n=64)
    one, chunked = Hessian(D, dtype=dtype), Hessian(D, dtype=dtype)
    one.add(X, weight=w)
    for Xc, wc in zip(X.split(7), w.split(7)):
        chunked.add(Xc, weight=wc)
    torch.testing.assert_close(chunked.finalize(), one.finalize(), rtol=tol, atol=tol)
    assert chunked.n_tokens == one.n_tokens == 64


def test_leading_dims_are_flattened():
    X, w = data(n=24)
    a, b = Hessian(D, dtype=torch.float64), Hessian(D, dtype=torch.float64)
    a.add(X.reshape(2, 3, 4, D), weight=w.reshape(2, 3, 4))
    b.add(X, weight=w)
    torch.testing.assert_close(a.finalize(), b.finalize(), rtol=0, atol=0)


def test_merge_pools_two_accumulators():
    X, w = data(n=40)
    a, b, both = (Hessian(D, dtype=torch.float64) for _ in range(3))
    a.add(X[:15], weight=w[:15])
    b.add(X[15:], weight=w[15:])
    both.add(X, weight=w)
    a.merge(b)
    torch.testing.assert_close(a.finalize(), both.finalize(), rtol=1e-12, atol=1e-12)
    assert a.n_tokens == 40


def test_dead_columns_include_channels_seen_only_by_zero_weight_tokens():
    X, w = data(n=20)
    X[:, 3] = 0  # never active
    X[:10, 5], w[10:] = 0, 0  # active only on tokens of weight 0
    h = Hessian(D, dtype=torch.float64)
    h.add(X, weight=w)
    dead = dead_columns(h.finalize())
    assert dead.nonzero().flatten().tolist() == [3, 5]


def test_bad_input_raises():
    h = Hessian(D)
    with pytest.raises(ValueError, match="last dim 5, expected d=12"):
        h.add(torch.randn(4, 5))
    with pytest.raises(ValueError, match="weight has 3 entries for 4 tokens"):
        h.add(torch.randn(4, D), weight=torch.ones(3))
    with pytest.raises(ValueError, match=">= 0"):
        h.add(torch.randn(4, D), weight=torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=">= 0"):
        h.add(torch.randn(4, D), weight=torch.tensor([1.0, float("nan"), 1.0, 1.0]))
    with pytest.raises(ValueError, match="no calibration tokens"):
        h.finalize()
    h.add(torch.randn(4, D), weight=torch.zeros(4))
    with pytest.raises(ValueError, match="no calibration tokens"):
        h.finalize()
    h.add(torch.full((1, D), float("nan")))
    with pytest.raises(ValueError, match="NaN/inf"):
        h.finalize()


# ---- FAQ fusion weights


def causal_probs(T, nh=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(nh, T, T, generator=g, dtype=torch.float64)
    scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    return scores.softmax(-1)


def test_fusion_scores_against_a_loop():
    T = 14
    is_vis = torch.zeros(T, dtype=torch.bool)
    is_vis[3:9] = True  # system/user text, 6 image tokens, question + answer
    probs = causal_probs(T)
    A = probs.mean(0)
    phi = fusion_scores(probs, is_vis)
    for j in range(T):
        if is_vis[j]:
            readers = [t for t in range(j + 1, T) if not is_vis[t]]
            want = sum(A[t, j] for t in readers) / len(readers)
        else:
            want = sum(A[j, v] for v in range(T) if is_vis[v])
        assert abs(float(phi[j]) - float(want)) <= 1e-6
    assert (phi[:3] == 0).all() and (phi[9:] > 0).all()  # text before the image cannot see it


def test_fusion_weights_are_positive_and_mean_one_per_modality():
    vis_a, vis_b = torch.zeros(14, dtype=torch.bool), torch.zeros(9, dtype=torch.bool)
    vis_a[3:9] = True
    vis_text_only = torch.zeros(6, dtype=torch.bool)
    masks = [vis_a, vis_b, vis_text_only]
    vis_b[2:5] = True
    scores = [fusion_scores(causal_probs(len(v), seed=i), v) for i, v in enumerate(masks)]
    w = fusion_weights(scores, masks, eta=0.5)
    allw, allv = torch.cat(w), torch.cat(masks)
    assert bool(torch.isfinite(allw).all()) and float(allw.min()) >= 0.5
    for m in (allv, ~allv):
        assert abs(float(allw[m].mean()) - 1.0) <= 1e-12
    assert torch.equal(w[2], torch.full((6,), 0.5, dtype=torch.float64))  # no image to attend to: 1 − η
    assert all(torch.equal(x, torch.ones_like(x)) for x in fusion_weights(scores, masks, eta=0.0))
    no_images = fusion_weights([torch.zeros(5)], [torch.zeros(5, dtype=torch.bool)])
    assert torch.equal(no_images[0], torch.ones(5, dtype=torch.float64))  # no fusion anywhere: plain weights
    with pytest.raises(ValueError, match="eta"):
        fusion_weights(scores, masks, eta=1.0)


def test_finalize_release_hands_over_the_storage_once():
    X, w = data()
    h = Hessian(D, dtype=torch.float64)
    h.add(X, w)
    want = h.finalize()
    got = h.finalize(release=True, dtype=torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, want.float())
    with pytest.raises(ValueError, match="released"):
        h.finalize()
    with pytest.raises(ValueError, match="released"):
        h.add(X)


def test_float32_products_summed_in_float64_match_a_float64_recomputation():
    """compute_dtype=float32 (the driver's): rows kept until flush(), one float32 product per flush, summed into
    a float64 S. Oracle: the float64 sum of w_j x_j x_jᵀ; float32 products of 300 rows agree to ~1e-6."""
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, 24, generator=g) for n in (7, 50, 1, 120, 33)]
    ws = [torch.rand(len(x), generator=g, dtype=torch.float64) for x in xs]
    H = Hessian(24, dtype=torch.float64, compute_dtype=torch.float32)
    for i, (x, w) in enumerate(zip(xs, ws)):
        H.add(x, w)
        if i == 2:
            H.flush()  # blocks of samples: (7, 50, 1) and (120, 33)
    X, W = torch.cat(xs).double(), torch.cat(ws)
    ref = 2 / W.sum() * (X.T * W) @ X
    got = H.finalize()
    assert got.dtype == torch.float64 and H.n_tokens == len(X)
    torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-6 * float(ref.abs().max()))


def test_flush_blocks_fix_the_float32_products():
    """Two accumulators fed the same blocks of rows, in a different block order, differ only by the float64
    order of the sum of identical float32 products (what distributed.py relies on)."""
    g = torch.Generator().manual_seed(4)
    blocks = [[torch.randn(n, 16, generator=g) for n in sizes] for sizes in ((5, 9), (40,), (3, 3, 3))]
    A, B = (Hessian(16, dtype=torch.float64, compute_dtype=torch.float32) for _ in range(2))
    for acc, order in ((A, (0, 1, 2)), (B, (2, 0, 1))):
        for b in order:
            for x in blocks[b]:
                acc.add(x)
            acc.flush()
    prods = [torch.cat(b).T @ torch.cat(b) for b in blocks]  # float32, as flush() computes them
    assert torch.equal(A.S, prods[0].double() + prods[1].double() + prods[2].double())
    torch.testing.assert_close(A.S, B.S, rtol=1e-15, atol=0)
