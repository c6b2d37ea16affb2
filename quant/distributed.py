"""Several processes (torch.distributed) for the layer-by-layer quantization of gptq.py's loop:

    torchrun --nproc-per-node N gptq.py ...          (the same flags as one process; WORLD_SIZE unset or 1: one process)

What is split, and how it is put back together (N = WORLD_SIZE, rank r):
  * calibration samples: blocks of SAMPLE_BLOCK consecutive samples, block b on rank b % N (Group.shard): the
    driver runs a block per forward and multiplies out its Hessian rows per block (hessian.Hessian.flush), so
    every float32 product is the same on any number of ranks. Each rank embeds its own
    samples, runs them through every decoder layer (the layers < l already quantized) and keeps their activations;
  * Hessians: each rank accumulates every linear's Hessian over its own samples' tokens (hessian.LayerCapture),
    then each one is summed (dist.reduce, float64) on the one rank that solves it, and dropped on the others
    (reduce_capture). Token counts and weight sums are all-reduced, so every rank knows every linear's counts (the
    starved-expert decision and the report). A reduce rather than an all-reduce: after it each rank holds only the
    Hessians it solves (1/N of them), which is what the solver then needs;
  * solving (input_owners): routed expert e on rank e % N (each rank runs the per-expert loop or, with
    --batched-experts, the batched solver on its own experts); the other inputs of the layer (attention, shared
    experts, dense MLP) round-robin over the ranks in model.layer_structure's order. The vision tower's linears
    (--quantize-vision) round-robin likewise;
  * results (share_linears): each rank broadcasts its packed QuantLinears (codes, scales, zero points: the exact
    tensors written), so every rank holds the whole quantized layer to compute its samples' next-layer inputs;
    the report entries are gathered (all_gather_object);
  * statistics over all samples (gather_samples): the scale searches (awq, smoothquant, veq-me, veq, ecs, ...)
    gather every sample's captured float inputs (and routing) in calib/'s order, so each rank searches on exactly
    the single-process data; rank 0's scales are broadcast and folded everywhere. FAQ's fusion weights gather
    the per-sample attention scores before their per-modality means. An expert quantized from the pooled MoE
    Hessian (starved, or --all-experts-hessian) needs every MoE input: they are gathered the same way and the
    pool rebuilt in calib/'s order. The searches themselves are not split (every rank runs all of them);
  * files: rank 0 alone writes OUT.partial/ (each layer atomically, as one process does) and OUT/; with --resume
    rank 0 decides which layers are restored and every rank restores them from OUT.partial/.
Backend: gloo for --device cpu, nccl for --device cuda (rank r uses cuda:LOCAL_RANK).

Equality with one process: the samples' forward passes are the same per sample, the gathered statistics are the
same tensors in the same order; only the Hessian sums (and weight sums) are added in another order: float64
sums that differ from the one-process ones in the last bits, so the float32 Hessian the solver takes differs
only where such a difference crosses a float32 rounding boundary (tests/test_distributed.py counts the
differing output elements against the one-process run).

Memory per rank: the capture still holds every linear's float64 Hessian of its own tokens (as one process does);
after the reduction only its own. The non-layer weights (embeddings, vision tower, lm_head) and the current
layer are loaded on every rank; the activations are those of its shard (1/N). README "Several processes / GPUs".

Does not: split one linear across ranks, pipeline layers, or overlap communication with compute.
Run the tests:  python -m pytest -q tests/test_distributed.py
"""

from __future__ import annotations

from dataclasses import dataclass, replace
import datetime
import os
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn

from hessian import Hessian

TIMEOUT = datetime.timedelta(hours=2)  # a collective waits this long for the slowest rank (a real-width solve)


SAMPLE_BLOCK = 8  # calibration samples per forward of a layer and per Hessian product (gptq.py's loop)

