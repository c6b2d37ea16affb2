"""Train the bundled tiny models from scratch on the synthetic shapes benchmark (data.py).

The result is written in the exact checkpoint layout of the real family (config.json in the Hub spelling,
model.safetensors in bf16 with the Hub's tensor names and fused-expert layout, tokenizer.json with the
family's real special tokens, preprocessor_config.json, generation_config.json), so `model.load_model`,
`processor.load_processor`, calibrate.py, gptq.py and eval.py read the tiny and the real models the same way.

Recipe (see docs/tiny-models.md for why): 64x64 scenes, 8-px patches (8x8 grid -> 16 image
tokens), Gaussian init N(0, 0.02) with residual output projections scaled by 1/sqrt(2 * layers), AdamW,
warm-up then constant then linear decay, answer cross-entropy + 0.01 load-balancing loss + 0.3 x an
auxiliary per-patch loss (a linear probe on the vision tower predicting the shape x colour under each patch;
it teaches the tower to see shape early) + 0.3 x the same labels read from the image embeddings the decoder
gets (--aux-merged: otherwise only the answer loss trains the projector, and Kimi's never passed shape on).
The probes are dropped from the checkpoint. Off by default, for Kimi's decoder (docs/tiny-models.md §4.4):
--look (attention supervision onto the object the answer is read from), --attn-scale, --type-weights.

    python train_tiny.py --family qwen3_vl_moe --steps 4500 --threads 1 --out models/tiny-qwen3-vl-moe
    python train_tiny.py --family kimi_vl --steps 4000 --threads 1 --out models/tiny-kimi-vl
(the from-scratch commands of the previous bundled models, before --aux-merged; the current ones continue those
with --init-from: docs/tiny-models.md §4.2. Many experts: --experts 64 --top-k 4 --moe-intermediate 40.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as `python tools/train_tiny.py`
from arch import checkpoint  # noqa: E402
from arch import qwen3_vl_moe  # noqa: E402
from data import processor  # noqa: E402
from data import samples as data_samples  # noqa: E402
import model  # noqa: E402
from quant import folders  # noqa: E402

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def qwen_config(tok) -> dict:
    """Tiny Qwen3-VL-MoE, Hub spelling. H=128, I=160: H != I and H != 2I, so the fused expert layouts
    cannot be confused by a loader that guesses from shapes (transformers does)."""
    ids = {t: tok.token_to_id(t) for t in QWEN_SPECIALS}
    return {
        "architectures": ["Qwen3VLMoeForConditionalGeneration"], "model_type": "qwen3_vl_moe",
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "qwen3_vl_moe_text", "vocab_size": tok.get_vocab_size(), "hidden_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "intermediate_size": 256, "moe_intermediate_size": 160, "num_experts": 8, "num_experts_per_tok": 2,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "hidden_act": "silu",
            "rms_norm_eps": 1e-6, "attention_bias": False, "max_position_embeddings": 4096,
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "tie_word_embeddings": False,
            "rope_theta": 10000.0,
            "rope_scaling": {"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True},
        },
        "vision_config": {
            "model_type": "qwen3_vl_moe", "depth": 3, "hidden_size": 128, "num_heads": 4,
            "intermediate_size": 512, "hidden_act": "gelu_pytorch_tanh", "patch_size": 8,
            "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3, "out_hidden_size": 128,
            "num_position_embeddings": 64, "deepstack_visual_indexes": [1],
        },
    }


def qwen_files(tok) -> dict:
    ids = {t: tok.token_to_id(t) for t in QWEN_SPECIALS}
    return {
        "preprocessor_config.json": {
            "image_processor_type": "Qwen2VLImageProcessor", "patch_size": 8, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "do_convert_rgb": True,
            "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": 64 * 64, "longest_edge": 64 * 64}},
        "generation_config.json": {"bos_token_id": ids["<|endoftext|>"], "do_sample": False,
                                   "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]},
    }


KIMI_SPECIALS = ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>",
                 "<|im_middle|>", "<|media_start|>", "<|media_content|>", "<|media_end|>", "<|media_pad|>", "[PAD]"]


def kimi_config(tok) -> dict:
    """Tiny Kimi-VL in the original remote-code spelling: MoonViT with 8-px patches, a DeepSeek-V3 text model
    with MLA (q_lora_rank null), a dense first layer, 8 routed experts top-2 plus one shared expert."""
    ids = {t: tok.token_to_id(t) for t in KIMI_SPECIALS}
    return {
        "architectures": ["KimiVLForConditionalGeneration"], "model_type": "kimi_vl",
        "media_placeholder_token_id": ids["<|media_pad|>"], "ignore_index": -100, "tie_word_embeddings": False,
        "vocab_size": tok.get_vocab_size(), "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "deepseek_v3", "vocab_size": tok.get_vocab_size(), "hidden_size": 128,
            "intermediate_size": 320, "moe_intermediate_size": 160, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 4, "n_shared_experts": 1, "n_routed_experts": 8,
            "routed_scaling_factor": 2.446, "kv_lora_rank": 64, "q_lora_rank": None, "qk_rope_head_dim": 16,
            "v_head_dim": 32, "qk_nope_head_dim": 32, "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1,
            "num_experts_per_tok": 2, "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": True,
            "scoring_func": "sigmoid", "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 800000.0,
            "rope_scaling": None, "attention_bias": False, "max_position_embeddings": 4096,
            "bos_token_id": ids["[BOS]"], "eos_token_id": ids["[EOS]"], "pad_token_id": ids["[PAD]"],
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "moonvit", "patch_size": 8, "init_pos_emb_height": 8, "init_pos_emb_width": 8,
            "num_attention_heads": 4, "num_hidden_layers": 3, "hidden_size": 128, "intermediate_size": 512,
            "merge_kernel_size": [2, 2],
        },
    }


def kimi_files(tok) -> dict:
    ids = {t: tok.token_to_id(t) for t in KIMI_SPECIALS}
    return {
        "preprocessor_config.json": {
            "image_processor_type": "KimiVLImageProcessor", "patch_size": 8, "in_token_limit": 4096,
            "merge_kernel_size": [2, 2], "pad_input": True, "num_pooled_tokens": 16,
            "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
        "generation_config.json": {"bos_token_id": ids["[BOS]"], "do_sample": False,
                                   "eos_token_id": [ids["<|im_end|>"], ids["[EOS]"]]},
    }


KIMI_REMOTE_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kimi_vl_processor")
KIMI_AUTO_MAP = {"AutoProcessor": "processing_kimi_vl.KimiVLProcessor",
                 "AutoImageProcessor": "image_processing_kimi_vl.KimiVLImageProcessor"}
KIMI_VLLM_MLA = {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 64, "v_head_dim": 64}


def vllm_shaped(family: str, cfg_dict: dict, files: dict) -> tuple[dict, dict]:
    """--vllm-shapes (Kimi): the MLA widths vLLM's CPU attention takes (latent kv_lora_rank + qk_rope_head_dim = 576,
    as in the real model; vllm/v1/attention/backends/mla/cpu_mla.py) and, with them, every quantized width a
    multiple of 32 (its CPU int4 linear kernel); and the remote-code processor files vLLM's Kimi-VL loads
    (tools/kimi_vl_processor/, implementing data/processor.py's Kimi preprocessing)."""
    if family != "kimi_vl":
        raise ValueError("--vllm-shapes: only Kimi-VL's bundled shapes differ from what vLLM runs")
    cfg_dict = {**cfg_dict, "text_config": {**cfg_dict["text_config"], **KIMI_VLLM_MLA}}
    code = {name: open(os.path.join(KIMI_REMOTE_CODE, name)).read() for name in sorted(os.listdir(KIMI_REMOTE_CODE))
            if name.endswith(".py")}
    pre = {**files["preprocessor_config.json"], "auto_map": KIMI_AUTO_MAP}
    return cfg_dict, {**files, "preprocessor_config.json": pre, "processor_config.json": {"auto_map": KIMI_AUTO_MAP},
                      **code}


def set_experts(cfg_dict: dict, experts: int | None = None, top_k: int | None = None,
                moe_intermediate: int | None = None) -> dict:
    """Override the routed-expert count, top-k and expert width of a config (the many-experts variants); None
    keeps the family's default (8 experts, top-2, width 160)."""
    t = cfg_dict["text_config"]
    n_key = "num_experts" if "num_experts" in t else "n_routed_experts"
    E = experts if experts is not None else t[n_key]
    k = top_k if top_k is not None else t["num_experts_per_tok"]
    if E < 2:
        raise ValueError(f"--experts {E}: need at least 2 routed experts")
    if not 1 <= k <= E:
        raise ValueError(f"--top-k {k}: must be between 1 and the number of experts ({E}, --experts)")
    if moe_intermediate is not None:
        H = t["hidden_size"]
        if moe_intermediate < 1 or moe_intermediate in (H, H // 2):
            raise ValueError(f"--moe-intermediate {moe_intermediate}: must be positive and differ from the hidden "
                             f"size {H} and its half {H // 2} (H != I and H != 2I keep the fused Qwen expert "
                             "layouts unambiguous)")
        t["moe_intermediate_size"] = moe_intermediate
    t[n_key], t["num_experts_per_tok"] = E, k
    return cfg_dict


FAMILIES = {"qwen3_vl_moe": dict(specials=QWEN_SPECIALS, config=qwen_config, files=qwen_files, patch_order="merge_block"),
            "kimi_vl": dict(specials=KIMI_SPECIALS, config=kimi_config, files=kimi_files, patch_order="raster")}


# ----------------------------------------------------------------------------------------------------------


def build_tokenizer(specials, vocab_size: int = 512):
    """Byte-level BPE (the kind both real families use) trained on the benchmark's words and the chat
    template's role names, plus the family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = data_samples.shapes_vocabulary() + ["user", "assistant", "system", "image", "?", "You are a helpful assistant"]
    corpus = [s.question + " " + s.answer for s in data_samples.shapes_benchmark(5000, split="train")] + words
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(specials)
    return tok


def init_weights(m: nn.Module, n_layers: int, std: float = 0.02):
    """N(0, 0.02) for every matrix and embedding; residual output projections (attention o_proj / wo /
    proj, MLP down projections) scaled by 1/sqrt(2 * layers); norms at 1, biases at 0."""
    for name, p in m.named_parameters():
        if p.ndim == 1:
            nn.init.ones_(p) if name.endswith("weight") and "norm" in name else nn.init.zeros_(p)
            if "gate.weight" in name:
                nn.init.normal_(p, std=std)
        elif name.endswith(("o_proj.weight", "down_proj.weight", "attn.proj.weight", "wo.weight",
                            "linear_fc2.weight", "fc1.weight")):
            nn.init.normal_(p, std=std / math.sqrt(2 * n_layers))
        else:
            nn.init.normal_(p, std=std)


@torch.no_grad()
def temper_attention(m, factor: float):
    """Multiply every decoder attention logit q·k by `factor` (< 1 softens a saturated softmax before a continued
    run): the query's last scale, i.e. q_norm's weight where there is one (Qwen), else the query projection's
    weight (Kimi's q_proj, or q_b_proj with a low-rank query; its rope part included)."""
    for layer in m.layers:
        a = layer.self_attn
        w = a.q_norm.weight if hasattr(a, "q_norm") else (a.q_proj if hasattr(a, "q_proj") else a.q_b_proj).weight
        w.mul_(factor)


def patch_labels(samples, patch_order: str, grid: int = 8, patch: int = 8):
    """Per-patch class for the auxiliary loss: the label-map value (0 background, else shape x colour) at each
    patch centre, in the order of the pixel rows (Qwen: merge blocks; Kimi: raster). (n_image_samples * grid²,)"""
    order = qwen3_vl_moe.merge_block_order(grid, grid, 2) if patch_order == "merge_block" else torch.arange(grid * grid)
    centres = np.arange(grid) * patch + patch // 2
    out = [torch.from_numpy(np.asarray(data_samples.draw_scene(s.objects, labels=True))[centres][:, centres]
                            .astype(np.int64).reshape(-1))[order]
           for s in samples if s.image is not None]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def image_feature_module(m) -> nn.Module:
    """The module whose output is the image embeddings the decoder reads (one row per 2x2 patch group)."""
    return m.multi_modal_projector if hasattr(m, "multi_modal_projector") else m.model.visual.merger


def merged_labels(samples, grid: int = 8):
    """The 4 patch labels of every 2x2 group, in the order both families emit merged image tokens (block row,
    block col; inside a block (0,0), (0,1), (1,0), (1,1)). (n_image_samples * grid² / 4, 4)"""
    return patch_labels(samples, "merge_block", grid).view(-1, 4)


def looked_at_object(s) -> dict | None:
    """The object a question about s's scene is answered from (the one the answer position should attend to):
    the object of the named unique shape (color) or colour (shape), the object asked about when it exists, the
    extreme object (position), the object found next to the anchor (relation); None for counts and for
    "no" answers to exists (nothing to look at)."""
    w, objs = s.question.split(), s.objects
    if s.type == "color":
        return next(o for o in objs if o["shape"] == w[4])
    if s.type == "shape":
        return next(o for o in objs if o["color"] == w[4])
    if s.type == "exists" and s.answer == "yes":
        return next(o for o in objs if (o["color"], o["shape"]) == (w[3], w[4]))
    if s.type == "position":
        key, pick = {"left": ("x", min), "right": ("x", max), "top": ("y", min), "bottom": ("y", max)}[w[4][:-4]]
        return pick(objs, key=lambda p: p[key])
    if s.type == "relation":  # "what ATTR is the object SIDE the COLOR SHAPE ?", SIDE one or two words
        side, (color, shape) = " ".join(w[5:-4]), w[-3:-1]
        a = next(o for o in objs if (o["color"], o["shape"]) == (color, shape))
        key, sign = {"left of": ("x", -1), "right of": ("x", 1), "above": ("y", -1), "below": ("y", 1)}[side]
        return min((o for o in objs if sign * (o[key] - a[key]) > 0), key=lambda p: abs(p[key] - a[key]))
    return None


def look_targets(samples, grid: int = 8) -> torch.Tensor:
    """(n_image_samples, grid² / 4) bool: the merged image tokens that cover a patch centre of the object each
    image question is answered from (all False where there is none: counts, "no" answers)."""
    labels = merged_labels(samples, grid).view(-1, grid * grid // 4, 4)
    image_samples = [s for s in samples if s.image is not None]
    out = torch.zeros(labels.shape[:2], dtype=torch.bool)
    for i, s in enumerate(image_samples):
        o = looked_at_object(s)
        if o is not None:
            code = 1 + data_samples.SHAPES.index(o["shape"]) * len(data_samples.COLORS) + list(data_samples.COLORS).index(o["color"])
            out[i] = (labels[i] == code).any(-1)
    return out


def answer_and_image_positions(batch: dict, image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a teacher-forced batch whose rows all hold one image: the position whose logits predict the
    first answer token (B,), and the image tokens' positions in merge order (B, tokens per image)."""
    answer_pos = (batch["labels"] != -100).int().argmax(-1) - 1  # logits[t] predict labels[t + 1]
    image_pos = (batch["input_ids"] == image_token_id).nonzero()[:, 1].view(len(answer_pos), -1)
    return answer_pos, image_pos


def look_loss(probs: list[torch.Tensor], batch: dict, samples, image_token_id: int) -> torch.Tensor:
    """Attention supervision: -log of the attention mass that head 0 of each given layer puts, from the position
    that predicts the first answer token, on the image tokens of the object the answer is read from, averaged
    over the image questions that have such an object. probs: per layer (B, nh, T, T) softmax probabilities."""
    per_image = look_targets(samples)
    targets = torch.zeros(len(samples), per_image.shape[1], dtype=torch.bool)
    targets[[i for i, s in enumerate(samples) if s.image is not None]] = per_image
    rows = targets.any(-1).nonzero().flatten()
    if len(rows) == 0:
        return torch.zeros(())
    answer_pos, image_pos = answer_and_image_positions({k: batch[k][rows] for k in ("input_ids", "labels")},
                                                       image_token_id)
    losses = []
    for p in probs:
        a = p[rows, 0, answer_pos]  # (R, T): head 0 from the answer position
        mass = (a.gather(1, image_pos) * targets[rows]).sum(-1)
        losses.append(-torch.log(mass + 1e-6).mean())
    return torch.stack(losses).mean()


class Probes:
    """Forward hooks that keep what the auxiliary losses read: the vision tower's last block output, the image
    embeddings handed to the decoder (projector / merger output) and every router's probabilities (for the
    load-balancing loss)."""

    def __init__(self, m):
        self.vision, self.image_embeds, self.router_probs = None, None, []
        m.vision_blocks()[-1].register_forward_hook(lambda mod, i, o: setattr(self, "vision", o))
        image_feature_module(m).register_forward_hook(lambda mod, i, o: setattr(self, "image_embeds", o))
        for layer in m.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.register_forward_hook(lambda mod, i, o: self.router_probs.append((o[0], o[2])))

    def balance_loss(self, n_experts: int):
        """Switch-style E * sum_e f_e P_e, averaged over MoE layers (1.0 when perfectly balanced)."""
        losses = []
        for idx, scores in self.router_probs:
            f = torch.bincount(idx.flatten(), minlength=n_experts).float() / idx.numel()
            P = scores.float() / scores.float().sum(-1, keepdim=True)  # softmax probs, or normalized sigmoids
            losses.append(n_experts * (f * P.mean(0)).sum())
        self.router_probs = []
        return torch.stack(losses).mean()


def answer_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


@torch.no_grad()
def evaluate(m, proc, samples, batch_size: int = 100) -> dict:
    """Exact-match accuracy per question type and modality. Teacher-forced: an answer counts as right when
    every answer token and the end token are the argmax given the right prefix, which is exactly when greedy
    generation reproduces it, at the cost of one batched forward."""
    right = {}
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        b = processor.encode_qa_batch(proc, chunk)
        pred = m(b["input_ids"], attention_mask=b["attention_mask"], **processor.vision_inputs(b))[:, :-1].argmax(-1)
        lab = b["labels"][:, 1:]
        ok = ((pred == lab) | (lab == -100)).all(-1)
        for s, good in zip(chunk, ok.tolist()):
            for key in (s.type, s.modality, "all"):
                right.setdefault(key, []).append(good)
    return {k: sum(v) / len(v) for k, v in right.items()}


def save_checkpoint(m, cfg_dict, tok, files: dict, out: str, overwrite: bool = False):
    """Write the checkpoint folder atomically: everything goes to a temporary sibling, then one rename (over a
    previous tiny model only, unless `overwrite`: `folders.publish_output_dir`)."""
    from safetensors.torch import save_file

    tmp = folders.temporary_output_dir(out, "tiny-model")
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint folder is meant to be shared
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in checkpoint.checkpoint_state_dict(m).items()}
    save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    tok.save(os.path.join(tmp, "tokenizer.json"))
    for name, content in {"config.json": cfg_dict, **files}.items():
        with open(os.path.join(tmp, name), "w") as f:
            f.write(content) if isinstance(content, str) else json.dump(content, f, indent=2)  # code or JSON
    folders.publish_output_dir(tmp, out, "tiny-model", overwrite=overwrite)


def lr_at(step: int, steps: int, peak: float, warmup: int, decay_frac: float) -> float:
    """Linear warm-up, constant, then linear decay to 10% over the last `decay_frac` of the steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    start = int(steps * (1 - decay_frac))
    return peak if step < start else peak * (1 - 0.9 * (step - start) / max(1, steps - start))


def train(family: str = "qwen3_vl_moe", out: str = "models/tiny-qwen3-vl-moe", steps: int = 3000,
          batch: int = 64, lr: float = 2e-3, warmup: int = 150, decay_frac: float = 0.3, aux: float = 0.3,
          aux_merged: float = 0.3, balance: float = 0.01, seed: int = 0, eval_every: int = 250, eval_n: int = 400,
          threads: int = 2, overwrite: bool = False, experts: int | None = None, top_k: int | None = None,
          moe_intermediate: int | None = None, init_from: str | None = None, text_fraction: float = 0.2,
          type_weights: dict[str, float] | None = None, look: float = 0.0, look_layers: list[int] | None = None,
          attn_scale: float = 1.0, eval_seed: int = 0, vllm_shapes: bool = False):
    folders.check_output_dir(out, "tiny-model", overwrite=overwrite)  # before training: fail fast
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    fam = FAMILIES[family]
    tok = build_tokenizer(fam["specials"])
    cfg_dict, files = set_experts(fam["config"](tok), experts, top_k, moe_intermediate), fam["files"](tok)
    if vllm_shapes:
        cfg_dict, files = vllm_shaped(family, cfg_dict, files)
    workdir = tempfile.mkdtemp(prefix="tiny-")  # the processor reads the same files the checkpoint will hold
    tok.save(os.path.join(workdir, "tokenizer.json"))
    for name, content in {"config.json": cfg_dict, **files}.items():
        with open(os.path.join(workdir, name), "w") as f:
            f.write(content) if isinstance(content, str) else json.dump(content, f)
    proc = processor.load_processor(workdir)
    cfg = model.CONFIGS[family].from_dict(cfg_dict)
    m = model.MODELS[family](cfg)
    init_weights(m, n_layers=len(m.layers))
    if init_from is not None:  # continued training: start from a checkpoint of the same family and shapes
        ref = model.load_model(init_from)
        state = {k: v.float() for k, v in ref.state_dict().items()}
        if vllm_shapes:  # the MLA widths changed: take every tensor that still fits, name the others
            own = m.state_dict()
            fresh = sorted(k for k in own if k not in state or state[k].shape != own[k].shape)
            state = {**own, **{k: v for k, v in state.items() if k in own and v.shape == own[k].shape}}
            print(f"--init-from {init_from}: {len(fresh)} tensors of other shapes start fresh: {', '.join(fresh)}")
        try:
            m.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"--init-from {init_from}: its weights do not fit this configuration ({e})") from e
        del ref
    if attn_scale <= 0:
        raise ValueError(f"--attn-scale {attn_scale}: expected a positive factor (< 1 softens attention)")
    if attn_scale != 1.0:
        temper_attention(m, attn_scale)
    probes = Probes(m)
    looked = []  # attention probabilities of the --look layers, in layer order, for the current forward
    if look_layers is not None and not all(0 <= i < len(m.layers) for i in look_layers):
        raise ValueError(f"--look-layers {look_layers}: the decoder has layers 0..{len(m.layers) - 1}")
    if look > 0:
        for i in look_layers if look_layers is not None else range(len(m.layers) - 2, len(m.layers)):
            m.layers[i].self_attn.probs_hook = looked.append
    n_classes = 1 + len(data_samples.SHAPES) * len(data_samples.COLORS)
    probe = nn.Linear(m.vision_blocks()[-1].norm1.weight.shape[0], n_classes)
    # the same labels read from the image embeddings the decoder gets (RMS-normalized, as the decoder's first
    # norm sees them): each merged token predicts the labels of its 4 patches
    merged_probe = nn.Linear(cfg_dict["text_config"]["hidden_size"], 4 * n_classes)
    params = list(m.parameters()) + list(probe.parameters()) + list(merged_probe.parameters())
    decay = [p for p in params if p.ndim >= 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    # eval_seed 1 draws a validation stream of the test split, disjoint from eval.py's default (seed 0) samples:
    # choose between runs on it and report on eval.py's
    held_out = data_samples.shapes_benchmark(eval_n, seed=eval_seed, split="test")
    n_experts = cfg_dict["text_config"].get("num_experts") or cfg_dict["text_config"].get("n_routed_experts")
    print(f"{family}: {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M parameters, vocab {tok.get_vocab_size()}")
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup, decay_frac)
        samples = data_samples.shapes_benchmark(batch, seed=seed * 1_000_000 + step, split="train",
                                        text_fraction=text_fraction, type_weights=type_weights)
        b = processor.encode_qa_batch(proc, samples)
        logits = m(b["input_ids"], attention_mask=b["attention_mask"], **processor.vision_inputs(b))
        loss_ans = answer_loss(logits, b["labels"])
        loss = loss_ans + balance * probes.balance_loss(n_experts)
        loss_look = look_loss(looked, b, samples, proc.image_token_id) if look > 0 else torch.zeros(())
        loss = loss + look * loss_look
        looked.clear()
        loss_aux = loss_merged = torch.zeros(())
        shape_acc = float("nan")
        if "pixel_values" in b:
            loss_aux = F.cross_entropy(probe(probes.vision), patch_labels(samples, fam["patch_order"]))
            e = probes.image_embeds.float()
            if aux_merged == 0:  # the probe still learns (a read-out to log), the model gets no gradient from it
                e = e.detach()
            e = e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + 1e-6)
            merged_logits = merged_probe(e).view(-1, n_classes)
            target = merged_labels(samples).reshape(-1)
            loss_merged = F.cross_entropy(merged_logits, target)
            loss = loss + aux * loss_aux + (aux_merged or 1.0) * loss_merged
            with torch.no_grad():  # how well the decoder's image embeddings tell the shape of object patches
                obj, pred = target > 0, merged_logits.argmax(-1)
                shape_acc = ((pred > 0) & ((pred - 1) // len(data_samples.COLORS) == (target - 1) // len(data_samples.COLORS)))[obj]
                shape_acc = shape_acc.float().mean().item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        probes.vision = probes.image_embeds = None
        if step % 25 == 0:
            print(f"step {step:5d}  loss {loss.item():.4f}  answer {loss_ans.item():.4f}  "
                  f"aux {loss_aux.item():.4f}  aux_merged {loss_merged.item():.4f}  merged_shape_acc {shape_acc:.3f}  "
                  + (f"look {loss_look.item():.4f}  " if look > 0 else "") +
                  f"grad {grad_norm.item():.2f}  lr {opt.param_groups[0]['lr']:.2e}  {time.time() - t0:7.1f}s",
                  flush=True)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            m.eval()
            acc = evaluate(m, proc, held_out)
            probes.router_probs = []
            looked.clear()
            probes.vision = probes.image_embeds = None
            m.train()
            print(f"eval step {step + 1}: " + "  ".join(f"{k} {v:.3f}" for k, v in sorted(acc.items())) +
                  f"  ({time.time() - t0:.0f}s)", flush=True)
            save_checkpoint(m, cfg_dict, tok, files, out, overwrite)
    shutil.rmtree(workdir)
    return acc


def parse_type_weights(text: str) -> dict[str, float]:
    """"color=3,exists=3,shape=2" -> {"color": 3.0, "exists": 3.0, "shape": 2.0} (argparse type)."""
    out = {}
    for item in text.split(","):
        name, _, w = item.partition("=")
        if name.strip() not in data_samples.IMAGE_TYPES or not w:
            raise argparse.ArgumentTypeError(f"{item!r}: expected TYPE=WEIGHT with TYPE one of {data_samples.IMAGE_TYPES}")
        try:
            out[name.strip()] = float(w)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{item!r}: the weight is not a number") from e
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="qwen3_vl_moe", choices=sorted(FAMILIES), help="model family to train")
    p.add_argument("--out", default=None, help="output checkpoint folder (default models/tiny-<family>)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    p.add_argument("--batch", type=int, default=64, help="samples per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--aux", type=float, default=0.3,
                   help="weight of the per-patch auxiliary loss on the vision tower's last block")
    p.add_argument("--aux-merged", type=float, default=0.3,
                   help="weight of the per-patch auxiliary loss read from the image embeddings the decoder gets")
    p.add_argument("--balance", type=float, default=0.01, help="weight of the load-balancing loss")
    p.add_argument("--experts", type=int, default=None, help="routed experts per MoE layer (default: 8)")
    p.add_argument("--top-k", type=int, default=None, help="experts per token (default: 2)")
    p.add_argument("--moe-intermediate", type=int, default=None, help="width of each routed expert (default: 160)")
    p.add_argument("--decay-frac", type=float, default=0.3, help="fraction of the steps with linear lr decay")
    p.add_argument("--init-from", default=None,
                   help="start from this checkpoint's weights (same family and configuration) instead of the init")
    p.add_argument("--warmup", type=int, default=150, help="linear warm-up steps")
    p.add_argument("--text-fraction", type=float, default=0.2, help="share of text-only training questions")
    p.add_argument("--type-weights", type=parse_type_weights, default=None, metavar="TYPE=W,...",
                   help="draw training image questions by these weights (e.g. color=3,exists=3,shape=2) instead "
                        "of in turn; types not named get 0")
    p.add_argument("--look", type=float, default=0.0,
                   help="weight of the attention supervision: head 0 of the --look-layers, from the answer position, "
                        "should attend to the image tokens of the object the answer is read from (0: off)")
    p.add_argument("--look-layers", type=lambda t: [int(x) for x in t.split(",")], default=None, metavar="I,J",
                   help="decoder layers the attention supervision acts on (default: the last two)")
    p.add_argument("--attn-scale", type=float, default=1.0,
                   help="multiply every decoder attention logit by this before training (with --init-from: < 1 "
                        "softens attention that has saturated)")
    p.add_argument("--vllm-shapes", action="store_true",
                   help="Kimi-VL at the widths vLLM runs on CPU (MLA latent 576; with --init-from: the tensors "
                        "that fit are taken, the others start fresh) and with its remote-code processor files")
    p.add_argument("--seed", type=int, default=0, help="seed for init and training data")
    p.add_argument("--eval-every", type=int, default=250, help="steps between held-out evaluations/checkpoints")
    p.add_argument("--eval-seed", type=int, default=0,
                   help="seed of the held-out questions scored during training (1: a validation set that shares no "
                        "image question with eval.py's default test samples, to choose between runs without them)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it is not a tiny model written by this script")
    args = p.parse_args()
    out = args.out or f"models/tiny-{args.family.replace('_', '-')}" + (f"-{args.experts}e" if args.experts else "")
    train(args.family, out, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, aux=args.aux,
          aux_merged=args.aux_merged, decay_frac=args.decay_frac, balance=args.balance, experts=args.experts,
          top_k=args.top_k, moe_intermediate=args.moe_intermediate, init_from=args.init_from, warmup=args.warmup,
          vllm_shapes=args.vllm_shapes,
          eval_every=args.eval_every, threads=args.threads, overwrite=args.overwrite,
          text_fraction=args.text_fraction, type_weights=args.type_weights, look=args.look,
          look_layers=args.look_layers, attn_scale=args.attn_scale, eval_seed=args.eval_seed)


if __name__ == "__main__":
    main()
