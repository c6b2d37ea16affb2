"""Hand-written forward passes for Mixture-of-Experts vision-language models, loaded from safetensors.

Families (model_type in the checkpoint's config.json):
  * qwen3_vl_moe  Qwen3-VL-MoE (e.g. Qwen3-VL-30B-A3B-Instruct): ViT with DeepStack, M-RoPE, softmax top-k MoE.
  * kimi_vl       Kimi-VL (e.g. Kimi-VL-A3B-Instruct): MoonViT + DeepSeek-V3 style LLM (MLA, sigmoid MoE).

The spec these follow is docs/architectures.md (checked against transformers 5.23 in tests/).
No transformers import: the modules below mirror the checkpoint's tensor names, so the state dict of a
model *is* the checkpoint's key list (with the fused Qwen expert tensors split into per-expert 2-D weights).

What this file does:
  * config dataclasses built from config.json (Hub and transformers-5 spellings),
  * the model, with experts as addressable per-expert `nn.Linear`s run by a token-gather loop (the
    reference path the quantizer hooks),
  * strict loading with `safetensors.safe_open` (single file or sharded), optionally one decoder layer at a
    time (`load_model(..., lazy_layers=True)` then `model.load_layer(i)` / `model.unload_layer(i)`),
  * greedy generation with a KV cache,
  * packed quantized weights (compressed-tensors `pack-quantized`: pack_int32/unpack_int32, QuantLinear), run by
    dequantizing on the fly; quantization methods themselves live in gptq.py / ecs.py.
What it does not do: video inputs, training-time features (dropout, aux losses), sampling.

Run:  python model.py --model DIR --image IMG --prompt "What is in the picture?"
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------
# Errors


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or inconsistent. The message names the file/tensor."""


# ----------------------------------------------------------------------------------------------------------
# Configs. Built from the checkpoint's config.json; every field the forward pass uses is named here.


def _pick(d: dict, *names, default=None):
    """First present key among `names` (accepts both the Hub and the transformers-5 spelling)."""
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    return default


def _rope_fields(d: dict, default_theta: float) -> tuple[float, dict]:
    """(theta, extra rope dict) from either `rope_theta`+`rope_scaling` or `rope_parameters`."""
    params = dict(d.get("rope_parameters") or {})
    scaling = dict(d.get("rope_scaling") or {})
    theta = _pick(d, "rope_theta", default=None) or params.get("rope_theta") or default_theta
    return float(theta), {**scaling, **params}


@dataclass
class QwenVisionConfig:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    in_channels: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: list[int]
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0
    eps: float = 1e-6  # not a config field: hard-coded in the reference (docs/architectures.md §5)

    @classmethod
    def from_dict(cls, d: dict) -> "QwenVisionConfig":
        theta, _ = _rope_fields(d, 10000.0)
        return cls(
            depth=d["depth"], hidden_size=d["hidden_size"], num_heads=d["num_heads"],
            intermediate_size=d["intermediate_size"], patch_size=d["patch_size"],
            temporal_patch_size=d.get("temporal_patch_size", 2), spatial_merge_size=d.get("spatial_merge_size", 2),
            in_channels=d.get("in_channels", 3), out_hidden_size=d["out_hidden_size"],
            num_position_embeddings=d["num_position_embeddings"],
            deepstack_visual_indexes=list(d.get("deepstack_visual_indexes", [])),
            hidden_act=d.get("hidden_act", "gelu_pytorch_tanh"), rope_theta=theta,
        )


@dataclass
class QwenTextConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: list[int]
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    attention_bias: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "QwenTextConfig":
        theta, rope = _rope_fields(d, 5_000_000.0)
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
            raise CheckpointError(f"config.json: text rope_type {rope.get('rope_type')!r} is not supported "
                                  "(only the default interleaved M-RoPE of Qwen3-VL)")
        if rope.get("mrope_interleaved") is False:
            raise CheckpointError("config.json: mrope_interleaved=false (Qwen2-VL chunked M-RoPE) is not supported")
        head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
        section = list(rope.get("mrope_section", [24, 20, 20]))
        if sum(section) != head_dim // 2:
            raise CheckpointError(f"config.json: mrope_section {section} must sum to head_dim/2 = {head_dim // 2}")
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"], head_dim=head_dim,
            intermediate_size=d.get("intermediate_size", 0), moe_intermediate_size=d["moe_intermediate_size"],
            num_experts=_pick(d, "num_experts", "num_local_experts"), num_experts_per_tok=d["num_experts_per_tok"],
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=theta, mrope_section=section,
            decoder_sparse_step=d.get("decoder_sparse_step", 1), mlp_only_layers=list(d.get("mlp_only_layers") or []),
            attention_bias=bool(d.get("attention_bias", False)),
        )

    def is_moe(self, layer: int) -> bool:
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)


@dataclass
class Qwen3VLMoeConfig:
    text: QwenTextConfig
    vision: QwenVisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    model_type: str = "qwen3_vl_moe"

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3VLMoeConfig":
        return cls(
            text=QwenTextConfig.from_dict(d["text_config"]), vision=QwenVisionConfig.from_dict(d["vision_config"]),
            image_token_id=d.get("image_token_id", 151655), video_token_id=d.get("video_token_id", 151656),
            vision_start_token_id=d.get("vision_start_token_id", 151652),
            vision_end_token_id=d.get("vision_end_token_id", 151653),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )


CONFIGS: dict[str, type] = {"qwen3_vl_moe": Qwen3VLMoeConfig}  # kimi_vl is registered further down


def load_config(checkpoint_dir: str):
    """Read `checkpoint_dir/config.json` into the dataclass of its model_type."""
    path = os.path.join(checkpoint_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: not found. Point --model at a checkpoint folder containing config.json.")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    model_type = d.get("model_type")
    if model_type not in CONFIGS:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not supported; "
                              f"expected one of {sorted(CONFIGS)}")
    try:
        return CONFIGS[model_type].from_dict(d)
    except KeyError as e:
        raise CheckpointError(f"{path}: missing field {e} required for model_type {model_type!r}") from e


# ----------------------------------------------------------------------------------------------------------
# Building blocks shared by both families.


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


def swiglu_groups(layer: nn.Module) -> list[tuple[str, list[str], None]]:
    """(up_proj -> down_proj) scaling groups of every SwiGLU in a layer: a per-channel scale folded into
    up_proj's output rows is undone exactly by down_proj's input columns (silu(g) * u/s * s = silu(g) * u)."""
    return [(f"{n}.up_proj", [f"{n}.down_proj"], None) for n, m in layer.named_modules() if isinstance(m, SwiGLU)]


def mlp_readers(layer: nn.Module) -> tuple[list[str], str | None]:
    """The linears that read post_attention_layernorm's output (every routed / shared / dense gate_proj and
    up_proj) and the router that reads it too (None for a dense layer)."""
    names = [f"{n}.{p}" for n, m in layer.named_modules() if isinstance(m, SwiGLU) for p in ("gate_proj", "up_proj")]
    return names, ("mlp.gate" if hasattr(layer.mlp, "gate") and not isinstance(layer.mlp.gate, nn.Linear) else None)


