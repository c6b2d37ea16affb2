"""Qwen3-VL-MoE (e.g. Qwen3-VL-30B-A3B-Instruct; docs/architectures.md §1): its config from config.json (Hub and
transformers-5 spellings), the vision tower (ViT with DeepStack), and the language model (GQA with q/k norms,
interleaved M-RoPE, softmax top-k MoE with per-expert SwiGLUs). Built from blocks.py; model.load_model builds
and loads it for model_type `qwen3_vl_moe`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from arch.blocks import (DecoderInputs, MoEVLM, RMSNorm, Routing, SwiGLU, apply_rope, block_diagonal_attention,
                    causal_mask, decoder_attention, gelu_tanh, mlp_readers, run_experts, swiglu_groups, text_model,
                    upcast)
from arch.checkpoint import CheckpointError, _pick, _rope_fields


# ----------------------------------------------------------------------------------------------------------
# Configs. Built from the checkpoint's config.json; every field the forward pass uses is named here.


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


def merge_block_order(h: int, w: int, m: int, device=None):
    """Raster index of every patch, listed in merge-block order (block row, block col, row in block, col in block).
    device: where the index is made (None: torch's default device; the model passes its activations' device)."""
    idx = torch.arange(h * w, device=device).view(h // m, m, w // m, m)
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
        grid = grid.reshape(D, h * w).T[merge_block_order(h, w, self.cfg.spatial_merge_size, grid.device)]
        return grid.repeat(t, 1)

    def rotary(self, t: int, h: int, w: int, device):
        """2-D axial rotary angles: first half of the frequencies follow the row, second half the column."""
        hd = self.cfg.hidden_size // self.cfg.num_heads
        inv = 1.0 / self.cfg.rope_theta ** (torch.arange(0, hd // 2, 2, dtype=torch.float32, device=device) / (hd // 2))
        order = merge_block_order(h, w, self.cfg.spatial_merge_size, device)
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

    @staticmethod
    def input_groups() -> list[tuple[str, ...]]:
        """The linears grouped by the tensor they read (layer_structure): q, k, v read the layer's input."""
        return [("q_proj", "k_proj", "v_proj"), ("o_proj",)]

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

    def forward(self, x) -> Routing:  # x (N, D) -> topk_idx (N, k), topk_weight (N, k), scores = probs (N, E) fp32
        probs = torch.softmax(upcast(F.linear(x, self.weight)), dim=-1)
        topk_p, topk_idx = torch.topk(probs, self.top_k, dim=-1)
        topk_w = (topk_p / topk_p.sum(-1, keepdim=True)).to(x.dtype)
        return Routing(topk_idx, topk_w, probs)


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
    Padding (attention_mask == 0) is skipped; its positions are left at 0. A walk over the token ids, so it runs
    on the host (the ids are read once) and returns both tensors on input_ids' device."""
    B, T = input_ids.shape
    ids_bt = input_ids.tolist()
    mask = attention_mask.tolist() if attention_mask is not None else [[1] * T] * B
    grids = iter(image_grid_thw.tolist()) if image_grid_thw is not None else iter(())
    pos = [[[0] * T for _ in range(B)] for _ in range(3)]
    deltas = []
    for b in range(B):
        keep = [j for j in range(T) if mask[b][j]]
        ids = [ids_bt[b][j] for j in keep]
        rows, cur, i = ([], [], []), 0, 0  # the T, H, W positions of the kept tokens
        while i < len(ids):
            if ids[i] != image_token_id:
                for r in rows:
                    r.append(cur)
                cur, i = cur + 1, i + 1
                continue
            t, h, w = next(grids)
            lh, lw = h // merge, w // merge
            rows[0].extend([cur] * (lh * lw))
            rows[1].extend(cur + r for r in range(lh) for _ in range(lw))
            rows[2].extend(cur + c for _ in range(lh) for c in range(lw))
            cur, i = cur + max(lh, lw), i + t * lh * lw
        if len(rows[0]) != len(keep):
            raise ValueError(f"prompt {b}: {len(keep)} tokens but {len(rows[0])} positions; an image grid with "
                             "t > 1 (video) is not supported")
        for axis, r in enumerate(rows):
            for j, v in zip(keep, r):
                pos[axis][b][j] = v
        deltas.append((max(max(r) for r in rows) + 1 if rows[0] else 0) - len(ids))
    return (torch.tensor(pos, dtype=torch.long, device=input_ids.device),
            torch.tensor(deltas, dtype=torch.long, device=input_ids.device))


class Qwen3VLMoeModel(MoEVLM):
    """Qwen3-VL-MoE. `forward(input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None)`
    returns logits (B, T, V) in fp32. The forward is split into `embed` -> `layers` -> `head` so the
    quantizer can run the decoder one layer at a time."""

    family = "qwen3_vl_moe"
    layers_path = "model.language_model.layers"
    vision_blocks_path = "model.visual.blocks"
    vision_paths = ("model.visual",)
    fused_experts = True  # the Hub checkpoint stores each layer's experts as two fused 3-D tensors

    def __init__(self, cfg: Qwen3VLMoeConfig):
        super().__init__()
        self.cfg = cfg
        self.model = _QwenInner(cfg)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

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
