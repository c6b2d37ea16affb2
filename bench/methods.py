"""The results table: every method on the bundled tiny models, with 95% intervals over calibration seeds and
eval samples, each method's difference from GPTQ at the same bits, and a calibration-distribution (OOD) section.

    python bench/methods.py                       # the full table: all three bundled models, 5 seeds, 1000 eval samples
    python bench/methods.py --seeds 0,1 --n-eval 200 --only W3A16 --methods rtn,gptq,veq-ma --tag smoke

What runs. Per model and calibration seed s: calibrate.py on the shapes train split (--n-calib samples, seed s;
a MACS-selected set for ECMFQ; image questions only, and 4x as many, for the OOD section), every configuration
through gptq.py (no closing eval), then eval.py against the float model on the same held-out samples (the float
model's outputs once per model; greedy answers through eval.answers_via_reference, equal to generating them).
RTN uses no calibration data: it runs on the first seed and its result stands for every seed.

Metrics, per eval sample i and seed s: x_si = KL(P_float || P_quant) per answer token (also on image and
text-only questions alone), top-1 agreement, answer flip, correctness, and the KL on --random-tokens sequences
of uniform random non-special ids (teacher forced, every position: an input no calibration set resembles).

Intervals (bench/stats.py's seeds_samples_interval). A row's number is the mean over seeds and samples, x̄ = mean_si x_si.
Its 95% interval adds two half-widths in quadrature: the percentile bootstrap over eval samples of the
seed-averaged per-sample values (2000 resamples; one resample serves every seed), and the t-interval
t_{0.975,S-1} · sd_s / √S of the S per-seed means. "Δ vs GPTQ" applies the same to the paired per-sample
differences d_si = x_si(method) − x_si(GPTQ), both quantized from seed s's calibration set and scored on the
same samples; * marks a Δ whose interval excludes 0. A metric's interval is clipped to its range (KL >= 0,
rates in [0, 100%]), which the symmetric seed term can overshoot with few seeds. GPTQ at W4A8 is GPTQ with
int8 activations. The interval treats the eval samples as drawn from the benchmark and the seeds as drawn from
calibration sets; it says nothing about other models or data. With one seed the seed term is missing and the
interval is too narrow.

OOD section (W3A16, calibrated on image questions only): KL on the image questions (the calibration
distribution), on the text-only questions and on random tokens (neither in it), for the main methods and a
small study: GPTQ with --percdamp 0.1 and 1 (damping pulls GPTQ towards RTN), with 4x the calibration samples,
and VEQ-MA's token weights (α = γ on text tokens up-weights text, its ablations).

Writes, under --out: methods-MODEL[-SETTING][-TAG].md (the tables, the command, the timings), .json (every row
with its intervals, every run's means and times) and .npz (every run's per-sample values; runs[k]["index"] = k).
Time: with --jobs 2 each model runs in its own process at --threads 1; the README gives the measured cost per
configuration and the extrapolated total. Does not: quantize the vision tower (--quantize-vision).
"""

import argparse
import contextlib
import io
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import calibrate  # noqa: E402
from data import processor  # noqa: E402
from data import samples as data_samples  # noqa: E402
import gptq  # noqa: E402
import eval as evaluation  # noqa: E402
from quant import folders  # noqa: E402
from bench import stats  # noqa: E402

G = 32  # group size for the tiny widths (hidden 128)
MAX_NEW = 8  # generation limit: the shapes answers are one or two tokens


@dataclass
class Config:
    label: str
    setting: str  # W4A16, W3A16, W2A16, W4A8
    q: dict  # gptq.Settings fields
    section: str = "main"  # "main" or "ood"
    calib: str = "shapes"  # calibrate.py --data
    calib_scale: int = 1  # calibration samples = this x --n-calib
    select: str = field(init=False)

    def __post_init__(self):
        self.select = "macs" if self.q["method"] == "ecmfq" else "random"


def w(bits, abits=16):
    return f"W{bits}A{abits}"


