"""Choose calibration samples, run the float model once, and record what the quantizers need.

    python calibrate.py [--model DIR] [--data shapes|FILE] [--n 128] [--seed 0] [--out calib/]
                        [--select random|macs] [--pool-factor 4] [--macs-penalty 1.0]
                        [--device cpu|cuda] [--dtype float32|bfloat16]

Per MoE layer l and expert e (VEQ, arXiv 2602.01037, §3):
  n_text[l, e], n_vis[l, e]   tokens of each modality routed to e (top-k membership),
  mean_prob[l, e]             mean router probability of e over all tokens (softmax prob for Qwen, the
                              normalized sigmoid score for Kimi),
and over the set: T_text, T_vis (tokens per modality) and the text/vision gradient ratio
  gamma = mean over image samples of  mean|dL/dx| on text positions / mean|dL/dx| on image positions,
with x the decoder input embeddings and L the answer (or caption) cross-entropy of the float model
(the paper reports 22.4 on Qwen3-VL with 128 COCO samples: text tokens matter more per token), and from the
same backward pass MBQ's sensitivities (arXiv 2412.19509): per decoder layer, mean|dL/dy| on the image tokens and
on the answer tokens, y the layer's attention output and MLP output (Sensitivity; ecs.mbq_ratios turns them into
MBQ's loss weights).

Writes calib/ (quant/folders.py's CalibSet: the encoded samples, so gptq.py reads back exactly the same set,
and the statistics; safetensors and JSON, never pickle), atomically.
Selection: `random` (the first n samples of the seeded stream / a seeded draw from a file), or `macs`: a pool
of pool-factor x n candidates from the same source, profiled with one float pass each here (macs_profile) and
scored and selected greedily by macs.py; calib.json then records the pool size and the chosen indices, and the
summary compares the experts left with zero / few tokens against a random draw of n from the same pool.
Does not: handle video.
Read next: gptq.py (what reads calib/); quant/folders.py's CalibSet is the folder's schema.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

from arch import blocks
from data import processor
from data import samples as data_samples
from hessian import fusion_scores
import macs
from model import DEFAULT_MODEL, load_model, resolve_device
from quant import folders


def moe_layers(m) -> list[int]:
    """Indices of decoder layers whose MLP is a routed MoE block (model.layer_structure: it has a router)."""
    return [i for i, layer in enumerate(m.layers) if blocks.layer_structure(layer).router is not None]


def n_experts(m) -> int:
    """Routed experts per MoE layer (0 for a dense model)."""
    layers = moe_layers(m)
    return len(blocks.layer_structure(m.layers[layers[0]]).experts) if layers else 0


class RoutingRecorder:
    """Forward hooks on every router: keeps (topk_idx (N, k), scores (N, E) fp32) of the last forward per layer
    (the router returns model.Routing)."""

    def __init__(self, m):
        self.last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        routers = {i: m.layers[i].get_submodule(blocks.layer_structure(m.layers[i]).router) for i in moe_layers(m)}
        self.handles = [router.register_forward_hook(self._hook(i)) for i, router in routers.items()]

    def _hook(self, i):
        def hook(module, inputs, routing: blocks.Routing):
            self.last[i] = (routing.topk_idx.detach(), routing.scores.detach().float())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


class BlockOutputs:
    """Forward hooks keeping what each decoder layer adds to the residual stream: its attention output and its
    MLP output (an MoE block's: routed + shared experts), in execution order, for MBQ's sensitivities."""

    def __init__(self, layers):
        self.out = []
        self.handles = [mod.register_forward_hook(lambda mod, args, y: self.out.append(y))
                        for layer in layers for mod in (layer.self_attn, layer.mlp)]

    def remove(self):
        for h in self.handles:
            h.remove()


def input_gradient(m, x, ctx, labels, blocks: bool = False):
    """dL/dx (T, D) of the answer cross-entropy L with respect to the decoder inputs x (1, T, D). blocks=True:
    also MBQ's dL/dy (T, D) at every layer's attention output and MLP output y, [(attention, MLP)] per layer."""
    x = x.detach().requires_grad_(True)
    hooks = BlockOutputs(m.layers) if blocks else None
    try:
        h = x
        for i, layer in enumerate(m.layers):
            h = m.after_layer(i, layer(h, ctx), ctx)
    finally:
        if hooks is not None:
            hooks.remove()
    loss = F.cross_entropy(m.head(h)[0, :-1], labels[0, 1:], ignore_index=-100)
    if not blocks:
        (g,) = torch.autograd.grad(loss, x)
        return g[0]
    g, *ys = torch.autograd.grad(loss, [x, *hooks.out])
    return g[0], [(a[0], b[0]) for a, b in zip(ys[0::2], ys[1::2])]


class Sensitivity:
    """MBQ's per-modality sensitivities (arXiv 2412.19509 §3.2; its code's GradCacheHook): per decoder layer, the
    mean over image samples of mean|dL/dy| over the image tokens and over the language tokens, y the attention
    output and the MLP output (MBQ hooks o_proj's and down_proj's outputs: the same tensors in a dense layer).
    Language tokens are MBQ's `answer` tokens (labels != -100, its code's caption mask) or the `scored` ones (the
    positions whose logits predict an answer token: the answer shifted left by one; see docs/methods.md §2.5)."""

    PARTS = tuple(f"{y}_{t}" for y in ("attn", "mlp") for t in ("vis", "answer", "scored"))

    def __init__(self, n_layers: int, device):
        self.sums = torch.zeros(len(self.PARTS), n_layers, dtype=torch.float64, device=device)
        self.n = [0] * n_layers

    def add(self, i: int, g_attn, g_mlp, vis, labels):
        """Layer i of one sample: g (T, D) at its attention and MLP outputs, vis (T,), labels (T,) (-100: prompt)."""
        answer = labels != -100
        scored = torch.zeros_like(answer)
        scored[:-1] = answer[1:]
        for k, (g, mask) in enumerate((g, m) for g in (g_attn, g_mlp) for m in (vis, answer, scored)):
            self.sums[k, i] += g[mask].abs().float().mean().double()
        self.n[i] += 1

    def stats(self) -> dict | None:
        if min(self.n) == 0:
            return None
        mean = (self.sums.cpu() / torch.tensor(self.n, dtype=torch.float64, device="cpu")).tolist()
        return {"samples": self.n[0], **dict(zip(self.PARTS, mean))}


def gradient_ratio(g, is_vis) -> float | None:
    """mean|g| over text positions / mean|g| over image positions, g (T, D), is_vis (T,); None without images."""
    if not is_vis.any():
        return None
    per_pos = g.abs().mean(-1)  # (T,)
    return (per_pos[~is_vis].mean() / per_pos[is_vis].mean()).item()


class Counts:
    """Routing statistics of the MoE layers, added one (layer, sample) at a time, on the model's device (no copy
    to the CPU per layer and sample; stats() hands them over once)."""

    def __init__(self, layers: list[int], E: int, device):
        self.layers = layers
        self.n_text = torch.zeros(len(layers), E, device=device)
        self.n_vis = torch.zeros(len(layers), E, device=device)
        self.prob_sum = torch.zeros(len(layers), E, dtype=torch.float64, device=device)
        self.T_text = self.T_vis = 0

    def add_sample(self, vis):
        n_vis = int(vis.sum())
        self.T_vis += n_vis
        self.T_text += vis.numel() - n_vis

    def add_routing(self, i: int, topk_idx, scores, vis):
        j, E = self.layers.index(i), self.n_text.shape[1]
        self.n_vis[j] += torch.bincount(topk_idx[vis].flatten(), minlength=E).float()
        self.n_text[j] += torch.bincount(topk_idx[~vis].flatten(), minlength=E).float()
        self.prob_sum[j] += (scores / scores.sum(-1, keepdim=True)).sum(0).double()

    def stats(self, ratios: list, ratios_gxi: list, sensitivity: Sensitivity | None = None) -> dict:
        """Everything calib/ records, on the CPU (safetensors + JSON)."""
        per_sample = [r for r in ratios if r is not None]
        return {"moe_layers": self.layers, "n_text": self.n_text.cpu(), "n_vis": self.n_vis.cpu(),
                "mean_prob": (self.prob_sum / max(1, self.T_text + self.T_vis)).float().cpu(), "T_text": self.T_text,
                "T_vis": self.T_vis, "gamma": sum(per_sample) / len(per_sample) if per_sample else None,
                "gamma_median": float(torch.tensor(per_sample, device="cpu").median()) if per_sample else None,
                "gamma_per_sample": ratios,
                # |x ⊙ dL/dx| instead of |dL/dx|: the decoder's first op is an RMSNorm, so dL/dx scales as
                # 1/||x|| and the plain ratio partly measures how much larger image embeddings are than text ones.
                "gamma_grad_x_input": _mean([r for r in ratios_gxi if r is not None]),
                "mbq": sensitivity.stats() if sensitivity is not None else None}


def encode(proc, s) -> dict:
    """One sample as calib/ keeps it: prompt + gold answer + end token (encode_qa_batch), CPU tensors."""
    return {k: v for k, v in processor.encode_qa_batch(proc, [s]).items() if k in folders.SAMPLE_KEYS}


def on(m, e: dict) -> dict:
    """An encoded sample with every tensor on the model's device."""
    return {k: v.to(m.device) for k, v in e.items()}


