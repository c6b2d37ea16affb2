"""GPTQ solver speed on one real-width MoE layer: the per-expert reference (gptq.gptq_shared for gate/up, gptq.gptq
for down, one expert after another, as the driver calls them) against the batched solver (batched.gptq_batched_shared
and batched.gptq_batched over all experts of the layer at once).

Layer: Qwen3-VL-30B-A3B's MoE, 128 experts; per expert gate_proj and up_proj (768, 2048) sharing one Hessian
(2048, 2048), solved as one (1536, 2048) matrix, and down_proj (2048, 768) with its own Hessian (768, 768). Random
weights; each Hessian is the expectation H = 2 E[x xᵀ] of synthetic correlated activations
x = c ⊙ (Aᵀ z + σ ε), z ~ N(0, I_r), r = 256 latent factors (A = a shared mixing plus a per-expert part),
lognormal per-channel scales c (a few outlier channels, as LLM activations have), passed as float32 as the driver
does. 3-bit, group 128, asymmetric, block 128 (the driver's defaults; --bits, --group-size).

Prints, from one run:
  * the machine's float32 matmul rate (torch.mm of 2048 x 2048 matrices, best of 5 before and after the solvers;
    the higher is used, which can only lower the reported fraction);
  * the reference's time per expert, measured on --reference-experts experts and scaled to --experts (memory
    the solvers will use is touched once first: see touch_memory);
  * the batched time for --experts experts, the speedup, and each solver's achieved rate as a fraction of the
    matmul rate, from the FLOPs it executes (formulas below). Each solver's time is the best of --repeats runs,
    as the matmul rate is a best of 5: the same code's time varies by up to 10% from run to run on this VM;
  * whether the two agree on the measured experts (share of equal codes, ratio of output errors);
  * the torch ops each mode dispatches per layer (what becomes a kernel launch on a GPU): counted with a
    TorchDispatchMode that skips views and allocations, in separate untimed runs on the same shapes but with 8
    output rows (the op count does not depend on the rows). On a CPU the batched solver sweeps 16 experts at a
    time (batched.CPU_EXPERT_CHUNK: their blocks stay in cache, 3-6% faster at 64 experts), so its count grows with
    the number of experts in steps of 16; with every expert in one sweep (the default on a GPU, or
    --expert-chunk N) it does not depend on the number of experts at all (printed: counted at 2 and at
    --experts experts).
Last line: gptq_solver: speedup=<x> matmul_fraction=<batched fraction> op_ratio=<loop ops / batched ops>, the
batched ops counted as timed.

Memory: the timed solves reuse memory touched once before them (touch_memory, with glibc told to keep freed
memory: bench.timing.keep_freed_memory); on this VM the first touch of fresh memory costs about 3.5 s per GB,
which the solve of a 128-expert layer would otherwise pay for ~5 GB of new tensors.

FLOPs counted (multiply-add = 2; elementwise quantization work, about 10 flops per weight, is not counted):
  batched, per expert, for one matrix W (out, n) and its H (n, n) (blocks b = [i1, i2) of B columns):
    reverse_cholesky, per block column [k1, k2) of nb: 2·k2·(n - k2)·nb (the bmm) + nb³/3 (Cholesky of the
      block) + nb³ (its triangular inverse, a solve against I) + 2·k1·nb² (the panel bmm);
    sweep, per block: B³ (Hinv_bb = R_bb⁻¹, a solve against I) + 2·i1·B² (G_b) + 2·out·i1·B (the left-looking
      update), and per sub-block [s1, s2) of s columns: out·s·(s - 1) (the rank-1 updates inside it) +
      2·out·s·(B - s2) (its errors reaching the block's later columns; the solver applies them by bmms when those
      columns' sub-block or group starts, so every pair of a block's columns is counted once).
  reference, per expert: n³/3 (Cholesky) + 2n³/3 (cholesky_inverse) + n³/3 (Cholesky of H⁻¹), and per column j
    of block b: 2·out·(i2 - j) (rank-1 update of the block's remaining columns, j included), per block
    2·out·B·(n - i2) (the lazy update of the later columns).

    OMP_NUM_THREADS=1 python bench/gptq_solver.py [--experts 128] [--reference-experts 4] [--threads 1] [--repeats 3]
        [--device cpu] [--expert-chunk N]
Memory: about 9 GB at 128 experts (Hessians, factors, weights, results); use --experts 16 on a small machine.
"""