VEQ_ROWS = [("veq-me", "veq-me", {}), ("veq-ma", "veq-ma", {}), ("veq (ME+MA, extension)", "veq", {}),
            ("veq-me w/o gamma", "veq-me", dict(use_gamma=False)), ("veq-me w/o beta", "veq-me", dict(use_beta=False)),
            ("veq-ma w/o p", "veq-ma", dict(affinity=False)), ("veq-ma w/o alpha", "veq-ma", dict(modality=False)),
            ("veq-ma scale-free gamma", "veq-ma", dict(gamma_source="grad_x_input"))]
MBQ_ROWS = [("mbq", {}), ("mbq (scored tokens)", dict(mbq_language="scored"))]
CONFIGS = [
    *[Config(m, w(4), dict(method=m, bits=4)) for m in ("rtn", "awq", "gptq")],
    *[Config(label, w(4), dict(method=m, bits=4, **extra)) for label, m, extra in VEQ_ROWS
      if label in ("veq-me", "veq-ma", "veq-ma scale-free gamma")],  # the papers' W4 claims
    *[Config(label, w(b), dict(method=m, bits=b, **extra)) for b in (3, 2)
      for label, m, extra in [("rtn", "rtn", {}), ("awq", "awq", {}), ("gptq", "gptq", {})] + VEQ_ROWS],
    *[Config(label, w(4, 8), dict(method=m, bits=4, abits=8)) for label, m in [
        ("gptq", "gptq"), ("awq", "awq"), ("smoothquant+rtn", "smoothquant"), ("smoothquant+gptq", "smoothquant-gptq"),
        ("ecs (+gptq)", "ecs"), ("ecs+faq", "ecs-faq"), ("ecmfq (ecs+macs+faq)", "ecmfq")]],
    *[Config(label, w(b, a), dict(method="mbq", bits=b, abits=a, **extra)) for b, a in ((4, 16), (3, 16), (2, 16), (4, 8))
      for label, extra in MBQ_ROWS],  # MBQ (arXiv 2412.19509), the code's answer tokens and the scored ones
    *[Config(label, w(3), dict(method=m, bits=3, **extra), section="ood", calib="shapes-image", calib_scale=scale)
      for label, m, extra, scale in [
          ("rtn", "rtn", {}, 1), ("awq", "awq", {}, 1), ("gptq", "gptq", {}, 1),
          ("gptq percdamp 0.1", "gptq", dict(percdamp=0.1), 1), ("gptq percdamp 1", "gptq", dict(percdamp=1.0), 1),
          ("gptq 4x calibration", "gptq", {}, 4), ("veq-me", "veq-me", {}, 1), ("veq-ma", "veq-ma", {}, 1),
          ("veq-ma w/o alpha", "veq-ma", dict(modality=False), 1),
          ("veq-ma scale-free gamma", "veq-ma", dict(gamma_source="grad_x_input"), 1)]],
]
W2_ROWS = [("gptq", "gptq", {}), ("gptq percdamp 0.05", "gptq", dict(percdamp=0.05)),
           ("gptq percdamp 0.1", "gptq", dict(percdamp=0.1)), ("gptq clip", "gptq", dict(clip=True)),
           ("gptq clip percdamp 0.05", "gptq", dict(clip=True, percdamp=0.05)),
           ("gptq no act-order", "gptq", dict(act_order=False, static_groups=False)),
           ("veq-ma", "veq-ma", {}), ("veq-ma scale-free gamma", "veq-ma", dict(gamma_source="grad_x_input"))]
CONFIGS += [Config(label, setting, dict(method=m, bits=2, sym=sym, **extra), section="w2")  # the W2 study
            for setting, sym in (("W2A16", False), ("W2A16 sym", True)) for label, m, extra in W2_ROWS]
