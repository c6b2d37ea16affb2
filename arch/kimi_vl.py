"""Kimi-VL (e.g. Kimi-VL-A3B-Instruct; docs/architectures.md §2): its configs from config.json, MoonViT (the
vision tower, images packed in raster order) with its projector, and the DeepSeek-V3 style language model (MLA,
sigmoid MoE with correction bias and group-limited routing, shared experts, a dense first layer). Built from
blocks.py; model.load_model builds and loads it for model_type `kimi_vl`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from arch.blocks import (DecoderInputs, MoEVLM, RMSNorm, Routing, SwiGLU, apply_rope, block_diagonal_attention,
                    causal_mask, decoder_attention, gelu_tanh, mlp_readers, run_experts, swiglu_groups, text_model,
                    upcast)
from arch.checkpoint import CheckpointError, _pick, _rope_fields


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

    def input_groups(self) -> list[tuple[str, ...]]:
        """The linears grouped by the tensor they read (layer_structure): the query's first linear and
        kv_a_proj_with_mqa read the layer's input; q_b_proj and kv_b_proj read their norms' outputs."""
        if self.cfg.q_lora_rank is None:
            return [("q_proj", "kv_a_proj_with_mqa"), ("kv_b_proj",), ("o_proj",)]
        return [("q_a_proj", "kv_a_proj_with_mqa"), ("q_b_proj",), ("kv_b_proj",), ("o_proj",)]

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
    times routed_scaling_factor. Returns Routing: topk_idx (N, k), topk_weight (N, k) fp32, scores = s (N, E) fp32."""

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
        return Routing(topk_idx, topk_w * c.routed_scaling_factor, s)


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
    layers_path = "language_model.model.layers"
    vision_blocks_path = "vision_tower.encoder.blocks"
    vision_paths = ("vision_tower", "multi_modal_projector")
    keep_fp32 = ("weight_scale", "e_score_correction_bias")  # routing bias stays fp32 in every model dtype (as in transformers)

    def __init__(self, cfg: KimiVLConfig):
        super().__init__()
        self.cfg = cfg
        self.language_model = KimiLanguageModel(cfg.text)
        self.vision_tower = MoonViT(cfg.vision)
        self.multi_modal_projector = KimiProjector(cfg)

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
