"""Builders for tiny random Kimi-VL checkpoints in the original (remote-code) layout, used as test fixtures.

transformers has no Kimi-VL class, so the oracle is built from two relatives (docs/architectures.md §4):
  * `Kimi_K25ForConditionalGeneration` computes the same function for still images. We build a random one, then
    export its weights to the Kimi-VL layout: unfused per-expert MLPs, `wqkv` with the q/k rows put back into
    interleaved rope pairs, and the MoonViT / projector names (`norm0`, `fc0`, `wo`, `linear_1`, ...).
  * `DeepseekV3ForCausalLM` loads the text half of that checkpoint after a prefix rename only.
Our loader is then tested on the exported files, transformers on its own weights.
"""

import json
import os

import torch

from helpers import build_tokenizer, randomize

KIMI_SPECIAL = ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>",
                "<|im_middle|>", "<|media_start|>", "<|media_content|>", "<|media_end|>", "<|media_pad|>", "[PAD]"]

# Fields of the remote-code DeepseekV3Config that transformers' DeepseekV3Config does not have.
_REMOTE_ONLY = ("model_type", "topk_method", "scoring_func", "moe_layer_freq", "rope_theta", "rope_scaling")


def kimi_config(vocab_size, media_id, text=None, vision=None) -> dict:
    """config.json of a tiny Kimi-VL in the Hub spelling (§2.1). Sizes keep every pair of widths distinct
    (H=64, dense I=96, expert I=24, shared I=48, nope 16, rope 8, v 24) so a transposed or swapped tensor fails."""
    t = dict(model_type="deepseek_v3", vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
             moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
             n_shared_experts=2, n_routed_experts=8, routed_scaling_factor=2.446, kv_lora_rank=32, q_lora_rank=None,
             qk_rope_head_dim=8, v_head_dim=24, qk_nope_head_dim=16, topk_method="noaux_tc", n_group=1, topk_group=1,
             num_experts_per_tok=2, moe_layer_freq=1, first_k_dense_replace=1, norm_topk_prob=True,
             scoring_func="sigmoid", hidden_act="silu", rms_norm_eps=1e-5, rope_theta=800000.0, rope_scaling=None,
             attention_bias=False, max_position_embeddings=512, tie_word_embeddings=False)
    t.update(text or {})
    v = dict(model_type="moonvit", patch_size=14, init_pos_emb_height=8, init_pos_emb_width=8, num_attention_heads=2,
             num_hidden_layers=2, hidden_size=32, intermediate_size=48, merge_kernel_size=[2, 2])
    v.update(vision or {})
    return dict(model_type="kimi_vl", architectures=["KimiVLForConditionalGeneration"], text_config=t,
                vision_config=v, media_placeholder_token_id=media_id, ignore_index=-100, tie_word_embeddings=False,
                vocab_size=vocab_size)


def deepseek_config(text: dict):
    """transformers' DeepseekV3Config for a remote-code text_config."""
    from transformers import DeepseekV3Config

    kw = {k: v for k, v in text.items() if k not in _REMOTE_ONLY}
    return DeepseekV3Config(**kw, rope_parameters={"rope_type": "default", "rope_theta": text["rope_theta"]})