def run_experts(experts: nn.ModuleList, x, topk_idx, topk_w):
    """The reference expert loop: gather each expert's routed tokens, run it, scatter-add weighted outputs.
    x (N, D), topk_idx (N, k) long, topk_w (N, k) -> (N, D). Experts are visited in index order and their tokens
    in sequence order, matching the accumulation order of the references. A quantizer hooks `experts[e]`:
    its inputs are exactly x[tok] below."""
    N, k = topk_idx.shape
    flat = topk_idx.flatten()  # (N*k,) expert of each (token, slot)
    order = flat.argsort(stable=True)  # grouped by expert, token order kept inside a group
    counts = flat.bincount(minlength=len(experts)).tolist()
    out = torch.zeros_like(x)
    for expert, sel in zip(experts, order.split(counts)):
        if sel.numel() == 0:
            continue
        tok, slot = sel // k, sel % k  # tokens routed to this expert, and which of their k slots chose it
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
    `embed(...) -> (x, DecoderInputs)`, `after_layer(i, x, ctx)`, `head(x)`, `layers` and `layer_prefix(i)`."""

    family = ""
    fused_experts = False
    keep_fp32: tuple[str, ...] = ("weight_scale",)  # name suffixes loaded in fp32 whatever the model dtype

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

# ----------------------------------------------------------------------------------------------------------
# Qwen3-VL-MoE vision tower (docs/architectures.md §1.3). Shapes: N patches, D width, nh heads, hd head dim.


class QwenVisionAttention(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.nh, self.hd = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, rope, seqlens: list[int]):
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.nh, self.hd).unbind(1)  # each (N, nh, hd)
        cos, sin = rope  # (N, 1, hd) fp32
        q = apply_rope(upcast(q), cos, sin).to(x.dtype)
        k = apply_rope(upcast(k), cos, sin).to(x.dtype)
        return self.proj(block_diagonal_attention(q, k, v, seqlens, scale=self.hd ** -0.5))


class QwenVisionMLP(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.linear_fc2(gelu_tanh(self.linear_fc1(x)))


class QwenVisionBlock(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.attn = QwenVisionAttention(cfg)
        self.mlp = QwenVisionMLP(cfg)

    def forward(self, x, rope, seqlens):
        x = x + self.attn(self.norm1(x), rope, seqlens)
        return x + self.mlp(self.norm2(x))


class QwenPatchMerger(nn.Module):
    """2x2 merge -> MLP. Main merger: LayerNorm(D) before the shuffle; DeepStack mergers: LayerNorm(4D) after."""

    def __init__(self, cfg: QwenVisionConfig, postshuffle_norm: bool):
        super().__init__()
        self.unit = cfg.spatial_merge_size ** 2
        wide = cfg.hidden_size * self.unit
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(wide if postshuffle_norm else cfg.hidden_size, eps=cfg.eps)
        self.linear_fc1 = nn.Linear(wide, wide)
        self.linear_fc2 = nn.Linear(wide, cfg.out_hidden_size)

    def forward(self, x):  # x (N, D) in merge-block order -> (N/4, Do)
        wide = x.shape[-1] * self.unit
        x = self.norm(x.reshape(-1, wide)) if self.postshuffle_norm else self.norm(x).reshape(-1, wide)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))  # exact (erf) GELU in the mergers


class QwenPatchEmbed(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=kernel, stride=kernel)

    def forward(self, pv):  # pv (N, C*T*P*P): a Conv3d with kernel == stride is one matmul
        w = self.proj.weight
        return F.linear(pv.to(w.dtype), w.reshape(w.shape[0], -1), self.proj.bias)


def merge_block_order(h: int, w: int, m: int):
    """Raster index of every patch, listed in merge-block order (block row, block col, row in block, col in block)."""
    idx = torch.arange(h * w).view(h // m, m, w // m, m)
    return idx.permute(0, 2, 1, 3).reshape(-1)


class QwenVisionModel(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = QwenPatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.side = math.isqrt(cfg.num_position_embeddings)
        if self.side ** 2 != cfg.num_position_embeddings:
            raise CheckpointError(f"config.json: vision num_position_embeddings {cfg.num_position_embeddings} "
                                  "is not a perfect square")
        self.blocks = nn.ModuleList(QwenVisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = QwenPatchMerger(cfg, postshuffle_norm=False)
        self.deepstack_merger_list = nn.ModuleList(
            QwenPatchMerger(cfg, postshuffle_norm=True) for _ in cfg.deepstack_visual_indexes)

    def position_embedding(self, t: int, h: int, w: int):
        """Learned 2-D table resampled bilinearly (align_corners=True) to (h, w), in merge-block order. (t*h*w, D)"""
        D, s = self.cfg.hidden_size, self.side
        table = upcast(self.pos_embed.weight).T.reshape(1, D, s, s)
        grid = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)[0]  # (D, h, w)
        grid = grid.reshape(D, h * w).T[merge_block_order(h, w, self.cfg.spatial_merge_size)]
        return grid.repeat(t, 1)

    def rotary(self, t: int, h: int, w: int, device):
        """2-D axial rotary angles: first half of the frequencies follow the row, second half the column."""
        hd = self.cfg.hidden_size // self.cfg.num_heads
        inv = 1.0 / self.cfg.rope_theta ** (torch.arange(0, hd // 2, 2, dtype=torch.float32, device=device) / (hd // 2))
        order = merge_block_order(h, w, self.cfg.spatial_merge_size).to(device)
        row, col = (order // w).float(), (order % w).float()
        ang = torch.cat([row[:, None] * inv, col[:, None] * inv], dim=-1).repeat(t, 1)  # (t*h*w, hd/2)
        ang = torch.cat([ang, ang], dim=-1)[:, None, :]  # (N, 1, hd): broadcast over heads
        return ang.cos(), ang.sin()

    def forward(self, pixel_values, grid_thw):
        """pixel_values (N, C*T*P*P) in merge-block order; grid_thw (n_img, 3). Returns (N/4, Do) image features
        and the DeepStack features, one (N/4, Do) tensor per deepstack index."""
        grids = [tuple(int(v) for v in g) for g in grid_thw.tolist()]
        x = self.patch_embed(pixel_values)
        pos = torch.cat([self.position_embedding(t, h, w) for t, h, w in grids]).to(x.device)
        x = x + pos.to(x.dtype)
        ropes = [self.rotary(t, h, w, x.device) for t, h, w in grids]
        rope = (torch.cat([c for c, _ in ropes]), torch.cat([s for _, s in ropes]))
        seqlens = [h * w for t, h, w in grids for _ in range(t)]  # one attention segment per frame
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, rope, seqlens)
            if i in self.cfg.deepstack_visual_indexes:
                deepstack.append(self.deepstack_merger_list[self.cfg.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), deepstack


# ----------------------------------------------------------------------------------------------------------
# Qwen3-VL-MoE language model (docs/architectures.md §1.5-1.7).


class QwenAttention(nn.Module):
    """GQA with per-head RMSNorm on q and k (before RoPE)."""

    def __init__(self, cfg: QwenTextConfig, layer: int):
        super().__init__()
        self.layer, self.nh, self.nkv, self.hd = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(H, self.nh * self.hd, bias=bias)
        self.k_proj = nn.Linear(H, self.nkv * self.hd, bias=bias)
        self.v_proj = nn.Linear(H, self.nkv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.nh * self.hd, H, bias=bias)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x, ctx: DecoderInputs):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.nh, self.hd)).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, self.nkv, self.hd)).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        cos, sin = ctx.rope  # (B, 1, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer, k, v)
        o = decoder_attention(self, q, k, v, scale=self.hd ** -0.5, mask=ctx.mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class QwenRouter(nn.Module):
    """Softmax over all experts (fp32), top-k, renormalize, cast back to the activation dtype."""

    def __init__(self, cfg: QwenTextConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))

    def forward(self, x):  # x (N, D) -> topk_idx (N, k), topk_w (N, k), probs (N, E) fp32
        probs = torch.softmax(upcast(F.linear(x, self.weight)), dim=-1)
        topk_p, topk_idx = torch.topk(probs, self.top_k, dim=-1)
        topk_w = (topk_p / topk_p.sum(-1, keepdim=True)).to(x.dtype)
        return topk_idx, topk_w, probs


class QwenMoE(nn.Module):
    def __init__(self, cfg: QwenTextConfig):
        super().__init__()
        self.gate = QwenRouter(cfg)
        self.experts = nn.ModuleList(SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.num_experts))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        topk_idx, topk_w, _ = self.gate(x)
        return run_experts(self.experts, x, topk_idx, topk_w).view(shape)


class _QwenInner(nn.Module):
    """Holds `visual` and `language_model` so parameter names equal the checkpoint's `model.*` keys."""

    def __init__(self, cfg: Qwen3VLMoeConfig):
        super().__init__()
        self.visual = QwenVisionModel(cfg.vision)
        self.language_model = text_model(cfg.text, QwenAttention, QwenMoE)


def mrope_position_ids(input_ids, image_grid_thw, attention_mask, image_token_id: int, merge: int):
    """(3, B, T) position ids (rows T, H, W) and rope_deltas (B,). Text tokens advance all three rows by one;
    an image run of lh x lw merged tokens gets (cur, cur + r, cur + c) and advances cur by max(lh, lw).
    Padding (attention_mask == 0) is skipped; its positions are left at 0."""
    B, T = input_ids.shape
    pos = torch.zeros(3, B, T, dtype=torch.long, device=input_ids.device)
    deltas = torch.zeros(B, dtype=torch.long, device=input_ids.device)
    grids = iter(image_grid_thw.tolist()) if image_grid_thw is not None else iter(())
    for b in range(B):
        keep = attention_mask[b].bool() if attention_mask is not None else torch.ones(T, dtype=torch.bool)
        ids = input_ids[b][keep].tolist()
        rows, cur, i = [], 0, 0
        while i < len(ids):
            if ids[i] != image_token_id:
                rows.append(torch.full((3, 1), cur))
                cur, i = cur + 1, i + 1
                continue
            t, h, w = next(grids)
            lh, lw = h // merge, w // merge
            rr, cc = torch.meshgrid(torch.arange(lh), torch.arange(lw), indexing="ij")
            rows.append(torch.stack([torch.zeros(lh * lw, dtype=torch.long), rr.flatten(), cc.flatten()]) + cur)
            cur, i = cur + max(lh, lw), i + t * lh * lw
        p = torch.cat(rows, dim=1) if rows else torch.zeros(3, 0, dtype=torch.long)
        pos[:, b, keep.to(pos.device)] = p.to(pos.device)
        deltas[b] = (int(p.max()) + 1 if p.numel() else 0) - len(ids)
    return pos, deltas


