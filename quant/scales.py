"""The scale searches' side of the driver (methods with `scales`: AWQ, SmoothQuant, VEQ-ME, VEQ, ECS, ECMFQ):
capture each scaling group's float input, describe the group (ecs.ScalingGroup), search, fold; and FAQ's
per-layer fusion weights from the layer's attention. The math is ecs.py's and hessian.py's; gptq.py's loop
calls search_and_fold and layer_fusion_weights before it captures the Hessians.
Tests: tests/test_pipeline.py, tests/test_methods.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from arch.blocks import LayerStructure, layer_structure
import ecs
from hessian import fusion_scores, fusion_weights
from quant import distributed


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


def group_readers(layer, structure: LayerStructure, consumers: list[str], topk):
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


def layer_fusion_weights(layer, acts, eta: float, group: distributed.Group = distributed.SINGLE) -> list[torch.Tensor]:
    """FAQ: one float forward of the layer per sample with its attention probabilities handed to
    hessian.fusion_scores (arch/blocks.py's decoder_attention probs_hook), then hessian.fusion_weights over the set.
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
        scores, is_vis = distributed.gather_fusion_scores(group, group.n_samples, scores, is_vis)
    return fusion_weights(scores, is_vis, eta)


def token_kinds(acts, group: distributed.Group = distributed.SINGLE) -> torch.Tensor | None:
    """(N,) uint8 over every token of the layer's samples (calib/'s order): bit 0 image, bit 1 answer
    (labels != -100), bit 2 scored (its logits predict an answer token); None if a sample has no labels."""
    if any(smp.is_answer is None for smp in acts):
        return None
    kinds = []
    for smp in acts:
        scored = torch.zeros_like(smp.is_answer)
        scored[:-1] = smp.is_answer[1:]
        kinds.append(smp.is_vis.to(torch.uint8) | smp.is_answer.to(torch.uint8) << 1 | scored.to(torch.uint8) << 2)
    if group.active:
        kinds = distributed.gather_samples(group, group.n_samples, {"k": [k[:, None] for k in kinds]}, torch.uint8)["k"]
    return torch.cat([k.flatten() for k in kinds])


def search_and_fold(layer, groups, acts, q, method, counts=None, gamma: float | None = None, fusion=None,
                    group: distributed.Group = distributed.SINGLE, sensitivity=None) -> dict:
    """The method's scale search (method.scales) on each scaling group (producer, consumers, router) of the layer
    (m.scaling_groups): capture the group's float input X (the router's input for the MoE block), describe the
    group (ecs.ScalingGroup), search the per-channel scale s, then fold 1/s into the producer and s into every
    consumer and the router (kept float, so routing is unchanged). counts: calib/'s routing counts of the layer
    (CalibSet.layer_counts; None outside MoE layers), for VEQ-ME's S_e and ECS's ω; fusion: FAQ's weights per
    sample. With several processes, every rank searches on the inputs of all samples (gathered; fusion then
    covers all of them) and folds rank 0's scales. Returns per-group reports."""
    structure = layer_structure(layer)
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
        distributed.gather_captured(group, group.n_samples, cap.X, cap.topk, ends)
    topk = torch.cat(cap.topk) if cap.topk else None
    importance = None if counts is None else \
        (lambda experts: ecs.expert_importance(experts, counts[:4], gamma or 1.0, q.options))
    kinds = token_kinds(acts, group) if method.needs_sensitivity else None  # (N,) image / answer / scored: MBQ
    report = {}
    for producer, consumers, router in groups:
        if not cap.X[source[producer]]:  # an expert no calibration token reached: nothing to scale on
            report[producer] = {"skipped": "no tokens"}
            continue
        readers, experts = group_readers(layer, structure, consumers, topk if router else None)
        c = torch.cat(fusion) if fusion is not None else None  # (N,) every token of the layer
        k = kinds
        expert = structure.expert_of(producer)
        if expert is not None:  # an expert's up_proj -> down_proj: its routed tokens, in order
            rows = torch.where((topk == expert).any(-1))[0]
            c, k = (None if c is None else c[rows]), (None if k is None else k[rows.to(k.device)])
        g = ecs.ScalingGroup(
            producer=producer, consumers=consumers, router=router, X=torch.cat(cap.X[source[producer]]).float(),
            attention=all(n in structure.attention for n in consumers), readers=readers, experts=experts,
            topk=topk if router else None, token_weights=c, mean_prob=None if counts is None else counts[4],
            importance=importance(experts) if router and importance is not None else None, sensitivity=sensitivity,
            **({} if k is None else dict(is_vis=k & 1 > 0, is_answer=k & 2 > 0, is_scored=k & 4 > 0)))
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
