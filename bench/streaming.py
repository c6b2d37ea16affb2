"""Layer streaming at real width: peak memory and time of the real driver, gptq.quantize_model, on random
real-width checkpoints of N = 2 and N = 4 decoder layers (bench/synthetic_checkpoint.py), --family:
  qwen  Qwen3-VL-30B-A3B widths (hidden 2048, 128 experts of 768, top-8; 1.25 GB per layer in bf16, 2.5 GB in
        the driver's float32); small vocabulary and vision tower; the real model has 48 layers.
  kimi  Kimi-VL-A3B-Instruct at real size: MLA, layer 0 dense (11264), layers >= 1 MoE (64 experts of 1408,
        top-6, + 2 shared experts; 1.17 GB per layer in bf16), MoonViT, 163840 x 2048 embeddings and lm_head
        (2.2 GB of non-layer tensors in bf16, 4.5 GB in float32); the real model has 27 layers.

For each N, in order:
  1. the checkpoint (written under --root if absent);
  2. a calibration folder: `calibrate.py --stream-layers --no-gamma` on --samples bundled shapes samples (one
     decoder layer in memory at a time; plain GPTQ does not read gamma). Its own subprocess, not measured;
  3. gptq.quantize_model(method gptq, --bits 4, --group-size 128, batched experts unless --per-expert) in a
     fresh subprocess, so its peak memory is its own: VmHWM (the kernel's peak resident set, from os.wait4's
     ru_maxrss) and the peak of RssAnon (anonymous memory: tensors), sampled every 0.1 s, over the whole run, per
     layer (up to the driver's line of layer i: the forward of layer i - 1 and the quantization of layer i) and
     over its last phase (after the driver printed its last layer: the closing forward and write_output).
     RSS also counts the pages of the checkpoint files the loader's memory maps hold (RssFile); the loader
     unmaps the shards after each layer (checkpoint.Checkpoint.release), so they no longer add up with depth.
     A guard kills the run if the machine's MemAvailable falls below --guard-gb (the machine is shared).
Prints, per N, the wall time of quantize_model (its report's seconds), VmHWM, the RssAnon peaks, the output
size and the driver's own per-layer seconds (its `layer i/n:` lines: Hessians, solve, report errors, packing; not
the layer's forward), dense and MoE layers apart; then seconds per layer = (T_4 - T_2) / 2 (the marginal cost of
a layer: load, Hessians, solve, report errors, the quantized layer's forward; layers 2 and 3 are MoE layers in
both families) and the fixed cost T_2 - 2 s_per_layer, and the extrapolation to the real depth,
T_2 + (L - 2) s_per_layer (every layer past the first two is an MoE layer in both families). The difference
of two runs carries the noise of both (on a shared machine, load that differs between them); so also the
marginal within the deeper run, from the driver's elapsed seconds at its first MoE layer's line and at its last
line, and T_4 + (L - 4) times that. Last line:
  streaming: peak_n2_gb=<VmHWM N=2> peak_n4_gb=<VmHWM N=4> ratio=<n4/n2> s_per_layer=<s> moe_driver_s=<mean of the
             MoE layers' lines at N=4> [dense_driver_s=<the dense layers' at N=4>]   (target ratio <= 1.15)
             [device_peak_n2_gb=<torch's peak GPU allocation, N=2> device_peak_n4_gb=<N=4>]   (on a GPU)

    OMP_NUM_THREADS=1 python bench/streaming.py [--family qwen|kimi] [--layers 2 4] [--root /tmp/h8] [--samples 16]
                                                [--per-expert] [--device cpu|cuda] [--dtype float32|bfloat16]
                                                [--experts N]
On a GPU (--device cuda) VmHWM and RssAnon are the host's memory; the GPU's peak is torch.cuda's
max_memory_allocated in the driver's process. --experts N: a reduced layer (N routed experts, same widths).
Disk: qwen 2.5 GB + 5 GB of checkpoints under --root (kept for reruns), plus the quantized outputs; kimi 3.6 + 5.9
GB, and each output holds the non-layer tensors in float32 (4.5 GB; the driver keeps them in its dtype).
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import calibrate  # noqa: E402
import gptq  # noqa: E402
import model  # noqa: E402
from quant import folders  # noqa: E402
from bench.synthetic_checkpoint import FAMILIES, GB, write_checkpoint  # noqa: E402
from bench.timing import LayerPhases  # noqa: E402

LAYER_LINE = re.compile(r"layer\s+(\d+)/(\d+):.*, (\d+\.\d)s, elapsed (\d+)s")  # gptq.print_layer


def streamed_calibration(ckpt: str, out: str, n: int, seed: int, device: str, dtype: torch.dtype):
    """calibrate.py --stream-layers --no-gamma: routing statistics with one decoder layer in memory at a time
    (plain GPTQ does not read gamma)."""
    calibrate.calibrate(ckpt, n=n, seed=seed, out=out, gamma=False, device=device, stream_layers=True, dtype=dtype,
                        command=f"bench/streaming.py: calibrate --stream-layers --no-gamma --n {n} --seed {seed}")


def quantize(ckpt: str, calib: str, out: str, bits: int, group_size: int, per_expert: bool, device: str,
             dtype: torch.dtype):
    """The driver; prints its seconds and, on a GPU, the peak memory torch allocated there (GB)."""
    q = gptq.Settings.of(method="gptq", bits=bits, group_size=group_size, batched_experts=not per_expert)
    phases = LayerPhases()
    report = gptq.quantize_model(ckpt, calib, out, q, device=device, command="bench/streaming.py", dtype=dtype,
                                 timer=phases)
    dev = torch.device(device)
    peak = torch.cuda.max_memory_allocated(dev) / GB if dev.type == "cuda" else None
    layers = {i: {"seconds": phases.layers[int(i)], "hessian_gflop": r["hessian_gflop"]}
              for i, r in report["layers"].items()}
    print(json.dumps({"seconds": report["seconds"], "device_peak_gb": peak, "layers": layers}))


def set_image_side(ckpt: str, side: int):
    """Qwen: every calibration image resized to side x side pixels (min = max pixels), so a sample carries
    (side / 16)^2 image tokens at the tiny tower's 8-px patches merged 2 x 2 (448: 784 tokens)."""
    path = os.path.join(ckpt, "preprocessor_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["size"] = {"shortest_edge": side * side, "longest_edge": side * side}
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


def matmul_rate(threads: int, device: str = "cpu", d: int = 2048, n: int = 512, seconds: float = 2.0) -> float:
    """GFLOP/s of the Hessian's product shape, (d, n) @ (n, d) in float32, at `threads` threads (on a GPU: the
    device's rate, synchronized)."""
    torch.set_num_threads(threads)
    a, c = torch.randn(n, d, device=device), torch.zeros(d, d, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    c.addmm_(a.T, a)
    sync()
    t0, reps = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        c.addmm_(a.T, a)
        reps += 1
    sync()
    return 2 * d * d * n * reps / (time.perf_counter() - t0) / 1e9


def status_kb(pid: int) -> dict:
    """VmRSS / RssAnon / RssFile of a live process, in kB ({} once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)
                    if k in ("VmRSS", "RssAnon", "RssFile")}
    except (FileNotFoundError, ProcessLookupError):
        return {}


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) * 1e3 / GB


def run_child(args: list[str], n_layers: int, guard_gb: float) -> dict:
    """Run `python streaming.py <args>` to completion, echoing its output. Returns its last JSON line plus
    vmhwm (GB, from wait4), peak_anon, peak_anon_by_layer (phase i: up to the driver's line of layer i, i.e. the
    forward of layer i - 1 and the quantization of layer i) and peak_anon_last_phase (after the last layer's
    line) (GB, sampled), layer_seconds (the driver's per-layer seconds), killed (bool)."""
    p = subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    peak = {"phase": 0, "by_phase": {}, "killed": False}
    layer_s, elapsed = {}, {}  # layer -> the driver's printed seconds, and its elapsed seconds at that line

    done = threading.Event()  # set once the child closed its output; the main thread alone reaps it (os.wait4):
    # a p.poll() here could reap it first and leave wait4 with ECHILD, losing the run's figures

    def sample():
        while not done.is_set():
            anon, phase = status_kb(p.pid).get("RssAnon", 0) * 1e3 / GB, peak["phase"]
            peak["by_phase"][phase] = max(peak["by_phase"].get(phase, 0), anon)
            if mem_available_gb() < guard_gb:
                print(f"guard: MemAvailable < {guard_gb} GB, killing the run (pid {p.pid})", flush=True)
                peak["killed"] = True
                os.kill(p.pid, signal.SIGKILL)
            time.sleep(0.1)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    result = {}
    for line in p.stdout:
        print("    " + line, end="", flush=True)
        layer = LAYER_LINE.match(line)
        if layer:
            layer_s[int(layer.group(1))] = float(layer.group(3))
            elapsed[int(layer.group(1))] = float(layer.group(4))
            peak["phase"] = int(layer.group(1)) + 1
        if line.startswith("{"):
            result = json.loads(line)
    _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage (RUSAGE_CHILDREN would mix the runs)
    done.set()
    p.returncode = os.waitstatus_to_exitcode(status)
    watcher.join()
    if p.returncode != 0 and not peak["killed"]:
        raise RuntimeError(f"child {args} exited with {p.returncode}")
    by_phase = peak["by_phase"]
    return {**result, "vmhwm": usage.ru_maxrss * 1e3 / GB, "peak_anon": max(by_phase.values(), default=0),
            "peak_anon_by_layer": [by_phase.get(i, 0) for i in range(n_layers)],
            "peak_anon_last_phase": by_phase.get(n_layers, 0), "killed": peak["killed"], "layer_seconds": layer_s,
            "elapsed": elapsed}


def calib_tokens(ckpt: str, calib: str) -> dict:
    """Tokens of the calibration set as the driver sees them: total, image, samples."""

    lens = [(int(b["is_vis"].numel()), int(b["is_vis"].sum())) for b in folders.CalibSet.load(calib).samples]
    return {"samples": len(lens), "total": sum(t for t, _ in lens), "image": sum(v for _, v in lens)}


TOP_PHASES = ("load", "fusion", "scales", "capture", "finalize", "solve", "error", "pack", "write", "forward")


def phase_table(runs: dict, n: int, text_cfg, rates: dict) -> tuple[str, dict]:
    """Per-phase seconds of the MoE layers (mean over them) at depth n for each thread count, the ratios, and
    the Hessian products' rate against the matmul rate. Returns the table and {threads: summary}."""
    threads = sorted(t for (nn, t) in runs if nn == n)
    per = {}
    for t in threads:
        layers = [r for i, r in runs[n, t]["layers"].items() if text_cfg.is_moe(int(i))]
        mean = {ph: sum(r["seconds"].get(ph, 0.0) for r in layers) / len(layers)
                for ph in TOP_PHASES + ("hessians",)}
        gflop = sum(r["hessian_gflop"] for r in layers) / len(layers)
        per[t] = {"phases": mean, "total": sum(mean[ph] for ph in TOP_PHASES), "gflop": gflop,
                  "hessian_rate": gflop / mean["hessians"] if mean["hessians"] else float("nan"), "matmul": rates[t]}
    head = "| phase | " + " | ".join(f"{t} thread(s) s" for t in threads) + (
        f" | {threads[0]}/{threads[-1]} |" if len(threads) > 1 else " |")
    lines = [head, "|" + "---|" * (len(threads) + 1 + (len(threads) > 1))]
    rows = [("load", "load"), ("capture: forward", None), ("capture: Hessians", "hessians")] + [
        (ph, ph) for ph in TOP_PHASES if ph not in ("load", "capture")] + [("layer total", None)]
    for label, ph in rows:
        vals = [(per[t]["phases"]["capture"] - per[t]["phases"]["hessians"]) if label == "capture: forward" else
                per[t]["total"] if label == "layer total" else per[t]["phases"][ph] for t in threads]
        ratio = f" | {vals[0] / vals[-1]:.2f}x" if len(threads) > 1 and vals[-1] > 0 else (" | -" if len(threads) > 1 else "")
        lines.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in vals) + ratio + " |")
    lines.append("| Hessian products GFLOP/s (x matmul rate) | " + " | ".join(
        f"{per[t]['hessian_rate']:.1f} ({per[t]['hessian_rate'] / per[t]['matmul']:.2f})" for t in threads) +
        (" | |" if len(threads) > 1 else " |"))
    return "\n".join(lines), per


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def ckpt_of(a, n: int) -> str:
    return os.path.join(a.root, f"{FAMILIES[a.family].name}-{n}l" + (f"-{a.experts}e" if a.experts else "") +
                        (f"-img{a.image_side}" if a.image_side else ""))


def measure(n: int, a, threads: int) -> dict:
    ckpt = ckpt_of(a, n)
    tag = os.path.basename(ckpt)
    calib = os.path.join(a.root, f"calib-{tag}-{a.samples}")
    out = os.path.join(a.root, f"quantized-{tag}-w{a.bits}g{a.group_size}-{'loop' if a.per_expert else 'batched'}")
    common = ["--device", a.device, "--threads", str(threads), "--dtype", a.dtype]
    if not os.path.isdir(ckpt):
        t0 = time.time()
        write_checkpoint(n, ckpt, seed=a.seed, device=a.device, family=a.family, real_dir=a.real_dir,
                         experts=a.experts)
        if a.image_side:
            set_image_side(ckpt, a.image_side)
        print(f"N={n}: wrote {ckpt} in {time.time() - t0:.0f}s", flush=True)
    if not os.path.isdir(calib):
        run_child(["--stage", "calib", "--ckpt", ckpt, "--calib", calib, "--samples", str(a.samples),
                   "--seed", str(a.seed), *common], n, a.guard_gb)
    print(f"N={n}, {threads} thread(s): quantize_model (gptq W{a.bits} g{a.group_size}, "
          f"{'per-expert loop' if a.per_expert else 'batched experts'})", flush=True)
    r = run_child(["--stage", "quantize", "--ckpt", ckpt, "--calib", calib, "--out", out, "--bits", str(a.bits),
                   "--group-size", str(a.group_size), *common] + (["--per-expert"] if a.per_expert else []),
                  n, a.guard_gb)
    r["out_gb"] = 0.0 if r["killed"] else dir_bytes(out) / GB
    r["tokens"] = calib_tokens(ckpt, calib)
    gpu = "" if r.get("device_peak_gb") is None else f", device peak {r['device_peak_gb']:.2f} GB (torch)"
    print(f"N={n}: {r.get('seconds', float('nan')):.0f}s, VmHWM {r['vmhwm']:.2f} GB, peak RssAnon "
          f"{r['peak_anon']:.2f} GB (after the last layer: {r['peak_anon_last_phase']:.2f} GB), output "
          f"{r['out_gb']:.2f} GB{gpu}" + (" [KILLED by the memory guard]" if r["killed"] else ""), flush=True)
    text = model.load_config(ckpt).text
    r["dense_s"] = [s for i, s in sorted(r["layer_seconds"].items()) if not text.is_moe(i)]
    r["moe_s"] = [s for i, s in sorted(r["layer_seconds"].items()) if text.is_moe(i)]
    first = min(i for i in range(n) if text.is_moe(i))  # the within-run marginal: from the first MoE layer's line
    r["s_within"] = (r["elapsed"][n - 1] - r["elapsed"][first]) / (n - 1 - first) if n - 1 > first else None
    print(f"N={n}: per-layer seconds of the driver (its layer lines): dense {r['dense_s']}, MoE {r['moe_s']}; "
          f"peak RssAnon per layer (GB): {[round(x, 2) for x in r['peak_anon_by_layer']]}", flush=True)
    return r


def add_run_args(p: argparse.ArgumentParser):
    """The quantization run's flags, shared with bench/distributed.py: calibration samples, GPTQ bits, group size,
    per-expert loop, seed, memory guard."""
    p.add_argument("--samples", type=int, default=16, help="calibration samples (bundled shapes, train split)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--per-expert", action="store_true", help="the per-expert GPTQ loop instead of batched experts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guard-gb", type=float, default=1.0, help="kill a run when MemAvailable falls below this")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(FAMILIES), default="qwen", help="the real model's widths")
    p.add_argument("--real-dir", default=None, help="kimi: folder with the real config.json (synthetic_checkpoint)")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4], help="the two depths compared (one depth: "
                   "the per-phase table only)")
    p.add_argument("--root", default="/tmp/h8", help="where checkpoints, calib and outputs are written")
    add_run_args(p)
    p.add_argument("--device", default="cpu", help="torch device of the driver (cpu, cuda; an error if absent)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the driver's model dtype")
    p.add_argument("--experts", type=int, default=None,
                   help="routed experts per MoE layer (default: the real model's; fewer: a quick reduced run)")
    p.add_argument("--threads", type=int, nargs="+", default=[1], help="torch CPU threads; several: every count "
                   "runs at the larger depth, the depth comparison at the largest count")
    p.add_argument("--image-side", type=int, default=None, help="qwen: calibration images resized to this many "
                   "pixels a side (448: 784 image tokens a sample); default the tiny preprocessor's 64 (16 tokens)")
    p.add_argument("--stage", choices=("calib", "quantize"), help=argparse.SUPPRESS)  # child processes
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--calib", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.image_side and a.family != "qwen":
        p.error("--image-side: only for --family qwen (Kimi's preprocessor already takes images at real size)")
    if a.stage:
        torch.set_num_threads(a.threads[0])
    model.resolve_device(a.device)  # before any work: a device this machine lacks is an error naming --device
    dtype = getattr(torch, a.dtype)
    if a.stage == "calib":
        return streamed_calibration(a.ckpt, a.calib, a.samples, a.seed, a.device, dtype)
    if a.stage == "quantize":
        return quantize(a.ckpt, a.calib, a.out, a.bits, a.group_size, a.per_expert, a.device, dtype)
    top = max(a.threads)
    runs = {}
    for n in a.layers:
        for t in sorted(set(a.threads), reverse=True):
            if t == top or n == max(a.layers):
                runs[n, t] = measure(n, a, t)
                with open(os.path.join(a.root, "streaming-runs.json"), "w") as f:  # kept should a later run fail
                    json.dump({f"N={k[0]},threads={k[1]}": v for k, v in runs.items()}, f)
    if any(r["killed"] for r in runs.values()):
        sys.exit("streaming: a run was killed by the memory guard, no figures (free memory, or raise --guard-gb)")
    real = FAMILIES[a.family].real_layers
    deep = max(a.layers)
    depth = depth_report(runs[min(a.layers), top], runs[deep, top], min(a.layers), deep, real) \
        if len(set(a.layers)) > 1 else ""
    tok = runs[deep, top]["tokens"]
    rates = {t: matmul_rate(t, a.device) for t in sorted(set(a.threads))}
    table, per = phase_table(runs, deep, model.load_config(ckpt_of(a, deep)).text, rates)
    print(f"\nper-phase seconds of an MoE layer (mean over the MoE layers of the N={deep} run; {tok['samples']} "
          f"calibration samples, {tok['total']} tokens, {tok['image']} of them image tokens; capture = the float "
          f"layer's forward with the Hessian hooks, 'Hessians' the time inside the hooks and the flushes; forward = "
          f"the quantized layer's outputs for the next layer):\n{table}")
    for t in sorted(per):
        print(f"{t} thread(s): {per[t]['total']:.1f} s per MoE layer, {real} layers ~ "
              f"{(per[t]['total'] * real) / 3600:.2f} h (+ the fixed cost); matmul rate {per[t]['matmul']:.1f} GFLOP/s")
    speed = ""
    if len(per) > 1:
        speed = f" thread_speedup={per[min(per)]['total'] / per[max(per)]['total']:.2f}"
    hess = per[top]["hessian_rate"] / per[top]["matmul"]
    print(f"streaming:{depth}{speed} hessian_x_matmul={hess:.2f} s_per_moe_layer={per[top]['total']:.1f} "
          f"threads={top} samples={tok['samples']} tokens={tok['total']}")


