"""Several processes (distributed.py): `torchrun --nproc-per-node 2 gptq.py ...` on the CPU (gloo) against the
oracle, the same command in one process (one thread in both, as the thread count changes float summation order),
on the bundled tiny models: every tensor of the output safetensors compared, the differing elements counted.

The runs cover the per-expert loop and --batched-experts, both families, a scale search with FAQ fusion weights
(captured inputs and attention scores gathered across ranks), starved experts quantized from the pooled MoE
Hessian (MoE inputs gathered), --quantize-vision (vision Hessians reduced, packed linears with bias shared), and
--resume of a partial run on two ranks. One torchrun launch runs all distributed configurations
(tests/distributed_worker.py), to pay for the processes' start once.

Only the Hessian sums (float64) are added in another order than in one process; the measured difference is 0
elements in every configuration; MAX_DIFFERING_FRACTION allows a few float32 rounding ties (which then change
the next layers' inputs), and the count is printed.

    python -m pytest -q -s tests/test_distributed.py
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import calibrate
from arch import blocks
from arch import checkpoint
import gptq
from quant import distributed
from quant import folders
from helpers import interrupt_after_layer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN = os.path.join(ROOT, "models", "tiny-qwen3-vl-moe")
KIMI = os.path.join(ROOT, "models", "tiny-kimi-vl")
MAX_DIFFERING_FRACTION = 1e-4  # of all output elements; measured: 0

# name -> (model, gptq.py flags); the calib folder and --out are added per run
RUNS = {
    "qwen-gptq-loop": (QWEN, ["--method", "gptq", "--bits", "3", "--group-size", "32"]),
    "kimi-veq-ma-batched-vision": (KIMI, ["--method", "veq-ma", "--bits", "4", "--group-size", "32", "--sym",
                                          "--batched-experts", "--quantize-vision"]),
    "qwen-ecs-faq-starved": (QWEN, ["--method", "ecs-faq", "--bits", "4", "--group-size", "32",
                                    "--min-expert-tokens", "80", "--ecs-grid", "5"]),
}

needs_gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="this torch build has no torch.distributed with the gloo backend")


def argv(name, calib, out, *extra):
    ckpt, flags = RUNS[name]
    return ["--model", ckpt, "--calib", calib, "--out", str(out), "--no-eval", *flags, *extra]


def one_process(args):
    """gptq.main in this process with one torch thread (as each rank has)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return gptq.main(args)
    finally:
        torch.set_num_threads(threads)


def differing(a, b) -> tuple[int, int]:
    """(differing elements, all elements) over every tensor of two output folders, which must hold the same names,
    shapes and dtypes."""
    ca, cb = checkpoint.Checkpoint(str(a)), checkpoint.Checkpoint(str(b))
    assert sorted(ca.keys()) == sorted(cb.keys())
    diff = total = 0
    for k in ca.keys():
        x, y = ca.get(k), cb.get(k)
        assert x.dtype == y.dtype and x.shape == y.shape, k
        diff, total = diff + int((x != y).sum()), total + x.numel()
    return diff, total


def reports(out) -> tuple:
    """report.json's per-layer linears, its vision entries and its sample count."""
    with open(os.path.join(out, "report.json")) as f:
        r = json.load(f)
    return {i: layer["linears"] for i, layer in r["layers"].items()}, r["vision"], r["n_samples"]