def k25_config(cfg: dict):
    """transformers' Kimi_K25Config computing the same function as the Kimi-VL config `cfg` on still images."""
    from transformers import Kimi_K25Config

    v = cfg["vision_config"]
    if v["init_pos_emb_height"] != v["init_pos_emb_width"]:
        raise ValueError("K2.5 resamples a square position table only")
    vision = dict(patch_size=v["patch_size"], pos_emb_height=v["init_pos_emb_height"],
                  pos_emb_width=v["init_pos_emb_width"], num_attention_heads=v["num_attention_heads"],
                  num_hidden_layers=v["num_hidden_layers"], hidden_size=v["hidden_size"],
                  intermediate_size=v["intermediate_size"], merge_kernel_size=list(v["merge_kernel_size"]),
                  rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    return Kimi_K25Config(text_config=deepseek_config(cfg["text_config"]).to_dict(), vision_config=vision,
                          projection_hidden_size=v["hidden_size"], tie_word_embeddings=False,
                          image_token_id=cfg["media_placeholder_token_id"])


def _halves_to_pairs(w, n_heads):
    """K2.5 keeps each head's q/k rows as [even pair members | odd pair members]; Kimi-VL (complex rope) keeps
    them interleaved (x0, x1), (x2, x3), ... Rows (nh*hd, ...) -> same shape, interleaved per head."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _vision_key(rest):
    """K2.5 name under `model.vision_tower.` -> Kimi-VL name under `vision_tower.` (None for q/k/v)."""
    if rest.startswith("patch_embed.pos_emb.position_embeddings"):
        return "patch_embed.pos_emb.weight"
    if rest.startswith("patch_embed."):
        return rest
    if rest.startswith("final_layernorm."):
        return "encoder." + rest
    n, _, sub = rest[len("layers."):].partition(".")
    renames = {"norm1.": "norm0.", "norm2.": "norm1.", "attn.proj.": "wo.", "mlp.fc1.": "mlp.fc0.",
               "mlp.fc2.": "mlp.fc1."}
    for src, dst in renames.items():
        if sub.startswith(src):
            return f"encoder.blocks.{n}.{dst}{sub[len(src):]}"
    raise KeyError(f"model.vision_tower.{rest}: no Kimi-VL name known")


def _export_wqkv(sd, hf_cfg, out):
    """Fuse K2.5's q/k/v into MoonViT's `wqkv` rows q | k | v, q and k back in interleaved rope pairs. Checked
    against transformers' own loading permutation (PermuteForRope), so the export is its exact inverse."""
    from transformers.core_model_loading import PermuteForRope

    nh, fwd = hf_cfg.vision_config.num_attention_heads, PermuteForRope(subconfig_key="vision_config")
    for i in range(hf_cfg.vision_config.num_hidden_layers):
        pre = f"model.vision_tower.layers.{i}.attn."
        for kind in ("weight", "bias"):
            q, k, v = (sd[f"{pre}{p}_proj.{kind}"] for p in "qkv")
            q, k = _halves_to_pairs(q, nh), _halves_to_pairs(k, nh)
            assert torch.equal(fwd._permute_for_rope(q, hf_cfg), sd[f"{pre}q_proj.{kind}"])
            out[f"vision_tower.encoder.blocks.{i}.wqkv.{kind}"] = torch.cat([q, k, v])


def export_kimi_vl(hf_model, cfg: dict) -> dict:
    """State dict of a Kimi_K25ForConditionalGeneration -> tensors named and laid out as in a Kimi-VL checkpoint
    (§2.2), including the stale `rotary_emb.inv_freq` buffers real checkpoints carry."""
    sd = {k: v.detach().clone().contiguous() for k, v in hf_model.state_dict().items()}
    out = {}
    inter = cfg["text_config"]["moe_intermediate_size"]
    for k, v in sd.items():
        if k == "lm_head.weight":
            out["language_model.lm_head.weight"] = v
        elif k.startswith("model.language_model."):
            name = "language_model.model." + k[len("model.language_model."):]
            if name.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H]: rows [:I] gate, [I:] up
                for j in range(v.shape[0]):
                    out[name.replace("gate_up_proj", f"{j}.gate_proj.weight")] = v[j, :inter].clone()
                    out[name.replace("gate_up_proj", f"{j}.up_proj.weight")] = v[j, inter:].clone()
            elif name.endswith("mlp.experts.down_proj"):  # [E, H, I]: nn.Linear layout already
                for j in range(v.shape[0]):
                    out[name.replace("down_proj", f"{j}.down_proj.weight")] = v[j].clone()
            else:
                out[name] = v
        elif k.startswith("model.mm_projector."):
            rest = k[len("model.mm_projector."):]
            rest = rest.replace("in_proj.", "linear_1.").replace("out_proj.", "linear_2.")
            out["multi_modal_projector." + rest] = v
        elif k.startswith("model.vision_tower."):
            rest = k[len("model.vision_tower."):]
            if ".attn." in rest and rest.split(".attn.")[1][0] in "qkv":
                continue  # fused below
            out["vision_tower." + _vision_key(rest)] = v
        else:
            raise KeyError(f"{k}: no Kimi-VL name known")
    _export_wqkv(sd, hf_model.config, out)
    t = cfg["text_config"]
    rope = t["qk_rope_head_dim"]
    inv_freq = 1.0 / t["rope_theta"] ** (torch.arange(0, rope, 2).float() / rope)
    for i in range(t["num_hidden_layers"]):
        out[f"language_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    return out


def shrink_latents(hf, cfg, factor=0.02):
    """Scale the projections feeding q_a_layernorm / kv_a_layernorm (only the latent rows of kv_a_proj_with_mqa,
    not k_pe) so their RMS is near sqrt(eps): then the 1e-6 eps of these two norms shows in the logits."""
    r = cfg["text_config"]["kv_lora_rank"]
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "kv_a_proj_with_mqa" in name:
                p[:r] *= factor
            elif "q_a_proj" in name:
                p *= factor


def make_tiny_kimi(path, seed=0, text=None, vision=None, preprocessor=None, small_latents=False):
    """Tiny random Kimi-VL at `path` (config.json, model.safetensors, tokenizer.json, preprocessor_config.json).
    Returns (path, the transformers K2.5 model holding the same weights, in eval mode with eager attention)."""
    from safetensors.torch import save_file
    from transformers import Kimi_K25ForConditionalGeneration

    tok = build_tokenizer(KIMI_SPECIAL)
    cfg = kimi_config(tok.get_vocab_size(), tok.token_to_id("<|media_pad|>"), text, vision)
    torch.manual_seed(seed)
    hf = Kimi_K25ForConditionalGeneration(k25_config(cfg))
    randomize(hf, seed)
    if small_latents:
        shrink_latents(hf, cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a buffer, so randomize() left it at 0; a real bias changes which experts win
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    hf.set_attn_implementation("eager")
    hf.eval()
    os.makedirs(path, exist_ok=True)
    save_file(export_kimi_vl(hf, cfg), os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"), indent=1)
    tok.save(os.path.join(path, "tokenizer.json"))
    pre = dict(patch_size=14, in_token_limit=4096, merge_kernel_size=[2, 2], pad_input=True,
               num_pooled_tokens=1024, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    pre.update(preprocessor or {})
    json.dump({k: v for k, v in pre.items() if v is not None},
              open(os.path.join(path, "preprocessor_config.json"), "w"))
    return str(path), hf


def deepseek_text_dir(kimi_dir, dst):
    """The text half of a Kimi-VL checkpoint as a DeepseekV3ForCausalLM folder: `language_model.model.` ->
    `model.`, `language_model.lm_head.` -> `lm_head.` (per-expert tensors kept as they are)."""
    from safetensors.torch import load_file, save_file

    cfg = json.load(open(os.path.join(kimi_dir, "config.json")))
    sd = load_file(os.path.join(kimi_dir, "model.safetensors"))
    out = {}
    for k, v in sd.items():
        if k.startswith("language_model.") and not k.endswith("rotary_emb.inv_freq"):
            out[k.replace("language_model.model.", "model.", 1).replace("language_model.lm_head.", "lm_head.", 1)] = v
    os.makedirs(dst, exist_ok=True)
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    deepseek_config(cfg["text_config"]).save_pretrained(dst)
    return str(dst)