def _counts(m) -> Counts:
    return Counts(moe_layers(m), n_experts(m), m.device)


def collect(m, samples: list[dict], gamma: bool = True) -> dict:
    """One float forward per sample (teacher forced on the gold answer): routing counts by modality, mean
    router probabilities, token totals, and the per-sample gradient ratios."""
    counts, ratios, ratios_gxi, sens = _counts(m), [], [], Sensitivity(len(m.layers), m.device)
    rec = RoutingRecorder(m)
    try:
        for s in samples:
            b = on(m, s)
            vis = b["is_vis"].flatten()
            with torch.no_grad():
                x, ctx = m.embed(b["input_ids"], **processor.vision_inputs(b))
                h = x
                for i, layer in enumerate(m.layers):
                    h = m.after_layer(i, layer(h, ctx), ctx)
            counts.add_sample(vis)
            for i in counts.layers:
                counts.add_routing(i, *rec.last[i], vis)
            if gamma:
                g, block_grads = input_gradient(m, x, ctx, b["labels"], blocks=True)
                ratios.append(gradient_ratio(g, vis))
                ratios_gxi.append(gradient_ratio(g * x[0], vis))  # scale-free variant: |x ⊙ dL/dx|
                if vis.any() and bool((b["labels"] != -100).any()):
                    for i, (g_attn, g_mlp) in enumerate(block_grads):
                        sens.add(i, g_attn, g_mlp, vis, b["labels"].flatten())
    finally:
        rec.remove()
    return counts.stats(ratios, ratios_gxi, sens if gamma else None)


