"""ecs.py: folding is exact (router included), AWQ and ECS against a float64 brute force of their objective, consumer
and token weights, SmoothQuant against its formula, the robust losses, the clip search, bad input. Tiny tensors, CPU, seconds."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ecs import (Consumer, awq_clip, awq_scale, consensus_weight_max, ecs_candidates, ecs_scale, fake_quant_act,
                 fold_into_linear_rows, fold_into_norm, huber, robust_absmax, scale_consumer, scale_loss,
                 smoothquant_scale, squared_error, trimmed_squared_error)
from quant.grid import rtn

GRID = dict(bits=3, group_size=32, sym=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: a second intra-op thread only adds sync cost, and on a loaded machine
    (conftest asks for 2) it made this file ~200x slower. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
OUTLIERS = [3, 17, 40, 50]  # the few large-magnitude input channels (AWQ's salient channels)


def outlier_inputs(n=256, d=64, mag=20.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    X[:, [c for c in OUTLIERS if c < d]] *= mag
    return X


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rmsnorm(x, g, eps=1e-6):
    return g * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


# ---- float64 oracles, written out independently of ecs.py


def act_q8(X):  # per-token symmetric int8, one scale per row
    scale = X.abs().max(dim=1, keepdim=True).values / 127
    return torch.round(X / scale).clamp(-127, 127) * scale


def brute_loss(X, Ws, rows, s, *, w=None, abits=16):
    """Σ_e w_e ||X_e W_eᵀ − Q_A(X_e / s) Q_W(W_e s)ᵀ||² / Σ_e w_e n_e out_e, in float64."""
    X, s = X.double(), s.double()
    num = den = 0.0
    for e, W in enumerate(Ws):
        w_e = 1.0 if w is None else w[e]
        Xe = X if rows[e] is None else X[rows[e]]
        Xs = Xe / s if abits == 16 else act_q8(Xe / s)
        W_hat = rtn(W.double() * s, **GRID).W_hat
        num += w_e * float((Xe @ W.double().T - Xs @ W_hat.T).pow(2).sum())
        den += w_e * Xe.shape[0] * W.shape[0]
    return num / den


def brute_awq(X, Ws, rows, *, n_grid=20, w=None, abits=16):
    """AWQ's grid search from its formula, in float64: (alphas, losses)."""
    x_bar = X.double().abs().mean(dim=0)
    alphas, losses = [], []
    for i in range(n_grid):
        s = (x_bar ** (i / n_grid)).clamp(min=1e-4)
        s = s / torch.sqrt(s.max() * s.min())
        alphas.append(i / n_grid)
        losses.append(brute_loss(X, Ws, rows, s, w=w, abits=abits))
    return alphas, losses


def moe_setup(n=256, d=64, E=4, k=2, seed=0):
    """Outlier inputs, E expert weights (gate and up stacked, 48 rows) and top-k routed rows per expert."""
    X = outlier_inputs(n, d, seed=seed)
    Ws = [randn(48, d, seed=seed + 10 + e) for e in range(E)]
    topk = (X @ randn(E, d, seed=seed + 99).T).topk(k, dim=1).indices  # (n, k)
    rows = [torch.nonzero((topk == e).any(dim=1)).flatten() for e in range(E)]
    return X, Ws, rows


# ---- folding


def test_fold_into_norm_keeps_router_and_experts_exact():
    T, d, E, k, inter = 32, 16, 6, 2, 8
    x = randn(T, d, seed=1).double()
    g = randn(d, seed=2).double().abs() + 0.5  # RMSNorm weight
    router = randn(E, d, seed=3).double()
    experts = [randn(2 * inter, d, seed=10 + e).double() for e in range(E)]  # gate and up stacked
    shared = randn(2 * inter, d, seed=30).double()
    s = torch.exp(randn(d, seed=4).double())  # any positive scale
    h, h_s = rmsnorm(x, g), rmsnorm(x, fold_into_norm(g, s))
    assert torch.allclose(h_s, h / s, rtol=1e-13, atol=0)

    p, p_s = F.softmax(h @ router.T, -1), F.softmax(h_s @ scale_consumer(router, s).T, -1)  # (T, E)
    assert torch.allclose(p_s, p, rtol=0, atol=1e-13)
    assert torch.equal(p_s.topk(k, dim=-1).indices, p.topk(k, dim=-1).indices)  # same experts chosen
    for W in experts + [shared]:
        assert torch.allclose(h_s @ scale_consumer(W, s).T, h @ W.T, rtol=0, atol=1e-12)
    # the reason for the MoE rule: a router left unscaled sees X / s and gives different probabilities
    assert not torch.allclose(F.softmax(h_s @ router.T, -1), p, atol=1e-3)