class Qwen3VLMoeModel(MoEVLM):
    """Qwen3-VL-MoE. `forward(input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None)`
    returns logits (B, T, V) in fp32. The forward is split into `embed` -> `layers` -> `head` so the
    quantizer can run the decoder one layer at a time."""

    family = "qwen3_vl_moe"
    fused_experts = True  # the Hub checkpoint stores each layer's experts as two fused 3-D tensors

    def __init__(self, cfg: Qwen3VLMoeConfig):
        super().__init__()
        self.cfg = cfg
        self.model = _QwenInner(cfg)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.language_model.layers

    @staticmethod
    def layer_prefix(i: int) -> str:
        return f"model.language_model.layers.{i}."

    def vision_blocks(self) -> nn.ModuleList:
        return self.model.visual.blocks

    def vision_modules(self) -> list[nn.Module]:
        """Everything that turns pixels into decoder inputs (what --quantize-vision quantizes)."""
        return [self.model.visual]

    def scaling_groups(self, i: int) -> list[tuple[str, list[str], str | None]]:
        """(producer, consumer linears, router or None) of decoder layer i, names relative to the layer: where a
        per-channel scale can be folded into the producer (a norm or a linear's output rows) exactly."""
        layer = self.layers[i]
        mlp, router = mlp_readers(layer)
        return [("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], None),
                ("post_attention_layernorm", mlp, router)] + swiglu_groups(layer)

    # -- rotary ------------------------------------------------------------------------------------------
    def text_rope(self, position_ids, dtype):
        """Interleaved M-RoPE. position_ids (3, B, T) -> cos, sin (B, 1, T, hd) in the activation dtype.
        Frequency j uses the H row if j % 3 == 1 (j < 3*sec[1]), the W row if j % 3 == 2 (j < 3*sec[2]),
        else the T row."""
        c = self.cfg.text
        inv = 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32,
                                                  device=position_ids.device) / c.head_dim)
        f = position_ids[..., None].float() * inv  # (3, B, T, hd/2)
        freqs = f[0].clone()
        for axis, offset in ((1, 1), (2, 2)):
            sl = slice(offset, 3 * c.mrope_section[axis], 3)
            freqs[..., sl] = f[axis][..., sl]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    # -- forward pieces ----------------------------------------------------------------------------------
    def embed(self, input_ids, attention_mask=None, cache=None, pixel_values=None, image_grid_thw=None):
        """Token embeddings with image features scattered in, plus the per-forward DecoderInputs."""
        lm = self.model.language_model
        x = lm.embed_tokens(input_ids)
        B, T = input_ids.shape
        is_img = input_ids == self.cfg.image_token_id
        if (input_ids == self.cfg.video_token_id).any():
            raise ValueError(f"the prompt contains video tokens (id {self.cfg.video_token_id}); video inputs are "
                             "not supported by this implementation")
        past = cache.length if cache is not None else 0
        ctx_extra = {}
        if pixel_values is not None:
            if image_grid_thw is None:
                raise ValueError("pixel_values given without image_grid_thw")
            feats, deepstack = self.model.visual(pixel_values, image_grid_thw)
            if int(is_img.sum()) != feats.shape[0]:
                raise ValueError(f"the prompt has {int(is_img.sum())} image tokens (id {self.cfg.image_token_id}) "
                                 f"but image_grid_thw gives {feats.shape[0]} image features")
            x = x.masked_scatter(is_img[..., None], feats.to(x.dtype))
            ctx_extra = dict(visual_pos_masks=is_img, deepstack=[d.to(x.dtype) for d in deepstack])
        elif is_img.any() and past == 0:
            raise ValueError("the prompt contains image tokens but no pixel_values were given")
        if past == 0:
            pos, deltas = mrope_position_ids(input_ids, image_grid_thw if pixel_values is not None else None,
                                             attention_mask, self.cfg.image_token_id,
                                             self.cfg.vision.spatial_merge_size)
            if cache is not None:
                cache.extra["rope_deltas"] = deltas
        else:  # decode step: plain positions shifted by the prompt's rope delta
            deltas = cache.extra["rope_deltas"]
            pos = (torch.arange(past, past + T, device=x.device)[None] + deltas[:, None].to(x.device))
            pos = pos[None].expand(3, B, T)
        ctx = DecoderInputs(rope=self.text_rope(pos.to(x.device), x.dtype),
                            mask=causal_mask(attention_mask, T, past, x.dtype, x.device),
                            attention_mask=attention_mask, cache=cache, **ctx_extra)
        return x, ctx

    def after_layer(self, i: int, x, ctx: DecoderInputs):
        """DeepStack: add the i-th vision feature set at the image positions after decoder layer i."""
        if i < len(ctx.deepstack):
            x = x.clone()
            x[ctx.visual_pos_masks] = x[ctx.visual_pos_masks] + ctx.deepstack[i]
        return x

    def head(self, x):
        return self.lm_head(self.model.language_model.norm(x)).float()



MODELS: dict[str, type] = {"qwen3_vl_moe": Qwen3VLMoeModel}


# ----------------------------------------------------------------------------------------------------------
# Kimi-VL configs (docs/architectures.md §2.1). The Hub config.json is the remote-code layout: `text_config` is a
# DeepseekV3Config (rope_theta + rope_scaling), `vision_config` a MoonViT config (init_pos_emb_height/width).
# The transformers-5 spellings (rope_parameters, num_local_experts, pos_emb_height/width) are accepted too.


@dataclass
class MoonViTConfig:
    patch_size: int
    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    intermediate_size: int
    pos_emb_height: int
    pos_emb_width: int
    merge_kernel_size: tuple[int, int] = (2, 2)
    in_channels: int = 3
    rope_theta: float = 10000.0  # not a config field: hard-coded in MoonViT (§2.1)
    eps: float = 1e-5  # not a config field: torch's LayerNorm default, in the tower and the projector

    @classmethod
    def from_dict(cls, d: dict) -> "MoonViTConfig":
        kernel = tuple(d.get("merge_kernel_size") or (2, 2))
        if len(kernel) != 2:
            raise CheckpointError(f"config.json: vision merge_kernel_size {kernel} must have two entries")
        return cls(
            patch_size=d["patch_size"], hidden_size=d["hidden_size"],
            num_attention_heads=_pick(d, "num_attention_heads", "num_heads"),
            num_hidden_layers=_pick(d, "num_hidden_layers", "depth"), intermediate_size=d["intermediate_size"],
            pos_emb_height=_pick(d, "init_pos_emb_height", "pos_emb_height"),
            pos_emb_width=_pick(d, "init_pos_emb_width", "pos_emb_width"), merge_kernel_size=kernel,
        )