import argparse
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import gptq  # noqa: E402
import hessian  # noqa: E402
import model  # noqa: E402
from quant import batched  # noqa: E402
from quant import grid  # noqa: E402
from bench.timing import best_time, keep_freed_memory, timed  # noqa: E402

HIDDEN, MOE_INTERMEDIATE, LAYER_EXPERTS = 2048, 768, 128  # Qwen3-VL-30B-A3B text config
RANK, SIGMA = 256, 0.1  # latent factors and noise of the synthetic activations
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}  # allocations only


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside the `with` block, except views and bare allocations."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in NO_KERNEL:
            self.n += 1
        return func(*args, **(kwargs or {}))


def synthetic_hessians(E: int, d: int, *, seed: int, device=None) -> torch.Tensor:
    """(E, d, d) float32 on `device`: H_e = 2 E[x xᵀ] for x = c_e ⊙ (A_eᵀ z + σ ε), A_e = M + 0.5 N_e (RANK, d).
    The random draws are made on the CPU (the same on every device), the products on the device."""
    cpu = torch.device("cpu")
    g = torch.Generator(device=cpu).manual_seed(seed)
    M = torch.randn(RANK, d, generator=g, device=cpu)  # mixing shared by the experts (the same residual stream)
    H = torch.empty(E, d, d, device=device)
    for e in range(E):
        c = torch.exp(0.7 * torch.randn(d, generator=g, device=cpu)).to(device)  # (d,) per-channel scales
        A = (M + 0.5 * torch.randn(RANK, d, generator=g, device=cpu)).to(device) * c  # (RANK, d)
        H[e] = 2 * (A.T @ A / RANK + torch.diag((SIGMA * c) ** 2))
    return H


def make_layer(E: int, out_rows: int | None = None, seed: int = 0, device=None) -> dict:
    """One MoE layer of E experts on `device`: weights gate, up (E, I, D), down (E, D, I) and Hessians H_gu
    (E, D, D), H_down (E, I, I). out_rows: keep only that many rows of each matrix (for op counting)."""
    D, I = HIDDEN, MOE_INTERMEDIATE
    cpu = torch.device("cpu")
    g = torch.Generator(device=cpu).manual_seed(seed + 1)
    w = lambda *shape: (0.02 * torch.randn(*shape, generator=g, device=cpu)).to(device)  # noqa: E731
    rows = lambda n: n if out_rows is None else out_rows  # noqa: E731
    return dict(gate=w(E, rows(I), D), up=w(E, rows(I), D), down=w(E, rows(D), I),
                H_gu=synthetic_hessians(E, D, seed=seed, device=device),
                H_down=synthetic_hessians(E, I, seed=seed + 2, device=device))


def run_reference(L: dict, experts, q: dict) -> list:
    """The driver's per-expert loop: gate/up with one shared Hessian, then down."""
    q = {k: v for k, v in q.items() if k != "expert_chunk"}
    return [(gptq.gptq_shared([L["gate"][e], L["up"][e]], L["H_gu"][e], **q), gptq.gptq(L["down"][e],
                                                                                          L["H_down"][e], **q))
            for e in experts]


def run_batched(L: dict, q: dict) -> tuple:
    return (batched.gptq_batched_shared([L["gate"], L["up"]], L["H_gu"], **q),
            batched.gptq_batched(L["down"], L["H_down"], **q))


def batched_flops(out: int, n: int, q: dict) -> float:
    """FLOPs gptq_batched executes for one expert's matrix (out, n) and its Hessian (module docstring)."""
    f = 0.0
    for k2 in range(n, 0, -batched.CHOL_BLOCK):  # reverse_cholesky
        k1 = max(0, k2 - batched.CHOL_BLOCK)
        nb = k2 - k1
        f += 2 * k2 * (n - k2) * nb + nb**3 / 3 + nb**3 + 2 * k1 * nb**2
    g = grid.group_len(n, q["group_size"])
    for i1, i2 in batched._block_edges(n, q["block_size"], g if g < n else 0):  # the sweep
        B = i2 - i1
        f += B**3 + 2 * i1 * B**2 + 2 * out * i1 * B
        for s1, s2 in batched._sub_edges(B, g):
            f += out * (s2 - s1) * (s2 - s1 - 1) + 2 * out * (s2 - s1) * (B - s2)
    return f