def collect_streaming(m, samples: list[dict], gamma: bool = True) -> dict:
    """collect() with one decoder layer in memory (m loaded with lazy_layers=True, for checkpoints larger than
    memory): every sample's hidden states pass layer i before layer i + 1 is loaded. For gamma the input of
    every layer is kept for the image samples (n_image x layers x T x D floats: 32 samples of 400 tokens at
    Qwen3-VL-30B-A3B's 48 x 2048 take 5 GB), and the answer-loss gradient is carried back over the layers in
    reverse, each loaded again: dL/dx_i = J_iᵀ dL/dx_(i+1), the gradient input_gradient() takes in one graph."""
    counts = _counts(m)
    rec = RoutingRecorder(m)  # hooks on the routers survive load_layer
    hs, saved = [], []  # per sample: [h, ctx, vis, labels]; inputs of every layer (image samples, gamma only)
    try:
        with torch.no_grad():
            for s in samples:
                b = on(m, s)
                x, ctx = m.embed(b["input_ids"], **processor.vision_inputs(b))
                vis = b["is_vis"].flatten()
                hs.append([x, ctx, vis, b["labels"]])
                saved.append([] if gamma and bool(vis.any()) else None)
                counts.add_sample(vis)
            for i in range(len(m.layers)):
                layer = m.load_layer(i)
                for k, (x, ctx, vis, _) in enumerate(hs):
                    if saved[k] is not None:
                        saved[k].append(x)
                    hs[k][0] = m.after_layer(i, layer(x, ctx), ctx)
                    if i in counts.layers:
                        counts.add_routing(i, *rec.last[i], vis)
                m.unload_layer(i)
    finally:
        rec.remove()
    ratios, ratios_gxi = [None] * len(hs), [None] * len(hs)
    if gamma:
        grads = {}
        for k, (h, ctx, vis, labels) in enumerate(hs):
            if saved[k] is not None:
                h = h.detach().requires_grad_(True)
                loss = F.cross_entropy(m.head(h)[0, :-1], labels[0, 1:], ignore_index=-100)
                grads[k] = torch.autograd.grad(loss, h)[0]
        sens = Sensitivity(len(m.layers), m.device)
        for i in reversed(range(len(m.layers))):
            layer = m.load_layer(i)
            for k in grads:
                x, ctx = saved[k][i].detach().requires_grad_(True), hs[k][1]
                hooks = BlockOutputs([layer])
                try:
                    y = m.after_layer(i, layer(x, ctx), ctx)
                finally:
                    hooks.remove()
                grads[k], g_attn, g_mlp = torch.autograd.grad(y, [x, *hooks.out], grads[k])
                if bool((hs[k][3] != -100).any()):
                    sens.add(i, g_attn[0], g_mlp[0], hs[k][2], hs[k][3].flatten())
            m.unload_layer(i)
        for k, g in grads.items():
            x, vis = saved[k][0], hs[k][2]
            ratios[k], ratios_gxi[k] = gradient_ratio(g[0], vis), gradient_ratio(g[0] * x[0], vis)
    return counts.stats(ratios, ratios_gxi, sens if gamma else None)


