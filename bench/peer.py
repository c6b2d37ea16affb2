"""Our quantizers against three peer toolkits (llm-compressor, GPTQModel, AutoRound) on the same model and samples.

    python bench/peer.py [--model models/tiny-qwen3-vl-moe] [--bits 4,3,2] [--group-size 32] [--n-calib 32]
        [--n-eval 1000] [--methods gptq,veq-ma] [--peers llm-compressor,gptqmodel,autoround]
        [--llmc-python P] [--gptqmodel-python P] [--autoround-python P] [--autoround-iters 200]
        [--no-gptqmodel-variant] [--threads 1] [--repeats 1] [--work DIR] [--md results/peer-....md]

Every side quantizes the same linears (the decoder's attention and expert linears; vision tower, routers and
lm_head float) to W`bits` symmetric with groups of `--group-size`, from the same calibration token sequences:
prompt + gold answer of the first `--n-calib` image questions of the shapes train split, as calibrate.py encodes
them (image samples only: the peers' VLM pipelines take one call signature). Each peer runs in a subprocess of
its own interpreter (its own virtual environment: they pin different torch and transformers versions), through
bench/peer_side.py, which hands it those token ids and pixels as ready tensors. Everything not named above is
each peer's default (peer_side.PEER_DEFAULTS); GPTQModel is run a second time with damping 0.01 and act-order
(our GPTQ's and llm-compressor's damping) unless --no-gptqmodel-variant.

Every output is compared with the float model on the same `--n-eval` held-out samples (shapes test split): mean
KL per answer token with a bootstrap 95% interval (also over image / text questions), the paired difference
from OUR GPTQ at the same width (row - ours, with its interval; * when it excludes 0), and the accuracy of the
greedy answers (eval.is_correct). A compressed-tensors output is read by model.load_model as it is; a GPTQ-format
output (GPTQModel) is first dequantized and its experts fused back by bench/peer_convert.py (the `how` column
says which). Seconds are the wall time of each side's quantization at `--threads` torch threads, the process
pinned to as many cores, the best of `--repeats`: ours `gptq.quantize_model` (loads the layers, writes the
output), a peer's own quantize call on a model already loaded, without saving.

A peer whose interpreter lacks its package is reported as skipped with the reason; a peer that fails is reported
as failed with its log, and the command exits 1 after writing the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import calibrate  # noqa: E402
from data import processor  # noqa: E402
from data import samples as data_samples  # noqa: E402
import gptq  # noqa: E402
import model  # noqa: E402
import eval as evaluation  # noqa: E402
import peer_convert  # noqa: E402
import peer_side  # noqa: E402

PEERS = ("llm-compressor", "gptqmodel", "autoround")
LABELS = {"llm-compressor": "llm-compressor", "gptqmodel": "GPTQModel", "autoround": "AutoRound"}


@contextmanager
def pinned(threads: int):
    """torch threads and CPU affinity limited to `threads` cores inside the block (timed quantization), restored
    after (evaluation uses the whole machine; its numbers do not depend on it)."""
    old_threads, old_cpus = torch.get_num_threads(), os.sched_getaffinity(0)
    torch.set_num_threads(threads)
    os.sched_setaffinity(0, sorted(old_cpus)[:threads])
    try:
        yield
    finally:
        os.sched_setaffinity(0, old_cpus)
        torch.set_num_threads(old_threads)


def peer_jobs(a) -> list[dict]:
    """The peer runs asked for: key (folder name), label, peer, interpreter, extra peer_side flags."""
    python = {"llm-compressor": a.llmc_python, "gptqmodel": a.gptqmodel_python, "autoround": a.autoround_python}
    jobs = []
    for peer in a.peers.split(","):
        if peer not in PEERS:
            raise SystemExit(f"--peers: unknown peer {peer!r}; known: {', '.join(PEERS)}")
        if peer == "autoround":
            jobs.append({"key": "autoround", "label": f"AutoRound, {a.autoround_iters} iters", "peer": peer,
                         "python": python[peer], "args": ["--iters", str(a.autoround_iters)]})
            continue
        jobs.append({"key": peer, "label": f"{LABELS[peer]} (defaults)", "peer": peer, "python": python[peer],
                     "args": []})
        if peer == "gptqmodel" and not a.no_gptqmodel_variant:
            jobs.append({"key": "gptqmodel-d01-act", "label": "GPTQModel, damp 0.01 + act-order", "peer": peer,
                         "python": python[peer], "args": ["--damp", "0.01", "--act-order"]})
    return jobs


def run_peer(job: dict, a, calib: str, bits: int, out: str) -> dict:
    """One peer run in its own interpreter -> {"status": "ok", "folder", "info", "how"} or {"status": "skipped" |
    "failed", "why"}. A GPTQ-format output is converted to a float checkpoint beside it."""
    cmd = [job["python"], os.path.join(ROOT, "bench", "peer_side.py"), "--peer", job["peer"], "--model", a.model,
           "--calib", calib, "--bits", str(bits), "--group-size", str(a.group_size), "--out", out,
           "--threads", str(a.threads), "--repeats", str(a.repeats), *job["args"]]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    log = out + ".log"
    with open(log, "w") as f:
        try:
            # cwd: the work folder, where GPTQModel writes its logs/ (not the checkout)
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                cwd=os.path.dirname(out)).returncode
        except OSError as e:
            return {"status": "skipped", "why": f"cannot start {job['python']} ({e}); fix --{flag(job)}"}
    with open(log) as f:
        tail = f.read()[-2000:].strip()
    if rc == peer_side.MISSING:
        return {"status": "skipped", "why": tail.splitlines()[-1] + f" (--{flag(job)})"}
    if rc != 0:
        print(f"{job['label']} W{bits} failed (exit {rc}): {shlex.join(cmd)}\n{tail}", file=sys.stderr)
        return {"status": "failed", "why": f"exit {rc}, log {log}: {tail.splitlines()[-1] if tail else ''}"}
    with open(os.path.join(out, "peer.json")) as f:
        info = json.load(f)
    if info["format"] == "gptq":
        conv = peer_convert.convert(out, out + "-float")
        return {"status": "ok", "folder": out + "-float", "info": info,
                "how": f"converted: GPTQ {conv['format']} -> float32, experts fused (bench/peer_convert.py)"}
    return {"status": "ok", "folder": out, "info": info, "how": "direct: compressed-tensors"}


def flag(job: dict) -> str:
    return {"llm-compressor": "llmc-python", "gptqmodel": "gptqmodel-python", "autoround": "autoround-python"}[
        job["peer"]]


def evaluate(folder: str, proc, samples, ref) -> dict:
    """Per-sample KL to the float model's answer distributions, and per-sample greedy-answer correctness."""
    m = model.load_model(folder)
    kl = torch.tensor([evaluation.answer_kl(q, r)
                       for q, r in zip(evaluation.answer_logprobs(m, proc, samples), ref)])
    correct = torch.tensor([float(evaluation.is_correct(x, s))
                            for x, s in zip(evaluation.greedy_answers(m, proc, samples), samples)])
    return {"kl": kl, "correct": correct}