@dataclass
class KimiTextConfig:
    """DeepSeek-V3 style LLM: MLA attention, `first_k_dense_replace` dense layers, then sigmoid-routed MoE."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    routed_scaling_factor: float
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    moe_layer_freq: int
    norm_topk_prob: bool
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool = False
    lora_norm_eps: float = 1e-6  # not a config field: q_a/kv_a_layernorm keep RMSNorm's default eps (§2.5)

    @classmethod
    def from_dict(cls, d: dict) -> "KimiTextConfig":
        theta, rope = _rope_fields(d, 10000.0)
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise CheckpointError(f"config.json: text rope scaling {rope} is not supported (Kimi-VL uses none)")
        for name, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("hidden_act", "silu")):
            if d.get(name, want) != want:
                raise CheckpointError(f"config.json: text_config.{name}={d[name]!r} is not supported "
                                      f"(only {want!r}, as in Kimi-VL)")
        c = cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            moe_intermediate_size=d["moe_intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            n_routed_experts=_pick(d, "n_routed_experts", "num_local_experts", default=0),
            n_shared_experts=d.get("n_shared_experts") or 0, num_experts_per_tok=d["num_experts_per_tok"],
            routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)), kv_lora_rank=d["kv_lora_rank"],
            q_lora_rank=d.get("q_lora_rank"), qk_nope_head_dim=d["qk_nope_head_dim"],
            qk_rope_head_dim=d["qk_rope_head_dim"], v_head_dim=d["v_head_dim"], n_group=d.get("n_group") or 1,
            topk_group=d.get("topk_group") or 1, first_k_dense_replace=d.get("first_k_dense_replace") or 0,
            moe_layer_freq=d.get("moe_layer_freq") or 1, norm_topk_prob=bool(d.get("norm_topk_prob", True)),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=theta,
            attention_bias=bool(d.get("attention_bias", False)),
        )
        if c.n_routed_experts % c.n_group or not 1 <= c.topk_group <= c.n_group:
            raise CheckpointError(f"config.json: n_routed_experts {c.n_routed_experts} must split into n_group "
                                  f"{c.n_group} equal groups, and 1 <= topk_group {c.topk_group} <= n_group")
        return c

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe(self, layer: int) -> bool:
        return (self.n_routed_experts > 0 and layer >= self.first_k_dense_replace
                and layer % self.moe_layer_freq == 0)


@dataclass
class KimiVLConfig:
    text: KimiTextConfig
    vision: MoonViTConfig
    media_placeholder_token_id: int = 163605
    model_type: str = "kimi_vl"

    @classmethod
    def from_dict(cls, d: dict) -> "KimiVLConfig":
        return cls(text=KimiTextConfig.from_dict(d["text_config"]), vision=MoonViTConfig.from_dict(d["vision_config"]),
                   media_placeholder_token_id=_pick(d, "media_placeholder_token_id", "image_token_id",
                                                    default=163605))


CONFIGS["kimi_vl"] = KimiVLConfig


# ----------------------------------------------------------------------------------------------------------
# MoonViT, the Kimi-VL vision tower (docs/architectures.md §2.3). Shapes: L patches of all images packed in raster
# order, D width, nh heads, hd head dim; (h, w) an image's grid in patches.


def moonvit_rope(h: int, w: int, head_dim: int, theta: float, device):
    """cis(angle) per complex pair, (h*w, hd/2) complex64 in raster order. With freq_i = theta^(-4i/hd),
    pair 2i turns by col*freq_i and pair 2i+1 by row*freq_i (col = width index: the code, not its docstring)."""
    freq = 1.0 / theta ** (torch.arange(0, head_dim, 4, dtype=torch.float32, device=device)[: head_dim // 4] / head_dim)
    row, col = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                              torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    ang = torch.stack([col.reshape(-1, 1) * freq, row.reshape(-1, 1) * freq], dim=-1)  # (h*w, hd/4, 2)
    ang = ang.reshape(h * w, head_dim // 2)
    return torch.polar(torch.ones_like(ang), ang)


def apply_complex_rope(x, cis):
    """Rotate consecutive pairs (x[2j], x[2j+1]) as complex numbers by cis[:, j]; fp32 inside, cast back.
    x (L, nh, hd), cis (L, hd/2)."""
    xc = torch.view_as_complex(upcast(x).reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * cis[:, None]).flatten(-2).to(x.dtype)


class MoonViTPosEmb(nn.Module):
    """Learned (H0, W0, D) absolute position table, resampled bicubically (align_corners=False) to each grid."""

    def __init__(self, cfg: MoonViTConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.pos_emb_height, cfg.pos_emb_width, cfg.hidden_size))

    def forward(self, h: int, w: int):  # -> (h*w, D) in raster order, fp32
        table = upcast(self.weight)
        if (h, w) != tuple(table.shape[:2]):
            table = F.interpolate(table.permute(2, 0, 1)[None], size=(h, w), mode="bicubic",
                                  align_corners=False)[0].permute(1, 2, 0)
        return table.reshape(h * w, -1)


class MoonViTPatchEmbed(nn.Module):
    def __init__(self, cfg: MoonViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_emb = MoonViTPosEmb(cfg)

    def forward(self, pixel_values, grids):  # pixel_values (L, 3, P, P) -> (L, D)
        x = self.proj(pixel_values.to(self.proj.weight.dtype)).flatten(1)
        pos = torch.cat([self.pos_emb(h, w) for h, w in grids])
        return x + pos.to(x.dtype)


class MoonViTMLP(nn.Module):
    def __init__(self, cfg: MoonViTConfig):
        super().__init__()
        self.fc0 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc1 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc1(gelu_tanh(self.fc0(x)))


class MoonViTBlock(nn.Module):
    """Pre-LN block: x += wo(attn(norm0(x))); x += mlp(norm1(x)). wqkv rows are q | k | v, head-major, with the
    rope dims of q and k in interleaved complex pairs."""

    def __init__(self, cfg: MoonViTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.nh, self.hd = cfg.num_attention_heads, D // cfg.num_attention_heads
        self.norm0 = nn.LayerNorm(D, eps=cfg.eps)
        self.norm1 = nn.LayerNorm(D, eps=cfg.eps)
        self.wqkv = nn.Linear(D, 3 * D)
        self.wo = nn.Linear(D, D)
        self.mlp = MoonViTMLP(cfg)

    def attn(self, x, cis, seqlens):
        q, k, v = self.wqkv(x).view(x.shape[0], 3, self.nh, self.hd).unbind(1)  # each (L, nh, hd)
        q, k = apply_complex_rope(q, cis), apply_complex_rope(k, cis)
        return self.wo(block_diagonal_attention(q, k, v, seqlens, scale=self.hd ** -0.5))

    def forward(self, x, cis, seqlens):
        x = x + self.attn(self.norm0(x), cis, seqlens)
        return x + self.mlp(self.norm1(x))


class MoonViTEncoder(nn.Module):
    def __init__(self, cfg: MoonViTConfig):
        super().__init__()
        self.blocks = nn.ModuleList(MoonViTBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)

    def forward(self, x, cis, seqlens):
        for block in self.blocks:
            x = block(x, cis, seqlens)
        return self.final_layernorm(x)


class MoonViT(nn.Module):
    def __init__(self, cfg: MoonViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = MoonViTPatchEmbed(cfg)
        self.encoder = MoonViTEncoder(cfg)

    def check_inputs(self, pixel_values, grids):
        c = self.cfg
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (c.in_channels, c.patch_size, c.patch_size):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}, expected (L, {c.in_channels}, "
                             f"{c.patch_size}, {c.patch_size}) (Kimi-VL patches in raster order)")
        if sum(h * w for h, w in grids) != pixel_values.shape[0]:
            raise ValueError(f"image_grid_hws {grids} covers {sum(h * w for h, w in grids)} patches but "
                             f"pixel_values has {pixel_values.shape[0]}")
        kh, kw = c.merge_kernel_size
        if any(h % kh or w % kw for h, w in grids):
            raise ValueError(f"image_grid_hws {grids}: every grid side must be a multiple of merge_kernel_size "
                             f"{c.merge_kernel_size}; pad images to multiples of {kh * c.patch_size} px "
                             "(the processor does)")

    def forward(self, pixel_values, image_grid_hws):
        """pixel_values (L, 3, P, P), image_grid_hws (n, 2) rows (h, w). Returns (L/4, 4, D): each image's 2x2
        patch groups (order (0,0), (0,1), (1,0), (1,1)), images concatenated."""
        grids = [(int(h), int(w)) for h, w in image_grid_hws.tolist()]
        self.check_inputs(pixel_values, grids)
        x = self.patch_embed(pixel_values, grids)
        hd = self.cfg.hidden_size // self.cfg.num_attention_heads
        cis = torch.cat([moonvit_rope(h, w, hd, self.cfg.rope_theta, x.device) for h, w in grids])
        seqlens = [h * w for h, w in grids]
        x = self.encoder(x, cis, seqlens)
        kh, kw = self.cfg.merge_kernel_size
        groups = [xs.view(h // kh, kh, w // kw, kw, -1).permute(0, 2, 1, 3, 4).reshape(-1, kh * kw, xs.shape[-1])
                  for (h, w), xs in zip(grids, x.split(seqlens))]
        return torch.cat(groups)


class KimiProjector(nn.Module):
    """LayerNorm per patch (before the 4-way concat), then linear -> exact GELU -> linear into the LLM width."""

    def __init__(self, cfg: KimiVLConfig):
        super().__init__()
        v = cfg.vision
        wide = v.hidden_size * v.merge_kernel_size[0] * v.merge_kernel_size[1]
        self.pre_norm = nn.LayerNorm(v.hidden_size, eps=v.eps)
        self.linear_1 = nn.Linear(wide, wide)
        self.linear_2 = nn.Linear(wide, cfg.text.hidden_size)

    def forward(self, groups):  # (N, 4, D) -> (N, H)
        x = self.pre_norm(groups).reshape(groups.shape[0], -1)
        return self.linear_2(F.gelu(self.linear_1(x)))


# ----------------------------------------------------------------------------------------------------------
# Kimi-VL language model: DeepSeek-V3 style (docs/architectures.md §2.5). MLA symbols as in the DeepSeek-V2 paper:
# c = the compressed kv latent (kv_lora_rank), q/k = [nope | rope] parts, k_pe one rope key shared by all heads.


def deinterleave(x):
    """(x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...) over the last dim: DeepSeek stores the rope dims as
    interleaved pairs; after this the NeoX rotate_half rope applies."""
    return x.unflatten(-1, (x.shape[-1] // 2, 2)).transpose(-1, -2).flatten(-2)


class MLAttention(nn.Module):
    """Multi-head latent attention. The cache keeps the expanded per-head k (nope|rope) and v."""

    def __init__(self, cfg: KimiTextConfig, layer: int):
        super().__init__()
        self.layer, self.nh, self.cfg = layer, cfg.num_attention_heads, cfg
        H, bias = cfg.hidden_size, cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(H, self.nh * cfg.qk_head_dim, bias=False)
        else:  # low-rank query: q = q_b(RMS(q_a(x)))
            self.q_a_proj = nn.Linear(H, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.lora_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.nh * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.lora_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, self.nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.nh * cfg.v_head_dim, H, bias=bias)

    def forward(self, x, ctx: DecoderInputs):
        c, (B, T, _) = self.cfg, x.shape
        q = self.q_proj(x) if c.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(B, T, self.nh, c.qk_head_dim).transpose(1, 2).split(
            [c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)  # (B, nh, T, dn), (B, nh, T, dr)
        ckv, k_pe = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(ckv)).view(B, T, self.nh, c.qk_nope_head_dim + c.v_head_dim)
        k_nope, v = kv.transpose(1, 2).split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        cos, sin = ctx.rope  # (B, 1, T, dr)
        q_pe = apply_rope(deinterleave(q_pe), cos, sin)
        k_pe = apply_rope(deinterleave(k_pe[:, None]), cos, sin)  # (B, 1, T, dr): one rope key for all heads
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, nh, T, dn + dr)
        k = torch.cat([k_nope, k_pe.expand(B, self.nh, T, c.qk_rope_head_dim)], dim=-1)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer, k, v)
        o = decoder_attention(self, q, k, v, scale=c.qk_head_dim ** -0.5, mask=ctx.mask)  # (B, nh, T, dv)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.nh * c.v_head_dim))


class KimiRouter(nn.Module):
    """DeepSeek-V3 `noaux_tc` routing, all in fp32: s = sigmoid(x W^T); the correction bias b shifts s only to
    *choose* experts (group-limited: keep the topk_group groups with the largest sum of their top-2 s + b, then
    top-k of s + b inside them); the chosen experts are weighted by their unbiased s, renormalized to sum to 1,
    times routed_scaling_factor. Returns topk_idx (N, k), topk_w (N, k) fp32, s (N, E) fp32."""

    def __init__(self, cfg: KimiTextConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts))

    def forward(self, x):  # x (N, H)
        c = self.cfg
        s = torch.sigmoid(F.linear(upcast(x), upcast(self.weight)))  # (N, E)
        choice = s + upcast(self.e_score_correction_bias)
        if c.topk_group < c.n_group:
            per_group = choice.view(x.shape[0], c.n_group, -1)  # (N, G, E/G)
            group_score = per_group.topk(min(2, per_group.shape[-1]), dim=-1).values.sum(-1)  # (N, G)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(c.topk_group, dim=-1).indices, True)
            choice = per_group.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        topk_idx = choice.topk(c.num_experts_per_tok, dim=-1).indices
        topk_w = s.gather(1, topk_idx)
        if c.norm_topk_prob and c.num_experts_per_tok > 1:
            topk_w = topk_w / (topk_w.sum(-1, keepdim=True) + 1e-20)
        return topk_idx, topk_w * c.routed_scaling_factor, s


class KimiMoE(nn.Module):
    """Routed experts (per-expert SwiGLU, run by run_experts) plus always-on shared experts (unscaled)."""

    def __init__(self, cfg: KimiTextConfig):
        super().__init__()
        self.gate = KimiRouter(cfg)
        self.experts = nn.ModuleList(SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.n_routed_experts))
        self.shared_experts = (SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        topk_idx, topk_w, _ = self.gate(x)
        y = run_experts(self.experts, x, topk_idx, topk_w)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)


class KimiLanguageModel(nn.Module):
    """`language_model.model.*` and `language_model.lm_head`, as in the checkpoint."""

    def __init__(self, cfg: KimiTextConfig):
        super().__init__()
        self.model = text_model(cfg, MLAttention, KimiMoE)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


def text_position_ids(attention_mask, past: int, T: int, device):
    """(B or 1, T) positions of the new tokens: plain past..past+T-1, or with padding cumsum(mask)-1, so a
    left-padded row gets the positions it would have unpadded. The mask must cover cached + new tokens."""
    if attention_mask is None:
        return torch.arange(past, past + T, device=device)[None]
    if attention_mask.shape[1] != past + T:
        raise ValueError(f"attention_mask has length {attention_mask.shape[1]}, expected cached + new tokens = "
                         f"{past + T}")
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:].to(device)


class KimiVLModel(MoEVLM):
    """Kimi-VL. `forward(input_ids, pixel_values=None, image_grid_hws=None, attention_mask=None)` returns logits
    (B, T, V) in fp32. pixel_values (L, 3, 14, 14) in raster order, image_grid_hws (n_images, 2)."""

    family = "kimi_vl"
    keep_fp32 = ("weight_scale", "e_score_correction_bias")  # routing bias stays fp32 in every model dtype (as in transformers)

    def __init__(self, cfg: KimiVLConfig):
        super().__init__()
        self.cfg = cfg
        self.language_model = KimiLanguageModel(cfg.text)
        self.vision_tower = MoonViT(cfg.vision)
        self.multi_modal_projector = KimiProjector(cfg)

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.model.layers

    @staticmethod
    def layer_prefix(i: int) -> str:
        return f"language_model.model.layers.{i}."

    def vision_blocks(self) -> nn.ModuleList:
        return self.vision_tower.encoder.blocks

    def vision_modules(self) -> list[nn.Module]:
        """Everything that turns pixels into decoder inputs (what --quantize-vision quantizes)."""
        return [self.vision_tower, self.multi_modal_projector]

    def scaling_groups(self, i: int) -> list[tuple[str, list[str], str | None]]:
        """(producer, consumer linears, router or None) of decoder layer i, names relative to the layer."""
        layer = self.layers[i]
        q_in = "self_attn.q_a_proj" if self.cfg.text.q_lora_rank else "self_attn.q_proj"
        groups = [("input_layernorm", [q_in, "self_attn.kv_a_proj_with_mqa"], None),
                  ("self_attn.kv_a_layernorm", ["self_attn.kv_b_proj"], None)]
        if self.cfg.text.q_lora_rank:
            groups.append(("self_attn.q_a_layernorm", ["self_attn.q_b_proj"], None))
        mlp, router = mlp_readers(layer)
        return groups + [("post_attention_layernorm", mlp, router)] + swiglu_groups(layer)

    def text_rope(self, position_ids, dtype):
        """position_ids (B, T) -> cos, sin (B, 1, T, dr) over the rope dims, in the activation dtype."""
        c = self.cfg.text
        inv = 1.0 / c.rope_theta ** (torch.arange(0, c.qk_rope_head_dim, 2, dtype=torch.float32,
                                                  device=position_ids.device) / c.qk_rope_head_dim)
        f = position_ids[..., None].float() * inv  # (B, T, dr/2)
        emb = torch.cat([f, f], dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def image_features(self, pixel_values, image_grid_hws):
        """(sum h*w/4, H): MoonViT -> 2x2 groups -> projector."""
        return self.multi_modal_projector(self.vision_tower(pixel_values, image_grid_hws))

    def embed(self, input_ids, attention_mask=None, cache=None, pixel_values=None, image_grid_hws=None):
        """Token embeddings with image features written over the media placeholders, plus DecoderInputs."""
        x = self.language_model.model.embed_tokens(input_ids)
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        is_img = input_ids == self.cfg.media_placeholder_token_id
        extra = {}
        if pixel_values is not None:
            if image_grid_hws is None:
                raise ValueError("pixel_values given without image_grid_hws")
            feats = self.image_features(pixel_values, image_grid_hws)
            if int(is_img.sum()) != feats.shape[0]:
                raise ValueError(f"the prompt has {int(is_img.sum())} media tokens (id "
                                 f"{self.cfg.media_placeholder_token_id}) but image_grid_hws gives "
                                 f"{feats.shape[0]} image features")
            x = x.masked_scatter(is_img[..., None], feats.to(x.dtype))
            extra["visual_pos_masks"] = is_img
        elif is_img.any() and past == 0:
            raise ValueError("the prompt contains media tokens but no pixel_values were given")
        pos = text_position_ids(attention_mask, past, T, x.device)
        ctx = DecoderInputs(rope=self.text_rope(pos, x.dtype), mask=causal_mask(attention_mask, T, past, x.dtype,
                                                                                x.device),
                            attention_mask=attention_mask, cache=cache, **extra)
        return x, ctx

    def after_layer(self, i: int, x, ctx: DecoderInputs):
        return x  # no DeepStack in Kimi-VL

    def head(self, x):
        lm = self.language_model
        return lm.lm_head(lm.model.norm(x)).float()


MODELS["kimi_vl"] = KimiVLModel


# ----------------------------------------------------------------------------------------------------------
# Packed quantized weights: the compressed-tensors `pack-quantized` layout, run by dequantizing on the fly.
# Codes are unsigned b-bit integers (compressed-tensors' signed codes + 2^(b-1)); Ŵ = scale · (code - zero) per
# output row and group of `group_size` input columns (gptq.py computes them). Packing: the codes of one row form
# a little-endian bit stream (code i at bits [i·b, (i+1)·b)) cut into int32 words, ceil(n·b/32) words per row.
# For b = 2, 4, 8 that is 32/b whole codes per word, the layout vLLM loads. For b = 3, 32 codes fill 3 words
# and a code may straddle two words: the dense layout compressed-tensors >= 0.20 writes and reads (checked in
# tests/test_gptq.py); vLLM's kernels do not run 3-bit weights, so 3-bit checkpoints load here only.

PACK_BITS = (2, 3, 4, 8)
_WORD_BITS = 32
_WORD_MASK = (1 << _WORD_BITS) - 1


def _bit_positions(n: int, bits: int, device):
    """Word index and bit shift (n,) of each of n codes in a row's bit stream."""
    start = torch.arange(n, device=device, dtype=torch.int64) * bits
    return start // _WORD_BITS, start % _WORD_BITS