METRICS = ("kl", "kl_image", "kl_text", "top1", "flips", "accuracy", "random_kl")
BOUNDS = {m: (0.0, 1.0) if m in ("top1", "flips", "accuracy") else (0.0, float("inf")) for m in METRICS}
DELTAS = {"main": ("kl", "random_kl"), "w2": ("kl", "random_kl"), "ood": ("kl_image", "kl_text", "random_kl")}  # Δ vs GPTQ columns


def quietly(fn, *args, **kwargs):
    """Run a pipeline step without its per-layer lines (the bench prints one line per run)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def per_sample(r: dict) -> dict:
    """One run's per-sample arrays, the modality splits of KL included."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in r["per_sample"].items() if k != "modality"}
    img = np.array([m == "image" for m in r["per_sample"]["modality"]])
    return {**p, "kl_image": p["kl"][img], "kl_text": p["kl"][~img]}


def accuracy_text(acc: dict) -> str:
    ci = f" [{100 * acc['ci95'][0]:.1f}, {100 * acc['ci95'][1]:.1f}]" if acc.get("ci95") else ""
    return f"{100 * acc['all']:.1f}%{ci}: " + ", ".join(f"{g} {100 * acc[g]:.1f}%" for g in ("image", "text")
                                                        if acc[g] is not None)


def reference(model_dir, n_eval, random_tokens, vision_cache=None):
    """The float model's outputs on the eval samples (once per model) and its accuracy."""
    proc = processor.load_processor(model_dir)
    samples = data_samples.load_samples("shapes", n=n_eval, seed=0, split="test")
    ref = evaluation.reference_outputs(model_dir, proc, samples, MAX_NEW, random_tokens=random_tokens,
                                       vision_cache=vision_cache)
    correct = [float(evaluation.is_correct(a, s)) for a, s in zip(ref.answers, samples)]
    return ref, {**evaluation.group_mean(correct, samples), "ci95": evaluation.bootstrap_ci(correct)}


def run_config(model_dir, c: Config, seed, calib, ref, n_eval, work, vision_cache=None) -> tuple[dict, dict]:
    """Quantize with one configuration, evaluate against the float model: (the run's record, its per-sample
    arrays). CPU seconds beside wall seconds: on a shared machine they are the better measure of the work."""
    out, cpu = os.path.join(work, "q"), time.process_time()
    rep = quietly(gptq.quantize_model, model_dir, calib, out, gptq.Settings.of(group_size=G, **c.q),
                  command=f"bench {c.label} {c.setting}", overwrite=True)
    cpu_quantize = time.process_time() - cpu
    r = evaluation.evaluate(out, reference=model_dir, n=n_eval, seed=0, max_new_tokens=MAX_NEW, ref_outputs=ref,
                            fast_flips=True, dequantize_once=True, vision_cache=vision_cache)
    arrays = per_sample(r)
    run = dict(model=os.path.basename(model_dir), section=c.section, label=c.label, setting=c.setting, seed=seed,
               args=c.q, calib=c.calib, n_calib=folders.CalibSet.read_json(calib)["n"], seconds=rep["seconds"],
               eval_seconds=r["seconds"], cpu_seconds=time.process_time() - cpu,
               cpu_quantize_seconds=cpu_quantize, generated=r["generated"],
               gamma=rep["gamma"], pooled=len(rep["pooled_hessian_linears"]),
               means={m: float(v.mean()) for m, v in arrays.items() if len(v)})
    print(f"  {run['model']} seed {seed} {c.section:4s} {c.setting} {c.label:26s} KL {run['means']['kl']:.2e} "
          f"random-token KL {run['means'].get('random_kl', float('nan')):.2e} flips {run['means']['flips']:.3f}  "
          f"quantize {rep['seconds']:.1f}s eval {r['seconds']:.1f}s (CPU {cpu_quantize:.1f}s + "
          f"{run['cpu_seconds'] - cpu_quantize:.1f}s, generated "
          f"{r['generated']})", flush=True)
    return run, arrays