@dataclass(frozen=True)
class Group:
    """This process's place in the run: rank r of `world`, its torch device, the backend (None: one process)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    backend: str | None = None
    created: bool = False  # this process initialized the process group (close() destroys it)
    n_samples: int = 0  # calibration samples over all ranks (set by take)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def comm_device(self) -> torch.device:
        """Where collective buffers live: the GPU for nccl, the CPU for gloo."""
        return torch.device(self.device if self.backend == "nccl" else "cpu")

    def log(self, *args, **kwargs):
        """print on rank 0 only: it speaks for all."""
        if self.rank == 0:
            print(*args, **kwargs)

    def take(self, samples: list) -> tuple["Group", list]:
        """This group knowing the number of samples, and this rank's share of them (all of them in one process)."""
        check_samples(self, len(samples))
        return replace(self, n_samples=len(samples)), self.shard(samples)

    def shard(self, items) -> list:
        """This rank's calibration samples: the blocks of SAMPLE_BLOCK consecutive samples b with b % world ==
        rank, in order."""
        items = list(items)
        return [x for j, x in enumerate(items) if self.owner(j) == self.rank]

    def owner(self, j: int) -> int:
        """The rank of calib/'s sample j."""
        return (j // SAMPLE_BLOCK) % self.world

    def global_index(self, j: int) -> int:
        """The calib/ index of this rank's j-th sample."""
        block, k = divmod(j, SAMPLE_BLOCK)
        return (block * self.world + self.rank) * SAMPLE_BLOCK + k

    def local_index(self, j: int) -> int:
        """Where calib/'s sample j sits in its owner's shard."""
        block, k = divmod(j, SAMPLE_BLOCK)
        return block // self.world * SAMPLE_BLOCK + k


SINGLE = Group()


def init(device: str = "cpu") -> Group:
    """The group of this process from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK). WORLD_SIZE unset or 1:
    one process, nothing initialized. Otherwise gloo (--device cpu) or nccl (--device cuda: rank r takes
    cuda:LOCAL_RANK). An already initialized default group (a script that set it up) is used as it is."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return Group(device=device)
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world}, but this torch build has no torch.distributed; run one process")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if device != "cuda":
            raise ValueError(f"--device {device}: with several processes pass --device cuda; rank r then uses "
                             f"cuda:LOCAL_RANK (this one: cuda:{local})")
        device, backend = f"cuda:{local}", "nccl"
        torch.cuda.set_device(device)
    elif device == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"--device {device}: several processes run on cpu (gloo) or cuda (nccl)")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend, timeout=TIMEOUT)
    elif dist.get_backend() != backend:
        raise ValueError(f"--device {device} needs the {backend} backend, but the process group uses "
                         f"{dist.get_backend()}")
    return Group(dist.get_rank(), dist.get_world_size(), device, backend, created)


def check_group(group: Group | None, device: str) -> Group:
    """The driver's group: SINGLE for one process; under torchrun the caller must pass distributed.init's."""
    if group is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"quantize_model runs under torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']}) without a "
                         "group: pass group=distributed.init(device), as gptq.py does")
    group = group or SINGLE
    if group.active and device != group.device:
        raise ValueError(f"--device {device}: this process's group runs on {group.device}; pass device=group.device")
    return group


def close(group: Group):
    """Destroy the process group if init() created it."""
    if group.created and dist.is_initialized():
        dist.destroy_process_group()


def check_samples(group: Group, n_samples: int):
    if group.active and n_samples < group.world:
        raise ValueError(f"{n_samples} calibration samples for {group.world} processes: every rank needs at least "
                         f"one; lower torchrun's --nproc-per-node or calibrate more samples (calibrate.py --n)")


def barrier(group: Group):
    if group.active:
        dist.barrier()


def agree(group: Group, flag: bool) -> bool:
    """Rank 0's flag, on every rank (e.g. whether a layer is restored from OUT.partial/)."""
    if not group.active:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=group.comm_device)
    dist.broadcast(t, 0)
    return bool(t.item())


