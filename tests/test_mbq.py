"""MBQ (arXiv 2412.19509, docs/methods.md §2.5): its sensitivities against float64 finite differences, its loss
against the formula of its code, its weights' floor at the median, and its reduction to AWQ without reweighting."""

import pytest
import torch

import calibrate
from data import processor
from data import samples as data_samples
import ecs
import gptq
import model
from quant import folders
from quant import scales
from quant.grid import rtn
from test_pipeline import digest, run


@pytest.fixture(scope="module")
def calib(tiny_qwen, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("calib") / "calib")
    calibrate.calibrate(tiny_qwen, n=6, seed=0, out=out, command="test")
    return out


def test_block_gradients_match_finite_differences(tiny_qwen):
    """dL/dy at layer l's attention output and MLP output: a perturbation εv added to y (a forward hook) moves the
    answer loss by ε<g, v> (central differences, float64), at image and at answer positions."""
    m, proc = model.load_model(tiny_qwen, dtype=torch.float64), processor.load_processor(tiny_qwen)
    s = next(s for s in data_samples.shapes_benchmark(10, split="train") if s.image is not None)
    b = processor.encode_qa_batch(proc, [s])
    x, ctx = m.embed(b["input_ids"], **processor.vision_inputs(b))
    _, grads = calibrate.input_gradient(m, x, ctx, b["labels"], blocks=True)
    assert len(grads) == len(m.layers)

    def loss(module, v):
        h = module.register_forward_hook(lambda mod, a, y: y + v)
        try:
            hh = x
            for i, layer in enumerate(m.layers):
                hh = m.after_layer(i, layer(hh, ctx), ctx)
        finally:
            h.remove()
        logits = m.lm_head(m.model.language_model.norm(hh))  # float64 (m.head casts logits to float32)
        return torch.nn.functional.cross_entropy(logits[0, :-1], b["labels"][0, 1:], ignore_index=-100)

    vis, answer = b["is_vis"][0], b["labels"][0] != -100
    first_answer = int(torch.where(answer)[0][0])
    positions = torch.where(vis)[0][:2].tolist() + [first_answer - 1, first_answer]
    gen = torch.Generator().manual_seed(0)
    checked = 0
    with torch.no_grad():
        for l in (0, len(m.layers) - 2):
            for part, module in enumerate((m.layers[l].self_attn, m.layers[l].mlp)):
                g = grads[l][part]
                for t in positions:
                    v = torch.zeros_like(x)
                    v[0, t] = torch.randn(x.shape[-1], generator=gen, dtype=torch.float64)
                    fd = (loss(module, 1e-6 * v) - loss(module, -1e-6 * v)) / 2e-6
                    assert abs(fd - (g[t] * v[0, t]).sum()) < 1e-4 * abs(fd) + 1e-8  # g: float32 logits (m.head)
                    checked += 1
    assert checked == 16


def test_sensitivity_is_the_mean_over_image_samples_of_the_per_sample_means(tiny_qwen):
    """calibrate.collect's `mbq` record, recomputed from the block gradients sample by sample with the masks
    written out: image tokens, answer tokens (labels != -100), scored tokens (the next token is an answer's)."""
    m, proc = model.load_model(tiny_qwen), processor.load_processor(tiny_qwen)
    enc = [calibrate.encode(proc, s) for s in data_samples.load_samples("shapes", n=6, seed=3, split="train")]
    got = calibrate.collect(m, enc)["mbq"]
    sums, n = {}, 0
    for e in enc:
        vis, labels = e["is_vis"][0], e["labels"][0].tolist()
        if not vis.any():
            continue
        n += 1
        x, ctx = m.embed(e["input_ids"], **processor.vision_inputs(e))
        _, grads = calibrate.input_gradient(m, x, ctx, e["labels"], blocks=True)
        answer = [t for t in range(len(labels)) if labels[t] != -100]
        scored = [t for t in range(len(labels) - 1) if labels[t + 1] != -100]
        image = torch.where(vis)[0].tolist()
        for l, (ga, gm) in enumerate(grads):
            for y, g in (("attn", ga), ("mlp", gm)):
                for kind, rows in (("vis", image), ("answer", answer), ("scored", scored)):
                    sums.setdefault(f"{y}_{kind}", [0.0] * len(grads))[l] += float(g[rows].abs().mean())
    assert got["samples"] == n > 0
    for k, v in sums.items():
        assert got[k] == pytest.approx([s / n for s in v], rel=1e-6), k
    assert got["attn_vis"][-1] == 0 and got["mlp_vis"][-1] == 0  # the last layer's image rows reach no scored logit


def test_streaming_sensitivities_equal_the_whole_model_pass(tiny_qwen):
    proc = processor.load_processor(tiny_qwen)
    enc = [calibrate.encode(proc, s) for s in data_samples.load_samples("shapes", n=5, seed=2, split="train")]
    full = calibrate.collect(model.load_model(tiny_qwen), enc)["mbq"]
    streamed = calibrate.collect_streaming(model.load_model(tiny_qwen, lazy_layers=True), enc)["mbq"]
    assert full["samples"] == streamed["samples"] > 0
    for k in calibrate.Sensitivity.PARTS:
        assert streamed[k] == pytest.approx(full[k], rel=1e-5, abs=1e-12), k


def test_ratios_are_floored_at_the_median_over_layers():
    sens = {"attn_vis": [1.0, 2.0, 3.0, 10.0], "attn_answer": [1.0] * 4, "attn_scored": [2.0] * 4,
            "mlp_vis": [0.0, 4.0, 4.0, 8.0], "mlp_answer": [2.0] * 4, "mlp_scored": [1.0] * 4}
    assert ecs.mbq_ratios(sens, 0) == (2.5, 2.0)  # medians: 2.5 (attention), 2.0 (MLP: 0, 2, 2, 4)
    assert ecs.mbq_ratios(sens, 3) == (10.0, 4.0)
    assert ecs.mbq_ratios(sens, 3, "scored") == (5.0, 8.0)
    assert ecs.mbq_ratios(None, 0) is None