def _check_pack_bits(bits: int):
    if bits not in PACK_BITS:
        raise ValueError(f"packing: bits={bits} is not supported; use one of {PACK_BITS}")


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer codes (..., n), each < 2^bits, along the last dim into int32 (..., ceil(n·bits/32))."""
    _check_pack_bits(bits)
    n = codes.shape[-1]
    v = codes.reshape(-1, n).to(torch.int64)  # (rows, n)
    if codes.is_floating_point() or bool(((v < 0) | (v >= 2**bits)).any()):
        raise ValueError(f"pack_int32: codes must be integers in [0, {2**bits - 1}] for bits={bits}")
    n_words = math.ceil(n * bits / _WORD_BITS)
    word, shift = _bit_positions(n, bits, codes.device)
    v = v << shift  # < 2^39, so each code spans at most two words
    words = torch.zeros(v.shape[0], n_words + 1, dtype=torch.int64, device=codes.device)
    words.index_add_(1, word, v & _WORD_MASK)  # the low part, in the code's own word
    words.index_add_(1, word + 1, v >> _WORD_BITS)  # the part that spills into the next word (bits never overlap)
    words = words[:, :n_words]
    words = torch.where(words > _WORD_MASK >> 1, words - (1 << _WORD_BITS), words)  # as signed 32-bit
    return words.to(torch.int32).reshape(*codes.shape[:-1], n_words)


def unpack_int32(packed: torch.Tensor, bits: int, shape) -> torch.Tensor:
    """Inverse of pack_int32: int32 (..., ceil(n·bits/32)) -> uint8 codes of the original `shape` (..., n)."""
    _check_pack_bits(bits)
    shape = tuple(int(s) for s in shape)
    n, n_words = shape[-1], math.ceil(shape[-1] * bits / _WORD_BITS)
    if packed.dtype != torch.int32 or packed.shape[-1] != n_words or packed.shape[:-1] != shape[:-1]:
        raise ValueError(f"unpack_int32: packed {packed.dtype} {tuple(packed.shape)} does not hold {shape} at "
                         f"{bits} bits (expected int32 (..., {n_words}))")
    if _WORD_BITS % bits == 0:  # 2, 4, 8 bits: whole codes per word, code j at bits [j·bits, (j+1)·bits)
        shifts = torch.arange(0, _WORD_BITS, bits, device=packed.device, dtype=torch.int32)
        v = (packed.reshape(-1, n_words, 1) >> shifts) & ((1 << bits) - 1)  # the mask drops the sign fill
        return v.reshape(-1, n_words * len(shifts))[:, :n].to(torch.uint8).reshape(shape)
    p = packed.reshape(-1, n_words).to(torch.int64) & _WORD_MASK  # (rows, n_words) as unsigned words
    p = F.pad(p, (0, 1))  # a zero word at the end, so every code has a "next word"
    word, shift = _bit_positions(n, bits, packed.device)
    v = ((p[:, word] | (p[:, word + 1] << _WORD_BITS)) >> shift) & ((1 << bits) - 1)  # (rows, n)
    return v.to(torch.uint8).reshape(shape)


def fake_quant_act(x: torch.Tensor, *, bits: int = 8) -> torch.Tensor:
    """Per-token dynamic symmetric fake quantization of activations x (..., d), as vLLM's dynamic int8 path:
    s = max|x| / (2^(bits-1) - 1) per token, x̂ = round(x / s) · s with codes in ±(2^(bits-1) - 1) (-2^(bits-1)
    is never produced, since |x| <= max|x|). Computed in float32, returned in x's dtype. Same math as
    ecs.fake_quant_act, which the scale search uses on (n, d) tensors without importing this file."""
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True) / qmax  # (..., 1)
    s = torch.where(s == 0, torch.ones_like(s), s)  # an all-zero token: any scale gives zeros back
    return (torch.clamp(torch.round(xf / s), -qmax, qmax) * s).to(x.dtype)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    """A Parameter without grad: the loader (`assign`) swaps Parameters, whatever their dtype."""
    return nn.Parameter(t, requires_grad=False)


def _expand_groups(t: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """Per-group (out, n_groups) -> per-column (out, in); group_size -1 means one group per row."""
    return t.repeat_interleave(in_features if group_size == -1 else group_size, dim=1)[:, :in_features]


def quant_linear_forward(ql: "QuantLinear", x):
    """What a QuantLinear computes: optional per-token activation fake-quant, dequantize, F.linear."""
    if ql.abits is not None:
        x = fake_quant_act(x, bits=ql.abits)
    W = getattr(ql, "W_once", None)  # set by dequantize_once
    W = ql.dequantize() if W is None else W
    return F.linear(x, W.to(x.dtype), None if ql.bias is None else ql.bias.to(x.dtype))


@contextlib.contextmanager
def dequantize_once(module: nn.Module):
    """Inside the block, every QuantLinear of `module` uses its weight dequantized once on entry instead of on
    every forward (the same values): the quantization driver runs each finished layer over every calibration
    sample, and at 128 experts re-dequantizing per sample took ~60 s of a layer's ~200 s. Costs the float
    weights' memory while inside."""
    qls = [mod for mod in module.modules() if isinstance(mod, QuantLinear)]
    for ql in qls:
        ql.W_once = ql.dequantize()
    try:
        yield
    finally:
        for ql in qls:
            del ql.W_once


