"""Builders for tiny random checkpoints in the real on-disk layouts, used as test fixtures.

transformers is the oracle here (test extra only): it builds and saves a random model; we convert what it
saves to the layout the Hub checkpoints actually have (docs/architectures.md §4) and test our loader on that copy.
"""

import json
import os

import torch

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

CORPUS = ["the quick brown fox jumps over the lazy dog", "what color is the circle ? red green blue",
          "how many shapes are there ? one two three four", "user assistant system describe the picture",
          "Is there a square left of the triangle? yes no", "1 2 3 4 5 6 7 8 9 0 + - = ."]

QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


PARITY_TOL = 1e-4  # fp32 max |dlogit| accepted against the transformers oracle


def assert_parity(a, b, keep=None, tol=PARITY_TOL):
    """max |a - b| <= tol and equal argmax (over the positions in `keep`, if given); returns the max diff."""
    import torch

    if keep is not None:
        a, b = a[keep], b[keep]
    diff = (a - b).abs().max().item()
    assert diff <= tol, f"max |dlogit| = {diff:.3g} > {tol}"
    assert torch.equal(a.argmax(-1), b.argmax(-1)), "argmax differs"
    return diff


def random_image(h, w, seed):
    """An RGB noise image (h x w) from a seed."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def user(*items):
    """A one-turn chat: None stands for an image, a string for text, in order."""
    content = [{"type": "image"} if it is None else {"type": "text", "text": it} for it in items]
    return [{"role": "user", "content": content}]


def build_tokenizer(special_tokens, vocab_size=300):
    """A small byte-level BPE (the Qwen/Kimi kind) trained on a fixed corpus, with the family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(special_tokens)
    return tok


def randomize(model, seed, std=0.08):
    """Random weights everywhere, norms around 1 (the default init leaves norms at exactly 1 and biases 0,
    which would hide a wrong eps, a missing weight multiply or a dropped bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(std * noise)


def qwen_config(vocab_size, ids, vision=None, **text):
    from transformers import Qwen3VLMoeConfig

    t = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, intermediate_size=80, moe_intermediate_size=48, num_experts=6,
             num_experts_per_tok=2, rms_norm_eps=1e-6,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                              "mrope_interleaved": True})
    t.update(text)
    v = dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=8, temporal_patch_size=2,
             spatial_merge_size=2, out_hidden_size=t["hidden_size"], num_position_embeddings=36,
             deepstack_visual_indexes=[0, 2])
    v.update(vision or {})
    return Qwen3VLMoeConfig(text_config=t, vision_config=v, image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)


def to_hub_layout(src_dir, dst_dir):
    """transformers 5 save_pretrained layout -> the Hub layout: fused experts as [E, H, 2I] / [E, I, H]
    (x @ W), `rope_theta` + `rope_scaling`, `num_experts`."""
    from safetensors.torch import load_file, save_file

    os.makedirs(dst_dir, exist_ok=True)
    sd = load_file(os.path.join(src_dir, "model.safetensors"))
    out = {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj") or k.endswith("mlp.experts.down_proj"):
            v = v.transpose(1, 2)
        out[k] = v.contiguous()
    save_file(out, os.path.join(dst_dir, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(src_dir, "config.json")))
    tc = cfg["text_config"]
    rp = tc.pop("rope_parameters")
    tc["rope_theta"] = rp.pop("rope_theta")
    tc["rope_scaling"] = rp
    tc["num_experts"] = tc.pop("num_local_experts")
    vc = cfg["vision_config"]
    vc.pop("rope_parameters", None)
    json.dump(cfg, open(os.path.join(dst_dir, "config.json"), "w"), indent=1)


def make_tiny_qwen(path, seed=0, preprocessor=None, vision=None, **text):
    """Tiny random Qwen3-VL-MoE in the Hub layout at `path` (config, weights, tokenizer, preprocessor)."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    tok = build_tokenizer(QWEN_SPECIAL)
    ids = {t: tok.token_to_id(t) for t in QWEN_SPECIAL}
    torch.manual_seed(seed)
    hf = Qwen3VLMoeForConditionalGeneration(qwen_config(tok.get_vocab_size(), ids, vision, **text))
    randomize(hf, seed)
    tmp = str(path) + "_hf"
    hf.save_pretrained(tmp)
    to_hub_layout(tmp, path)
    tok.save(os.path.join(path, "tokenizer.json"))
    pre = dict(patch_size=8, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
               size={"shortest_edge": 32 * 32, "longest_edge": 96 * 96})
    pre.update(preprocessor or {})
    json.dump(pre, open(os.path.join(path, "preprocessor_config.json"), "w"))
    return str(path)


def interrupt_after_layer(monkeypatch, k: int):
    """Make the driver raise KeyboardInterrupt right after it has written (and printed) decoder layer k, as a
    killed run would stop: for the --resume tests. Undo with monkeypatch.undo() or let the fixture end."""
    from quant import folders

    original = folders.print_layer

    def crash(i, *a, **kw):
        original(i, *a, **kw)
        if i == k:
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(folders, "print_layer", crash)
    return original