def _mean(values):
    return sum(values) / len(values) if values else None


@torch.no_grad()
def macs_profile(m, proc, samples, layers: list[int]) -> macs.Profile:
    """MACS's pass over its candidate pool: run the float model once per sample (prompt + gold answer),
    counting its routing per MoE layer (`layers`) and modality as collect() does (RoutingRecorder, Counts) and
    reading every decoder attention's probabilities (model.decoder_attention's probs_hook) for the text ->
    image attention mass. The scoring and selection that follow are macs.py's."""
    E, dev = n_experts(m), m.device
    P, L = len(samples), len(layers)
    u_text, u_vis = torch.zeros(P, L, E, device=dev), torch.zeros(P, L, E, device=dev)
    prob_sum, n_tokens = torch.zeros(L, E, dtype=torch.float64, device=dev), 0
    affinity = torch.zeros(P, dtype=torch.float64, device=dev)
    mass = []  # per layer of the current sample: mean attention its text after the image pays to the image (0-dim)

    def attention_hook(probs, vis, text_after):
        if text_after is not None:
            mass.append(fusion_scores(probs[0], vis)[text_after].mean())  # text tokens: mass paid to image tokens

    rec = RoutingRecorder(m)
    try:
        for i, s in enumerate(samples):
            b = on(m, encode(proc, s))
            vis = b["is_vis"][0]
            mass.clear()
            has_image, text_after = bool(vis.any()), None  # text_after: the text after the first image token
            if has_image:
                text_after = ~vis & (torch.arange(len(vis), device=vis.device) > int(torch.where(vis)[0][0]))
                text_after = text_after if bool(text_after.any()) else None
            hook = (lambda p, v=vis, t=text_after: attention_hook(p, v, t)) if has_image else None
            for layer in m.layers:
                layer.self_attn.probs_hook = hook
            x, ctx = m.embed(b["input_ids"], **processor.vision_inputs(b))
            for k, layer in enumerate(m.layers):
                x = m.after_layer(k, layer(x, ctx), ctx)
            counts = Counts(layers, E, dev)
            for layer_idx in layers:
                counts.add_routing(layer_idx, *rec.last[layer_idx], vis)
            u_text[i], u_vis[i] = counts.n_text, counts.n_vis
            prob_sum += counts.prob_sum
            for v in mass:  # summed in order, in float64 (as Python's sum of floats), on the device
                affinity[i] += v.double()
            affinity[i] /= len(m.layers)
            n_tokens += len(vis)
    finally:
        rec.remove()
        for layer in m.layers:
            del layer.self_attn.probs_hook
    return macs.Profile(u_text, u_vis, affinity.float(), (prob_sum / max(1, n_tokens)).float())