def broadcast_(group: Group, t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """t, in place, set to rank src's t (any device: copied through the backend's device if needed)."""
    if not group.active:
        return t
    buf = t.contiguous().to(group.comm_device)
    dist.broadcast(buf, src)
    if buf is not t:
        with torch.no_grad():
            t.copy_(buf)
    return t


def _all_gather(group: Group, t: torch.Tensor) -> torch.Tensor:
    """(world, *t.shape): every rank's t, stacked by rank."""
    out = [torch.empty_like(t) for _ in range(group.world)]
    dist.all_gather(out, t)
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------------------
# Who solves what


def input_owners(structure, world: int) -> dict[str, int]:
    """The rank that solves each input of a decoder layer (model.layer_structure), keyed by the input's first
    reader (as hessian.LayerCapture keys its Hessians): routed expert e on rank e % world; the other inputs
    (attention, shared experts, dense MLP) round-robin over the ranks in the structure's order."""
    owner, j = {}, 0
    for inp in structure.inputs:
        if inp.expert is not None:
            owner[inp.readers[0]] = inp.expert % world
        else:
            owner[inp.readers[0]], j = j % world, j + 1
    return owner


# ----------------------------------------------------------------------------------------------------------
# Hessians: sum each on the rank that solves it


class Sums(NamedTuple):
    """A Hessian's sums as hessian.Hessian.merge reads them (d, S, weight_sum, n_tokens): how the reduced sums
    of all ranks are put back into a fresh accumulator."""

    d: int
    S: torch.Tensor | None  # (d, d) Σ w x xᵀ over every rank's tokens (None on the ranks that do not solve it)
    weight_sum: torch.Tensor  # () float64
    n_tokens: int


def _reduce_to(group: Group, S: torch.Tensor, dst: int):
    """S summed over the ranks, in place on rank dst (S on the other ranks: undefined afterwards)."""
    buf = S.to(group.comm_device)
    dist.reduce(buf, dst, op=dist.ReduceOp.SUM)
    if group.rank == dst and buf is not S:
        S.copy_(buf)


def reduce_hessians(group: Group, H: dict, owner: dict, width: dict, tokens: dict | None = None) -> dict:
    """Sum every rank's accumulators H[key] (hessian.Hessian over its own tokens; a key absent on a rank counts as
    zero) on rank owner[key]. Afterwards H[key] on the owner is a Hessian of all tokens; on the other ranks a Sums
    without S (its counts only). Keys no rank saw a token of are left as they are (absent, as in one process).
    width[key]: the input dimension d. tokens: key -> [n_text, n_vis], all-reduced in place. Returns H."""
    keys = list(owner)
    counts = torch.zeros(len(keys), 4, dtype=torch.float64)  # n_text, n_vis, n_tokens, Σw: exact below 2^53
    for i, k in enumerate(keys):
        if k in H:
            counts[i, 2], counts[i, 3] = H[k].n_tokens, H[k].weight_sum.to("cpu")
            if tokens is not None:
                counts[i, :2] = torch.tensor(tokens[k], dtype=torch.float64)
    buf = counts.to(group.comm_device)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    counts = buf.cpu()
    like = next((h.S for h in H.values() if h.S is not None), torch.zeros((), dtype=torch.float64))
    for i, k in enumerate(keys):
        n = int(counts[i, 2])
        if n == 0:  # no rank saw a token: left as it is (absent, or empty: finalize() then says so)
            continue
        d = width[k]
        local = H.pop(k, None)
        S = local.S if local is not None else torch.zeros(d, d, dtype=like.dtype, device=like.device)
        _reduce_to(group, S, owner[k])
        weight_sum = counts[i, 3].to(S.device)
        if group.rank == owner[k]:
            H[k] = Hessian(d, dtype=S.dtype, device=S.device)
            H[k].merge(Sums(d, S, weight_sum, n))
        else:
            H[k] = Sums(d, None, weight_sum, n)
        del local, S
        if tokens is not None:
            tokens[k] = [int(counts[i, 0]), int(counts[i, 1])]
    return H


def reduce_capture(group: Group, layer: nn.Module, cap):
    """hessian.LayerCapture's Hessians and token counts of this rank's samples -> every input's Hessian over all
    samples on the rank that solves it (input_owners), counts everywhere (reduce_hessians). In place on cap.
    One process: nothing to do."""
    if not group.active:
        return
    owner = input_owners(cap.structure, group.world)
    width = {k: layer.get_submodule(k).in_features for k in owner}
    reduce_hessians(group, cap.H, owner, width, cap.tokens)


def own_inputs(group: Group, cap, starved: dict) -> dict:
    """The inputs of the layer this rank solves (key: first reader -> LinearInput): all of them in one process.
    With several, if any expert is solved from the pooled Hessian, every sample's MoE input first."""
    inputs = {inp.readers[0]: inp for inp in cap.structure.inputs}
    if not group.active:
        return inputs
    if any(starved.values()):
        gather_moe_inputs(group, cap, group.n_samples)
    owner = input_owners(cap.structure, group.world)
    return {k: inp for k, inp in inputs.items() if owner[k] == group.rank}


def share_layer(group: Group, layer: nn.Module, structure, report: dict, shell: Callable) -> dict:
    """After each rank packed the linears it owns: every rank gets the others' (share_linears) and the report
    of every linear. One process: the report as it is."""
    if not group.active:
        return report
    owner = input_owners(structure, group.world)
    where = {name: (layer, name) for inp in structure.inputs for name in inp.readers}
    owner = {name: owner[inp.readers[0]] for inp in structure.inputs for name in inp.readers}
    return share_linears(group, where, owner, report, shell)


def gather_moe_inputs(group: Group, cap, n_samples: int):
    """For experts quantized from the pooled MoE Hessian (hessian.pooled_hessian): every block's MoE input in
    calib/'s order on every rank (cap.moe_inputs, one (T, D) tensor per block of SAMPLE_BLOCK samples: the driver
    runs the MLP once per block), from which pooled_hessian then builds the pool as one process does."""
    if not cap.moe_inputs:
        raise RuntimeError("gather_moe_inputs: no MoE input was captured on this rank (a dense layer?)")
    n_blocks = -(-n_samples // SAMPLE_BLOCK)
    xs = gather_samples(group, n_blocks, {"x": list(cap.moe_inputs)}, cap.moe_inputs[0].dtype, blocks=True)["x"]
    cap.moe_inputs, cap.pool = [x.to(cap.moe_inputs[0].device) for x in xs], None  # pooled_hessian builds the pool


# ----------------------------------------------------------------------------------------------------------
# Per-sample statistics: gather every rank's samples in calib/'s order


def gather_samples(group: Group, n_samples: int, named: dict[str, list], dtype,
                   blocks: bool = False) -> dict[str, list]:
    """named[name]: one entry per sample of this rank (in its order): a tensor (rows, *) or None (no rows).
    Returns, per name, the list over all n_samples samples in calib/'s order, each (rows, width) on the
    backend's device (None where a sample had no rows). One all_gather of the row counts, one per name.
    blocks=True: the entries are blocks of SAMPLE_BLOCK samples (block b on rank b % world), n_samples blocks."""
    owner, position = ((lambda b: b % group.world), (lambda b: b // group.world)) if blocks else \
        (group.owner, group.local_index)
    n_max = max(sum(owner(j) == r for j in range(n_samples)) for r in range(group.world))
    n_local = sum(owner(j) == group.rank for j in range(n_samples))
    names = list(named)
    meta = torch.zeros(len(names), 1 + n_max, dtype=torch.int64)  # width, then rows per local sample
    for i, name in enumerate(names):
        if len(named[name]) != n_local:
            raise RuntimeError(f"gather_samples: {name} has {len(named[name])} entries for this rank's {n_local} "
                               "samples (one per sample expected)")
        for j, t in enumerate(named[name]):
            if t is not None and t.shape[0] > 0:
                meta[i, 0], meta[i, 1 + j] = t[0].numel(), t.shape[0]
    metas = _all_gather(group, meta.to(group.comm_device)).cpu()  # (world, names, 1 + n_max)
    out = {}
    for i, name in enumerate(names):
        width, rows = int(metas[:, i, 0].max()), metas[:, i, 1:]  # rows (world, n_max)
        R = int(rows.sum(1).max())
        if R == 0:
            out[name] = [None] * n_samples
            continue
        buf = torch.zeros(R, width, dtype=dtype, device=group.comm_device)
        local = [t.reshape(t.shape[0], width) for t in named[name] if t is not None and t.shape[0] > 0]
        if local:
            flat = torch.cat(local)
            buf[:flat.shape[0]] = flat.to(buf)
        bufs = _all_gather(group, buf)  # (world, R, width)
        pieces = [list(bufs[r].split(rows[r].tolist() + [R - int(rows[r].sum())])) for r in range(group.world)]
        out[name] = [p if p.shape[0] > 0 else None
                     for p in (pieces[owner(j)][position(j)] for j in range(n_samples))]
    return out


def gather_captured(group: Group, n_samples: int, X: dict, topk: list, ends: list):
    """The scale searches' captures (layerwise.InputCapture) over all samples, in place: X[name] the chunks a
    module saw, ends[j][name] how many of them existed after this rank's sample j; topk one (T, k) per sample.
    Afterwards X[name] holds every sample's rows in calib/'s order (no entry for a sample without rows) and topk
    every sample's routing, exactly as one process captures them."""
    per_sample, start = {n: [] for n in X}, {n: 0 for n in X}
    for e in ends:
        for n in X:
            chunks = X[n][start[n]:e[n]]
            per_sample[n].append(torch.cat(chunks) if chunks else None)
            start[n] = e[n]
    dtype = next((t.dtype for v in X.values() for t in v), torch.float32)
    gathered = gather_samples(group, n_samples, per_sample, dtype)
    for n in X:
        X[n] = [t for t in gathered[n] if t is not None]
    if topk:
        topk[:] = gather_samples(group, n_samples, {"topk": topk}, topk[0].dtype)["topk"]


def gather_fusion_scores(group: Group, n_samples: int, scores: list, is_vis: list) -> tuple[list, list]:
    """FAQ's per-sample scores (T,) and image masks (T,) of every sample, in calib/'s order."""
    g = gather_samples(group, n_samples, {"s": [s[:, None] for s in scores]}, scores[0].dtype)["s"]
    v = gather_samples(group, n_samples, {"v": [m.to(torch.uint8)[:, None] for m in is_vis]}, torch.uint8)["v"]
    return [s.flatten() for s in g], [m.flatten().bool() for m in v]


# ----------------------------------------------------------------------------------------------------------
# Results: every rank gets every quantized linear


def share_linears(group: Group, where: dict, owner: dict, report: dict, shell: Callable) -> dict:
    """After each rank quantized the linears it owns: where[key] = (root module, name) of every linear, owner[key]
    its rank, report[key] this rank's report entries (its own keys). On each non-owner the float nn.Linear is
    replaced by shell(linear) (an empty QuantLinear built as the owner built its own) and filled from the owner's
    tensors, one flat byte broadcast per owning rank. Returns the report of every key in `where`'s order."""
    for src in range(group.world):
        keys = [k for k in where if owner[k] == src]
        if group.rank != src:
            for k in keys:
                root, name = where[k]
                lin = root.get_submodule(name)
                root.set_submodule(name, shell(lin).to(lin.weight.device))
        tensors = [t for k in keys for t in root_get(where[k]).state_dict().values()]
        nbytes = torch.tensor([sum(t.numel() * t.element_size() for t in tensors)], device=group.comm_device)
        theirs = nbytes.clone()
        dist.broadcast(theirs, src)
        if int(theirs.item()) != int(nbytes.item()):
            raise RuntimeError(f"share_linears: rank {src} sends {int(theirs.item())} bytes of quantized tensors, "
                               f"rank {group.rank} expects {int(nbytes.item())}: the shells differ from the owner's "
                               "QuantLinears (bits, group size, sym, bias?)")
        if group.rank == src:
            buf = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8).to(group.comm_device)
                             for t in tensors]) if tensors else torch.empty(0, dtype=torch.uint8,
                                                                           device=group.comm_device)
        else:
            buf = torch.empty(int(nbytes.item()), dtype=torch.uint8, device=group.comm_device)
        dist.broadcast(buf, src)
        if group.rank != src:
            o = 0
            with torch.no_grad():
                for t in tensors:
                    n = t.numel() * t.element_size()
                    t.reshape(-1).view(torch.uint8).copy_(buf[o:o + n])
                    o += n
    parts = [None] * group.world
    dist.all_gather_object(parts, report)
    merged = {k: v for part in parts for k, v in part.items()}
    return {k: merged[k] for k in where if k in merged}


def root_get(root_name) -> nn.Module:
    root, name = root_name
    return root.get_submodule(name)
