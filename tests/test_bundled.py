"""The bundled tiny models: they load through the contract, still answer the held-out benchmark, load in
transformers (Qwen) with the same logits, survive W8 RTN, and every gptq.py preset runs on both of them."""

import os

import pytest
import torch

from data import processor
from data import samples as data_samples
import gptq
import model
import eval as evaluation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN = os.path.join(ROOT, "models", "tiny-qwen3-vl-moe")
KIMI = os.path.join(ROOT, "models", "tiny-kimi-vl")
MANY = os.path.join(ROOT, "models", "tiny-qwen3-vl-moe-64e")  # 64 routed experts, top-4
# Answering the most frequent training answer of each question type scores 28.8% on held-out image questions
# (measured on 1000 test items). On these 120 held-out samples the bundled models measured 86.3% (Qwen), 86.3%
# (Kimi) and 71.6% (64 experts) on image questions and 100% / 100% / 100% on text ones; the floors sit well
# below that and well above guessing, so the test fails when a model stops seeing or answering, not on noise.
FLOORS = {"qwen": (0.75, 0.95), "kimi": (0.75, 0.95), "many": (0.60, 0.95)}  # (image, text) accuracy
# the many-experts model on 32 calibration samples (seed 0) measured: 256 of 256 experts under 256 tokens,
# I(E; M) 0.52-0.62 bits per layer (0.52-0.63 of H(M)) against 0.010-0.011 for modality-blind routing
MANY_FLOORS = {"few": 200, "mi_share": 0.3}


@pytest.mark.parametrize("path, name", [(QWEN, "qwen"), (KIMI, "kimi"), (MANY, "many")], ids=["qwen", "kimi", "many"])
def test_bundled_model_still_answers(path, name):
    r = evaluation.evaluate(path, n=120, seed=1, max_new_tokens=6)
    assert r["accuracy"]["image"] >= FLOORS[name][0], r["accuracy"]
    assert r["accuracy"]["text"] >= FLOORS[name][1], r["accuracy"]


@pytest.mark.parametrize("path", [QWEN, KIMI, MANY], ids=["qwen", "kimi", "many"])
def test_bundled_checkpoint_layout(path):
    from safetensors import safe_open

    size = os.path.getsize(os.path.join(path, "model.safetensors"))
    assert size <= 12 * 2**20
    f = safe_open(os.path.join(path, "model.safetensors"), "pt")
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(path, name))
    m = model.load_model(path, dtype=torch.float32)
    moe = [layer.mlp for layer in m.layers if hasattr(layer.mlp, "experts")]
    assert moe and len(moe[0].experts) >= 8 and m.cfg.text.num_experts_per_tok >= 2


@pytest.mark.parametrize("path", [QWEN, MANY], ids=["qwen", "many"])
def test_bundled_qwen_matches_transformers(path):
    from transformers import Qwen3VLMoeForConditionalGeneration

    hf = Qwen3VLMoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    m, proc = model.load_model(path), processor.load_processor(path)
    s = next(s for s in data_samples.shapes_benchmark(10) if s.image is not None)
    e = processor.encode_sample(proc, s)
    with torch.no_grad():
        ref = hf(input_ids=e["input_ids"], pixel_values=e["pixel_values"], image_grid_thw=e["image_grid_thw"],
                 mm_token_type_ids=e["is_vis"].int()).logits
    ours = m(e["input_ids"], pixel_values=e["pixel_values"], image_grid_thw=e["image_grid_thw"])
    assert (ours - ref).abs().max() <= 1e-4 and torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_many_experts_model_routes_by_modality_and_starves_experts(tmp_path):
    """The regime the many-experts model exists for, on 32 calibration samples: routing depends on modality far
    beyond what modality-blind routing would show, and many experts get fewer than 2 x input width tokens
    (MEASURED_64E below; the floors sit well under the measured values)."""
    import calibrate
    from bench import routing_stats

    calibrate.calibrate(MANY, n=32, seed=0, out=str(tmp_path / "calib"), gamma=False, command="test")
    r = routing_stats.report(str(tmp_path / "calib"))
    assert r["experts_total"] == 64 * 4
    assert r["few_total"] >= MANY_FLOORS["few"], r
    for layer in r["layers"]:
        assert layer["mi_share"] >= MANY_FLOORS["mi_share"] and layer["mi_bits"] >= 10 * layer["mi_null"], layer


def test_w8_rtn_on_bundled_model_stays_close_to_float(tmp_path):
    import calibrate

    calibrate.calibrate(QWEN, n=8, seed=0, out=str(tmp_path / "calib"), gamma=False, command="test")
    gptq.quantize_model(QWEN, str(tmp_path / "calib"), str(tmp_path / "q"),
                             gptq.Settings.of(method="rtn", bits=8, group_size=32), command="test")
    r = evaluation.evaluate(str(tmp_path / "q"), reference=QWEN, n=60, max_new_tokens=6)
    assert r["kl"]["all"] < 1e-4, r["kl"]


@pytest.fixture(scope="module")
def macs_calib(tmp_path_factory):
    """A small MACS-selected calib/ per bundled model (gamma included, so every preset can run on it)."""
    import calibrate

    out = {}
    for name, path in (("qwen", QWEN), ("kimi", KIMI)):
        out[name] = str(tmp_path_factory.mktemp("calib") / name)
        calibrate.calibrate(path, n=6, seed=0, out=out[name], command="test", select="macs", pool_factor=2)
    return out


PRESETS = [("rtn", 3, 16), ("gptq", 3, 16), ("awq", 3, 16), ("mbq", 3, 16), ("veq-me", 3, 16), ("veq-ma", 3, 16), ("veq", 3, 16),
           ("smoothquant", 4, 8), ("smoothquant-gptq", 4, 8), ("ecs", 4, 8), ("ecs-faq", 4, 8), ("ecmfq", 4, 8)]


def test_presets_cover_every_method():

    assert sorted(m for m, _, _ in PRESETS) == sorted(gptq.METHODS)


@pytest.mark.parametrize("method, bits, abits", PRESETS, ids=[p[0] for p in PRESETS])
@pytest.mark.parametrize("name", ["qwen", "kimi"])
def test_every_preset_runs_on_the_bundled_models(name, method, bits, abits, macs_calib, tmp_path):
    """End to end through the driver, then the packed checkpoint answers like the float model on a few samples."""

    path = {"qwen": QWEN, "kimi": KIMI}[name]
    gptq.quantize_model(path, macs_calib[name], str(tmp_path / "q"),
                             gptq.Settings.of(method=method, bits=bits, abits=abits, group_size=32), command="test")
    r = evaluation.evaluate(str(tmp_path / "q"), reference=path, n=6, seed=3, max_new_tokens=3)
    assert r["top1"]["all"] >= 0.8 and r["kl"]["all"] < 0.1, (method, r["kl"], r["top1"])