def select_macs(m, proc, pool: list, n: int, seed: int, penalty: float) -> tuple[list[int], dict]:
    """MACS over the candidate pool (pool_factor x n samples): the chosen indices, sorted, and the report
    (coverage of MACS and of a random draw of the same size from the same pool)."""
    n = min(n, len(pool))
    prof = macs_profile(m, proc, pool, moe_layers(m))
    parts = macs.scores(prof)
    chosen = macs.select(prof.usage, parts["score"], n, penalty)
    baseline = macs.random_selection(len(pool), n, seed)
    few = 2 * m.layers[0].input_layernorm.weight.shape[0]  # fewer tokens than 2 x input width: a thin Hessian
    report = {"pool": len(pool), "penalty": penalty, "few": few,
              "macs": macs.coverage(prof.usage, chosen, few), "random": macs.coverage(prof.usage, baseline, few),
              "image_samples": {"macs": sum(pool[i].image is not None for i in chosen),
                                "random": sum(pool[i].image is not None for i in baseline)}}
    return sorted(chosen), report


def macs_summary(r: dict) -> str:
    a, b, few = r["random"], r["macs"], f"under_{r['few']}"
    return (f"MACS on a pool of {r['pool']}: experts with 0 tokens: random {a['zero']}, MACS {b['zero']}; "
            f"with < {r['few']} tokens: random {a[few]}, MACS {b[few]}; "
            f"fewest tokens: random {a['min']}, MACS {b['min']}; imbalance (std/mean): random {a['imbalance']:.3f}, "
            f"MACS {b['imbalance']:.3f}; image samples: random {r['image_samples']['random']}, "
            f"MACS {r['image_samples']['macs']}")


def summary(stats: dict, hidden: int) -> str:
    low = (stats["n_text"] + stats["n_vis"]) < 2 * hidden
    lines = [f"tokens: text {stats['T_text']}, image {stats['T_vis']} "
             f"(beta = T_text / T_vis = {stats['T_text'] / max(1, stats['T_vis']):.3f})",
             "gamma (text/vision gradient ratio): "
             + (f"{stats['gamma']:.3f} (mean; median {stats['gamma_median']:.3f}) over "
                f"{sum(r is not None for r in stats['gamma_per_sample'])} image samples; with |x * grad| instead "
                f"of |grad|: {stats['gamma_grad_x_input']:.3f}"
                if stats["gamma"] is not None else "not computed"),
             f"experts with fewer than 2 x {hidden} (input width) routed tokens: {int(low.sum())} of {low.numel()}"]
    for j, i in enumerate(stats["moe_layers"]):
        counts = (stats["n_text"][j] + stats["n_vis"][j]).int().tolist()
        lines.append(f"  layer {i:3d}: tokens per expert {counts}, image share "
                     f"{stats['n_vis'][j].sum() / max(1, (stats['n_text'][j] + stats['n_vis'][j]).sum()):.2f}")
    if stats.get("mbq"):
        def ratios(y, t):
            return ", ".join(f"{v / a:.3g}" for v, a in zip(stats["mbq"][f"{y}_vis"], stats["mbq"][f"{y}_{t}"]))
        lines.append(f"MBQ sensitivity, image / language mean|dL/dy| per layer over {stats['mbq']['samples']} image "
                     f"samples: attention {ratios('attn', 'answer')} (scored tokens: {ratios('attn', 'scored')}); "
                     f"MLP {ratios('mlp', 'answer')} (scored: {ratios('mlp', 'scored')})")
    return "\n".join(lines)