def run_model(model_dir, configs, seeds, n_calib, n_eval, random_tokens, work) -> dict:
    """Every configuration on every seed; calibration sets made once per seed and kind."""
    t0, vision_cache = time.time(), evaluation.VisionCache()  # every configuration keeps the float tower
    ref, float_acc = reference(model_dir, n_eval, random_tokens, vision_cache)
    timing = {"reference": time.time() - t0, "calibrate": {}}
    print(f"{model_dir}: float accuracy {accuracy_text(float_acc)} on {n_eval} held-out samples "
          f"({timing['reference']:.0f}s)", flush=True)
    runs, arrays, first = [], {}, {}
    for seed in seeds:
        calibs = {}
        for c in configs:
            if c.q["method"] == "rtn" and (c.section, c.setting, c.label) in first:  # no calibration data used
                runs.append({**first[(c.section, c.setting, c.label)], "seed": seed, "reused": True})
                continue
            key = (c.calib, c.calib_scale, c.select)
            if key not in calibs:
                calibs[key], t = os.path.join(work, f"calib-{seed}-{len(calibs)}"), time.time()
                quietly(calibrate.calibrate, model_dir, c.calib, n_calib * c.calib_scale, seed, calibs[key],
                        select=c.select, command=f"bench calibrate {key} seed {seed}", overwrite=True)
                timing["calibrate"][f"{seed} {key}"] = time.time() - t
            run, arrays[len(arrays)] = run_config(model_dir, c, seed, calibs[key], ref, n_eval, work, vision_cache)
            runs.append({"index": len(arrays) - 1, **run})
            first.setdefault((c.section, c.setting, c.label), runs[-1])
    return {"float_accuracy": float_acc, "runs": runs, "arrays": arrays, "timing": timing}


def seed_matrix(runs, arrays, key, metric):
    """The (seeds, samples) values of one metric for the row key = (section, setting, label), seeds in order,
    and the seeds; (None, None) when there is no such row or no such values (no random tokens, no text)."""
    rs = sorted((r for r in runs if (r["section"], r["setting"], r["label"]) == key), key=lambda r: r["seed"])
    if not rs or len(arrays[rs[0]["index"]].get(metric, ())) == 0:
        return None, None
    return np.stack([arrays[r["index"]][metric] for r in rs]), [r["seed"] for r in rs]


def load_arrays(npz_path) -> dict:
    """Every run's per-sample arrays as run_one saves them ("INDEX/METRIC" keys), back as {index: {metric: values}}."""
    arrays = {}
    with np.load(npz_path) as f:
        for name in f.files:
            k, m = name.split("/", 1)
            arrays.setdefault(int(k), {})[m] = f[name]
    return arrays


def summarize(runs, arrays) -> list[dict]:
    """One row per (section, setting, label): each metric's mean and interval over seeds x samples, and the
    paired difference from GPTQ of the same section and setting."""
    rows, keys = [], list(dict.fromkeys((r["section"], r["setting"], r["label"]) for r in runs))

    for key in keys:
        section, setting, label = key
        rs = [r for r in runs if (r["section"], r["setting"], r["label"]) == key]
        row = {"section": section, "setting": setting, "label": label, "args": rs[0]["args"],
               "n_calib": rs[0]["n_calib"], "seeds": sorted(r["seed"] for r in rs), "metrics": {}, "delta": {},
               "seconds": float(np.mean([r["seconds"] for r in rs if not r.get("reused")])),
               "eval_seconds": float(np.mean([r["eval_seconds"] for r in rs if not r.get("reused")]))}
        for metric in METRICS:
            x, seeds = seed_matrix(runs, arrays, key, metric)
            if x is not None:
                row["metrics"][metric] = stats.seeds_samples_interval(x, bounds=BOUNDS[metric])
            base, base_seeds = seed_matrix(runs, arrays, (section, setting, "gptq"), metric)
            if x is not None and base is not None and label != "gptq" and metric in DELTAS[section]:
                if base_seeds != seeds:
                    raise ValueError(f"{label} {setting}: seeds {seeds} but GPTQ has {base_seeds}")
                row["delta"][metric] = stats.seeds_samples_interval(x - base)
        rows.append(row)
    return rows