# The function every QuantLinear calls. `use_compiled_quant_linear()` swaps in a torch.compile'd version at the
# call site (the CLI's --compile); nothing compiled is stored in the modules or the checkpoint.
QUANT_LINEAR_FN = {"fn": quant_linear_forward}


COMPILE_GRAPHS = 64  # graphs torch.compile may build for quant_linear_forward


def use_compiled_quant_linear(enabled: bool = True):
    """Route every QuantLinear through torch.compile(quant_linear_forward), or back to the eager function.
    Dynamo specializes on each linear's int attributes (features, bits) and the input's rank, so a model needs
    more graphs than its default limit of 8; past the limit it would silently run the rest eager. The limit is
    raised to COMPILE_GRAPHS and hitting it raises instead."""
    if enabled:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_GRAPHS)
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    QUANT_LINEAR_FN["fn"] = torch.compile(quant_linear_forward, dynamic=True) if enabled else quant_linear_forward


class QuantLinear(nn.Module):
    """A bias-optional linear layer whose weight is stored packed and dequantized on every forward (plain torch
    ops, then F.linear). Tensors under compressed-tensors' names:
      weight_packed (out, ceil(in·bits/32)) int32; weight_scale (out, n_groups);
      weight_zero_point (ceil(out·bits/32), n_groups) int32, packed along the output dim (asymmetric only);
      weight_shape (2,) = (out, in).
    group_size -1 means one group per output row. abits: fake-quantize the inputs per token (fake_quant_act)."""

    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int, sym: bool,
                 abits: int | None = None, bias: bool = False, scale_dtype=torch.float32):
        super().__init__()
        _check_pack_bits(bits)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym, self.abits = bits, group_size, sym, abits
        g = in_features if group_size == -1 else group_size
        n_groups = math.ceil(in_features / g)
        self.weight_packed = _frozen(torch.zeros(out_features, math.ceil(in_features * bits / _WORD_BITS),
                                                 dtype=torch.int32))
        self.weight_scale = _frozen(torch.ones(out_features, n_groups, dtype=scale_dtype))
        self.weight_zero_point = None if sym else _frozen(
            torch.zeros(math.ceil(out_features * bits / _WORD_BITS), n_groups, dtype=torch.int32))
        self.weight_shape = _frozen(torch.tensor([out_features, in_features]))
        self.bias = _frozen(torch.zeros(out_features, dtype=scale_dtype)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_codes(cls, codes, scale, zero, *, bits: int, group_size: int, sym: bool, abits: int | None = None,
                   bias: torch.Tensor | None = None) -> "QuantLinear":
        """Build from unsigned codes (out, in), scale (out, n_groups) and zero (out, n_groups) (None iff sym),
        as gptq.rtn / gptq.gptq return them."""
        if (zero is None) != sym:
            raise ValueError(f"QuantLinear.from_codes: sym={sym} but zero is {'None' if zero is None else 'given'}"
                             " (symmetric weights have no zero point; asymmetric ones need one)")
        out_features, in_features = codes.shape
        m = cls(in_features, out_features, bits=bits, group_size=group_size, sym=sym, abits=abits,
                bias=bias is not None, scale_dtype=scale.dtype)
        if tuple(scale.shape) != tuple(m.weight_scale.shape):
            raise ValueError(f"QuantLinear.from_codes: scale {tuple(scale.shape)} does not match codes "
                             f"{tuple(codes.shape)} with group_size={group_size} (expected {tuple(m.weight_scale.shape)})")
        m.weight_packed.copy_(pack_int32(codes, bits))
        m.weight_scale.copy_(scale)
        if not sym:
            m.weight_zero_point.copy_(pack_int32(zero.T, bits).T)  # packed along the output dim
        if bias is not None:
            m.bias.copy_(bias)
        return m

    def dequantize(self) -> torch.Tensor:
        """Ŵ (out, in) = scale · (code - zero), in weight_scale's dtype."""
        out_f, in_f = self.out_features, self.in_features
        codes = unpack_int32(self.weight_packed, self.bits, (out_f, in_f))
        scale, n_groups = self.weight_scale, self.weight_scale.shape[1]  # (out, n_groups)
        if self.sym:
            zero = torch.full_like(scale, 2 ** (self.bits - 1))
        else:
            zero = unpack_int32(self.weight_zero_point.T, self.bits, (n_groups, out_f)).T.to(scale.dtype)
        g = in_f if self.group_size == -1 else self.group_size
        if in_f == n_groups * g:  # whole groups: (out, n_groups, g) views, no per-column copies of scale / zero
            w = codes.view(out_f, n_groups, g).to(scale.dtype)
            return ((w - zero[..., None]) * scale[..., None]).view(out_f, in_f)
        scale, zero = (_expand_groups(t, in_f, self.group_size) for t in (scale, zero))  # a ragged last group
        return (codes.to(scale.dtype) - zero) * scale

    def forward(self, x):
        return QUANT_LINEAR_FN["fn"](self, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, abits={self.abits}")


# ----------------------------------------------------------------------------------------------------------
# Loading: safetensors, strict, optionally one decoder layer at a time.


class Checkpoint:
    """Name -> file index over a checkpoint folder (`model.safetensors` or a sharded
    `model.safetensors.index.json`); tensors are read lazily with `safe_open`."""

    def __init__(self, checkpoint_dir: str):
        self.dir = checkpoint_dir
        index = os.path.join(checkpoint_dir, "model.safetensors.index.json")
        single = os.path.join(checkpoint_dir, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            files = ["model.safetensors"]
        else:
            raise CheckpointError(f"{checkpoint_dir}: no model.safetensors or model.safetensors.index.json found")
        self.where: dict[str, str] = {}
        self.handles = {}  # file -> open safe_open handle (a memory map), reopened after release()
        for name in files:
            if not os.path.isfile(os.path.join(checkpoint_dir, name)):
                raise CheckpointError(f"{os.path.join(checkpoint_dir, name)}: listed in the index but missing; "
                                      "re-download the shard")
            for key in self._handle(name).keys():
                self.where[key] = name

    def _handle(self, name: str):
        from safetensors import safe_open

        if name not in self.handles:
            path = os.path.join(self.dir, name)
            try:
                self.handles[name] = safe_open(path, framework="pt")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it may be truncated") from e
        return self.handles[name]

    def release(self):
        """Close the files' memory maps: the pages read so far stop counting in this process's resident memory
        (streaming reads every layer once; kept open, a 48-layer run would map the whole checkpoint)."""
        self.handles.clear()

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def keys(self):
        return self.where.keys()

    def get(self, key: str) -> torch.Tensor:
        name = self.where[key]
        try:
            return self._handle(name).get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{os.path.join(self.dir, name)}: cannot read tensor {key!r} ({e}); "
                                  "the file may be truncated") from e

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(self.where[key]).get_slice(key).get_shape())

    def get_expert(self, key: str, e: int) -> torch.Tensor:
        """Row e of a fused [E, ...] tensor, read without loading the other experts."""
        name = self.where[key]
        try:
            return self._handle(name).get_slice(key)[e]
        except Exception as e_:
            raise CheckpointError(f"{os.path.join(self.dir, name)}: cannot read expert {e} of {key!r} ({e_}); "
                                  "the file may be truncated") from e_


# Tensors present in real checkpoints that the forward pass does not use, skipped by name.
STALE_KEYS = [re.compile(r".*\.rotary_emb\.inv_freq$")]

# Per-expert names in our module tree, which may come from the Hub's fused 3-D tensors instead.
_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def resolve(ckpt: Checkpoint, key: str, shape: tuple[int, ...]) -> tuple[str, Callable[[], torch.Tensor]]:
    """Where parameter `key` (of `shape`) comes from: (checkpoint key, reader). Checks presence and shape from
    the file headers only, so a whole 60 GB checkpoint is validated without reading it.

    Per-expert weights are read either under their own names (`experts.{e}.gate_proj.weight`, the layout
    quantization toolkits write) or from the Hub's fused tensors: `gate_up_proj [E, H, 2I]` (columns [:I] gate,
    [I:] up, used as x @ W) and `down_proj [E, I, H]`."""
    if key in ckpt:
        if ckpt.shape(key) != tuple(shape):
            raise CheckpointError(f"{ckpt.dir}: tensor {key!r} has shape {ckpt.shape(key)}, expected {tuple(shape)} "
                                  "(does config.json match the weights?)")
        return key, lambda: ckpt.get(key)
    m = _EXPERT_KEY.match(key)
    fused = m and (f"{m.group(1)}.down_proj" if m.group(3) == "down_proj" else f"{m.group(1)}.gate_up_proj")
    if not m or fused not in ckpt:
        raise CheckpointError(f"{ckpt.dir}: tensor {key!r} is missing (expected shape {tuple(shape)})")
    e, proj, (out_f, in_f) = int(m.group(2)), m.group(3), shape
    E, a, b = ckpt.shape(fused)
    want = (in_f, out_f) if proj == "down_proj" else (in_f, 2 * out_f)
    if (a, b) != want or e >= E:
        raise CheckpointError(f"{ckpt.dir}: fused tensor {fused!r} has shape {(E, a, b)}, expected "
                              f"(>{e}, {want[0]}, {want[1]}) to provide {key!r}")

    def read():
        W = ckpt.get_expert(fused, e)  # (H, 2I) or (I, H), used as x @ W
        if proj == "down_proj":
            return W.T
        return (W[:, :out_f] if proj == "gate_proj" else W[:, out_f:]).T

    return fused, read


def checkpoint_state_dict(model: nn.Module, keys=None) -> dict[str, torch.Tensor]:
    """The model's weights (or only `keys`) under the family's on-disk names: the inverse of `resolve`. For the
    Qwen family float per-expert weights are fused back into the Hub layout (gate_up_proj [E, H, 2I],
    down_proj [E, I, H]); packed (quantized) experts keep their per-expert names."""
    sd = dict(model.state_dict())
    if keys is not None:
        sd = {k: sd[k] for k in keys}
    if not getattr(model, "fused_experts", False):
        return sd
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key in [k for k in sd if _EXPERT_KEY.match(k)]:
        m = _EXPERT_KEY.match(key)
        groups.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = sd.pop(key)
    for base, experts in groups.items():
        order = [experts[e] for e in range(len(experts))]
        sd[f"{base}.gate_up_proj"] = torch.stack([torch.cat([w["gate_proj"].T, w["up_proj"].T], 1) for w in order])
        sd[f"{base}.down_proj"] = torch.stack([w["down_proj"].T for w in order])
    return sd


def assign(model: nn.Module, key: str, t: torch.Tensor):
    """Replace the parameter at dotted path `key` by `t` (used to swap meta tensors for real ones and back)."""
    mod_name, _, name = key.rpartition(".")
    setattr(model.get_submodule(mod_name), name, nn.Parameter(t, requires_grad=False))


def quantization_settings(checkpoint_dir: str) -> dict | None:
    """QuantLinear arguments from a compressed-tensors `quantization_config` in config.json (None if absent).
    Every nn.Linear inside the decoder layers is packed; what stayed float is listed in its `ignore`."""
    with open(os.path.join(checkpoint_dir, "config.json")) as f:
        qc = json.load(f).get("quantization_config")
    if qc is None:
        return None
    where = f"{checkpoint_dir}/config.json: quantization_config"
    if qc.get("quant_method") != "compressed-tensors" or qc.get("format") != "pack-quantized":
        raise CheckpointError(f"{where}: only compressed-tensors pack-quantized checkpoints are supported")
    groups = list(qc.get("config_groups", {}).values())
    if len(groups) != 1:
        raise CheckpointError(f"{where}: expected one config group, found {len(groups)}")
    w, a = groups[0]["weights"], groups[0].get("input_activations")
    group_size = -1 if w.get("strategy") == "channel" else int(w["group_size"])
    return dict(bits=int(w["num_bits"]), group_size=group_size, sym=bool(w["symmetric"]),
                abits=None if a is None else int(a["num_bits"]),
                vision=bool(qc.get("moe_vlm_quant", {}).get("quantize_vision", False)))


def to_quant_shells(layer: nn.Module, *, bits: int, group_size: int, sym: bool, abits: int | None):
    """Replace every nn.Linear in `layer` by an empty QuantLinear of the same shape (filled by the loader)."""
    for name, lin in [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]:
        parent, _, attr = name.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, attr,
                QuantLinear(lin.in_features, lin.out_features, bits=bits, group_size=group_size, sym=sym,
                            abits=abits, bias=lin.bias is not None))