def calibrate(model: str = DEFAULT_MODEL, data_spec: str = "shapes", n: int = 128, seed: int = 0,
              out: str = "calib", gamma: bool = True, device: str = "cpu", command: str | None = None,
              select: str = "random", pool_factor: int = 4, macs_penalty: float = 1.0,
              stream_layers: bool = False, overwrite: bool = False,
              dtype: torch.dtype = torch.float32) -> folders.CalibSet:
    """Everything calibrate.py does (module docstring); returns what it wrote. dtype: the model's weights and
    activations (bfloat16 halves the memory on a GPU); the statistics are accumulated in float32 / float64
    whatever it is."""
    t0 = time.time()
    resolve_device(device)  # before any work: --device cuda without CUDA is an error naming the flag
    inputs = [model] + ([data_spec] if os.path.exists(data_spec) else [])
    folders.check_output_dir(out, "calib", inputs, overwrite)  # before any work: fail fast
    if select not in ("random", "macs") or pool_factor < 1:
        raise ValueError(f"--select {select!r} / --pool-factor {pool_factor}: expected random|macs and >= 1")
    if stream_layers and select == "macs":
        raise ValueError("--stream-layers with --select macs: MACS profiles its pool with the whole model in "
                         "memory; select with a model that fits, or use --select random")
    m = load_model(model, dtype=dtype, device=device, lazy_layers=stream_layers)
    proc = processor.load_processor(model)
    info = {"stream_layers": stream_layers, "dtype": str(dtype).removeprefix("torch."),
            "command": command or " ".join(sys.argv)}
    pool = data_samples.load_samples(data_spec, n=(pool_factor if select == "macs" else 1) * n, seed=seed,
                                     split="train")
    report = None
    if select == "macs":
        indices, report = select_macs(m, proc, pool, n, seed, macs_penalty)
        info.update(pool=len(pool), macs=report)
    else:
        indices = list(range(len(pool)))
    samples = [encode(proc, pool[i]) for i in indices]
    stats = (collect_streaming if stream_layers else collect)(m, samples, gamma=gamma)
    info["seconds"] = time.time() - t0
    cal = folders.CalibSet(model=model, data=data_spec, split="train", seed=seed, selection=select, indices=indices,
                           samples=samples, **stats, info=info)
    cal.save(out, inputs, overwrite)
    print(summary(stats, m.layers[0].input_layernorm.weight.shape[0]))
    if report is not None:
        print(macs_summary(report))
    print(f"wrote {out}/ ({len(samples)} samples, {info['seconds']:.1f}s)")
    return cal


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="float checkpoint folder")
    p.add_argument("--data", default="shapes", help="'shapes' (bundled benchmark, train split) or a data file")
    p.add_argument("--n", type=int, default=128, help="number of calibration samples")
    p.add_argument("--seed", type=int, default=0, help="sample selection seed")
    p.add_argument("--out", default="calib", help="output folder (replaced only if it is a previous calib/ "
                   "or empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it is not a previous calib/ (never the model or data folder)")
    p.add_argument("--no-gamma", action="store_true", help="skip the gradient pass (gamma is then not recorded)")
    p.add_argument("--select", default="random", choices=("random", "macs"), help="how samples are chosen")
    p.add_argument("--pool-factor", type=int, default=4, help="MACS: candidate pool = this x --n")
    p.add_argument("--macs-penalty", type=float, default=1.0, help="MACS: weight of the expert-imbalance penalty")
    p.add_argument("--stream-layers", action="store_true",
                   help="one decoder layer in memory at a time (checkpoints larger than memory)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N (an error if absent)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="model weights and activations (bfloat16 on a GPU: half the memory; statistics stay fp32/fp64)")
    args = p.parse_args(argv)
    calibrate(args.model, args.data, args.n, args.seed, args.out, gamma=not args.no_gamma, device=args.device,
              command="python calibrate.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              select=args.select, pool_factor=args.pool_factor, macs_penalty=args.macs_penalty,
              stream_layers=args.stream_layers, overwrite=args.overwrite, dtype=getattr(torch, args.dtype))


if __name__ == "__main__":
    main()