def reference_flops(out: int, n: int, q: dict) -> float:
    """FLOPs gptq() executes for one matrix (out, n) (module docstring)."""
    f = 4 * n**3 / 3
    for i1 in range(0, n, q["block_size"]):
        i2 = min(i1 + q["block_size"], n)
        f += sum(2 * out * (i2 - j) for j in range(i1, i2)) + 2 * out * (i2 - i1) * (n - i2)
    return f


def expert_flops(flops, q: dict) -> float:
    """One expert's FLOPs: gate/up as one (2I, D) matrix, plus down (D, I)."""
    return flops(2 * MOE_INTERMEDIATE, HIDDEN, q) + flops(HIDDEN, MOE_INTERMEDIATE, q)


def matmul_rate(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a float32 n x n matmul, best of `repeats` (bench.timing synchronizes a GPU)."""
    A, B = torch.randn(n, n, device=device), torch.randn(n, n, device=device)  # fp32 (TF32 off: torch's default)
    return 2 * n**3 / best_time(lambda: A @ B, repeats)


def touch_memory(E: int):
    """Write (then free) about as much memory as the batched solve of E experts allocates. The first touch of
    memory is slow on this VM (about 3.5 s per GB, in system time), and the solvers' FLOP rate should not
    include it: with bench.timing.keep_freed_memory in effect, the timed solves reuse these pages."""
    per_expert = 4 * (HIDDEN**2 + MOE_INTERMEDIATE**2 + 4 * 2 * MOE_INTERMEDIATE * HIDDEN)  # bytes, generous
    torch.empty(E * per_expert, dtype=torch.uint8, device="cpu").fill_(1)


def count_ops(fn) -> int:
    with OpCounter() as counter:
        fn()
    return counter.n


def agreement(ref: list, bat: tuple, L: dict) -> tuple[float, float, float]:
    """On the reference's experts: share of equal codes, and min / max of the ratio of output errors
    (batched / reference) over their gate, up and down matrices."""
    equal = total = 0
    ratios = []
    for e, ((r_gate, r_up), r_down) in enumerate(ref):
        pairs = [(r_gate, bat[0][0][e], L["gate"][e], L["H_gu"][e]), (r_up, bat[0][1][e], L["up"][e], L["H_gu"][e]),
                 (r_down, bat[1][e], L["down"][e], L["H_down"][e])]
        for r, b, W, H in pairs:
            equal += int((r.codes == b.codes).sum())
            total += r.codes.numel()
            ratios.append(hessian.relative_output_error(W, b.W_hat, H) / hessian.relative_output_error(W, r.W_hat, H))
    return equal / total, min(ratios), max(ratios)


def op_counts(L: dict, q: dict, E: int) -> tuple[int, int, int, int]:
    """On 8-row copies of the layer: (loop ops per expert, batched ops at 2 experts and at E experts with every
    expert in one sweep (the default off the CPU), batched ops at E experts as timed (q's expert_chunk))."""
    small = {k: v[:, :8] if k in ("gate", "up", "down") else v for k, v in L.items()}
    two = {k: v[:2] for k, v in small.items()}
    return (count_ops(lambda: run_reference(small, [0], q)),
            count_ops(lambda: run_batched(two, {**q, "expert_chunk": 2})),
            count_ops(lambda: run_batched(small, {**q, "expert_chunk": E})), count_ops(lambda: run_batched(small, q)))


def best_of(fn, repeats: int):
    """(the last result of fn, its best wall time over `repeats` calls); one result is held at a time."""
    best, r = float("inf"), None
    for _ in range(repeats):
        r = None  # frees the previous result before the next call
        r, t = timed(fn)
        best = min(best, t)
    return r, best


def measure(E: int, K: int, q: dict, repeats: int, device: torch.device) -> dict:
    """Everything the report prints, from one run: rate, times, FLOPs, agreement and op counts."""
    rate = matmul_rate(device)
    L = make_layer(E, device=device)
    gptq.gptq(torch.randn(8, 64, device=device), torch.eye(64, device=device), bits=q["bits"])  # first-call setup
    kept = device.type == "cpu" and keep_freed_memory()
    if device.type == "cpu":  # the CPU's first touch of fresh memory (the GPU's allocator caches its blocks)
        touch_memory(E)
    ref, t_ref = best_of(lambda: run_reference(L, range(K), q), repeats)
    bat, t_bat = best_of(lambda: run_batched(L, q), repeats)
    rate = max(rate, matmul_rate(device))
    f_ref, f_bat = expert_flops(reference_flops, q), expert_flops(batched_flops, q)
    same, r_lo, r_hi = agreement(ref, bat, L)
    loop1, bat2, batE, bat_timed = op_counts(L, q, E)
    return dict(E=E, K=K, rate=rate, t_ref=t_ref, t_bat=t_bat, t_ref_layer=t_ref / K * E, f_ref=f_ref, f_bat=f_bat,
                frac_ref=f_ref * K / t_ref / rate, frac_bat=f_bat * E / t_bat / rate, same=same, r_lo=r_lo,
                r_hi=r_hi, loop1=loop1, bat2=bat2, batE=batE, bat_timed=bat_timed, kept=kept, repeats=repeats,
                device=device)


def report(m: dict, q: dict, threads: int):
    E, K, dev = m["E"], m["K"], m["device"]
    reduced = "" if E == LAYER_EXPERTS else f" (a reduced run: {E} of the layer's {LAYER_EXPERTS} experts)"
    print(f"layer: Qwen3-VL-30B-A3B MoE, {E} experts{reduced}; per expert gate/up ({2 * MOE_INTERMEDIATE}, {HIDDEN}) "
          f"+ down ({HIDDEN}, {MOE_INTERMEDIATE}); {q['bits']}-bit, group {q['group_size']}, asym; {threads} thread(s)")
    print(f"device: {dev}{' (' + torch.cuda.get_device_name(dev) + ')' if dev.type == 'cuda' else ''}")
    print(f"float32 matmul rate: {m['rate'] / 1e9:.1f} GFLOP/s (2048^3 torch.mm, best of 5 before and after)")
    if dev.type == "cpu":
        print("memory: " + ("touched once before the timed solves; glibc keeps freed memory for reuse (mallopt)"
                            if m["kept"] else "not glibc: the timed solves include the first touch of their memory"))
    if dev.type == "cuda":
        print(f"GPU memory: peak {torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GiB allocated by torch")
    print(f"times: best of {m['repeats']} runs of each solver")
    print(f"reference (per expert): {m['t_ref'] / K:.3f} s/expert measured on {K} experts -> {m['t_ref_layer']:.2f} s "
          f"for {E}; {m['f_ref'] / 1e9:.2f} GFLOP/expert, {m['frac_ref']:.2f} of the matmul rate")
    print(f"batched (all experts):  {m['t_bat']:.2f} s for {E} ({m['t_bat'] / E:.3f} s/expert); "
          f"{m['f_bat'] / 1e9:.2f} GFLOP/expert, {m['frac_bat']:.2f} of the matmul rate")
    print(f"agreement on the {K} reference experts: {100 * m['same']:.3f}% of codes equal; output error batched / "
          f"reference {m['r_lo']:.4f} .. {m['r_hi']:.4f}")
    loop1, batE, timed_ops = m["loop1"], m["batE"], m["bat_timed"]
    chunk = q.get("expert_chunk") or (batched.CPU_EXPERT_CHUNK if dev.type == "cpu" else E)
    how = "" if q.get("expert_chunk") else ", the default here"
    print(f"torch ops per layer, {E} experts: loop {loop1 * E} ({loop1} per expert); batched as timed (the sweep "
          f"{chunk} experts at a time{how}) {timed_ops}, ratio {loop1 * E / timed_ops:.1f}; batched with "
          f"all experts in one sweep (the default on a GPU) {batE} (at 2 experts: {m['bat2']}), ratio "
          f"{loop1 * E / batE:.1f}")
    print(f"gptq_solver: speedup={m['t_ref_layer'] / m['t_bat']:.2f} matmul_fraction={m['frac_bat']:.2f} "
          f"op_ratio={loop1 * E / timed_ops:.1f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=LAYER_EXPERTS, help="experts in the layer (batched solve)")
    p.add_argument("--reference-experts", type=int, default=4, help="experts timed with the per-expert reference")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of each solver; the best is reported, as for the matmul rate (best of 5)")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--device", default="cpu", help="torch device (on a GPU the memory lines do not apply)")
    p.add_argument("--expert-chunk", type=int, default=None,
                   help=f"experts per sweep of the batched solver (default: {batched.CPU_EXPERT_CHUNK} on a CPU)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    q = dict(bits=args.bits, group_size=args.group_size, block_size=128, expert_chunk=args.expert_chunk)
    report(measure(args.experts, min(args.reference_experts, args.experts), q, args.repeats,
                   model.resolve_device(args.device)), q, args.threads)


if __name__ == "__main__":
    main()