def ci_cell(d, fmt, scale=1.0, mark=False) -> str:
    if d is None:
        return "-"
    lo, hi = d["ci95"]
    star = " *" if mark and d["significant"] else ""
    return f"{fmt.format(scale * d['mean'])} [{fmt.format(scale * lo)}, {fmt.format(scale * hi)}]{star}"


def table(rows, section, compact=False) -> str:
    e, ed, pct = "{:.2e}", "{:+.1e}", "{:.1f}"
    if compact:  # the README's version of the main table
        cols = [("KL", "kl", e), ("Δ KL vs GPTQ", "Δkl", ed), ("flips %", "flips", pct),
                ("random-token KL", "random_kl", e), ("Δ random-token KL", "Δrandom_kl", ed)]
    elif section in ("main", "w2"):
        cols = [("KL", "kl", e), ("Δ KL vs GPTQ", "Δkl", ed), ("KL image", "kl_image", e),
                ("KL text", "kl_text", e),
                ("top-1 %", "top1", pct), ("flips %", "flips", pct), ("accuracy %", "accuracy", pct),
                ("random-token KL", "random_kl", e), ("Δ random-token KL", "Δrandom_kl", ed)]
    else:
        cols = [("KL image (in calib.)", "kl_image", e), ("Δ vs GPTQ", "Δkl_image", ed),
                ("KL text (OOD)", "kl_text", e), ("Δ vs GPTQ", "Δkl_text", ed),
                ("random-token KL (OOD)", "random_kl", e), ("Δ vs GPTQ", "Δrandom_kl", ed), ("flips %", "flips", pct)]
    lines = ["| setting | method | " + " | ".join(c[0] for c in cols) + " | s |", "|---" * (len(cols) + 3) + "|"]
    for r in (r for r in rows if r["section"] == section):
        cells = []
        for _, key, fmt in cols:
            d = r["delta"].get(key[1:]) if key.startswith("Δ") else r["metrics"].get(key)
            cells.append(ci_cell(d, fmt, 100.0 if fmt == pct else 1.0, mark=key.startswith("Δ")))
        lines.append(f"| {r['setting']} | {r['label']} | " + " | ".join(cells) + f" | {r['seconds']:.1f} |")
    return "\n".join(lines)


def report(name, res, args, command) -> str:
    fa, rows = res["float_accuracy"], res["rows"]
    runs = [r for r in res["runs"] if not r.get("reused")]
    per_run = np.mean([r["seconds"] + r["eval_seconds"] for r in runs]) if runs else float("nan")
    cpu_run = np.mean([r["cpu_seconds"] for r in runs]) if runs else float("nan")
    cpu_q = np.mean([r.get("cpu_quantize_seconds", np.nan) for r in runs]) if runs else float("nan")
    head = ("**Smoke run: too few seeds and samples to be a result; it shows that the pipeline works and times "
            "it.**\n\n" if args.tag == "smoke" else "")
    head += (f"Command: `{command}` (torch {torch.__version__}, {args.threads} thread(s) per model). Group size {G}, "
             f"asymmetric weights, {args.n_calib} calibration samples per seed (shapes train split), seeds "
             f"{args.seeds}, {args.n_eval} held-out samples, {args.random_tokens} random-token sequences of 32. "
             f"Cells: mean over seeds and samples [95% interval: eval-sample bootstrap and seed t-interval in "
             f"quadrature]; Δ = paired difference from GPTQ of the same section and bits, * where its interval "
             f"excludes 0. s = quantization seconds.\n\n")
    out = head + f"### {name} (float accuracy {accuracy_text(fa)})\n\n"
    if any(r["section"] == "main" for r in rows):
        out += table(rows, "main") + "\n\n"
    if any(r["section"] == "w2" for r in rows):
        out += ("#### W2 study: damping, MSE clipping, column order, VEQ-MA's weights (W2 g32, asymmetric and "
                "symmetric)\n\n" + table(rows, "w2") + "\n\n")
    if any(r["section"] == "ood" for r in rows):
        out += ("#### Calibration distribution (OOD): W3A16 calibrated on image questions only\n\n"
                + table(rows, "ood") + "\n\n")
    calib_s = list(res["timing"]["calibrate"].values())
    out += (f"Timing: reference outputs {res['timing']['reference']:.1f}s, calibration {np.mean(calib_s):.1f}s per "
            f"set ({len(calib_s)} sets), {len(runs)} quantize+eval runs at {per_run:.1f}s wall ({cpu_run:.1f}s CPU, "
            f"{cpu_q:.1f}s of it quantizing) each on average, "
            f"{res['timing']['total']:.0f}s in all.\n")
    return out


