"""calibrate.py: routing statistics are consistent counts, the folder round-trips, gamma is a real ratio, the
layer-streaming pass equals the whole-model one."""

import os

import pytest
import torch

import calibrate
from data import processor
from data import samples as data_samples
import model
from quant import folders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_routing_counts_and_round_trip(tiny_qwen, tmp_path):
    out = str(tmp_path / "calib")
    r = calibrate.calibrate(tiny_qwen, n=6, seed=1, out=out, command="test")
    k = model.load_config(tiny_qwen).text.num_experts_per_tok
    # every token is routed to exactly k experts in every MoE layer
    assert torch.equal(r.n_text.sum(1), torch.full((len(r.moe_layers),), float(k * r.T_text)))
    assert torch.equal(r.n_vis.sum(1), torch.full((len(r.moe_layers),), float(k * r.T_vis)))
    assert torch.allclose(r.mean_prob.sum(1), torch.ones(len(r.moe_layers)), atol=1e-5)
    # the token totals are the samples' prompt + answer lengths
    proc = processor.load_processor(tiny_qwen)
    samples = data_samples.load_samples("shapes", n=6, seed=1, split="train")
    encs = [processor.encode_qa_batch(proc, [s]) for s in samples]
    assert r.T_vis == sum(int(e["is_vis"].sum()) for e in encs)
    assert r.T_text == sum(int((~e["is_vis"]).sum()) for e in encs)
    back = folders.CalibSet.load(out)  # the folder holds these very samples, encoded
    assert [sorted(s) for s in back.samples] == [sorted(k for k in e if k in folders.SAMPLE_KEYS) for e in encs]
    assert all(torch.equal(s[k], e[k]) for s, e in zip(back.samples, encs) for k in s)
    assert torch.equal(back.n_text, r.n_text) and back.gamma == r.gamma and back.seed == 1
    n_img = sum(s.image is not None for s in samples)
    assert sum(g is not None for g in r.gamma_per_sample) == n_img and r.gamma > 0


def test_input_gradient_matches_finite_differences(tiny_qwen):
    """dL/dx at the decoder inputs, checked by central differences along random directions at text and image
    positions (float64); the ratio is then the plain formula on it."""
    m, proc = model.load_model(tiny_qwen, dtype=torch.float64), processor.load_processor(tiny_qwen)
    s = next(s for s in data_samples.shapes_benchmark(10, split="train") if s.image is not None)
    b = processor.encode_qa_batch(proc, [s])
    x, ctx = m.embed(b["input_ids"], **processor.vision_inputs(b))
    g = calibrate.input_gradient(m, x, ctx, b["labels"])

    def loss(xx):
        h = xx
        for i, layer in enumerate(m.layers):
            h = m.after_layer(i, layer(h, ctx), ctx)
        logits = m.lm_head(m.model.language_model.norm(h))  # float64 (m.head casts logits to float32)
        return torch.nn.functional.cross_entropy(logits[0, :-1], b["labels"][0, 1:], ignore_index=-100)

    vis = b["is_vis"][0]
    positions = torch.where(vis)[0][:3].tolist() + torch.where(~vis)[0][-3:].tolist()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in positions:
            v = torch.zeros_like(x)
            v[0, t] = torch.randn(x.shape[-1], generator=gen, dtype=torch.float64)
            fd = (loss(x + 1e-6 * v) - loss(x - 1e-6 * v)) / 2e-6
            assert abs(fd - (g[t] * v[0, t]).sum()) < 1e-4 * abs(fd) + 1e-8  # g has float32 logits (m.head)
    per_pos = g.abs().mean(-1)
    want = (per_pos[~vis].mean() / per_pos[vis].mean()).item()
    assert calibrate.gradient_ratio(g, vis) == want
    assert calibrate.gradient_ratio(g, torch.zeros_like(vis)) is None


@pytest.mark.parametrize("which", ["tiny_qwen", "kimi"])
def test_streaming_collect_equals_the_whole_model_pass(which, tiny_qwen):
    """One layer in memory at a time, gamma carried back layer by layer: the same counts, probabilities and
    per-sample gradient ratios as the whole-model pass (to float rounding)."""
    path = tiny_qwen if which == "tiny_qwen" else os.path.join(ROOT, "models", "tiny-kimi-vl")
    proc = processor.load_processor(path)
    samples = [calibrate.encode(proc, s) for s in data_samples.load_samples("shapes", n=5, seed=2, split="train")]
    full = calibrate.collect(model.load_model(path), samples)
    streamed = calibrate.collect_streaming(model.load_model(path, lazy_layers=True), samples)
    for k in ("n_text", "n_vis"):
        assert torch.equal(full[k], streamed[k])
    assert torch.allclose(full["mean_prob"], streamed["mean_prob"], atol=1e-7)
    assert (full["T_text"], full["T_vis"]) == (streamed["T_text"], streamed["T_vis"])
    assert [r is None for r in full["gamma_per_sample"]] == [r is None for r in streamed["gamma_per_sample"]]
    assert any(r is not None for r in full["gamma_per_sample"])
    for a, b in zip(full["gamma_per_sample"], streamed["gamma_per_sample"]):
        assert a is None or abs(a - b) <= 1e-5 * abs(a)
    assert abs(full["gamma_grad_x_input"] - streamed["gamma_grad_x_input"]) <= 1e-5 * abs(full["gamma_grad_x_input"])


def test_a_calib_folder_of_the_previous_schema_is_refused_with_the_command_to_run(tmp_path):
    """calib/ written by the version that stored only a recipe (no schema, no samples.safetensors): gptq.py's
    reader names the file and says to re-run calibrate.py, before any work."""
    import json

    import pytest

    import gptq

    old = tmp_path / "calib"
    old.mkdir()
    json.dump({"model": "models/tiny-qwen3-vl-moe", "data": "shapes", "n": 4, "seed": 0, "split": "train",
               "selection": "random"}, open(old / "calib.json", "w"))
    with pytest.raises(folders.CalibError, match=r"calib\.json: written by another version of calibrate\.py .*"
                                                  r"re-run `python calibrate\.py --out"):
        folders.CalibSet.load(str(old))
    with pytest.raises(folders.CalibError, match="re-run"):
        gptq.main(["--calib", str(old), "--out", str(tmp_path / "q"), "--no-eval"])
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()  # nothing written