def test_fold_into_linear_rows_exact_through_swiglu():
    T, d, inter = 16, 12, 20
    x = randn(T, d, seed=5).double()
    gate, up = randn(inter, d, seed=6).double(), randn(inter, d, seed=7).double()
    down = randn(d, inter, seed=8).double()
    b_up = randn(inter, seed=9).double()
    s = torch.exp(randn(inter, seed=10).double())
    y = (F.silu(x @ gate.T) * (x @ up.T + b_up)) @ down.T
    up_s, b_s = fold_into_linear_rows(up, s, b_up)
    y_s = (F.silu(x @ gate.T) * (x @ up_s.T + b_s)) @ scale_consumer(down, s).T
    assert torch.allclose(y_s, y, rtol=0, atol=1e-12)
    assert fold_into_linear_rows(up, s)[1] is None


def test_fold_keeps_dtype_and_rejects_bad_scale():
    g = torch.ones(8, dtype=torch.bfloat16)
    assert fold_into_norm(g, torch.full((8,), 2.0)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="scale_consumer"):
        scale_consumer(torch.ones(4, 8), torch.zeros(8))
    with pytest.raises(ValueError, match="fold_into_norm"):
        fold_into_norm(g, torch.ones(7))


# ---- AWQ


def test_awq_with_one_grid_point_is_plain_rtn():
    X, W = outlier_inputs(), randn(32, 64, seed=1)
    r = awq_scale(X, [W], n_grid=1, **GRID)
    assert r.alpha == 0.0 and torch.equal(r.s, torch.ones(64))
    assert r.loss == r.loss_no_scale
    W_hat = rtn(W.double(), **GRID).W_hat
    rtn_mse = float((X.double() @ (W.double() - W_hat).T).pow(2).mean())
    assert r.loss == pytest.approx(rtn_mse, rel=1e-5)


@pytest.mark.parametrize("abits", [16, 8])
def test_awq_beats_rtn_on_outlier_channels_and_matches_brute_force(abits):
    X, W = outlier_inputs(), randn(32, 64, seed=1)
    r = awq_scale(X, [W], abits=abits, **GRID)
    print(f"abits={abits}: alpha={r.alpha}, loss {r.loss_no_scale:.4g} -> {r.loss:.4g}, "
          f"gain {r.loss_no_scale / r.loss:.2f}x, rel error {r.rel_error_no_scale:.4f} -> {r.rel_error:.4f}")
    assert r.alpha > 0 and r.loss < r.loss_no_scale / 2  # measured: 4.4x (abits 16), 4.5x (abits 8), alpha 0.4
    assert r.loss == pytest.approx(brute_loss(X, [W], [None], r.s, abits=abits), rel=1e-4)
    alphas, losses = brute_awq(X, [W], [None], abits=abits)
    assert torch.allclose(r.losses, torch.tensor(losses, dtype=torch.float64), rtol=1e-4, atol=0)
    assert r.loss <= min(losses) * (1 + 1e-4)


def test_awq_moe_routed_rows_match_brute_force():
    X, Ws, rows = moe_setup()
    r = awq_scale(X, [Consumer(W, rows=idx) for W, idx in zip(Ws, rows)], **GRID)
    alphas, losses = brute_awq(X, Ws, rows)
    assert torch.allclose(r.losses, torch.tensor(losses, dtype=torch.float64), rtol=1e-4, atol=0)
    assert r.loss < r.loss_no_scale
    # rows into the shared X and a gathered copy as the consumer's own X are the same thing
    r2 = awq_scale(X, [Consumer(W, X=X[idx]) for W, idx in zip(Ws, rows)], **GRID)
    assert r2.alpha == r.alpha and torch.equal(r2.s, r.s) and torch.equal(r2.losses, r.losses)


def test_equal_weights_reproduce_unweighted_awq():
    X, Ws, rows = moe_setup()
    cons = [Consumer(W, rows=idx) for W, idx in zip(Ws, rows)]
    r = awq_scale(X, cons, **GRID)
    for kw in (dict(consumer_weights=[2.5] * len(Ws)), dict(token_weights=torch.full((X.shape[0],), 0.3))):
        r_w = awq_scale(X, cons, **kw, **GRID)  # VEQ-ME with all S_e equal is AWQ
        assert r_w.alpha == r.alpha and torch.equal(r_w.s, r.s) and torch.equal(r_w.losses, r.losses)


