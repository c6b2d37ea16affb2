"""The layer-by-layer quantization loop behind `python gptq.py` (quantize_model), for any method of methods.py.

For each decoder layer l (its inputs produced by the already-quantized layers < l):
  1. load layer l from the checkpoint (one layer in memory at a time);
  2. if the method wants them, FAQ's fusion weights from the layer's attention (layer_fusion_weights);
  3. if the method has a scale search, run it on every scaling group on the layer's float inputs and fold the
     scales in (search_and_fold);
  4. run the layer on every calibration sample with hooks on every nn.Linear (LayerCapture): one Hessian per
     distinct input (model.layer_structure says which linears share one: q/k/v, an expert's gate/up), experts
     seeing only their routed tokens, each token weighted by the method's token_weights;
  5. quantize every linear with the method's solver, RTN or GPTQ (quantize_linears; all experts in one batched
     problem with --batched-experts), and swap it for a packed model.QuantLinear;
  6. recompute the layer's outputs with the quantized weights (+ DeepStack, run_layer), write the layer
     atomically to OUT.partial/ (--resume continues from there).
Router, norms, embeddings and lm_head stay in float; --quantize-vision quantizes the vision tower first.
Then export.write_output assembles OUT/. docs/methods.md §1.3 is the spec.
Under torchrun (a distributed.Group with several ranks) each rank runs its share of the samples and solves its
share of the linears; the few places that sum, gather or share across ranks call distributed.py (`group.active`).

Model structure comes from the model code as data (model.layer_structure, model.Routing, m.scaling_groups);
nothing here parses module names. Does not: define methods (methods.py), solve (gptq.py, gptq_batched.py), accumulate
Hessians (hessian.py), search scales (ecs.py), or write the output folder (export.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
import json
import os
import shutil
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import calibrate
import data
import distributed
import ecs
import export
import methods
import model as model_lib
from gptq import gptq, gptq_shared, relative_output_error, rtn
from gptq_batched import gptq_batched_shared
from hessian import Hessian, fusion_scores, fusion_weights
from methods import QuantArgs


@dataclass
class LayerInput:
    """One calibration sample flowing through the decoder: hidden states (1, T, D), the per-forward inputs,
    and which positions are image tokens (T,)."""

    x: torch.Tensor
    ctx: object
    is_vis: torch.Tensor


class Phases:
    """Wall seconds per phase of one layer's quantization (`with phases("solve"): ...`; nested phases count in
    both), and the floating-point work of the Hessian sums. The driver writes `seconds` into the layer's report,
    bench/streaming.py prints the table. On a GPU each boundary synchronizes, so the seconds are the device's."""

    def __init__(self, device="cpu"):
        self.seconds: dict[str, float] = {}
        self.cuda = torch.device(device).type == "cuda"

    @contextmanager
    def __call__(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


NO_PHASES = Phases()  # when nobody is timing


# ----------------------------------------------------------------------------------------------------------
# Hessians: capture and quantize


HESSIAN_BLOCK = distributed.SAMPLE_BLOCK  # samples per forward_many and per float32 product of each Hessian


class LayerCapture:
    """Forward hooks on every nn.Linear of one decoder layer and on its router, accumulating one Hessian per
    input of model.layer_structure (keyed by its first reader). An expert's linears see only the rows routed to
    it: `run_experts` feeds expert e the tokens torch.where(topk_idx == e) in token order, and the router hook
    records the routing of this forward."""

    def __init__(self, layer: nn.Module, method: methods.Method, q: QuantArgs, gamma: float,
                 phases: Phases = NO_PHASES):
        self.phases = phases
        self.structure = model_lib.layer_structure(layer)
        self.method, self.q, self.gamma = method, q, gamma
        self.input_of = {name: inp for inp in self.structure.inputs for name in inp.readers}
        self.H: dict[str, Hessian] = {}  # input key (its first reader) -> accumulator
        self.tokens: dict[str, list[int]] = {}  # input key -> [n_text, n_vis]
        self.moe_inputs: list[torch.Tensor] = []
        self.pool: Hessian | None = None  # all tokens entering the MoE block: built by pooled_hessian if needed
        self.is_vis, self.fusion, self.routing, self._seen = None, None, None, {}
        self.flop = 0  # floating-point operations of the Hessian products (bench/streaming.py's rate)
        self.handles = [layer.get_submodule(name).register_forward_pre_hook(self._linear_hook(name))
                        for name in self.input_of]
        if self.structure.router is not None:  # kept float
            self.handles.append(layer.get_submodule(self.structure.router).register_forward_hook(self._router_hook))

    def start_sample(self, is_vis, fusion=None):
        """is_vis (T,) of the next sample; fusion (T,) its FAQ weights (methods with fusion only)."""
        self.is_vis, self.fusion, self.routing, self._seen = is_vis, fusion, None, {}

    def run_block(self, layer, block: list, fusion: list | None):
        """The float layer on a block of samples (DecoderLayer.forward_many: attention per sample, the MLP on
        all their tokens), the hooks told which tokens each linear's input holds; then the block's products."""
        vis = [s.is_vis for s in block]
        fus = fusion if fusion is not None else [None] * len(block)
        layer.forward_many([s.x for s in block], [s.ctx for s in block],
                           before_attention=lambda j: self.start_sample(vis[j], fus[j]),
                           before_mlp=lambda: self.start_sample(torch.cat(vis), None if fusion is None else
                                                                torch.cat(fusion)))
        self.flush()

    def _router_hook(self, module, args, routing: model_lib.Routing):
        x = args[0].reshape(-1, args[0].shape[-1])
        self.routing = (routing.topk_idx, routing.topk_weight.float())  # (T, k) each
        self.moe_inputs.append(x.detach())  # for pooled_hessian, should an expert get (almost) no tokens

    def _linear_hook(self, name):
        inp = self.input_of[name]
        key = inp.readers[0]

        def hook(module, args):
            with self.phases("hessians"):
                add(args)

        def add(args):
            if key in self._seen:  # another reader of this input already added it in this forward
                if self._seen[key] is not args[0]:
                    raise RuntimeError(f"{name} and {key} read different tensors, but model.layer_structure says "
                                       "they share one input: fix the layer's description")
                return
            self._seen[key] = args[0]
            x = args[0].reshape(-1, args[0].shape[-1])
            tok, p = slice(None), None
            if inp.expert is not None:
                tok, slot = torch.where(self.routing[0] == inp.expert)
                p = self.routing[1][tok, slot]
            is_vis, fusion = self.is_vis[tok], None if self.fusion is None else self.fusion[tok]
            if key not in self.H:
                self.H[key] = Hessian(x.shape[-1], dtype=torch.float64, compute_dtype=torch.float32,
                                      device=x.device)
                self.tokens[key] = [0, 0]
            self.H[key].add(x, self.method.token_weights(self.q, self.gamma, is_vis, p, fusion))
            self.flop += 2 * x.shape[0] * x.shape[1] ** 2  # the (d, n) @ (n, d) product
            self.tokens[key][0] += int((~is_vis).sum())
            self.tokens[key][1] += int(is_vis.sum())
        return hook

    def flush(self):
        """Multiply out every Hessian's kept rows (the driver calls it after each HESSIAN_BLOCK samples)."""
        with self.phases("hessians"):
            for H in self.H.values():
                H.flush()

    def remove(self):
        for h in self.handles:
            h.remove()


def pooled_hessian(layer, inp: model_lib.LinearInput, cap: LayerCapture) -> torch.Tensor:
    """For an expert with (almost) no routed tokens: the Hessian of what its input would be if every MoE token
    were routed to it (gate/up: the MoE input; down: that expert's activations on the MoE input)."""
    s = cap.structure.swiglu_of(inp.readers[0])
    if inp.readers[0] != s.down_proj:  # gate/up: every MoE token, computed once per layer
        if cap.pool is None:
            cap.pool = Hessian(cap.moe_inputs[0].shape[-1], dtype=torch.float64, compute_dtype=torch.float32,
                               device=cap.moe_inputs[0].device)
            for x in cap.moe_inputs:
                cap.pool.add(x)
                cap.pool.flush()
        return cap.pool.finalize(dtype=torch.float32)
    expert = layer.get_submodule(s.name)
    H = Hessian(expert.down_proj.in_features, dtype=torch.float64, compute_dtype=torch.float32,
                device=expert.down_proj.weight.device)
    for x in cap.moe_inputs:
        H.add(F.silu(expert.gate_proj(x)) * expert.up_proj(x))
        H.flush()
    return H.finalize(release=True, dtype=torch.float32)


def solve_batched(layer, expert_inputs: list[model_lib.LinearInput], H: dict, q: QuantArgs, prefix: str) -> dict:
    """All experts' gate/up (one Hessian each) in one gptq_batched_shared call, all down_proj in another: the
    same results as the per-expert loop up to float rounding ties (tests/test_gptq_batched.py). Returns input key
    -> one result per reader."""
    per_expert: dict[int, list[model_lib.LinearInput]] = {}
    for inp in expert_inputs:
        per_expert.setdefault(inp.expert, []).append(inp)
    out = {}
    for role in zip(*per_expert.values()):  # the same input of every expert: gate/up, then down
        keys = [inp.readers[0] for inp in role]
        stacks = [torch.stack([layer.get_submodule(inp.readers[j]).weight.float() for inp in role])
                  for j in range(len(role[0].readers))]  # per reader of the input: (E, out, in)
        Hs = H[keys[0]].new_empty((len(keys),) + tuple(H[keys[0]].shape))  # (E, in, in)
        for e, k in enumerate(keys):  # each expert's Hessian moves into the stack (no second copy of all of them)
            Hs[e] = H.pop(k)
            H[k] = Hs[e]
        res = gptq_batched_shared(stacks, Hs, bits=q.bits, group_size=q.group_size, sym=q.sym,
                                  block_size=q.block_size, percdamp=q.percdamp, act_order=q.act_order,
                                  static_groups=q.static_groups, names=[prefix + k for k in keys])
        for e, k in enumerate(keys):
            out[k] = [res[j][e] for j in range(len(stacks))]
    return out


def quantize_linears(layer, cap: LayerCapture, q: QuantArgs, prefix: str, phases: Phases = NO_PHASES,
                     group: distributed.Group = distributed.SINGLE, n_samples: int = 0) -> dict:
    """Quantize every linear of the layer from its captured Hessian (GPTQ) or directly (RTN), swap each for a
    packed QuantLinear, and return the per-linear report. With several processes (group), each rank solves the
    inputs it owns (distributed.input_owners) from the Hessians summed over all ranks' samples (n_samples in all),
    then every rank receives the others' QuantLinears."""
    if group.active:  # each Hessian summed on the rank that solves it; token counts on every rank
        distributed.reduce_capture(group, layer, cap)
    inputs = {inp.readers[0]: inp for inp in cap.structure.inputs}  # key: the input's first reader
    for key, inp in inputs.items():  # an expert no token reached is quantized from the pooled Hessian below
        if inp.expert is None and key not in cap.H:
            raise RuntimeError(f"{prefix}{key}: no calibration token reached this linear")
    starved = {k: inp.expert is not None and (q.all_experts_hessian or
                                              (cap.H[k].n_tokens if k in cap.H else 0) < q.min_expert_tokens)
               for k, inp in inputs.items()}  # quantized from the pooled Hessian: every token entering the MoE block
    if group.active:  # this rank solves its own inputs; the pooled Hessian needs every sample's MoE input
        if any(starved.values()):
            distributed.gather_moe_inputs(group, cap, n_samples)
        owner = distributed.input_owners(cap.structure, group.world)
        inputs = {k: inp for k, inp in inputs.items() if owner[k] == group.rank}
    with phases("finalize"):
        H = {k: pooled_hessian(layer, inp, cap) if starved[k] else cap.H[k].finalize(release=True, dtype=torch.float32)
             for k, inp in inputs.items()}  # float32, as the solvers take it; the float64 sums are released one by one
    cap.moe_inputs, cap.pool = [], None  # the pooled Hessians are built: the layer's MoE inputs can go
    rtn_solver = cap.method.solver == "rtn"
    results = {}
    with phases("solve"):
        if q.batched_experts and not rtn_solver:
            results = solve_batched(layer, [inp for inp in inputs.values() if inp.expert is not None], H, q, prefix)
        for key, inp in inputs.items():
            if key in results:  # solved by the batched path
                continue
            W = [layer.get_submodule(n).weight.float() for n in inp.readers]
            if rtn_solver:
                results[key] = [rtn(w, bits=q.bits, group_size=q.group_size, sym=q.sym) for w in W]
            else:
                results[key] = gptq_shared(W, H[key], bits=q.bits, group_size=q.group_size, sym=q.sym,
                                           block_size=q.block_size, percdamp=q.percdamp, act_order=q.act_order,
                                           static_groups=q.static_groups, name=prefix + key)
    report = {}
    for key, inp in inputs.items():
        n_text, n_vis = cap.tokens.get(key, (0, 0))
        for name, r in zip(inp.readers, results.pop(key)):  # each result (with its W_hat) freed once packed
            lin = layer.get_submodule(name)
            with phases("error"):
                err = relative_output_error(lin.weight.float(), r.W_hat, H[key])
            with phases("pack"):
                ql = model_lib.QuantLinear.from_codes(r.codes, r.scale, r.zero, bits=q.bits, group_size=q.group_size,
                                                      sym=q.sym, abits=q.abits if q.abits < 16 else None)
                layer.set_submodule(name, ql.to(lin.weight.device))
            report[name] = {"tokens_text": n_text, "tokens_vis": n_vis, "pooled_hessian": starved[key],
                            "damp": getattr(r, "damp", None), "cholesky_retries": getattr(r, "retries", 0),
                            "rel_error": err}
    if group.active:  # every rank gets the others' packed linears and report entries
        where = {name: (layer, name) for inp in cap.structure.inputs for name in inp.readers}
        owner = {name: owner[inp.readers[0]] for inp in cap.structure.inputs for name in inp.readers}
        with phases("share"):
            report = distributed.share_linears(group, where, owner, report, lambda lin: model_lib.QuantLinear(
                lin.in_features, lin.out_features, bits=q.bits, group_size=q.group_size, sym=q.sym,
                abits=q.abits if q.abits < 16 else None))
    return report


# ----------------------------------------------------------------------------------------------------------
# Scale searches: capture each scaling group's float input, search, fold


class InputCapture:
    """Hooks keeping the raw float inputs (n, d) of chosen modules of a layer (concatenated over samples) and
    every token's top-k experts (n, k) from the router, for the scale searches."""

    def __init__(self, layer, names: list[str], router: str | None):
        self.X = {n: [] for n in names}
        self.topk, self.handles = [], []
        for n in names:
            self.handles.append(layer.get_submodule(n).register_forward_pre_hook(self._hook(n)))
        if router is not None:
            self.handles.append(layer.get_submodule(router).register_forward_hook(
                lambda mod, a, routing: self.topk.append(routing.topk_idx)))

    def _hook(self, name):
        def hook(module, args):
            self.X[name].append(args[0].reshape(-1, args[0].shape[-1]).detach())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def group_readers(layer, structure: model_lib.LayerStructure, consumers: list[str], topk):
    """The readers of a scaling group as ecs.Consumer entries, and the routed expert of each (None elsewhere): a
    SwiGLU's gate_proj and up_proj stacked (they read the same rows), an expert restricted to its routed tokens
    when topk (N, k) is given (the MoE block); other readers see every token."""
    readers, experts = [], []
    for c in consumers:
        s = structure.swiglu_of(c)
        if s is not None and c == s.up_proj and s.gate_proj in consumers:
            continue  # stacked with its gate_proj below
        W = layer.get_submodule(c).weight.float()
        if s is not None and c == s.gate_proj:
            W = torch.cat([W, layer.get_submodule(s.up_proj).weight.float()])
        e = structure.expert_of(c)
        rows = torch.where((topk == e).any(-1))[0] if e is not None and topk is not None else None
        readers.append(ecs.Consumer(W=W, rows=rows, name=c))
        experts.append(e)
    return readers, experts


def layer_fusion_weights(layer, acts, eta: float, group: distributed.Group = distributed.SINGLE,
                         n_samples: int = 0) -> list[torch.Tensor]:
    """FAQ: one float forward of the layer per sample with its attention probabilities handed to
    hessian.fusion_scores (model.decoder_attention's probs_hook), then hessian.fusion_weights over the set.
    Returns one (T,) weight tensor per sample (with several processes: per sample of all n_samples, calib/'s order)."""
    scores = []
    try:
        with torch.no_grad():
            for smp in acts:
                layer.self_attn.probs_hook = lambda p, v=smp.is_vis: scores.append(fusion_scores(p[0], v))
                layer(smp.x, smp.ctx)
    finally:
        del layer.self_attn.probs_hook
    is_vis = [smp.is_vis for smp in acts]
    if group.active:  # the weights are normalized over all samples: every rank's scores, in calib/'s order
        scores, is_vis = distributed.gather_fusion_scores(group, n_samples, scores, is_vis)
    return fusion_weights(scores, is_vis, eta)


def search_and_fold(layer, groups, acts, q: QuantArgs, importance=None, fusion=None, mean_prob=None,
                    group: distributed.Group = distributed.SINGLE, n_samples: int = 0) -> dict:
    """The method's scale search (methods.Method.scales) on each scaling group (producer, consumers, router) of
    the layer (m.scaling_groups): capture the group's float input X (the router's input for the MoE block),
    describe the group (methods.ScalingGroup), search the per-channel scale s, then fold 1/s into the producer
    and s into every consumer and the router (kept float, so routing is unchanged). importance: experts -> S_e
    (methods.layer_importance); fusion: FAQ's weights per sample; mean_prob (E,): calib/'s mean router
    probability of the layer. With several processes (group), every rank searches on the inputs of all n_samples
    samples (gathered; fusion then covers all of them) and folds rank 0's scales. Returns per-group reports."""
    method = methods.get(q.method)
    if method.scales is None:
        raise ValueError(f"--method {q.method}: has no scale search")
    structure = model_lib.layer_structure(layer)
    source = {p: (r if r else cons[0]) for p, cons, r in groups}  # a module whose input is the group's X
    cap = InputCapture(layer, sorted(set(source.values())), structure.router)
    ends = []  # per sample: how many chunks each module had seen after it
    try:
        with torch.no_grad():
            for smp in acts:
                layer(smp.x, smp.ctx)
                ends.append({n: len(v) for n, v in cap.X.items()})
    finally:
        cap.remove()
    if group.active:  # every sample's inputs on every rank, in calib/'s order
        distributed.gather_captured(group, n_samples, cap.X, cap.topk, ends)
    topk = torch.cat(cap.topk) if cap.topk else None
    report = {}
    for producer, consumers, router in groups:
        if not cap.X[source[producer]]:  # an expert no calibration token reached: nothing to scale on
            report[producer] = {"skipped": "no tokens"}
            continue
        readers, experts = group_readers(layer, structure, consumers, topk if router else None)
        c = torch.cat(fusion) if fusion is not None else None  # (N,) every token of the layer
        expert = structure.expert_of(producer)
        if c is not None and expert is not None:  # an expert's up_proj -> down_proj: its routed tokens, in order
            c = c[torch.where((topk == expert).any(-1))[0]]
        g = methods.ScalingGroup(
            producer=producer, consumers=consumers, router=router, X=torch.cat(cap.X[source[producer]]).float(),
            attention=all(n in structure.attention for n in consumers), readers=readers, experts=experts,
            topk=topk if router else None, token_weights=c, mean_prob=mean_prob,
            importance=importance(experts) if router and importance is not None else None)
        s, report[producer] = method.scales(g, q)
        s = distributed.broadcast_(group, s)  # several processes: rank 0's scales, bitwise, on every rank
        fold_group(layer, producer, consumers, router, s)
    return report


def fold_group(layer, producer: str, consumers: list[str], router: str | None, s):
    """Producer output / s (a norm's weight, or a linear's output rows), consumers' input columns * s."""
    prod = layer.get_submodule(producer)
    with torch.no_grad():
        if isinstance(prod, nn.Linear):
            prod.weight.copy_(ecs.fold_into_linear_rows(prod.weight, s)[0])
        else:
            prod.weight.copy_(ecs.fold_into_norm(prod.weight, s))
        for name in consumers + ([router] if router else []):
            mod = layer.get_submodule(name)
            mod.weight.copy_(ecs.scale_consumer(mod.weight, s))


# ----------------------------------------------------------------------------------------------------------
# The loop


def embed_samples(m, proc, samples, device) -> list:
    """Decoder inputs of every calibration sample (prompt + gold answer, teacher forced, batch 1)."""
    out = []
    with torch.no_grad():
        for s in samples:
            b = data.encode_qa_batch(proc, [s])
            vision = {k: v.to(device) for k, v in data.vision_inputs(b).items()}
            x, ctx = m.embed(b["input_ids"].to(device), **vision)
            out.append(LayerInput(x, ctx, b["is_vis"][0].to(device)))
    return out


def run_layer(m, i: int, samples: list) -> list:
    """The layer's outputs (+ DeepStack injection) for every sample, HESSIAN_BLOCK samples per forward_many."""
    layer, out = m.layers[i], []
    with torch.no_grad(), model_lib.dequantize_once(layer):
        for b in range(0, len(samples), HESSIAN_BLOCK):
            block = samples[b:b + HESSIAN_BLOCK]
            ys = layer.forward_many([s.x for s in block], [s.ctx for s in block])
            out += [LayerInput(m.after_layer(i, y, s.ctx), s.ctx, s.is_vis) for y, s in zip(ys, block)]
    return out


def quantize_vision_tower(m, proc, samples, q: QuantArgs, device,
                          group: distributed.Group = distributed.SINGLE) -> dict:
    """--quantize-vision: GPTQ (RTN for the RTN methods) every nn.Linear of the vision tower and projector from
    the Hessians of their inputs on the calibration images (unweighted, all patches), before the decoder
    loop, so the decoder is calibrated on the quantized tower's features. The patch embedding stays float.
    With several processes (group): `samples` is this rank's shard; the linears are solved round-robin over the
    ranks, each from the Hessian summed over all ranks, and shared."""
    linears = {f"v{j}.{n}": (root, n, mod) for j, root in enumerate(m.vision_modules())
               for n, mod in root.named_modules() if isinstance(mod, nn.Linear)}  # report key -> where it is
    H = {k: Hessian(mod.in_features, dtype=torch.float64, device=mod.weight.device)
         for k, (_, _, mod) in linears.items()}
    handles = [mod.register_forward_pre_hook(lambda mod_, a, k=k: H[k].add(a[0]))
               for k, (_, _, mod) in linears.items()]
    try:
        with torch.no_grad():
            for s in samples:
                if s.image is not None:
                    e = data.encode_sample(proc, s)
                    m.embed(e["input_ids"].to(device), **{k: v.to(device) for k, v in data.vision_inputs(e).items()})
    finally:
        for h in handles:
            h.remove()
    owner = {k: j % group.world for j, k in enumerate(linears)}
    if group.active:  # each Hessian summed on the rank that solves it
        distributed.reduce_hessians(group, H, owner, {k: mod.in_features for k, (_, _, mod) in linears.items()})
    rtn_solver = methods.get(q.method).solver == "rtn"
    report = {}
    for k, (root, name, lin) in linears.items():
        if owner[k] != group.rank:  # another process solves it
            continue
        Hk, W = H[k].finalize(), lin.weight.float()
        r = rtn(W, bits=q.bits, group_size=q.group_size, sym=q.sym) if rtn_solver else \
            gptq(W, Hk.float(), bits=q.bits, group_size=q.group_size, sym=q.sym, block_size=q.block_size,
                 percdamp=q.percdamp, name=k)
        ql = model_lib.QuantLinear.from_codes(r.codes, r.scale, r.zero, bits=q.bits, group_size=q.group_size,
                                              sym=q.sym, bias=None if lin.bias is None else lin.bias.float())
        root.set_submodule(name, ql.to(lin.weight.device))
        report[k] = {"tokens": H[k].n_tokens, "rel_error": relative_output_error(W, r.W_hat, Hk)}
    if group.active:  # every rank gets the others' packed linears and report entries
        report = distributed.share_linears(
            group, {k: (root, name) for k, (root, name, _) in linears.items()}, owner, report,
            lambda lin: model_lib.QuantLinear(lin.in_features, lin.out_features, bits=q.bits,
                                              group_size=q.group_size, sym=q.sym, bias=lin.bias is not None))
    return report


def layer_state(m, i: int) -> dict:
    """Layer i's tensors under their checkpoint names (packed linears, float norms and router)."""
    prefix = m.layer_prefix(i)
    return {prefix + k: v.detach().contiguous() for k, v in m.layers[i].state_dict().items()}


def restore_layer(m, i: int, path: str, q: QuantArgs):
    """Resume: rebuild layer i from its saved result (QuantLinear shells, then the saved tensors)."""
    from safetensors.torch import load_file

    layer = m.load_layer(i)
    model_lib.to_quant_shells(layer, bits=q.bits, group_size=q.group_size, sym=q.sym,
                              abits=q.abits if q.abits < 16 else None)
    sd = load_file(path)
    prefix = m.layer_prefix(i)
    layer.load_state_dict({k[len(prefix):]: v for k, v in sd.items()}, strict=True)


def print_layer(i: int, n_layers: int, rep: dict, t0: float, t_layer: float):
    lin = rep["linears"]
    errs = [r["rel_error"] for r in lin.values()]
    pooled = [n for n, r in lin.items() if r["pooled_hessian"]]
    retries = sum(r["cholesky_retries"] for r in lin.values())
    done = i + 1
    eta = (time.time() - t0) / done * (n_layers - done)
    print(f"layer {i:3d}/{n_layers}: {len(lin)} linears, rel. output error mean {sum(errs) / len(errs):.2e} "
          f"max {max(errs):.2e}, pooled-Hessian linears {len(pooled)}, Cholesky retries {retries}, "
          f"{t_layer:.1f}s, elapsed {time.time() - t0:.0f}s, ETA {eta:.0f}s", flush=True)


def quantize_model(model: str, calib: str = "calib", out: str = "quantized", q: QuantArgs | None = None,
                   resume: bool = False, device: str = "cpu", command: str | None = None,
                   overwrite: bool = False, dtype: torch.dtype = torch.float32,
                   group: distributed.Group | None = None) -> dict:
    """The sequential loop. Returns the run report (also written to out/report.json). `out` and its
    `out.partial/` are refused before any work if they are not previous outputs (`model.check_output_dir`).
    device, dtype: where the layers run and their weights' dtype (bfloat16 on a GPU); Hessians accumulate in
    float64 and the solvers run in float32 on that device whatever the dtype.
    group: several processes (distributed.init under torchrun; device is then the group's): the samples are split
    across the ranks, each layer's linears solved across them; rank 0 alone writes. None: one process."""
    if group is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"quantize_model runs under torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']}) without a "
                         "group: pass group=distributed.init(device), as gptq.py does")
    group = group or distributed.SINGLE
    if group.active and device != group.device:
        raise ValueError(f"--device {device}: this process's group runs on {group.device}; pass device=group.device")
    log = print if group.rank == 0 else (lambda *a, **k: None)  # rank 0 speaks for all
    q = q or QuantArgs()
    model_lib.resolve_device(device)  # before any work: a device this machine lacks is an error naming --device
    inputs = [model, calib]
    partial = out.rstrip("/") + ".partial"
    model_lib.check_output_dir(out, "quantized", inputs, overwrite)
    model_lib.check_output_dir(partial, "partial", inputs, overwrite, flag="--out's partial folder")
    distributed.barrier(group)  # every rank has checked the folders before rank 0 touches OUT.partial/
    method = methods.get(q.method)
    t0 = time.time()
    cal = calibrate.load(calib)
    if os.path.abspath(cal["model"]) != os.path.abspath(model):
        log(f"note: {calib}/ was made with --model {cal['model']}, quantizing {model}", file=sys.stderr)
    gamma = q.gamma if q.gamma is not None else cal.get({"grad": "gamma", "grad_x_input": "gamma_grad_x_input"}
                                                         [q.gamma_source])
    if method.needs_gamma and gamma is None and (q.modality and q.use_gamma):
        raise ValueError(f"{calib}/calib.json has no gamma (calibrate.py --no-gamma?); pass --gamma or --no-modality")
    if method.needs_macs and cal.get("selection") != "macs":
        raise ValueError(f"--method {q.method} quantizes on a MACS-selected calibration set, but {calib}/ was "
                         f"selected by {cal.get('selection')!r}: run `python calibrate.py --select macs --out "
                         f"{calib}` first, or use a method without MACS (ecs-faq: ecmfq's quantizer on any calib/)")
    methods.check_args(q)
    samples = calibrate.calibration_samples(cal)
    n_samples = len(samples)
    distributed.check_samples(group, n_samples)
    samples = group.shard(samples)  # this rank's blocks of HESSIAN_BLOCK samples (all of them in one process)
    m = model_lib.load_model(model, dtype=dtype, device=device, lazy_layers=True)
    proc = data.load_processor(model)
    vision_report = quantize_vision_tower(m, proc, samples, q, device, group) if q.quantize_vision else None
    acts = embed_samples(m, proc, samples, device)
    if group.rank == 0 and os.path.isdir(partial) and not resume:
        shutil.rmtree(partial)  # a previous run's partial/ (checked above), or --overwrite
    if group.rank == 0 and not os.path.isdir(partial):
        model_lib.make_output_dir(partial, "partial", command)
    report = {"method": q.method, "bits": q.bits, "group_size": q.group_size, "abits": q.abits, "sym": q.sym,
              "model": model, "calib": calib, "gamma": gamma, "n_samples": n_samples, "seed": cal["seed"],
              "command": command or " ".join(sys.argv), "args": asdict(q), "vision": vision_report, "layers": {}}
    n = len(m.layers)
    for i in range(n):
        t_layer = time.time()
        path = os.path.join(partial, f"layer_{i:04d}.safetensors")
        if distributed.agree(group, resume and os.path.exists(path)):  # rank 0 decides; every rank restores
            restore_layer(m, i, path, q)
            with open(path[:-len(".safetensors")] + ".json") as f:
                report["layers"][str(i)] = json.load(f)
            log(f"layer {i:3d}/{n}: restored from {path}")
        else:
            phases = Phases(device)
            with phases("load"):
                layer = m.load_layer(i)
            with phases("fusion"):
                fusion = layer_fusion_weights(layer, acts, q.eta, group, n_samples) if method.fusion else None
            mean_prob = cal["mean_prob"][cal["moe_layers"].index(i)] if i in cal["moe_layers"] else None
            with phases("scales"):
                scales = {} if method.scales is None else search_and_fold(
                    layer, m.scaling_groups(i), acts, q, importance=methods.layer_importance(cal, i, gamma, q),
                    fusion=fusion, mean_prob=mean_prob, group=group, n_samples=n_samples)
            if fusion is not None:  # fusion covers every sample: this rank's j-th is global_index(j)
                fusion = [fusion[group.global_index(j)] for j in range(len(acts))]
            cap = LayerCapture(layer, method, q, gamma or 1.0, phases)
            try:
                with torch.no_grad(), phases("capture"):  # the float layer's forward + the Hessian sums
                    for b in range(0, len(acts), HESSIAN_BLOCK):  # one block = the same samples on any rank count
                        cap.run_block(layer, acts[b:b + HESSIAN_BLOCK],
                                      None if fusion is None else fusion[b:b + HESSIAN_BLOCK])
            finally:
                cap.remove()
            rep = {"linears": quantize_linears(layer, cap, q, m.layer_prefix(i), phases, group, n_samples),
                   "scales": scales, "hessian_gflop": cap.flop / 1e9}
            del cap  # its Hessians (GBs at real width) must not live on into the next layer
            rep["seconds"] = phases.seconds  # the layer's forward below is added to the saved report only
            if group.rank == 0:  # the only writer
                with phases("write"):
                    export.save_atomic(layer_state(m, i), path, metadata={"format": "pt"})
                with open(path[:-len(".safetensors")] + ".json.tmp", "w") as f:
                    json.dump(rep, f)
                os.replace(path[:-len(".safetensors")] + ".json.tmp", path[:-len(".safetensors")] + ".json")
                print_layer(i, n, rep, t0, time.time() - t_layer)
            report["layers"][str(i)] = rep
        forward = Phases(device)
        with forward("forward"):  # the quantized layer's outputs: the next layer's inputs
            acts = run_layer(m, i, acts)
        m.unload_layer(i)
        report["layers"][str(i)].setdefault("seconds", {}).update(forward.seconds)
    report["seconds"] = time.time() - t0
    report["pooled_hessian_linears"] = [f"{i}:{k}" for i, rep in report["layers"].items()
                                        for k, r in rep["linears"].items() if r["pooled_hessian"]]
    report["cholesky_retries"] = sum(r["cholesky_retries"] for rep in report["layers"].values()
                                     for r in rep["linears"].values())
    if group.rank == 0:
        export.write_output(m, model, out, q, partial, report, inputs, overwrite)
    distributed.barrier(group)  # every rank returns once OUT/ is in place
    how = "error measured on" if method.solver == "rtn" else "quantized from"
    which = ("with --all-experts-hessian" if q.all_experts_hessian
             else f"with < {q.min_expert_tokens} calibration tokens")
    log(f"wrote {out}/ ({q.method}, W{q.bits} g{q.group_size} A{q.abits}) in {report['seconds']:.1f}s; "
          f"{len(report['pooled_hessian_linears'])} expert linears {which} ({how} the layer's pooled MoE "
          f"Hessian), {report['cholesky_retries']} Cholesky retries")
    return report
