"""The building blocks both model families share (docs/architectures.md): RMSNorm, rotary embeddings, the
attention kernels (and the probs hook through which FAQ and MACS read attention), SwiGLU, the pre-norm decoder
layer, the expert loop the quantizers hook (run_experts), the KV cache, the per-forward decoder inputs, and
MoEVLM, the base of both model classes (binding weights to a checkpoint, one decoder layer in memory at a time,
greedy generation). Also each decoder layer as data for the quantizers: what a router returns (Routing), which
linears read which input, the experts and the router (layer_structure), the scaling-group helpers.
Does not: define a family (arch/qwen3_vl_moe.py, arch/kimi_vl.py) or read files (arch/checkpoint.py, model.py).
Read next: hessian.py (what a quantizer does with a layer's routed tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from arch.checkpoint import assign, resolve
from quant.grid import QuantLinear


# ----------------------------------------------------------------------------------------------------------
# Kernels and modules: norms, rotary embeddings, attention, SwiGLU, the decoder layer.


def upcast(x):
    """x in at least float32: the references compute norms, softmaxes and rotations in fp32; a float64 model
    (used by tests as a high-precision recomputation) stays float64."""
    return x if x.dtype == torch.float64 else x.float()


class RMSNorm(nn.Module):
    """w * x / rms(x), computed in fp32 and cast back *before* the weight multiply (as the references do)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = upcast(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim (the NeoX / Llama rotary convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x, cos, sin):
    """x * cos + rotate_half(x) * sin; cos/sin broadcast over heads."""
    return x * cos + rotate_half(x) * sin


def attention(q, k, v, scale: float, mask=None, causal: bool = False):
    """Softmax attention. q (B, nh, T, d), k/v (B, nkv, S, d*) with nh % nkv == 0 (GQA: each kv head serves
    nh/nkv query heads). mask: additive (B, 1, T, S), or None with causal=True (plain causal, T == S) or
    causal=False (bidirectional). Uses torch's fused SDPA kernel; `attention_reference` is the same math
    written out."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def block_diagonal_attention(q, k, v, seqlens: list[int], scale: float):
    """Bidirectional attention inside each segment of a packed sequence, so packed images never see each other.
    q, k, v (L, nh, hd); seqlens sums to L. Returns (L, nh*hd)."""
    outs = []
    for qs, ks, vs in zip(q.split(seqlens), k.split(seqlens), v.split(seqlens)):
        o = attention(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None], vs.transpose(0, 1)[None], scale=scale)
        outs.append(o[0].transpose(0, 1).reshape(qs.shape[0], -1))
    return torch.cat(outs)


def attention_reference(q, k, v, scale: float, mask=None):
    """softmax(q kᵀ * scale + mask) v with the softmax in fp32, as the references' eager path; also returns the
    probabilities (B, nh, T, S), which token-weighting methods read."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, nh, T, S)
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(upcast(scores), dim=-1).to(q.dtype)
    return torch.matmul(probs, v), probs


def decoder_attention(module: nn.Module, q, k, v, scale: float, mask):
    """The LLM's causal self-attention. A quantizer that reads attention probabilities (FAQ, macs.py) sets
    `module.probs_hook` to a callable; the softmax is then written out (attention_reference, same result up to
    float rounding) and the probabilities (B, nh, T, S) are handed to it. Otherwise the fused kernel runs."""
    hook = getattr(module, "probs_hook", None)
    if hook is None:
        return attention(q, k, v, scale=scale, mask=mask, causal=True)
    if mask is None:  # plain causal: build it, the written-out softmax has no causal path of its own
        mask = causal_mask(torch.ones(q.shape[0], k.shape[2], device=q.device), q.shape[2], k.shape[2] - q.shape[2],
                           q.dtype, q.device)
    o, probs = attention_reference(q, k, v, scale=scale, mask=mask)
    hook(probs)
    return o


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the LLM MLPs and every expert of both families."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """The pre-norm residual block of both families: x += attn(RMS(x)); x += mlp(RMS(x)). The attention
    (GQA or MLA) and the MLP (MoE or dense SwiGLU) are the family's; names follow the checkpoints."""

    def __init__(self, hidden: int, eps: float, self_attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.self_attn, self.mlp = self_attn, mlp

    def forward(self, x, ctx: "DecoderInputs"):
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_many(self, xs: list, ctxs: list, before_attention=None, before_mlp=None) -> list:
        """forward() of several samples (1, T_j, D) at once: the attention one sample at a time, the MLP (token by
        token) once on all their tokens, so each expert multiplies the routed rows of every sample in one matmul
        (a quantizer's calibration pass: larger products, fewer small ops). Equal to forward() per sample up to
        float rounding (tests/test_pipeline.py). before_attention(j), before_mlp(): called first, for the hooks
        of a quantizer that needs to know which sample a linear's input belongs to."""
        hs = []
        for j, (x, ctx) in enumerate(zip(xs, ctxs)):
            if before_attention is not None:
                before_attention(j)
            hs.append(x + self.self_attn(self.input_layernorm(x), ctx))
        h = torch.cat(hs, dim=1)  # (1, Σ T_j, D)
        if before_mlp is not None:
            before_mlp()
        return list((h + self.mlp(self.post_attention_layernorm(h))).split([x.shape[1] for x in hs], dim=1))


class TextModel(nn.Module):
    """embed_tokens -> layers -> norm (the head and the layer loop live in the model class)."""

    def __init__(self, vocab: int, hidden: int, eps: float, layers: list[nn.Module]):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(hidden, eps)


def text_model(cfg, attention: type, moe: type) -> TextModel:
    """The decoder of either family: layer i gets the family's attention, and its MoE block where
    cfg.is_moe(i), else a dense SwiGLU of cfg.intermediate_size."""
    return TextModel(cfg.vocab_size, cfg.hidden_size, cfg.rms_norm_eps, [
        DecoderLayer(cfg.hidden_size, cfg.rms_norm_eps, attention(cfg, i),
                     moe(cfg) if cfg.is_moe(i) else SwiGLU(cfg.hidden_size, cfg.intermediate_size))
        for i in range(cfg.num_hidden_layers)])


# ----------------------------------------------------------------------------------------------------------
# A decoder layer as data, for the quantizers: where scales fold (swiglu_groups, mlp_readers; the families'
# scaling_groups), what a router returns (Routing), which linears read which input (layer_structure).


def swiglu_groups(layer: nn.Module) -> list[tuple[str, list[str], None]]:
    """(up_proj -> down_proj) scaling groups of every SwiGLU in a layer: a per-channel scale folded into
    up_proj's output rows is undone exactly by down_proj's input columns (silu(g) * u/s * s = silu(g) * u)."""
    return [(f"{n}.up_proj", [f"{n}.down_proj"], None) for n, m in layer.named_modules() if isinstance(m, SwiGLU)]


def mlp_readers(layer: nn.Module) -> tuple[list[str], str | None]:
    """The linears that read post_attention_layernorm's output (every routed / shared / dense gate_proj and
    up_proj) and the router that reads it too (None for a dense layer)."""
    names = [f"{n}.{p}" for n, m in layer.named_modules() if isinstance(m, SwiGLU) for p in ("gate_proj", "up_proj")]
    return names, ("mlp.gate" if hasattr(layer.mlp, "gate") and not isinstance(layer.mlp.gate, nn.Linear) else None)


class Routing(NamedTuple):
    """What a router (QwenRouter, KimiRouter) returns for N tokens."""

    topk_idx: torch.Tensor  # (N, k) long: the experts chosen for each token
    topk_weight: torch.Tensor  # (N, k): their weights in the MoE output (Qwen: renormalized top-k softmax, in the
    #                            activation dtype; Kimi: renormalized sigmoid scores x routed_scaling_factor, fp32)
    scores: torch.Tensor  # (N, E) fp32: every expert's score before top-k (Qwen: softmax probability; Kimi: sigmoid)


class LinearInput(NamedTuple):
    """One input tensor of a decoder layer and the linears that read it (names relative to the layer)."""

    readers: tuple[str, ...]  # e.g. ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    expert: int | None = None  # the routed expert whose tokens these are; None: every token of the layer


class SwiGLUNames(NamedTuple):
    """One SwiGLU of a decoder layer (a routed expert, a shared expert, or the dense MLP), by module name."""

    name: str  # e.g. "mlp.experts.3", "mlp.shared_experts", "mlp"
    expert: int | None  # the routed expert's index e; None for a shared expert or a dense MLP
    gate_proj: str
    up_proj: str
    down_proj: str


@dataclass
class LayerStructure:
    """A decoder layer as a quantizer sees it, as data (layer_structure): names relative to the layer."""

    attention: list[str]  # the attention's linears
    swiglus: list[SwiGLUNames]  # routed experts in index order, then shared experts; or the dense MLP
    router: str | None  # the router module (kept float, returns Routing); None in a dense layer
    inputs: list[LinearInput]  # every nn.Linear of the layer exactly once, grouped by the tensor it reads
    _owner: dict = field(init=False, repr=False)

    def __post_init__(self):
        self._owner = {lin: s for s in self.swiglus for lin in (s.gate_proj, s.up_proj, s.down_proj)}

    @property
    def experts(self) -> list[SwiGLUNames]:
        """The routed experts, in index order."""
        return [s for s in self.swiglus if s.expert is not None]

    def swiglu_of(self, linear: str) -> SwiGLUNames | None:
        """The SwiGLU a linear belongs to (None for attention linears)."""
        return self._owner.get(linear)

    def expert_of(self, name: str) -> int | None:
        """The routed expert a linear belongs to, or None (attention, shared expert, dense MLP)."""
        s = self._owner.get(name)
        return None if s is None else s.expert


def layer_structure(layer: nn.Module) -> LayerStructure:
    """Decoder layer `layer` (either family, loaded or on the meta device) as data: which linears read which
    input (the attention's groups from its `input_groups()`; an expert's, shared expert's or dense MLP's gate_proj
    and up_proj share its input, its down_proj reads its own), the routed experts with their index, and the
    router. Raises if a linear of the layer (float or packed) is missing from the description."""
    attention = [[f"self_attn.{n}" for n in group] for group in layer.self_attn.input_groups()]
    index = {id(e): j for j, e in enumerate(getattr(layer.mlp, "experts", ()))}
    swiglus = [SwiGLUNames(n, index.get(id(m)), f"{n}.gate_proj", f"{n}.up_proj", f"{n}.down_proj")
               for n, m in layer.named_modules() if isinstance(m, SwiGLU)]
    inputs = [LinearInput(tuple(group)) for group in attention]
    for s in swiglus:
        inputs += [LinearInput((s.gate_proj, s.up_proj), s.expert), LinearInput((s.down_proj,), s.expert)]
    router = mlp_readers(layer)[1]
    described = sorted(n for i in inputs for n in i.readers)
    linears = sorted(n for n, m in layer.named_modules() if isinstance(m, (nn.Linear, QuantLinear)))
    if described != linears:
        raise ValueError(f"layer_structure: the description lists {described} but the layer's linears are "
                         f"{linears}; describe every linear (the attention's input_groups(), SwiGLU)")
    return LayerStructure([n for group in attention for n in group], swiglus, router, inputs)


# ----------------------------------------------------------------------------------------------------------
# The forward's machinery: the expert loop, masks, the KV cache, and MoEVLM, the base of both model classes.


def expert_assignments(topk_idx, n_experts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each expert e, in index order: (tok, slot), the tokens routed to e in sequence order and which of
    their k slots chose it. topk_idx (N, k) long. The expert loop (run_experts) and the quantizers' Hessian
    capture (hessian.LayerCapture) both take the routing from here."""
    k = topk_idx.shape[1]
    flat = topk_idx.flatten()  # (N*k,) expert of each (token, slot)
    order = flat.argsort(stable=True)  # grouped by expert, token order kept inside a group
    counts = flat.bincount(minlength=n_experts).tolist()
    return [(sel // k, sel % k) for sel in order.split(counts)]


def run_experts(experts: nn.ModuleList, x, topk_idx, topk_w):
    """The reference expert loop: gather each expert's routed tokens, run it, scatter-add weighted outputs.
    x (N, D), topk_idx (N, k) long, topk_w (N, k) -> (N, D). Experts are visited in index order and their tokens
    in sequence order, matching the accumulation order of the references."""
    out = torch.zeros_like(x)
    for expert, (tok, slot) in zip(experts, expert_assignments(topk_idx, len(experts))):
        if tok.numel() == 0:
            continue
        y = expert(x[tok]) * topk_w[tok, slot, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


def causal_mask(attention_mask, q_len: int, past_len: int, dtype, device):
    """Additive mask (B, 1, q_len, past_len + q_len): causal, and padded keys hidden. Every query row may see
    itself, so rows of left padding stay finite (their outputs are never used). None when no mask is needed
    beyond plain causality (no padding, no cache): attention() then uses the kernel's own causal path."""
    if attention_mask is None and past_len == 0:
        return None
    total = past_len + q_len
    q_pos = torch.arange(past_len, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None]  # (1, q, S)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, :total].bool().to(device)
        allowed = allowed | (k_pos == q_pos)[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]  # (B or 1, 1, q, S)


class KVCache:
    """Per-layer (k, v) tensors, concatenated along the sequence on every step. `extra` holds family state
    (Qwen: rope_deltas)."""

    def __init__(self, n_layers: int):
        self.kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        self.extra: dict = {}

    @property
    def length(self) -> int:
        return 0 if self.kv[0] is None else self.kv[0][0].shape[2]

    def update(self, layer: int, k, v):
        if self.kv[layer] is not None:
            k = torch.cat([self.kv[layer][0], k], dim=2)
            v = torch.cat([self.kv[layer][1], v], dim=2)
        self.kv[layer] = (k, v)
        return k, v


@dataclass
class DecoderInputs:
    """Everything a decoder layer needs besides the hidden states, computed once per forward.
    rope: (cos, sin) broadcastable to the q/k of every layer; mask: additive attention mask;
    visual_pos_masks (B, T) bool; deepstack: list of (n_visual, D) features added after layers 0..n-1."""

    rope: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor | None
    attention_mask: torch.Tensor | None = None
    visual_pos_masks: torch.Tensor | None = None
    deepstack: list[torch.Tensor] = field(default_factory=list)
    cache: KVCache | None = None



class MoEVLM(nn.Module):
    """What both families share: weight binding/streaming and greedy generation. Subclasses define
    `embed(...) -> (x, DecoderInputs)`, `after_layer(i, x, ctx)`, `head(x)`, and where their parts are."""

    family = ""
    fused_experts = False
    keep_fp32: tuple[str, ...] = ("weight_scale",)  # name suffixes loaded in fp32 whatever the model dtype
    layers_path = ""  # the decoder layers, as module path and checkpoint prefix ("model.language_model.layers")
    vision_blocks_path = ""  # the vision tower's transformer blocks
    vision_paths: tuple[str, ...] = ()  # everything that turns pixels into decoder inputs (--quantize-vision)

    @property
    def layers(self) -> nn.ModuleList:
        return self.get_submodule(self.layers_path)

    @classmethod
    def layer_prefix(cls, i: int) -> str:
        """Decoder layer i's tensor names start with this."""
        return f"{cls.layers_path}.{i}."

    def vision_blocks(self) -> nn.ModuleList:
        return self.get_submodule(self.vision_blocks_path)

    def vision_modules(self) -> list[nn.Module]:
        """Everything that turns pixels into decoder inputs (what --quantize-vision quantizes)."""
        return [self.get_submodule(p) for p in self.vision_paths]

    def bind(self, ckpt, dtype, device):
        """Resolve where every parameter comes from (headers only) without reading any tensor."""
        self._ckpt, self._dtype, self._device = ckpt, dtype, torch.device(device)
        self.sources = {k: resolve(ckpt, k, tuple(p.shape)) for k, p in self.state_dict(keep_vars=True).items()}

    def layer_keys(self, i: int) -> list[str]:
        prefix = self.layer_prefix(i)
        return [k for k in self.sources if k.startswith(prefix)]

    def load_keys(self, keys):
        for k in keys:
            t = self.sources[k][1]()
            # copy: never alias the mmap'd file; float tensors take the requested dtype (or fp32, see keep_fp32);
            # contiguous: a weight read from the Hub's fused experts is a transposed view, and a linear on a
            # transposed weight takes another matmul kernel (other rounding) than the per-expert layout's
            dtype = (torch.float32 if k.endswith(self.keep_fp32) else self._dtype) if t.is_floating_point() else t.dtype
            t = t.to(device=self._device, dtype=dtype, copy=True, memory_format=torch.contiguous_format)
            assign(self, k, t)

    @property
    def device(self) -> torch.device:
        """Where load_model put (and load_layer puts) the weights."""
        return self._device

    def load_layer(self, i: int):
        """Materialize decoder layer i from the checkpoint (streaming: one layer in memory at a time)."""
        self.load_keys(self.layer_keys(i))
        self._ckpt.release()  # the layer is copied out: unmap what was read
        return self.layers[i]

    def unload_layer(self, i: int):
        """Drop decoder layer i's weights (whatever modules it holds now) back to the meta device."""
        prefix = self.layer_prefix(i)
        for k, p in list(self.layers[i].named_parameters()):
            assign(self, prefix + k, torch.empty(p.shape, dtype=p.dtype, device="meta"))

    def forward(self, input_ids, attention_mask=None, cache=None, **vision):
        x, ctx = self.embed(input_ids, attention_mask=attention_mask, cache=cache, **vision)
        for i, layer in enumerate(self.layers):
            x = self.after_layer(i, layer(x, ctx), ctx)
        return self.head(x)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, stop_ids=(), on_token=None, **vision):
        """Greedy decoding with a KV cache, batch 1. Returns the new token ids (stop token excluded)."""
        if input_ids.shape[0] != 1:
            raise ValueError("generate() decodes one prompt at a time (batch 1)")
        cache = KVCache(len(self.layers))
        logits = self(input_ids, cache=cache, **vision)
        out = []
        for _ in range(max_new_tokens):
            nxt = int(logits[0, -1].argmax())
            if nxt in stop_ids:
                break
            out.append(nxt)
            if on_token is not None:
                on_token(nxt)
            logits = self(torch.tensor([[nxt]], device=input_ids.device), cache=cache)
        return out
