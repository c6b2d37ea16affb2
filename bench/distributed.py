"""Several processes against one: the same `gptq.py` run (method gptq, W4 g128, batched experts unless
--per-expert) on one process with --threads threads, and under `torchrun --nproc-per-node N` with --threads
threads per rank (distributed.py), on a checkpoint of one real-width Qwen3-VL-30B-A3B decoder layer
(bench/synthetic_checkpoint.py: hidden 2048, 128 experts of 768, top-8; 1.25 GB in bf16, 2.5 GB in the
driver's float32), or on --model DIR (e.g. the bundled tiny model, to check that the bench runs).

Steps: the checkpoint (written under --root if absent; 2.5 GB of disk per layer is the lead's estimate for the
real-width one), a calibration folder (`calibrate.py --stream-layers --no-gamma`, --samples bundled shapes
samples, not timed), then each run in its own subprocess, one after the other. Per run: the driver's seconds for
its layer(s) (its `layer i/n:` lines: load, Hessians, reduction, solve, broadcast, write; not the layer's
forward), its total seconds (the `wrote ... in Xs` line: load, embedding, layers, output) and the peak resident
memory of its largest process (os.wait4's ru_maxrss: torchrun's agent and the ranks are descendants). A guard
kills a run when the machine's MemAvailable falls below --guard-gb. Then the two outputs are compared tensor by
tensor (differing elements counted). Last line:
  distributed: layer_s_1=<one process> layer_s_N=<N ranks> speedup=<layer_s_1 / layer_s_N> total_s_1=<> total_s_N=<>
               peak_gb_1=<> peak_gb_N=<largest rank> differing=<elements>

Memory (a computed estimate at real width, README "Several processes / GPUs"): every rank holds the float32 layer
(2.5 GB), the float64 Hessians of its own tokens for every expert until they are reduced (4.9 GB), then the
float32 Hessians and weight stacks of its own experts only; the single-process run peaked at 13.3 GB
(bench/RESULTS.md), so two ranks need roughly twice 10-13 GB of RAM on one machine.

    OMP_NUM_THREADS=1 python bench/distributed.py [--nproc 2] [--threads 1] [--root /tmp/dist] [--samples 16]
    python bench/distributed.py --model models/tiny-qwen3-vl-moe --root /tmp/dist-tiny     (a check, seconds)
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from arch import checkpoint  # noqa: E402
import torch  # noqa: E402
from bench.synthetic_checkpoint import GB, write_checkpoint  # noqa: E402
from bench.streaming import add_run_args, mem_available_gb, streamed_calibration  # noqa: E402

LAYER_LINE = re.compile(r"layer\s+(\d+)/(\d+):.*, (\d+\.\d)s, elapsed")  # layerwise.print_layer
WROTE_LINE = re.compile(r"wrote .* in (\d+\.\d)s;")  # quantize_model's last line


def run(cmd: list[str], threads: int, guard_gb: float) -> dict:
    """Run cmd to completion (OMP_NUM_THREADS=threads), echoing its output. Returns the driver's per-layer seconds,
    its total seconds, the peak RSS of the largest process (GB) and whether the memory guard killed it."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         start_new_session=True)
    killed = []

    def guard():
        while p.poll() is None:
            if mem_available_gb() < guard_gb:
                print(f"guard: MemAvailable < {guard_gb} GB, killing the run", flush=True)
                killed.append(True)
                os.killpg(p.pid, signal.SIGKILL)
            time.sleep(0.2)

    watcher = threading.Thread(target=guard, daemon=True)
    watcher.start()
    layers, total = {}, None
    for line in p.stdout:
        print("    " + line, end="", flush=True)
        if m := LAYER_LINE.match(line):
            layers[int(m.group(1))] = float(m.group(3))
        if m := WROTE_LINE.search(line):
            total = float(m.group(1))
    _, status, usage = os.wait4(p.pid, 0)
    watcher.join()
    if os.waitstatus_to_exitcode(status) != 0 and not killed:
        raise RuntimeError(f"{' '.join(cmd)} exited with {os.waitstatus_to_exitcode(status)}")
    return {"layers": layers, "total": total, "peak_gb": usage.ru_maxrss * 1e3 / GB, "killed": bool(killed)}


def differing(a: str, b: str) -> int:
    ca, cb = checkpoint.Checkpoint(a), checkpoint.Checkpoint(b)
    if sorted(ca.keys()) != sorted(cb.keys()):
        raise RuntimeError(f"{a} and {b} hold different tensors")
    return sum(int((ca.get(k) != cb.get(k)).sum()) for k in ca.keys())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="an existing checkpoint (default: write a real-width Qwen one)")
    p.add_argument("--layers", type=int, default=1, help="decoder layers of the written checkpoint")
    p.add_argument("--root", default="/tmp/dist", help="where the checkpoint, calib and outputs are written")
    p.add_argument("--nproc", type=int, default=2, help="ranks of the distributed run")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the one process, and of each rank")
    add_run_args(p)
    a = p.parse_args()
    os.makedirs(a.root, exist_ok=True)
    ckpt = a.model or os.path.join(a.root, f"qwen3-vl-30b-a3b-{a.layers}l")
    if a.model is None and not os.path.isdir(ckpt):
        write_checkpoint(a.layers, ckpt, seed=a.seed, family="qwen")
    tag = os.path.basename(os.path.normpath(ckpt))
    calib = os.path.join(a.root, f"calib-{tag}-{a.samples}")
    if not os.path.isdir(calib):
        streamed_calibration(ckpt, calib, a.samples, a.seed, "cpu", torch.float32)
    flags = ["--model", ckpt, "--calib", calib, "--method", "gptq", "--bits", str(a.bits), "--group-size",
             str(a.group_size), "--no-eval", "--overwrite"] + ([] if a.per_expert else ["--batched-experts"])
    gptq_py = os.path.join(ROOT, "gptq.py")
    out1, outn = os.path.join(a.root, f"q-{tag}-1proc"), os.path.join(a.root, f"q-{tag}-{a.nproc}proc")
    print(f"one process, {a.threads} thread(s):", flush=True)
    r1 = run([sys.executable, gptq_py, *flags, "--out", out1], a.threads, a.guard_gb)
    print(f"{a.nproc} processes, {a.threads} thread(s) each:", flush=True)
    rn = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(a.nproc),
              gptq_py, *flags, "--out", outn], a.threads, a.guard_gb)
    if r1["killed"] or rn["killed"]:
        sys.exit("distributed: a run was killed by the memory guard, no figures (free memory, or raise --guard-gb)")
    s1, sn = sum(r1["layers"].values()), sum(rn["layers"].values())
    diff = differing(out1, outn)
    print(f"distributed: layer_s_1={s1:.1f} layer_s_{a.nproc}={sn:.1f} speedup={s1 / sn:.2f} "
          f"total_s_1={r1['total']:.1f} total_s_{a.nproc}={rn['total']:.1f} peak_gb_1={r1['peak_gb']:.2f} "
          f"peak_gb_{a.nproc}={rn['peak_gb']:.2f} differing={diff}")


if __name__ == "__main__":
    main()
