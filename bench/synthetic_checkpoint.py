"""A random-weight checkpoint with the real Qwen3-VL-30B-A3B text widths and N decoder layers, for benchmarks.

Text model at real width: hidden 2048, 32 query / 4 key-value heads of head_dim 128 with q/k RMSNorms, 128
experts of moe_intermediate_size 768, top-8 (softmax router, renormalized), M-RoPE sections [24, 20, 20],
rope_theta 5e6. Everything else small: the vocabulary, tokenizer, preprocessor and vision tower of
models/tiny-qwen3-vl-moe (its vision config, with out_hidden_size raised to 2048 so the merger feeds the wide
decoder). One real-width layer is 625M parameters, 1.25 GB in bf16: N = 4 is about 5 GB on disk.

Layout: exactly what model.load_model reads from the Hub, config.json in the Hub spelling, bf16 tensors under
the Hub names, each layer's experts as the two fused 3-D tensors `mlp.experts.gate_up_proj` (E, H, 2I) and
`mlp.experts.down_proj` (E, I, H) (model.checkpoint_state_dict writes them), sharded one file per decoder layer
plus one for the rest, with model.safetensors.index.json. The model is built on the meta device and one layer at
a time is materialized, initialized, written and dropped, so memory stays at about two layers in bf16 whatever N.
The folder is written under a temporary name and renamed when complete.

Init as train_tiny.init_weights (a trained model's scale): N(0, 0.02) for every matrix, residual output
projections (o_proj, down_proj) N(0, 0.02 / sqrt(2 N)), norms 1, biases 0; activations stay finite through N
layers.

    python bench/synthetic_checkpoint.py --layers 4 --out /tmp/h8/qwen3-vl-30b-a3b-4l [--seed 0]
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import model  # noqa: E402
from train_tiny import init_weights  # noqa: E402

TINY = os.path.join(ROOT, "models", "tiny-qwen3-vl-moe")
PROCESSOR_FILES = ("tokenizer.json", "preprocessor_config.json", "generation_config.json")
# Qwen3-VL-30B-A3B-Instruct's text_config (Hub spelling), without vocab_size / token ids (the tiny tokenizer's)
TEXT = {"hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "attention_bias": False, "max_position_embeddings": 262144, "rope_theta": 5000000,
        "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True}}


def synthetic_config(n_layers: int) -> dict:
    """The tiny model's config.json with the real text widths and n_layers decoder layers."""
    with open(os.path.join(TINY, "config.json")) as f:
        cfg = json.load(f)
    cfg["text_config"].update(TEXT, num_hidden_layers=n_layers)
    cfg["vision_config"]["out_hidden_size"] = TEXT["hidden_size"]
    return cfg


def write_shard(m, modules: list, keys: list[str], path: str, device: str) -> dict[str, int]:
    """Materialize `modules` (parts of the meta model m) in bf16 on `device`, initialize, write `keys` (Hub
    layout) to `path`, drop them back to meta. Returns {key: bytes}."""
    from safetensors.torch import save_file

    for mod in modules:
        mod.to_empty(device=device)
    init_weights(m, n_layers=len(m.layers))  # by full names, as train_tiny; meta: no-op
    sd = {k: v.contiguous().cpu() for k, v in model.checkpoint_state_dict(m, keys=keys).items()}
    save_file(sd, path, metadata={"format": "pt"})
    for mod in modules:
        mod.to("meta")
    return {k: v.numel() * v.element_size() for k, v in sd.items()}


def write_checkpoint(n_layers: int, out: str, seed: int = 0, device: str = "cpu") -> str:
    """Write the checkpoint folder `out` (replaced if present); returns out."""
    torch.manual_seed(seed)
    cfg = synthetic_config(n_layers)
    with torch.device("meta"):
        m = model.Qwen3VLMoeModel(model.Qwen3VLMoeConfig.from_dict(cfg)).to(torch.bfloat16)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    os.chmod(tmp, 0o755)
    names = [f"model-{j + 1:05d}-of-{n_layers + 1:05d}.safetensors" for j in range(n_layers + 1)]
    prefixes = tuple(m.layer_prefix(i) for i in range(n_layers))
    keys = list(m.state_dict())
    rest = [m.model.visual, m.model.language_model.embed_tokens, m.model.language_model.norm, m.lm_head]
    sizes = {names[0]: write_shard(m, rest, [k for k in keys if not k.startswith(prefixes)],
                                   os.path.join(tmp, names[0]), device)}
    for i in range(n_layers):
        t0 = time.time()
        layer_keys = [k for k in keys if k.startswith(prefixes[i])]
        sizes[names[i + 1]] = write_shard(m, [m.layers[i]], layer_keys, os.path.join(tmp, names[i + 1]), device)
        print(f"layer {i}: {sum(sizes[names[i + 1]].values()) / 1e9:.2f} GB in {time.time() - t0:.1f}s", flush=True)
    index = {"metadata": {"total_size": sum(b for s in sizes.values() for b in s.values())},
             "weight_map": {k: name for name, s in sizes.items() for k in sorted(s)}}
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in PROCESSOR_FILES:
        shutil.copy(os.path.join(TINY, name), tmp)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.rename(tmp, out)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, required=True, help="decoder layers N")
    p.add_argument("--out", required=True, help="output checkpoint folder (replaced if present)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where the weights are drawn (written from the CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    write_checkpoint(args.layers, args.out, args.seed, args.device)
    print(f"synthetic_checkpoint: layers={args.layers} out={args.out} seconds={time.time() - t0:.1f}")


if __name__ == "__main__":
    main()