@pytest.fixture(scope="module")
def calibs(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    out = {}
    for ckpt in (QWEN, KIMI):
        out[ckpt] = str(root / os.path.basename(ckpt))
        calibrate.calibrate(ckpt, n=16, seed=0, out=out[ckpt], command="test")
    return out


@needs_gloo
def test_two_processes_equal_one_process(calibs, tmp_path, monkeypatch):
    # the oracles, in this process; and a partial run of the first (interrupted after layer 1) to resume on 2 ranks
    for name, (ckpt, _) in RUNS.items():
        one_process(argv(name, calibs[ckpt], tmp_path / f"{name}-1"))
    original = interrupt_after_layer(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        one_process(argv("qwen-gptq-loop", calibs[QWEN], tmp_path / "resumed-2"))
    monkeypatch.setattr(folders, "print_layer", original)
    assert sorted(f for f in os.listdir(tmp_path / "resumed-2.partial") if f.endswith(".safetensors")) == \
        ["layer_0000.safetensors", "layer_0001.safetensors"]

    runs = [argv(name, calibs[ckpt], tmp_path / f"{name}-2") for name, (ckpt, _) in RUNS.items()]
    runs.append(argv("qwen-gptq-loop", calibs[QWEN], tmp_path / "resumed-2", "--resume"))
    with open(tmp_path / "runs.json", "w") as f:
        json.dump(runs, f)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        os.path.join(ROOT, "tests", "distributed_worker.py"), str(tmp_path / "runs.json")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert p.stdout.count("restored from") == 2  # layers 0 and 1, printed by rank 0 only

    pairs = [(name, f"{name}-1", f"{name}-2") for name in RUNS] + [("resume", "qwen-gptq-loop-1", "resumed-2")]
    for name, one, two in pairs:
        diff, total = differing(tmp_path / one, tmp_path / two)
        print(f"\n{name}: {diff} of {total} output elements differ between 1 and 2 processes")
        assert diff <= MAX_DIFFERING_FRACTION * total, (name, diff, total)
        lin1, vis1, n1 = reports(tmp_path / one)
        lin2, vis2, n2 = reports(tmp_path / two)
        assert n1 == n2 == 16
        for i in lin1:  # every linear reported once, with the token counts of all samples (exact integers)
            assert list(lin1[i]) == list(lin2[i]), (name, i)
            for k, r in lin1[i].items():
                keys = ("tokens_text", "tokens_vis", "pooled_hessian")
                assert [r[x] for x in keys] == [lin2[i][k][x] for x in keys], (name, i, k)
        assert (vis1 is None) == (vis2 is None) and (vis1 is None or {k: v["tokens"] for k, v in vis1.items()} ==
                                                     {k: v["tokens"] for k, v in vis2.items()})
    starved = sum(r["pooled_hessian"] for layer in reports(tmp_path / "qwen-ecs-faq-starved-1")[0].values()
                  for r in layer.values())
    assert starved > 0  # the pooled-Hessian path was exercised


class _Structure:
    def __init__(self, inputs):
        self.inputs = inputs


def test_expert_and_sample_assignment():
    LI = blocks.LinearInput
    s = _Structure([LI(("a.q", "a.k", "a.v")), LI(("a.o",))] +
                   [LI((f"e{e}.gate", f"e{e}.up"), e) for e in range(5)] + [LI((f"e{e}.down",), e) for e in range(5)] +
                   [LI(("shared.gate", "shared.up")), LI(("shared.down",))])
    owner = distributed.input_owners(s, 2)
    assert [owner[f"e{e}.gate"] for e in range(5)] == [0, 1, 0, 1, 0]
    assert [owner[f"e{e}.down"] for e in range(5)] == [0, 1, 0, 1, 0]  # an expert's inputs on one rank
    assert [owner[k] for k in ("a.q", "a.o", "shared.gate", "shared.down")] == [0, 1, 0, 1]  # round-robin
    assert set(distributed.input_owners(s, 1).values()) == {0}
    B = distributed.SAMPLE_BLOCK  # blocks of B consecutive samples, block b on rank b % world
    g = distributed.Group(rank=1, world=3)
    assert g.shard(range(5 * B)) == list(range(B, 2 * B)) + list(range(4 * B, 5 * B))
    for n in (1, B - 1, B, 3 * B + 2, 7 * B + 5):  # brute force: the shards partition the samples, in order
        groups = [distributed.Group(rank=r, world=3) for r in range(3)]
        shards = [gr.shard(range(n)) for gr in groups]
        assert sorted(sum(shards, [])) == list(range(n))
        for gr, sh in zip(groups, shards):
            assert [gr.global_index(j) for j in range(len(sh))] == sh
            assert all(gr.owner(j) == gr.rank and gr.local_index(j) == k for k, j in enumerate(sh))
    with pytest.raises(ValueError, match="nproc-per-node"):
        distributed.check_samples(g, 2)


def test_under_torchrun_without_a_group_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="WORLD_SIZE=2"):
        gptq.quantize_model(QWEN, "calib", str(tmp_path / "q"), gptq.Settings.of(method="rtn"))
