"""The results table: every method on the bundled tiny models, mean ± std over calibration seeds.

    python bench/methods.py [--models tiny-qwen3-vl-moe,tiny-kimi-vl] [--seeds 0,1,2] [--n-calib 64]
                            [--n-eval 300] [--only W3] [--out results/]

For each model and seed: calibrate.py on the shapes train split (n-calib samples, that seed; for ECMFQ also a
MACS-selected set from a 4x pool of the same stream), then every configuration below through gptq.py (no
closing eval) and eval.py against the float model on the same held-out samples (the float model's answers are
computed once). Writes results/methods.md (the table with
the command) and results/methods.json (every run). Metrics: KL(P_float || P_quant) per answer token, top-1
agreement, answer flips, accuracy and its share of float accuracy; image and text-only separately for KL.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import calibrate  # noqa: E402
import data  # noqa: E402
import eval as evaluation  # noqa: E402
import gptq  # noqa: E402

G = 32  # group size for the tiny widths (hidden 128)
CONFIGS = [  # (label, setting, QuantArgs fields)
    *[(f"{m}", f"W{b}A16", dict(method=m, bits=b)) for b in (4,) for m in ("rtn", "awq", "gptq")],
    *[(label, f"W{b}A16", dict(method=m, bits=b, **extra)) for b in (3, 2) for label, m, extra in (
        ("rtn", "rtn", {}), ("awq", "awq", {}), ("gptq", "gptq", {}), ("veq-me", "veq-me", {}),
        ("veq-ma", "veq-ma", {}), ("veq (ME+MA, extension)", "veq", {}),
        ("veq-me w/o gamma", "veq-me", dict(use_gamma=False)), ("veq-me w/o beta", "veq-me", dict(use_beta=False)),
        ("veq-ma w/o p", "veq-ma", dict(affinity=False)), ("veq-ma w/o alpha", "veq-ma", dict(modality=False)),
        ("veq-ma, scale-free gamma", "veq-ma", dict(gamma_source="grad_x_input")))],
    ("smoothquant+rtn", "W4A8", dict(method="smoothquant", bits=4, abits=8)),
    ("smoothquant+gptq", "W4A8", dict(method="smoothquant-gptq", bits=4, abits=8)),
    ("ecs (+gptq)", "W4A8", dict(method="ecs", bits=4, abits=8)),
    ("ecs+faq", "W4A8", dict(method="ecs-faq", bits=4, abits=8)),
    ("ecmfq (ecs+macs+faq)", "W4A8", dict(method="ecmfq", bits=4, abits=8)),
]


def run_model(model_dir, seeds, n_calib, n_eval, only, work):
    proc = data.load_processor(model_dir)
    samples = data.load_samples("shapes", n=n_eval, seed=0, split="test")
    t0 = time.time()
    ref = evaluation.reference_outputs(model_dir, proc, samples, max_new_tokens=8)
    float_acc = evaluation.group_mean([float(evaluation.is_correct(a, s)) for a, s in zip(ref[0], samples)], samples)
    print(f"{model_dir}: float accuracy {float_acc['all']:.3f} (image {float_acc['image']:.3f}, text "
          f"{float_acc['text']:.3f}) on {len(samples)} held-out samples ({time.time() - t0:.0f}s)", flush=True)
    runs = []
    for seed in seeds:
        calib = os.path.join(work, f"calib-{seed}")
        calibrate.calibrate(model_dir, n=n_calib, seed=seed, out=calib, command=f"calibrate seed {seed}")
        configs = [c for c in CONFIGS if not only or c[1] == only]
        if any(kw["method"] == "ecmfq" for _, _, kw in configs):
            calibrate.calibrate(model_dir, n=n_calib, seed=seed, out=calib + "-macs", select="macs",
                                command=f"calibrate --select macs seed {seed}")
        for label, setting, kw in configs:
            q = gptq.QuantArgs(group_size=G, **kw)
            out = os.path.join(work, "q")
            rep = gptq.quantize_model(model_dir, calib + ("-macs" if q.method == "ecmfq" else ""), out, q,
                                      command=f"bench {label} {setting}")
            r = evaluation.evaluate(out, reference=model_dir, n=n_eval, seed=0, max_new_tokens=8, ref_outputs=ref)
            runs.append(dict(model=os.path.basename(model_dir), label=label, setting=setting, seed=seed,
                             args=kw, seconds=rep["seconds"], gamma=rep["gamma"],
                             pooled=len(rep["pooled_hessian_linears"]), **{k: r[k] for k in
                             ("accuracy", "kl", "top1", "flips", "ce_delta")}))
            print(f"  seed {seed} {setting:7s} {label:24s} KL {r['kl']['all']:.2e}  flips {r['flips']['all']:.3f}  "
                  f"acc {r['accuracy']['all']:.3f}", flush=True)
    return float_acc, runs


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(model, float_acc, runs) -> str:
    lines = [f"### {model} (float accuracy {100 * float_acc['all']:.1f}%: image {100 * float_acc['image']:.1f}%, "
             f"text {100 * float_acc['text']:.1f}%)", "",
             "| setting | method | KL all | KL image | KL text | top-1 | flips | accuracy | % of float | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    keys = []
    for r in runs:
        if (r["setting"], r["label"]) not in keys:
            keys.append((r["setting"], r["label"]))
    for setting, label in keys:
        rs = [r for r in runs if r["setting"] == setting and r["label"] == label]

        def f(get, fmt, scale=1.0):
            m, s = mean_std([scale * get(r) for r in rs])
            return f"{fmt.format(m)} ± {fmt.format(s)}"
        lines.append(f"| {setting} | {label} | {f(lambda r: r['kl']['all'], '{:.2e}')} | "
                     f"{f(lambda r: r['kl']['image'], '{:.2e}')} | {f(lambda r: r['kl']['text'], '{:.2e}')} | "
                     f"{f(lambda r: r['top1']['all'], '{:.1f}', 100)} | {f(lambda r: r['flips']['all'], '{:.1f}', 100)} | "
                     f"{f(lambda r: r['accuracy']['all'], '{:.1f}', 100)} | "
                     f"{100 * statistics.mean(r['accuracy']['all'] for r in rs) / max(1e-9, float_acc['all']):.1f} | "
                     f"{statistics.mean(r['seconds'] for r in rs):.1f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-qwen3-vl-moe,tiny-kimi-vl", help="folders under models/")
    p.add_argument("--seeds", default="0,1,2", help="calibration seeds")
    p.add_argument("--n-calib", type=int, default=64, help="calibration samples")
    p.add_argument("--n-eval", type=int, default=300, help="held-out evaluation samples")
    p.add_argument("--only", default=None, help="run one setting only, e.g. W3A16 or W4A8")
    p.add_argument("--out", default="results", help="output folder")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    command = "python bench/methods.py " + " ".join(sys.argv[1:])
    os.makedirs(a.out, exist_ok=True)
    for name in a.models.split(","):
        with tempfile.TemporaryDirectory() as work:
            float_acc, runs = run_model(os.path.join(ROOT, "models", name), [int(s) for s in a.seeds.split(",")],
                                        a.n_calib, a.n_eval, a.only, work)
        name = os.path.basename(name.rstrip("/"))
        md = table(name, float_acc, runs)
        print(md)
        base = os.path.join(a.out, f"methods-{name}" + (f"-{a.only}" if a.only else ""))
        with open(base + ".json", "w") as f:
            json.dump({"command": command, "float_accuracy": float_acc, "group_size": G, "n_calib": a.n_calib,
                       "n_eval": a.n_eval, "runs": runs}, f, indent=1)
        with open(base + ".md", "w") as f:
            f.write(f"Command: `{command}` (2-core CPU, torch 2.13 CPU). Group size {G}, asymmetric weights, "
                    f"{a.n_calib} calibration samples (shapes train split) per seed, {a.n_eval} held-out samples; "
                    f"mean ± std over seeds {a.seeds}.\n\n{md}\n")


if __name__ == "__main__":
    main()