def load_model(checkpoint_dir: str, dtype=torch.float32, device="cpu", lazy_layers: bool = False):
    """Build the model of `checkpoint_dir/config.json` and load its safetensors strictly.

    dtype/device: where the weights live (fp32 on CPU; bf16 on GPU). With lazy_layers=True the decoder layers
    stay on the meta device (no memory); materialize one with `model.load_layer(i)` and drop it with
    `model.unload_layer(i)`. Every tensor of every layer is checked (presence, shape) up front; tensors in the
    checkpoint that no parameter uses are reported by name. Errors are CheckpointError naming file and tensor."""
    cfg = load_config(checkpoint_dir)
    ckpt = Checkpoint(checkpoint_dir)
    quant = quantization_settings(checkpoint_dir)
    with torch.device("meta"):
        model = MODELS[cfg.model_type](cfg)
        if quant is not None:
            vision = quant.pop("vision")
            for mod in list(model.layers) + (model.vision_modules() if vision else []):
                to_quant_shells(mod, **quant)
    model.eval().requires_grad_(False)
    model.bind(ckpt, dtype, device)
    used = {src for src, _ in model.sources.values()}
    unexpected = [k for k in ckpt.keys() if k not in used and not any(p.match(k) for p in STALE_KEYS)]
    if unexpected:
        shown = ", ".join(unexpected[:10]) + (f" ... ({len(unexpected)} in all)" if len(unexpected) > 10 else "")
        raise CheckpointError(f"{checkpoint_dir}: unexpected tensors not used by {cfg.model_type}: {shown}")
    layer_keys = {k for i in range(len(model.layers)) for k in model.layer_keys(i)}
    model.load_keys([k for k in model.sources if k not in layer_keys])
    ckpt.release()
    if not lazy_layers:
        for i in range(len(model.layers)):
            model.load_layer(i)
    return model