def test_zero_weight_consumer_does_not_move_the_choice():
    X, Ws, rows = moe_setup()
    Ws[1] = Ws[1] * 50  # a loud consumer that would dominate the loss if it counted
    cons = [Consumer(W, rows=idx) for W, idx in zip(Ws, rows)]
    keep = [0, 2, 3]
    r0 = awq_scale(X, cons, consumer_weights=[1.0, 0.0, 1.0, 1.0], **GRID)
    r_sub = awq_scale(X, [cons[e] for e in keep], **GRID)
    assert r0.alpha == r_sub.alpha and torch.equal(r0.s, r_sub.s) and torch.equal(r0.losses, r_sub.losses)
    _, losses = brute_awq(X, [Ws[e] for e in keep], [rows[e] for e in keep])
    assert r0.loss <= min(losses) * (1 + 1e-4)
    assert awq_scale(X, cons, **GRID).losses[0] > 100 * r0.losses[0]  # with weight 1 it would count


def test_scale_loss_and_token_weights_match_brute_force():
    X, W = outlier_inputs(), randn(32, 64, seed=1)
    s = torch.exp(0.3 * randn(64, seed=2))
    c = torch.rand(X.shape[0], generator=torch.Generator().manual_seed(3))
    got = scale_loss(X, [W], s, token_weights=c, **GRID)
    Xd, sd, cd = X.double(), s.double(), c.double() / c.max()
    err = Xd @ W.double().T - (Xd / sd) @ rtn(W.double() * sd, **GRID).W_hat.T
    assert got == pytest.approx(float((cd * err.pow(2).sum(1)).sum() / (cd.sum() * W.shape[0])), rel=1e-4)


def test_fake_quant_act_is_per_token_int8():
    X = outlier_inputs(n=16)
    Xq = fake_quant_act(X, bits=8)
    scale = X.abs().amax(1, keepdim=True) / 127
    k = Xq / scale
    assert torch.allclose(k, k.round(), atol=1e-3) and (k.abs() <= 127 + 1e-3).all()
    assert ((X - Xq).abs() <= scale / 2 + 1e-6).all()
    assert torch.equal(fake_quant_act(torch.zeros(2, 4)), torch.zeros(2, 4))
    assert fake_quant_act(X, bits=16) is X


def test_awq_clip_never_worse_and_helps_heavy_tails():
    X = randn(128, 64, seed=4)
    W = randn(16, 64, seed=5)
    W[torch.arange(16), torch.arange(16) * 4] = 8.0  # one large weight per row
    c = awq_clip(W, X, bits=3, group_size=32, sym=True)
    assert c.W.shape == W.shape and c.ratio.shape == (16, 2)
    allowed = torch.tensor([1 - i / 20 for i in range(11)], dtype=c.ratio.dtype)
    assert torch.isin(c.ratio, allowed).all() and c.ratio.min() >= 0.5
    assert c.err_after < c.err_before  # ratio 1 is a candidate, so never worse; here strictly better
    assert (c.W.abs() <= W.abs() + 1e-7).all()


# ---- SmoothQuant


def test_smoothquant_formula_and_balance():
    X = outlier_inputs(n=64, d=32)
    Ws = [randn(24, 32, seed=6), 3 * randn(16, 32, seed=7)]
    X_absmax = X.abs().amax(0)
    r = smoothquant_scale(X_absmax, Ws, alpha=0.5)
    w_max = torch.stack([W.double().abs().amax(0) for W in Ws]).amax(0)
    want = X_absmax.double().pow(0.5) / w_max.pow(0.5)
    assert r.n_zero_channels == 0 and torch.allclose(r.s.double(), want, rtol=1e-6, atol=0)
    # α = 0.5 balances: max|X_j / s_j| == max_e max|W_e[:, j] s_j|
    act_after = (X.double() / r.s.double()).abs().amax(0)
    w_after = torch.stack([(W.double() * r.s.double()).abs().amax(0) for W in Ws]).amax(0)
    assert torch.allclose(act_after, w_after, rtol=1e-5, atol=0)
    r3 = smoothquant_scale(X_absmax, Ws, alpha=0.8)
    assert torch.allclose(r3.s.double(), X_absmax.double() ** 0.8 / w_max ** 0.2, rtol=1e-6, atol=0)


def test_smoothquant_counts_zero_channels():
    X_absmax, W = torch.tensor([1.0, 0.0, 4.0, 2.0]), torch.ones(3, 4)
    W[:, 3] = 0
    r = smoothquant_scale(X_absmax, [W])
    assert r.n_zero_channels == 2 and r.s[1] == 1 and r.s[3] == 1 and r.s[2] == 2


# ---- bad input


