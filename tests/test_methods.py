"""A new method is one record (gptq.Method), here registered from outside the package as a fork would, and
run end to end on the bundled tiny Qwen3-VL-MoE: the README's two fork examples, a token weighting and a scale
search. An unknown method name is an error.

    python -m pytest -q tests/test_methods.py
"""

import os

import pytest
import torch

import calibrate
import ecs
import gptq
import model

QWEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "tiny-qwen3-vl-moe")


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("calib") / "calib")
    calibrate.calibrate(QWEN, n=4, seed=0, out=out, command="test")
    return out


@pytest.fixture
def registry(monkeypatch):
    """A copy of the methods table for one test: what it registers is gone afterwards."""
    monkeypatch.setattr(gptq, "METHODS", dict(gptq.METHODS))


def packed(folder) -> dict:
    m = model.load_model(str(folder))  # the output loads and runs as a packed checkpoint
    return {k: v for k, v in m.state_dict().items() if k.endswith("weight_packed")}


def test_a_token_weighting_registered_from_outside_runs_end_to_end(calib, tmp_path, registry):
    calls = []

    def unsure_image_weights(q, gamma, is_vis, p=None, fusion=None):
        """VEQ-MA's α (γ on text tokens), times p² on image tokens: an image token whose router is unsure
        about this expert weighs less."""
        calls.append((p is not None, bool(is_vis.any())))
        alpha = torch.where(is_vis, 1.0, gamma).double()
        if p is None:
            return alpha
        return alpha * torch.where(is_vis, p.double() ** 2, torch.ones_like(alpha))

    gptq.register(gptq.Method("veq-conf", "VEQ-MA's α, p² on image tokens", token_weights=unsure_image_weights,
                              needs_gamma=True))
    for name in ("veq-conf", "gptq"):
        q = gptq.Settings.of(method=name, bits=4, group_size=32)
        gptq.quantize_model(QWEN, calib, str(tmp_path / name), q, command="test")
    assert (True, True) in calls and (False, True) in calls  # expert and non-expert linears, with image tokens
    conf, plain = packed(tmp_path / "veq-conf"), packed(tmp_path / "gptq")
    assert conf.keys() == plain.keys() and any(not torch.equal(conf[k], plain[k]) for k in conf)


def test_a_scale_search_registered_from_outside_runs_through_the_cli(calib, tmp_path, registry):
    calls = []

    def awq_p99(g: ecs.ScalingGroup, q: gptq.Settings):
        """AWQ's grid on a robust activation range (99th percentile of |x|) instead of the mean |x|."""
        calls.append(g.producer)
        m = ecs.robust_absmax(g.X, 99.0)
        r = ecs.search_scale(g.X, g.readers, [(i / 20, m.pow(i / 20).clamp(min=1e-4)) for i in range(20)],
                             bits=q.bits, group_size=q.group_size, sym=q.sym, abits=q.abits)
        return r.s, {"alpha": r.alpha, "rel_error": r.rel_error, "rel_error_no_scale": r.rel_error_no_scale}

    gptq.register(gptq.Method("awq-p99", "AWQ on the 99th percentile of |x|, then RTN", solver="rtn",
                              scales=awq_p99))
    for name in ("awq-p99", "awq"):
        gptq.main(["--model", QWEN, "--calib", calib, "--out", str(tmp_path / name), "--method", name,
                   "--bits", "4", "--group-size", "32", "--no-eval"])
    assert "post_attention_layernorm" in calls and "input_layernorm" in calls
    new, awq = packed(tmp_path / "awq-p99"), packed(tmp_path / "awq")
    assert new.keys() == awq.keys() and any(not torch.equal(new[k], awq[k]) for k in new)


def test_an_unknown_method_is_an_error(calib, tmp_path, registry):
    with pytest.raises(ValueError, match="unknown; expected one of veq-ma, gptq"):
        gptq.quantize_model(QWEN, calib, str(tmp_path / "q"), gptq.Settings.of(method="awq-p99"), command="t")
    with pytest.raises(ValueError, match="exists already"):
        gptq.register(gptq.Method("gptq", "a second gptq"))
    with pytest.raises(ValueError, match="solver must be"):
        gptq.Method("x", "a solver that does not exist", solver="obq")


def test_the_readmes_example_runs_as_written(tmp_path, monkeypatch, registry):
    """The README's "Adding a method" block, taken from README.md and run unchanged after `python calibrate.py`
    (here with --n 8) in a fresh folder: its method quantizes and its output carries the method's name."""
    import json
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md")).read()
    block = re.search(r"## Adding a method.*?```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    os.symlink(os.path.join(root, "models"), tmp_path / "models")
    calibrate.main(["--n", "8"])
    exec(compile(block, "README.md", "exec"), {})
    with open(tmp_path / "quantized" / "report.json") as f:
        assert json.load(f)["method"] == "veq-conf"