# ----------------------------------------------------------------------------------------------------------
# Output folders. Every folder this project writes (calib/, quantized/, its .partial/ and fake-quant/) is built
# under a temporary name, gets a marker file saying what it is, and is then renamed into place. An existing
# folder is replaced only if it is empty or carries the marker of the same kind (a previous output of the same
# command); anything else (the float model, `.`, a user's folder) is refused unless the user passes
# --overwrite. Input folders (the model, the calibration set) are never written into or replaced, even then.

OUTPUT_MARKER = ".moe-vlm-quant.json"


class OutputError(ValueError):
    """An output folder that may not be written; the message says which flag or folder to change."""


def output_kind(folder: str) -> str | None:
    """The kind written in `folder`'s marker ("calib", "quantized", "partial", "fake-quant"), or None."""
    path = os.path.join(folder, OUTPUT_MARKER)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f).get("kind")
    except (json.JSONDecodeError, AttributeError, OSError) as e:
        raise OutputError(f"{path}: unreadable output marker ({e}); remove the folder by hand") from e


def _inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies below it (both resolved, symlinks followed)."""
    return os.path.commonpath([path, folder]) == folder


def check_output_dir(out: str, kind: str, inputs=(), overwrite: bool = False, flag: str = "--out"):
    """Refuse an output folder that writing `kind` there could destroy; returns its resolved path.

    Always refused: a folder that is or contains the working directory, or that is, contains or lies inside
    one of `inputs` (the model folder, calib/). Refused without `overwrite`: an existing non-empty folder
    whose marker is not `kind`, and an existing file."""
    real = os.path.realpath(out)
    for src in inputs:
        src_real = os.path.realpath(src)
        if _inside(real, src_real) or _inside(src_real, real):
            raise OutputError(f"{flag} {out}: would write into or replace the input folder {src}; "
                              f"choose an output folder outside it")
    if _inside(os.getcwd(), real):
        raise OutputError(f"{flag} {out}: is the working directory or one of its parents; choose a new folder")
    if os.path.isfile(real):
        raise OutputError(f"{flag} {out}: is a file; choose a folder name")
    if os.path.isdir(real) and os.listdir(real) and output_kind(real) != kind and not overwrite:
        what = f"a {output_kind(real)} folder of this tool" if output_kind(real) else "not written by this tool"
        raise OutputError(f"{flag} {out}: exists and is {what} (no {OUTPUT_MARKER} of kind {kind!r}); "
                          f"choose another folder, or pass --overwrite to replace it")
    return real


def make_output_dir(folder: str, kind: str, command: str | None = None, exist_ok: bool = False):
    """Create `folder` (new unless exist_ok) and write its marker."""
    os.makedirs(folder, exist_ok=exist_ok)
    with open(os.path.join(folder, OUTPUT_MARKER), "w") as f:
        json.dump({"kind": kind, "tool": "moe-vlm-quant", "command": command or " ".join(sys.argv)}, f)


def temporary_output_dir(out: str, kind: str) -> str:
    """A new, uniquely named, hidden sibling of `out` with its marker, to be published with
    `publish_output_dir`."""
    import tempfile

    parent = os.path.dirname(os.path.realpath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.realpath(out))}.tmp-", dir=parent)
    make_output_dir(tmp, kind, exist_ok=True)
    return tmp


def publish_output_dir(tmp: str, out: str, kind: str, inputs=(), overwrite: bool = False, flag: str = "--out"):
    """Rename the finished `tmp` to `out`. The checks of `check_output_dir` are repeated (the folder may have
    appeared while we worked); an old `out` is first renamed aside, so a failure leaves either the old folder
    or the new one in place, never neither."""
    import shutil

    real = check_output_dir(out, kind, inputs, overwrite, flag)
    if os.path.isdir(real):
        old = tmp + ".old"
        os.rename(real, old)
        os.rename(tmp, real)
        shutil.rmtree(old)
    else:
        os.rename(tmp, real)


# ----------------------------------------------------------------------------------------------------------
# CLI: greedy answer to one prompt (with or without an image), printed as it is generated.


def main(argv=None):
    p = argparse.ArgumentParser(description="Greedy generation with the hand-written model (no transformers).")
    p.add_argument("--model", required=True, help="checkpoint folder (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--prompt", required=True, help="user message text")
    p.add_argument("--image", action="append", default=[],
                   help="image file shown before the prompt; repeat the flag for several images")
    p.add_argument("--system", default=None, help="optional system message")
    p.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many generated tokens")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight/activation dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--compile", action="store_true",
                   help="run packed (quantized) linears through torch.compile (first call compiles)")
    args = p.parse_args(argv)
    if args.compile:
        use_compiled_quant_linear(True)

    from data import load_processor  # data.py never imports model.py, so no loop

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if args.device == "cpu" else torch.bfloat16)
    model = load_model(args.model, dtype=dtype, device=args.device)
    proc = load_processor(args.model)
    content = [{"type": "image"} for _ in args.image] + [{"type": "text", "text": args.prompt}]
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": content}]
    enc = proc.encode(messages, images=args.image)
    vision = {k: v.to(args.device) for k, v in enc.items() if k.startswith(("pixel_values", "image_grid"))}
    ids = []

    def show(tok):  # print the decoded text incrementally (decode the whole answer so far: BPE merges)
        prev = proc.tokenizer.decode(ids)
        ids.append(tok)
        sys.stdout.write(proc.tokenizer.decode(ids)[len(prev):])
        sys.stdout.flush()

    model.generate(enc["input_ids"].to(args.device), args.max_new_tokens, stop_ids=proc.stop_ids,
                   on_token=show, **vision)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
