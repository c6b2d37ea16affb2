"""bench/plots.py: the report heatmaps and the forest plot on tiny synthetic inputs.

    python -m pytest -q tests/test_plots.py
"""

import json

import pytest
from PIL import Image

from bench import plots


def synthetic_report(n_experts=4):
    """Layer 0 dense (no experts), layers 1-2 with n_experts routed experts; expert e of layer l gets 10·l·e text
    tokens and 5·e image tokens and error 1e-5·(1 + e)·l, and expert 0 of layer 2 was quantized from the pooled
    Hessian (cell (2, 0): a white cross)."""
    lin = lambda t, v, err, pooled=False: dict(tokens_text=t, tokens_vis=v, rel_error=err,  # noqa: E731
                                               pooled_hessian=pooled, damp=0.01, cholesky_retries=0)
    layers = {"0": {"linears": {"self_attn.q_proj": lin(9, 9, 1e-4), "mlp.gate_proj": lin(9, 9, 2e-4)}}}
    for i in (1, 2):
        ls = {"self_attn.q_proj": lin(9, 9, 1e-4)}
        for e in range(n_experts):
            for p in ("gate_proj", "up_proj", "down_proj"):
                ls[f"mlp.experts.{e}.{p}"] = lin(10 * i * e, 5 * e, 1e-5 * (1 + e) * i, pooled=(i, e) == (2, 0))
        layers[str(i)] = {"linears": ls}
    return {"method": "gptq", "bits": 3, "group_size": 32, "abits": 16, "model": "tiny", "layers": layers}


def pixel(offsets, panel, r, c):
    """The colour at the centre of cell (r, c) of one panel of the composed report picture."""
    p, x, y = offsets[panel]
    return x + p.x0 + c * p.cw + p.cw // 2, y + p.y0 + r * p.ch + p.ch // 2


def test_report_heatmaps(tmp_path):
    report = synthetic_report()
    (tmp_path / "report.json").write_text(json.dumps(report))
    plots.main(["report", str(tmp_path / "report.json"), "--out", str(tmp_path / "r.png")])
    im, offsets = plots.draw_report(report)
    assert Image.open(tmp_path / "r.png").size == im.size
    wider, _ = plots.draw_report(synthetic_report(32))
    assert wider.width > im.width and wider.height == im.height
    top = plots.VIRIDIS[-1]
    assert im.getpixel(pixel(offsets, "text", 2, 3)) == top  # 60 text tokens: the largest count of the picture
    assert im.getpixel(pixel(offsets, "text", 1, 0)) == plots.VIRIDIS[0]  # 0 tokens
    assert im.getpixel(pixel(offsets, "image", 1, 3)) == plots.colour(15 / 60)  # one scale for text and image
    assert im.getpixel(pixel(offsets, "other", 0, 1)) == top  # layer 0's dense MLP: the largest error, 2e-4
    assert im.getpixel(pixel(offsets, "expert", 1, 0)) == plots.VIRIDIS[0]  # the smallest, 1e-5 (one log scale)
    assert im.getpixel(pixel(offsets, "expert", 2, 0)) == (255, 255, 255)  # the pooled-Hessian cross
    assert im.getpixel(pixel(offsets, "expert", 0, 0)) == plots.MISSING  # the dense layer has no experts


def test_colour_scale_ends():
    assert plots.colour(0) == plots.VIRIDIS[0] and plots.colour(1) == plots.VIRIDIS[-1]
    assert plots.colour(2) == plots.VIRIDIS[-1] and plots.colour(0.5) == plots.VIRIDIS[2]


def results_json(tmp_path):
    interval = lambda m, lo, hi, sig=False: dict(mean=m, ci95=[lo, hi], significant=sig)  # noqa: E731
    rows = [dict(section="main", setting="W3A16", label="gptq", metrics={"kl": interval(1e-4, 5e-5, 2e-4)}, delta={}),
            dict(section="main", setting="W3A16", label="rtn", metrics={"kl": interval(1e-3, 8e-4, 2e-3)},
                 delta={"kl": interval(9e-4, 7e-4, 1e-3, True)}),
            dict(section="ood", setting="W3A16", label="gptq", metrics={"kl_text": interval(1e-6, 0, 3e-6)}, delta={})]
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"model": "tiny", "rows": rows}))
    return path


def test_forest_plot(tmp_path):
    path = results_json(tmp_path)
    plots.main(["forest", str(path), str(path), "--out", str(tmp_path / "f.png")])
    im = Image.open(tmp_path / "f.png").convert("RGB")
    colours = {c for _, c in im.getcolors(maxcolors=1 << 20)}
    assert plots.GPTQ in colours and plots.OTHER in colours
    panels = plots.forest_rows(json.loads(path.read_text()), "kl", "kl_text")
    assert list(panels) == ["W3A16", "W3A16 OOD (kl_text)"] and panels["W3A16"][1][-1] is True  # rtn: significant
    with pytest.raises(ValueError, match="no 'rows'"):
        plots.forest_rows({"runs": []}, "kl", "kl_text")
