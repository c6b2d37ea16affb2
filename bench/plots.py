"""Pictures of a quantization run and of the results table, drawn with pillow alone (no matplotlib).

    python bench/plots.py report quantized/report.json --out docs/img/report.png
    python bench/plots.py forest results/methods-tiny-qwen3-vl-moe.json [more.json ...] --out docs/img/forest.png

report: from the report.json that gptq.py writes into its output folder (per decoder layer, per linear:
tokens_text, tokens_vis, rel_error = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), pooled_hessian). Four heatmaps, one row per
layer: the relative output error of each linear outside the routed experts (one column per linear: attention,
shared experts, dense MLPs), of each routed expert (the mean over its gate / up / down projections; a cross marks
an expert quantized from the layer's pooled Hessian), and the calibration tokens routed to each expert, text and
image on one colour scale so that the two can be compared. Errors use a log colour scale.
forest: from bench/methods.py's JSON (its "rows"): one panel per model and setting, each method's mean and 95%
interval of --metric on a log axis (an interval reaching 0 runs to the axis' left end), GPTQ in red with a dashed
line at its mean, * after a method whose difference from GPTQ is significant. The OOD section's panel shows --ood-metric (KL on text-only questions by default).
Does not: draw the older results JSON (no intervals), or the vision tower's linears.
"""

import argparse
import json
import math
import os
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

FONT, SMALL = ImageFont.load_default(size=14), ImageFont.load_default(size=11)
VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]  # colour(0) .. colour(1)
MISSING, INK, GPTQ, OTHER = (225, 225, 225), (20, 20, 20), (200, 30, 30), (30, 60, 150)
EXPERT = re.compile(r"experts\.(\d+)\.(\w+)$")  # a routed expert's linear: mlp.experts.{e}.{gate,up,down}_proj


def colour(t: float) -> tuple:
    """t in [0, 1] -> an RGB colour, linear between the VIRIDIS anchors."""
    x = min(1.0, max(0.0, t)) * (len(VIRIDIS) - 1)
    i = min(int(x), len(VIRIDIS) - 2)
    return tuple(round(a + (x - i) * (b - a)) for a, b in zip(VIRIDIS[i], VIRIDIS[i + 1]))


def log_norm(lo: float, hi: float):
    a, b = math.log10(lo), math.log10(max(hi, lo * 1.0001))
    return lambda v: (math.log10(max(v, lo)) - a) / (b - a)


@dataclass
class Panel:
    """A drawn heatmap and where its cells are: cell (r, c) is the box at (x0 + c·cw, y0 + r·ch), size cw x ch."""

    image: Image.Image
    x0: int
    y0: int
    cw: int
    ch: int


def vertical_text(im: Image.Image, x: int, y: int, text: str):
    """text written bottom to top, its top-centre at (x, y)."""
    w, h = SMALL.getbbox(text)[2] + 2, 14
    t = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(t).text((0, 0), text, fill=INK, font=SMALL)
    im.paste(t.rotate(90, expand=True), (int(x - h / 2), y))


def heatmap(title, rows, cols, values: dict, norm, lo_text, hi_text, marks=frozenset(), cell=(16, 16)) -> Panel:
    """values {(r, c): v}: cells without a value are grey; norm maps a value to [0, 1]. Rows labelled on the left,
    columns below (numbers: every k-th when crowded; names: written vertically), a colour bar with its end values
    at the bottom."""
    cw, ch = cell
    names = any(isinstance(c, str) for c in cols)
    label_h = max(SMALL.getbbox(str(c))[2] for c in cols) + 6 if names and cols else 18
    left, top = 8 + max(FONT.getbbox(str(r))[2] for r in rows), 26
    W, H = max(left + cw * len(cols) + 10, FONT.getbbox(title)[2] + 16), top + ch * len(rows) + label_h + 52
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    d.text((4, 4), title, fill=INK, font=FONT)
    for i, r in enumerate(rows):
        d.text((4, top + i * ch + ch / 2), str(r), fill=INK, font=FONT, anchor="lm")
        for j, c in enumerate(cols):
            v = values.get((r, c))
            box = [left + j * cw, top + i * ch, left + (j + 1) * cw - 1, top + (i + 1) * ch - 1]
            d.rectangle(box, fill=MISSING if v is None else colour(norm(v)))
            if (r, c) in marks:
                d.line(box, fill="white")
                d.line([box[0], box[3], box[2], box[1]], fill="white")
    step = 1 if names else max(1, math.ceil(40 / cw))  # number labels at least ~40 px apart
    for j in range(0, len(cols), step):
        x, y = left + j * cw + cw / 2, top + len(rows) * ch + 4
        if names:
            vertical_text(im, x, y, str(cols[j]))
        else:
            d.text((x, y), str(cols[j]), fill=INK, font=SMALL, anchor="mt")
    y = top + len(rows) * ch + label_h + 8
    for x in range(left, W - 10):
        d.line([x, y, x, y + 10], fill=colour((x - left) / max(1, W - 11 - left)))
    d.text((left, y + 14), lo_text, fill=INK, font=SMALL)
    d.text((W - 10, y + 14), hi_text, fill=INK, font=SMALL, anchor="ra")
    return Panel(im, left, top, cw, ch)