def fmt_ci(v: torch.Tensor, f: str) -> str:
    ci = evaluation.bootstrap_ci(v)
    return f"{v.mean():{f}} [{ci[0]:{f}}, {ci[1]:{f}}]"


def table_row(name: str, r: dict | None, img: torch.Tensor, base: dict | None, seconds, how: str) -> str:
    """One markdown row; r None: a skipped / failed run (how says why)."""
    if r is None:
        return f"| {name} | - | - | - | - | - | - | {how} |"
    diff = "-"
    if base is not None and r is not base:
        d = evaluation.paired_difference(r["kl"], base["kl"])
        diff = f"{d['mean']:+.1e} [{d['ci95'][0]:+.1e}, {d['ci95'][1]:+.1e}]" + (" *" if d["significant"] else "")
    return (f"| {name} | {fmt_ci(r['kl'], '.2e')} | {r['kl'][img].mean():.2e} | {r['kl'][~img].mean():.2e} | "
            f"{diff} | {fmt_ci(r['correct'] * 100, '.1f')} | {'-' if seconds is None else f'{seconds:.1f}'} | "
            f"{how} |")


HEADER = ("| bits / method | KL [95% CI] | KL image | KL text | row − our GPTQ [95% CI] | accuracy % [95% CI] | "
          "s | how |\n" + "|---" * 8 + "|")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ROOT, "models", "tiny-qwen3-vl-moe"))
    p.add_argument("--bits", default="4,3,2", help="comma-separated weight widths")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--n-calib", type=int, default=32, help="calibration samples (image questions)")
    p.add_argument("--seed", type=int, default=0, help="calibration sample seed")
    p.add_argument("--n-eval", type=int, default=1000, help="held-out samples for the KL and the accuracy")
    p.add_argument("--methods", default="gptq,veq-ma", help="our methods, each with our defaults (gptq first: "
                   "the paired differences are taken from it)")
    p.add_argument("--peers", default=",".join(PEERS), help="peers to run, comma-separated; '' for none")
    for peer, name in (("llm-compressor", "llmc"), ("gptqmodel", "gptqmodel"), ("autoround", "autoround")):
        p.add_argument(f"--{name}-python", default=sys.executable,
                       help=f"interpreter whose environment has {peer} (default: this one)")
    p.add_argument("--autoround-iters", type=int, default=200, help="AutoRound tuning iterations")
    p.add_argument("--no-gptqmodel-variant", action="store_true",
                   help="skip the second GPTQModel run (damp 0.01 + act-order)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (and cores) of every timed quantization")
    p.add_argument("--repeats", type=int, default=1, help="times are the best of this many runs on each side")
    p.add_argument("--work", default=None, help="folder for the outputs (default: a temporary one, removed)")
    p.add_argument("--md", default=None, help="write the table (with the command and versions) to this file")
    a = p.parse_args(argv)
    a.model = os.path.abspath(a.model)
    methods = a.methods.split(",")
    if methods[0] != "gptq":
        raise SystemExit("--methods: must start with gptq (the paired differences are taken from our GPTQ)")
    jobs = peer_jobs(a) if a.peers else []
    work = a.work or tempfile.mkdtemp(prefix="peer-")
    os.makedirs(work, exist_ok=True)
    calib = os.path.join(work, "calib")
    calibrate.calibrate(a.model, "shapes-image", a.n_calib, a.seed, calib, command="bench/peer.py", overwrite=True)
    samples = data_samples.load_samples("shapes", n=a.n_eval, seed=0, split="test")
    proc = processor.load_processor(a.model)
    ref = evaluation.answer_logprobs(model.load_model(a.model), proc, samples)
    img = torch.tensor([s.image is not None for s in samples])
    flt = evaluate(a.model, proc, samples, ref)
    head = (f"model {os.path.relpath(a.model, ROOT)}, W-bits {a.bits}, group {a.group_size}, symmetric, "
            f"{a.n_calib} image calibration samples (seed {a.seed}), {a.n_eval} eval samples ({int(img.sum())} "
            f"with an image), quantization at {a.threads} thread(s) on as many pinned cores, best of {a.repeats}")
    lines = [head, "", HEADER, table_row("float", flt, img, None, None, "the reference (KL 0 by definition)")]
    print("\n".join(lines), flush=True)
    versions, failed = {}, False
    for bits in [int(b) for b in a.bits.split(",")]:
        base = None
        for method in methods:
            q = gptq.Settings.of(method=method, bits=bits, group_size=a.group_size, sym=True)
            out = os.path.join(work, f"ours-w{bits}-{method}")
            seconds = []
            for _ in range(a.repeats):
                with pinned(a.threads):
                    t0 = time.time()
                    gptq.quantize_model(a.model, calib, out, q, command="bench/peer.py", overwrite=True)
                    seconds.append(time.time() - t0)
            r = evaluate(out, proc, samples, ref)
            base = base or r
            lines.append(table_row(f"W{bits} {method} (ours)", r, img, base, min(seconds), "direct: ours, packed"))
            print(lines[-1], flush=True)
        for job in jobs:
            res = run_peer(job, a, calib, bits, os.path.join(work, f"{job['key']}-w{bits}"))
            name = f"W{bits} {job['label']}"
            if res["status"] != "ok":
                failed |= res["status"] == "failed"
                lines.append(table_row(name, None, img, base, None, f"{res['status']}: {res['why']}"))
            else:
                info = res["info"]
                versions[job["peer"]] = (f"{info['version']} (torch {info['torch']}, transformers "
                                         f"{info['transformers']}, {info['python']})")
                r = evaluate(res["folder"], proc, samples, ref)
                lines.append(table_row(name, r, img, base, info["seconds"], res["how"]))
            print(lines[-1], flush=True)
    ours = f"torch {torch.__version__}, python {platform.python_version()} ({sys.executable})"
    top = [f"# {shlex.join(['python', 'bench/peer.py'] + (sys.argv[1:] if argv is None else list(argv)))}",
           f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPU cores "
           f"({platform.processor() or platform.machine()}); ours: {ours}"]
    top += [f"# {LABELS[k]} {v}" for k, v in versions.items()]
    top += [f"# {LABELS[j['peer']]} defaults: {peer_side.PEER_DEFAULTS[j['peer']]}"
            for j in jobs if j["key"] == j["peer"]]
    if a.md:
        with open(a.md, "w") as f:
            f.write("\n".join(top + [""] + lines) + "\n")
        print(f"wrote {a.md}")
    if a.work is None:
        shutil.rmtree(work)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