def summarize_files(paths) -> str:
    """The compact main table of every model in the given results/methods-*.json files (one file per setting
    or one for all), settings in the order W4A16, W3A16, W2A16, W4A8; the commands that made them below it."""
    by_model = {}
    for path in paths:
        with open(path) as f:
            d = json.load(f)
        by_model.setdefault(d["model"], []).append(d)
    order = {s: i for i, s in enumerate(("W4A16", "W3A16", "W2A16", "W4A8"))}
    out = []
    for name, ds in by_model.items():
        rows = sorted((r for d in ds for r in d["rows"] if r["section"] == "main"),
                      key=lambda r: order.get(r["setting"], len(order)))
        out.append(f"#### {name} (float accuracy {accuracy_text(ds[0]['float_accuracy'])})\n\n"
                   + table(rows, "main", compact=True) + "\n\n"
                   + "".join(f"`{d['command']}`{' (smoke)' if d.get('smoke') else ''}\n" for d in ds))
    return "\n".join(out)


def paired_from_files(paths, pairs, metrics=("kl", "kl_image", "random_kl")) -> str:
    """Paired differences A − B between two rows of the same model, section and setting, from the saved per-sample
    arrays (results/methods-*.json + .npz), with the same interval as the Δ vs GPTQ columns. A pair is
    "SETTING:A:B" (labels as in the tables, e.g. "W3A16:veq-me:awq"); the OOD and W2 study's rows are "ood/A", "w2/A"."""
    lines = ["| model | setting | A − B | " + " | ".join(f"Δ {m}" for m in metrics) + " |",
             "|---" * (3 + len(metrics)) + "|"]
    for path in paths:
        with open(path) as f:
            d = json.load(f)
        arrays = load_arrays(path[:-len(".json")] + ".npz")
        for pair in pairs:
            setting, a, b = pair.split(":")
            if not any(r["setting"] == setting for r in d["runs"]):
                continue

            def matrix(label, metric):
                section = next((x for x in ("ood", "w2") if label.startswith(x + "/")), "main")
                key = (section, setting, label[len(section) + 1:] if section != "main" else label)
                x, seeds = seed_matrix(d["runs"], arrays, key, metric)
                if x is None:
                    raise SystemExit(f"--pairs {pair}: no row '{key[2]}' ({key[0]}, {setting}) with {metric} values "
                                     f"in {path}")
                return x, seeds

            cells = []
            for m in metrics:
                (xa, sa), (xb, sb) = matrix(a, m), matrix(b, m)
                if sa != sb:
                    raise SystemExit(f"--pairs {pair}: seeds {sa} against {sb} in {path}")
                cells.append(ci_cell(stats.seeds_samples_interval(xa - xb), "{:+.1e}", mark=True))
            lines.append(f"| {d['model']} | {setting} | {a} − {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_one(name, args, command):
    configs = [c for c in CONFIGS if (not args.only or c.setting == args.only) and c.section in args.sections.split(",")
               and (not args.methods or c.q["method"] in args.methods.split(","))
               and (not args.labels or c.label in args.labels.split(","))]
    if not configs:
        raise SystemExit(f"--only {args.only} / --methods {args.methods} / --sections {args.sections}: no "
                         f"configuration left (settings {sorted({c.setting for c in CONFIGS})})")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as work:
        res = run_model(os.path.join(ROOT, "models", name), configs, [int(s) for s in args.seeds.split(",")],
                        args.n_calib, args.n_eval, args.random_tokens, work)
    res["timing"]["total"] = time.time() - t0
    res["rows"] = summarize(res["runs"], res["arrays"])
    md = report(name, res, args, command)
    print(md)
    base = os.path.join(args.out, f"methods-{name}" + (f"-{args.only.replace(' ', '-')}" if args.only else "")
                        + (f"-{args.tag}" if args.tag else ""))
    np.savez_compressed(base + ".npz", **{f"{k}/{m}": v for k, a in res["arrays"].items() for m, v in a.items()})
    meta = {k: getattr(args, k) for k in ("seeds", "n_calib", "n_eval", "random_tokens", "only", "methods", "labels",
                                          "tag")}
    with open(base + ".json", "w") as f:
        json.dump({"command": command, "model": name, "group_size": G, **meta, "smoke": args.tag == "smoke",
                   "float_accuracy": res["float_accuracy"], "timing": res["timing"], "rows": res["rows"],
                   "runs": res["runs"]}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(md)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-qwen3-vl-moe,tiny-kimi-vl,tiny-qwen3-vl-moe-64e", help="folders under models/")
    p.add_argument("--seeds", default="0,1,2,3,4", help="calibration seeds")
    p.add_argument("--n-calib", type=int, default=32, help="calibration samples per seed")
    p.add_argument("--n-eval", type=int, default=1000, help="held-out evaluation samples")
    p.add_argument("--random-tokens", type=int, default=128, help="random-token sequences (of 32) for the OOD KL")
    p.add_argument("--only", default=None, help="one setting only: W4A16, W3A16, W2A16 or W4A8")
    p.add_argument("--methods", default=None, help="comma-separated gptq.py --method names to keep (all rows of each)")
    p.add_argument("--labels", default=None, help="comma-separated row labels to keep (e.g. gptq,awq,mbq)")
    p.add_argument("--sections", default="main,ood", help="main (the table), ood (image-only calibration), w2 "
                   "(the W2 study)")
    p.add_argument("--tag", default=None, help="suffix of the output names ('smoke' marks a smoke run)")
    p.add_argument("--out", default=os.path.join(ROOT, "results"), help="output folder")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per model")
    p.add_argument("--jobs", type=int, default=2, help="models run in parallel, one process each")
    p.add_argument("--command", default=None, help=argparse.SUPPRESS)  # the parent's, in a per-model child
    p.add_argument("--summarize", nargs="+", metavar="JSON", help="print the compact main table of these result "
                   "files (the README's) and exit; runs nothing")
    p.add_argument("--pairs", default=None, help="with --summarize: comma-separated SETTING:A:B, print the paired "
                   "differences A − B (e.g. W3A16:veq-me:awq,W4A8:ecs+faq:ecs (+gptq))")
    a = p.parse_args()
    if a.summarize:
        print(paired_from_files(a.summarize, a.pairs.split(",")) if a.pairs else summarize_files(a.summarize))
        return
    command = a.command or "python bench/methods.py " + shlex.join(sys.argv[1:])
    os.makedirs(a.out, exist_ok=True)
    models = a.models.split(",")
    if a.jobs > 1 and len(models) > 1:  # one child process per model, at most --jobs at a time
        procs = []
        for name in models:
            while sum(q.poll() is None for q in procs) >= a.jobs:
                time.sleep(1)
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--models", name,
                                           "--jobs", "1", "--command", command]))
        if any(q.wait() != 0 for q in procs):
            raise SystemExit("a model's run failed (see its output above)")
        return
    torch.set_num_threads(a.threads)
    for name in models:
        run_one(name, a, command)


if __name__ == "__main__":
    main()