def read_report(report: dict) -> dict:
    """report.json -> per layer: the non-expert linears' errors, each expert's mean error, its text and image
    tokens, and the experts quantized from the pooled Hessian."""
    out = {"layers": sorted(int(i) for i in report["layers"]), "other": {}, "expert": {}, "text": {}, "image": {},
           "pooled": set()}
    errs = {}
    for i, layer in report["layers"].items():
        for name, r in layer["linears"].items():
            m = EXPERT.search(name)
            if m is None:
                short = name.replace("self_attn.", "").replace("mlp.", "").replace("shared_experts.", "shared.")
                out["other"][(int(i), short)] = r["rel_error"]
                continue
            key = (int(i), int(m.group(1)))
            errs.setdefault(key, []).append(r["rel_error"])
            out["text"][key], out["image"][key] = r["tokens_text"], r["tokens_vis"]
            if r["pooled_hessian"]:
                out["pooled"].add(key)
    out["expert"] = {k: sum(v) / len(v) for k, v in errs.items()}
    return out


def draw_report(report: dict, title: str = "") -> tuple[Image.Image, dict]:
    """The four heatmaps side by side; returns the picture and each panel with its offset in it."""
    r = read_report(report)
    rows = r["layers"]
    experts = sorted({e for _, e in r["expert"]})
    others = list(dict.fromkeys(name for _, name in r["other"]))
    cell = (max(4, min(16, 640 // max(1, len(experts)))), max(6, min(16, 480 // max(1, len(rows)))))
    errors = [v for v in [*r["other"].values(), *r["expert"].values()] if v > 0] or [1.0]
    lo, hi = min(errors), max(errors)
    count_max = max([1, *r["text"].values(), *r["image"].values()])
    panels = {
        "other": heatmap("rel. output error: other linears", rows, others, r["other"], log_norm(lo, hi),
                         f"{lo:.1e}", f"{hi:.1e}", cell=(max(cell[0], 18), cell[1])),
        "expert": heatmap("rel. output error per expert (x: pooled H)", rows, experts, r["expert"], log_norm(lo, hi),
                          f"{lo:.1e}", f"{hi:.1e}", marks=r["pooled"], cell=cell),
        "text": heatmap("text tokens per expert", rows, experts, r["text"], lambda v: v / count_max, "0",
                        str(count_max), cell=cell),
        "image": heatmap("image tokens per expert", rows, experts, r["image"], lambda v: v / count_max, "0",
                         str(count_max), cell=cell),
    }
    head = title or (f"{report.get('method')} W{report.get('bits')} g{report.get('group_size')} A{report.get('abits')}"
                     f" on {os.path.basename(str(report.get('model')).rstrip('/'))}: rows = decoder layers, columns = "
                     "linears / experts")
    W = sum(p.image.width for p in panels.values()) + 10 * (len(panels) + 1)
    H = max(p.image.height for p in panels.values()) + 30
    im = Image.new("RGB", (max(W, FONT.getbbox(head)[2] + 20), H), "white")
    ImageDraw.Draw(im).text((10, 6), head, fill=INK, font=FONT)
    x, offsets = 10, {}
    for k, p in panels.items():
        im.paste(p.image, (x, 30))
        offsets[k] = (p, x, 30)
        x += p.image.width + 10
    return im, offsets


def forest_rows(res: dict, metric: str, ood_metric: str) -> dict:
    """(setting or OOD) -> [(label, mean, lo, hi, significant Δ)] from one bench/methods.py JSON."""
    if "rows" not in res:
        raise ValueError(f"{res.get('command', '?')}: no 'rows' with intervals (an older results JSON); run "
                         "bench/methods.py again")
    panels = {}
    for r in res["rows"]:
        m = metric if r["section"] == "main" else ood_metric
        if m not in r["metrics"]:
            continue
        d, delta = r["metrics"][m], r["delta"].get(m)
        name = r["setting"] + ("" if r["section"] == "main" else f" OOD ({m})")
        panels.setdefault(name, []).append((r["label"], d["mean"], *d["ci95"], bool(delta and delta["significant"])))
    return panels


def draw_forest(results: list[dict], metric: str = "kl", ood_metric: str = "kl_text") -> Image.Image:
    """Per model (a column) and setting (a panel): mean and 95% interval of each method, log axis."""
    columns = [(res.get("model", "?"), forest_rows(res, metric, ood_metric)) for res in results]
    label_w = max(FONT.getbbox(lab + " *")[2] for _, ps in columns for rs in ps.values() for lab, *_ in rs) + 12
    plot_w, row_h = 360, 18
    col_w = label_w + plot_w + 30
    heights = [sum(40 + row_h * len(rs) + 24 for rs in ps.values()) for _, ps in columns]
    head = (f"{metric} (OOD panels: {ood_metric}): mean and 95% interval over seeds and eval samples; red: GPTQ; "
            "*: differs from GPTQ")
    im = Image.new("RGB", (max(col_w * len(columns), FONT.getbbox(head)[2]) + 20, max(heights) + 40), "white")
    d = ImageDraw.Draw(im)
    d.text((10, 8), head, fill=INK, font=FONT)
    for k, (model, panels) in enumerate(columns):
        x0, y = 10 + k * col_w, 36
        for name, rs in panels.items():
            y = forest_panel(d, f"{model}: {name}", rs, x0, y, label_w, plot_w, row_h)
    return im


def forest_panel(d, title, rs, x0, y, label_w, plot_w, row_h) -> int:
    """One setting's methods; returns the y below it."""
    positive = [v for _, m, lo, hi, _ in rs for v in (m, lo, hi) if v > 0] or [1e-9, 1.0]
    a, b = math.floor(math.log10(min(positive))), math.ceil(math.log10(max(positive)))
    b = max(b, a + 1)
    xs = lambda v: x0 + label_w + plot_w * (math.log10(max(v, 10 ** a)) - a) / (b - a)  # noqa: E731
    d.text((x0, y), title, fill=INK, font=FONT)
    y += 22
    gptq = next((m for lab, m, *_ in rs if lab == "gptq"), None)
    if gptq is not None:
        for yy in range(y, y + row_h * len(rs), 6):
            d.line([xs(gptq), yy, xs(gptq), yy + 3], fill=GPTQ)
    for lab, m, lo, hi, sig in rs:
        c = GPTQ if lab == "gptq" else OTHER
        d.text((x0 + label_w - 8, y + row_h / 2), lab + (" *" if sig else ""), fill=c, font=FONT, anchor="rm")
        d.line([xs(lo), y + row_h / 2, xs(hi), y + row_h / 2], fill=c, width=2)
        d.ellipse([xs(m) - 4, y + row_h / 2 - 4, xs(m) + 4, y + row_h / 2 + 4], fill=c)
        y += row_h
    d.line([x0 + label_w, y + 2, x0 + label_w + plot_w, y + 2], fill=INK)
    for e in range(a, b + 1):
        d.line([xs(10 ** e), y, xs(10 ** e), y + 6], fill=INK)
        d.text((xs(10 ** e), y + 8), f"1e{e}", fill=INK, font=SMALL, anchor="mt")
    return y + 40


def save(im: Image.Image, out: str):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    im.save(out)
    print(f"wrote {out} ({im.width}x{im.height})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["report", "forest"], help="what to draw")
    p.add_argument("inputs", nargs="+", help="report: one report.json; forest: bench/methods.py JSON files")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--metric", default="kl", help="forest: kl, kl_image, kl_text, random_kl, top1, flips, accuracy")
    p.add_argument("--ood-metric", default="kl_text", help="forest: the metric of the OOD section's panel")
    a = p.parse_args(argv)
    loaded = []
    for path in a.inputs:
        if not os.path.isfile(path):
            raise SystemExit(f"{path}: not found (report: QUANTIZED/report.json; forest: results/methods-*.json)")
        with open(path) as f:
            loaded.append(json.load(f))
    if a.kind == "report":
        if len(loaded) != 1 or "layers" not in loaded[0]:
            raise SystemExit(f"{a.inputs}: report draws one report.json (with 'layers'), as gptq.py writes it")
        save(draw_report(loaded[0])[0], a.out)
    else:
        save(draw_forest(loaded, a.metric, a.ood_metric), a.out)


if __name__ == "__main__":
    main()