def depth_report(r2: dict, r4: dict, n2: int, n4: int, real: int) -> str:
    """Memory flatness and the marginal seconds per layer from runs at two depths; returns the summary fields."""
    s_layer = (r4["seconds"] - r2["seconds"]) / (n4 - n2)
    fixed = r2["seconds"] - n2 * s_layer
    layer_out = (r4["out_gb"] - r2["out_gb"]) / (n4 - n2)
    print(f"seconds per layer (marginal, (T_{n4} - T_{n2}) / {n4 - n2}): {s_layer:.1f}; fixed cost {fixed:.1f}s")
    print(f"peak RssAnon N={n2} {r2['peak_anon']:.2f} GB, N={n4} {r4['peak_anon']:.2f} GB "
          f"(ratio {r4['peak_anon'] / r2['peak_anon']:.3f}); VmHWM - RssAnon peak: {r2['vmhwm'] - r2['peak_anon']:.2f}"
          f" and {r4['vmhwm'] - r4['peak_anon']:.2f} GB (file pages of the read checkpoint)")
    print(f"extrapolation to {real} layers: time T_{n2} + {real - n2} x {s_layer:.1f} = {r2['seconds']:.0f} + "
          f"{(real - n2) * s_layer:.0f} s = {(r2['seconds'] + (real - n2) * s_layer) / 3600:.2f} h; peak memory "
          f"{r4['vmhwm']:.1f} GB if it stays flat in depth as from N={n2} to N={n4} (one layer in memory; the "
          f"output is {layer_out:.2f} GB of shards per added layer on disk, {r2['out_gb'] + (real - n2) * layer_out:.1f}"
          f" GB at {real})")
    if r4["s_within"] is not None:
        print(f"within the N={n4} run, seconds per MoE layer (elapsed at the last layer's line - at the first MoE "
              f"layer's, over the layers between; one process, so less exposed to load that differs between runs): "
              f"{r4['s_within']:.1f}; extrapolation T_{n4} + {real - n4} x {r4['s_within']:.1f} = "
              f"{(r4['seconds'] + (real - n4) * r4['s_within']) / 3600:.2f} h")
    dense = f" dense_driver_s={sum(r4['dense_s']) / len(r4['dense_s']):.1f}" if r4["dense_s"] else ""
    moe = sum(r4["moe_s"]) / max(1, len(r4["moe_s"]))
    print(f"the driver's own per-layer seconds at N={n4} (quantization only, not the layer's forward): dense "
          f"{r4['dense_s'] or 'none'}, MoE {r4['moe_s']} (mean {moe:.1f})")
    gpu = "" if r4.get("device_peak_gb") is None else \
        f" device_peak_n{n2}_gb={r2['device_peak_gb']:.2f} device_peak_n{n4}_gb={r4['device_peak_gb']:.2f}"
    return (f" peak_n{n2}_gb={r2['vmhwm']:.2f} peak_n{n4}_gb={r4['vmhwm']:.2f} ratio={r4['vmhwm'] / r2['vmhwm']:.3f}"
            f" s_per_layer={s_layer:.1f} moe_driver_s={moe:.1f}{dense}{gpu}")

if __name__ == "__main__":
    main()