def group_of(X, W, is_vis, is_answer, r):
    n = X.shape[0]
    return ecs.ScalingGroup(
        producer="norm", consumers=["a"], router=None, attention=False, X=X, readers=[ecs.Consumer(W=W, name="a")],
        experts=[None], topk=None, token_weights=None, importance=None, mean_prob=None, is_vis=is_vis,
        is_answer=is_answer, is_scored=torch.zeros(n, dtype=torch.bool), sensitivity=(r / 2, r))


@pytest.mark.parametrize("loss", ["mae", "mse"])
def test_mbq_loss_is_its_codes_formula(loss):
    """For every α of the grid, the searched loss is MBQ's (auto_scale.py) up to a factor common to all α:
    mae (Σ_ans|e| + r Σ_vis|e|) / ((n_ans + n_vis) · out), mse Σ_ans e² / (n_ans · out) + r Σ_vis e² / (n_vis · out),
    computed here in float64 from the same scaled-and-rounded weights; prompt tokens do not count."""
    gen = torch.Generator().manual_seed(1)
    n, d, out, r = 60, 32, 24, 0.3
    X = torch.randn(n, d, generator=gen) * torch.linspace(0.1, 4, d)
    W = torch.randn(out, d, generator=gen)
    kind = torch.randint(0, 3, (n,), generator=gen)  # 0 prompt, 1 answer, 2 image
    q = gptq.Settings.of(method="mbq", bits=3, group_size=16, mbq_loss=loss)
    g = group_of(X, W, kind == 2, kind == 1, r)
    s, rep = ecs.mbq_search(g, q)
    ans, img = (kind == 1).double(), (kind == 2).double()
    c = ans + r * img if loss == "mae" else ans / ans.sum() + r * img / img.sum()
    res = ecs.search_scale(X, [W], ecs.awq_candidates(ecs.mean_abs(X)), bits=3, group_size=16, sym=False,
                           token_weights=c, rho=ecs.MBQ_LOSSES[loss])
    want = []
    for alpha, sc in ecs.awq_candidates(ecs.mean_abs(X)):
        W_hat = rtn(W * sc, bits=3, group_size=16, sym=False).W_hat
        e = X.double() @ W.double().T - (X / sc).double() @ W_hat.double().T
        ans, vis = e[kind == 1], e[kind == 2]
        if loss == "mae":
            want.append((ans.abs().sum() + r * vis.abs().sum()) / ((ans.shape[0] + vis.shape[0]) * out))
        else:
            want.append(ans.square().sum() / (ans.shape[0] * out) + r * vis.square().sum() / (vis.shape[0] * out))
    want = torch.stack(want)
    ratio = res.losses / want
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)
    assert rep["alpha"] == ecs.awq_candidates(ecs.mean_abs(X))[int(want.argmin())][0] == res.alpha
    assert torch.equal(s, res.s)


def test_a_group_without_answer_or_image_tokens_keeps_s_1():
    X, W = torch.randn(10, 16), torch.randn(8, 16)
    none = torch.zeros(10, dtype=torch.bool)
    s, rep = ecs.mbq_search(group_of(X, W, none, none, 0.5), gptq.Settings.of(method="mbq", bits=3, group_size=16))
    assert torch.equal(s, torch.ones(16)) and rep["alpha"] == 0.0


def test_mbq_without_reweighting_and_with_squared_error_is_exactly_awq(tiny_qwen, calib, tmp_path):
    """MBQ's reweight=False with loss_mode mse is AWQ: the search on layer 0 and the whole quantized output."""
    reps = []
    for method, opts in (("awq", {}), ("mbq", dict(mbq_reweight=False, mbq_loss="mse"))):
        m = model.load_model(tiny_qwen)
        acts = gptq.embed(m, folders.CalibSet.load(calib).samples, "cpu")
        q = gptq.Settings.of(method=method, bits=3, group_size=16, **opts)
        reps.append(scales.search_and_fold(m.layers[0], m.scaling_groups(0), acts, q, gptq.get_method(method)))
        run(tiny_qwen, calib, tmp_path / method, method=method, **opts)
    assert reps[0] == reps[1]
    assert digest(tmp_path / "awq") == digest(tmp_path / "mbq")


def test_mbq_runs_weight_only_and_w4a8_and_differs_from_awq(tiny_qwen, calib, tmp_path):
    run(tiny_qwen, calib, tmp_path / "awq", method="awq")
    rep = run(tiny_qwen, calib, tmp_path / "mbq", method="mbq")
    assert digest(tmp_path / "awq") != digest(tmp_path / "mbq")
    assert any(r.get("alpha", 0) > 0 for layer in rep["layers"].values() for r in layer["scales"].values())
    rep = run(tiny_qwen, calib, tmp_path / "mbq8", method="mbq", bits=4, abits=8, mbq_language="scored")
    assert rep["abits"] == 8


def test_a_calib_without_sensitivities_is_refused_before_any_work(tiny_qwen, tmp_path):
    c = str(tmp_path / "calib")
    calibrate.calibrate(tiny_qwen, n=4, seed=0, out=c, gamma=False, command="test")
    with pytest.raises(ValueError, match="no MBQ sensitivities.*--no-mbq-reweight"):
        run(tiny_qwen, c, tmp_path / "q", method="mbq")
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()
    run(tiny_qwen, c, tmp_path / "q", method="mbq", mbq_reweight=False)