def test_bad_input_names_the_argument():
    X, W = outlier_inputs(n=8, d=16), randn(4, 16, seed=0)
    with pytest.raises(ValueError, match=r"consumers\[1\].W"):
        awq_scale(X, [W, randn(4, 15, seed=0)], **GRID)
    with pytest.raises(ValueError, match="consumer_weights"):
        awq_scale(X, [W], consumer_weights=[-1.0], **GRID)
    with pytest.raises(ValueError, match="not both"):
        awq_scale(X, [Consumer(W, rows=torch.arange(4), X=X[:4])], **GRID)
    with pytest.raises(ValueError, match="rows"):
        awq_scale(X, [Consumer(W, rows=torch.tensor([0, 8]))], **GRID)
    with pytest.raises(ValueError, match="abits"):
        awq_scale(X, [W], abits=6, **GRID)
    with pytest.raises(ValueError, match="X: has NaN"):
        awq_scale(torch.full((2, 16), float("nan")), [W], **GRID)
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_scale(X.abs().amax(0), [W], alpha=1.5)


# ---- ECS (expert-consensus smoothing)


def test_ecs_with_one_expert_and_mse_is_the_smoothquant_formula_searched_over_alpha():
    """One consumer, plain MSE, m_X = max|X| (percentile 100): each candidate is exactly smoothquant_scale at
    that α, and the choice is the α with the lowest brute-force float64 loss."""
    X, W = outlier_inputs(n=128, d=64), randn(48, 64, seed=3)
    r = ecs_scale(X, [W], rho=squared_error, percentile=100, n_grid=21, abits=16, **GRID)
    assert r.alphas.tolist() == [i / 20 for i in range(21)]
    brute = []
    for a in r.alphas.tolist():
        s = smoothquant_scale(X.abs().amax(0), [W], alpha=a).s
        brute.append(brute_loss(X, [W], [None], s))
        assert abs(scale_loss(X, [W], s, **GRID) - r.losses[len(brute) - 1]) <= 1e-6 * r.losses[len(brute) - 1]
    assert r.alpha == r.alphas[min(range(21), key=brute.__getitem__)]
    assert torch.allclose(r.s, smoothquant_scale(X.abs().amax(0), [W], alpha=r.alpha).s, rtol=1e-6, atol=0)
    assert r.rel_error < r.rel_error_no_scale  # outlier channels: smoothing helps


def test_ecs_consensus_and_robust_range_against_float64():
    X, Ws, rows = moe_setup()
    omega = [len(r) / X.shape[0] for r in rows]
    m_W = consensus_weight_max(Ws, omega)
    want = sum(w * W.double().abs().amax(0) for w, W in zip(omega, Ws)) / sum(omega)
    assert torch.allclose(m_W.double(), want, rtol=1e-6, atol=0)
    for p in (50.0, 99.0, 99.9, 100.0):  # nearest rank = numpy's inverted_cdf percentile
        want = torch.from_numpy(np.percentile(X.abs().numpy(), p, axis=0, method="inverted_cdf"))
        assert torch.equal(robust_absmax(X, p), want.float())
    # a zero-frequency expert (no routed tokens) does not move the consensus, its weights may be anything
    assert torch.equal(consensus_weight_max(Ws + [1e3 * Ws[0]], omega + [0.0]), m_W)


def test_ecs_moe_loss_matches_brute_force_with_omega_and_a8():
    X, Ws, rows = moe_setup()
    omega = [len(r) / X.shape[0] for r in rows]
    cons = [Consumer(W, rows=r) for W, r in zip(Ws, rows)]
    r = ecs_scale(X, cons, omega=omega, rho=squared_error, abits=8, **GRID)
    cands = ecs_candidates(robust_absmax(X, 99.9), consensus_weight_max(Ws, omega), 21)
    brute = [brute_loss(X, Ws, rows, s, w=omega, abits=8) for _, s in cands]
    assert r.alpha == cands[min(range(21), key=brute.__getitem__)][0]
    assert abs(r.loss - min(brute)) <= 1e-5 * min(brute)


def test_robust_losses_against_brute_force():
    err, y, c = randn(200, 8, seed=1), randn(200, 8, seed=2), torch.rand(200, generator=torch.Generator().manual_seed(3))
    err[7] *= 50  # one outlier token
    e = err.double().pow(2).sum(1)
    keep = [j for j in range(200) if j not in e.argsort()[-2:].tolist()]  # 1% of 200 = the 2 largest
    assert torch.isclose(trimmed_squared_error(0.01)(err, c), (c.double()[keep] * e[keep]).sum().float(), rtol=1e-5)
    assert torch.equal(trimmed_squared_error(0.0)(err, c), squared_error(err, c))
    assert torch.isclose(huber(1e6)(err, c, y), squared_error(err, c), rtol=1e-5)  # nothing above the threshold
    d = 0.1 * float(y.double().pow(2).mean().sqrt())
    u = (e / 8).sqrt()
    want = (c.double() * torch.where(u <= d, u * u, 2 * d * u - d * d)).sum() * 8
    assert torch.isclose(huber(0.1)(err, c, y).double(), want, rtol=1e-5)
    assert huber(0.1)(err, c, y) < squared_error(err, c)  # the outlier grows linearly
