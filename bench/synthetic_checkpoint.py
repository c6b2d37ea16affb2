"""Random-weight checkpoints at a real model's widths with N decoder layers, for benchmarks (no 60 GB download).

Two families (--family):
  qwen  Qwen3-VL-30B-A3B text widths: hidden 2048, 32 query / 4 key-value heads of head_dim 128 with q/k
        RMSNorms, 128 experts of moe_intermediate_size 768, top-8 (softmax router, renormalized), M-RoPE sections
        [24, 20, 20], rope_theta 5e6. Everything else small: the vocabulary, tokenizer, preprocessor and vision
        tower of models/tiny-qwen3-vl-moe (its vision config, with out_hidden_size raised to 2048 so the merger
        feeds the wide decoder). One layer is 625M parameters, 1.25 GB in bf16.
  kimi  Kimi-VL-A3B-Instruct, everything at real size but the depth (ARCHITECTURES.md §2.1-2.2): MLA (q_proj,
        no q_lora; kv_a_proj_with_mqa 576, kv_a_layernorm 512, kv_b_proj 4096, o_proj), layer 0 a dense SwiGLU of
        11264, layers >= 1 MoE with 64 routed experts of 1408 (top-6, sigmoid, noaux_tc) + 2 shared experts
        (2816) + the router's gate.weight and e_score_correction_bias; MoonViT (27 blocks of 1152, pos table
        64x64), the projector, embed_tokens and lm_head of 163840 x 2048. Non-layer tensors 1.11B parameters
        (2.2 GB), layer 0 83M (0.17 GB), each MoE layer 585M (1.17 GB): the real 27 layers make 16.4B. The config
        is the real config.json when one is found (--real-dir, else tests/fixtures/real/kimi-vl-a3b-instruct/),
        else written from ARCHITECTURES.md §2.1; the same folder may supply tokenizer.json,
        preprocessor_config.json and generation_config.json. Otherwise: the bundled tiny Kimi tokenizer with its
        special tokens moved to the real ids (§3.2; its 500 ordinary ids fit the real vocabulary), and the real
        preprocessor values (§3.2: patch 14, in_token_limit 4096, pad_input, mean/std 0.5, §6.1).

Layout: what model.load_model reads from the Hub, config.json in the Hub spelling, tensors under the Hub names in
bf16. qwen: each layer's experts as the two fused 3-D tensors `mlp.experts.gate_up_proj` (E, H, 2I) and
`mlp.experts.down_proj` (E, I, H) (checkpoint.checkpoint_state_dict writes them), one shard per decoder layer plus one
for the rest. kimi: per-expert tensors (`mlp.experts.{e}.gate_proj.weight` ...), and shards filled in order up to
--shard-gb at tensor granularity, as transformers' save_pretrained shards (max_shard_size): the non-layer
tensors first, then the layers, so a layer may straddle two shards. The real repository has 7 shards (the Hub
listing of Kimi-VL-A3B-Thinking, tests/fixtures/real/SOURCES.md on branch fixtures; <= 5 GB, transformers 4's
default, gives 7 for 32.9 GB: --shard-gb 5); the default 2 GB already gives several shards and a split layer at
2-4 layers. e_score_correction_bias is stored in float32: ARCHITECTURES.md §6.4 leaves the real file's dtype
unchecked; Kimi-K3 and DeepSeek-V3 checkpoints store it in float32 (vLLM PR #50761), and model.py reads it as
float32 whatever the file holds. Always with model.safetensors.index.json.

The model is built on the meta device; one unit at a time (the non-layer tensors, then each decoder layer) is
materialized, initialized, handed to the shard writer and dropped, so memory stays at about one unit plus one
shard in bf16 whatever N. The folder is written under a temporary name and renamed when complete.

Init as train_tiny.init_weights (a trained model's scale): N(0, 0.02) for every matrix, residual output
projections (o_proj, down_proj, MoonViT wo / fc1) N(0, 0.02 / sqrt(2 N)), norms 1, biases 0. Kimi only:
e_score_correction_bias N(0, 0.01) (small: it changes which experts win without unbalancing them), and
embed_tokens N(0, 1), so text tokens enter at the scale of the image features (KIMI_EMBED_STD). Kimi also gets
the real file's stale `self_attn.rotary_emb.inv_freq` per layer (5679 tensors at 27 layers, as §2.2 counts).
--check runs the float model, streamed, on a few calibration samples and prints per-layer activation RMS and
how the MoE layers' routed slots spread over the experts.

    python bench/synthetic_checkpoint.py --layers 4 --out /tmp/h8/qwen3-vl-30b-a3b-4l [--seed 0]
    python bench/synthetic_checkpoint.py --family kimi --layers 4 --out /tmp/kimi/kimi-vl-a3b-4l [--check]
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from arch import checkpoint  # noqa: E402
from arch import kimi_vl  # noqa: E402
from data import processor  # noqa: E402
from data import samples as data_samples  # noqa: E402
import model  # noqa: E402
from tools.train_tiny import init_weights  # noqa: E402

GB = 1e9
QWEN_TINY = os.path.join(ROOT, "models", "tiny-qwen3-vl-moe")
KIMI_TINY = os.path.join(ROOT, "models", "tiny-kimi-vl")
KIMI_REAL_DIR = os.path.join(ROOT, "tests", "fixtures", "real", "kimi-vl-a3b-instruct")
SIDE_FILES = ("tokenizer.json", "preprocessor_config.json", "generation_config.json")

# Qwen3-VL-30B-A3B-Instruct's text_config (Hub spelling), without vocab_size / token ids (the tiny tokenizer's)
QWEN_TEXT = {"hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
             "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
             "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "hidden_act": "silu",
             "rms_norm_eps": 1e-6, "attention_bias": False, "max_position_embeddings": 262144,
             "rope_theta": 5000000, "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20],
                                                     "mrope_interleaved": True}}

# Kimi-VL-A3B-Instruct's config.json (ARCHITECTURES.md §2.1, remote-code spelling); num_hidden_layers is set per run
KIMI_CONFIG = {
    "architectures": ["KimiVLForConditionalGeneration"], "model_type": "kimi_vl", "media_placeholder_token_id": 163605,
    "ignore_index": -100, "tie_word_embeddings": False, "vocab_size": 163840, "torch_dtype": "bfloat16",
    "vision_config": {"model_type": "moonvit", "patch_size": 14, "num_attention_heads": 16, "num_hidden_layers": 27,
                      "hidden_size": 1152, "intermediate_size": 4304, "init_pos_emb_height": 64,
                      "init_pos_emb_width": 64, "merge_kernel_size": [2, 2]},
    "text_config": {"model_type": "deepseek_v3", "vocab_size": 163840, "max_position_embeddings": 131072,
                    "hidden_size": 2048, "intermediate_size": 11264, "moe_intermediate_size": 1408,
                    "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
                    "n_shared_experts": 2, "n_routed_experts": 64, "routed_scaling_factor": 2.446,
                    "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "v_head_dim": 128,
                    "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1,
                    "num_experts_per_tok": 6, "moe_layer_freq": 1, "first_k_dense_replace": 1,
                    "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu", "rms_norm_eps": 1e-5,
                    "rope_theta": 800000.0, "rope_scaling": None, "attention_bias": False, "bos_token_id": 163584,
                    "eos_token_id": 163585, "pad_token_id": 163839, "tie_word_embeddings": False}}
# The special tokens' ids in the real Kimi vocabulary (ARCHITECTURES.md §3.2)
KIMI_SPECIAL_IDS = {"[BOS]": 163584, "[EOS]": 163585, "<|im_end|>": 163586, "<|im_user|>": 163587,
                    "<|im_assistant|>": 163588, "<|im_system|>": 163594, "<|im_middle|>": 163601,
                    "<|media_start|>": 163602, "<|media_content|>": 163603, "<|media_end|>": 163604,
                    "<|media_pad|>": 163605, "[PAD]": 163839}
KIMI_PREPROCESSOR = {"image_processor_type": "KimiVLImageProcessor", "patch_size": 14, "in_token_limit": 4096,
                     "merge_kernel_size": [2, 2], "pad_input": True, "num_pooled_tokens": 1024,
                     "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
FP32_KEYS = ("e_score_correction_bias",)  # stored in float32 (see the docstring); every other tensor in bf16
# The real bias is trained to balance the experts' load; a random one unbalances it. On Gaussian router inputs
# (4096 tokens, one of these layers) std 0.01 changes at least one chosen expert for 36% of the tokens (the
# selection-only path is exercised) and the load's coefficient of variation is 0.14 (0.06 without a bias;
# the tests' 0.1 changes 98% of the choices but gives 0.91, with an expert never chosen).
ROUTER_BIAS_STD = 0.01
# With init_weights' N(0, 0.02) embeddings (RMS 0.02) image features enter at RMS ~1.3 and layer 0's attention
# output, a running mean of values shared by all positions, swamps the text tokens: on 16 calibration samples
# the MoE layer routed 14% of all slots to one expert. At std 1 text and image tokens enter at the same scale.
KIMI_EMBED_STD = 1.0


def qwen_config(n_layers: int, real_dir: str | None = None) -> dict:
    """The tiny Qwen model's config.json with the real text widths and n_layers decoder layers."""
    with open(os.path.join(QWEN_TINY, "config.json")) as f:
        cfg = json.load(f)
    cfg["text_config"].update(QWEN_TEXT, num_hidden_layers=n_layers)
    cfg["vision_config"]["out_hidden_size"] = QWEN_TEXT["hidden_size"]
    return cfg


def kimi_config(n_layers: int, real_dir: str | None = None) -> dict:
    """Kimi-VL-A3B-Instruct's config.json (the real file in real_dir if there, else §2.1) with n_layers."""
    path = os.path.join(real_dir or KIMI_REAL_DIR, "config.json")
    cfg = json.load(open(path)) if os.path.isfile(path) else json.loads(json.dumps(KIMI_CONFIG))
    cfg["text_config"]["num_hidden_layers"] = n_layers
    return cfg


def qwen_side_files(folder: str, real_dir: str | None = None):
    for name in SIDE_FILES:
        shutil.copy(os.path.join(QWEN_TINY, name), folder)


def kimi_side_files(folder: str, real_dir: str | None = None):
    """tokenizer.json, preprocessor_config.json, generation_config.json: the real files where real_dir has them,
    else the tiny tokenizer with the real special-token ids, the real preprocessor values, and the tiny
    generation config with its token ids moved the same way."""
    real_dir = real_dir or KIMI_REAL_DIR
    with open(os.path.join(KIMI_TINY, "tokenizer.json")) as f:
        tok = json.load(f)
    moved = {}  # tiny id -> real id
    for t in tok["added_tokens"]:  # `tokenizers` takes an added token's id from the model vocab, so set both
        moved[t["id"]] = t["id"] = tok["model"]["vocab"][t["content"]] = KIMI_SPECIAL_IDS[t["content"]]
    with open(os.path.join(KIMI_TINY, "generation_config.json")) as f:
        gen = json.load(f)
    gen = {k: ([moved[i] for i in v] if isinstance(v, list) else moved[v]) if k.endswith("token_id") else v
           for k, v in gen.items()}
    for name, content in zip(SIDE_FILES, (tok, KIMI_PREPROCESSOR, gen)):
        if os.path.isfile(os.path.join(real_dir, name)):
            shutil.copy(os.path.join(real_dir, name), folder)
        else:
            with open(os.path.join(folder, name), "w") as f:
                json.dump(content, f, indent=2)


def kimi_init(m, keys: list[str]):
    """After init_weights: the router's correction bias N(0, ROUTER_BIAS_STD), and text embeddings at the
    scale of the projector's image features (RMS about 1; see KIMI_EMBED_STD)."""
    for k in keys:
        if k.endswith("e_score_correction_bias"):
            torch.nn.init.normal_(m.get_parameter(k), std=ROUTER_BIAS_STD)
        elif k.endswith("embed_tokens.weight"):
            torch.nn.init.normal_(m.get_parameter(k), std=KIMI_EMBED_STD)


def kimi_stale(cfg: dict, i: int) -> dict:
    """The real checkpoint's stale rotary buffer of layer i (§2.2; the loader skips it by name), bf16 as the
    model's other buffers were saved (its stored dtype is not checked)."""
    t = cfg["text_config"]
    d = t["qk_rope_head_dim"]
    inv_freq = 1.0 / t["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float32) / d)  # (d/2,)
    return {kimi_vl.KimiVLModel.layer_prefix(i) + "self_attn.rotary_emb.inv_freq": inv_freq.to(torch.bfloat16)}


@dataclass(frozen=True)
class Family:
    name: str  # the checkpoint folder's stem
    real_layers: int
    config: Callable[[int, str | None], dict]
    side_files: Callable[[str, str | None], None]
    shard_gb: float | None  # None: one shard per unit (the rest, then each layer)
    init: Callable = lambda m, keys: None  # after init_weights, on the unit's parameters
    stale: Callable[[dict, int], dict] = lambda cfg, i: {}  # tensors of layer i that no parameter holds


FAMILIES = {"qwen": Family("qwen3-vl-30b-a3b", 48, qwen_config, qwen_side_files, None),
            "kimi": Family("kimi-vl-a3b", 27, kimi_config, kimi_side_files, 2.0, kimi_init, kimi_stale)}


class ShardWriter:
    """Safetensors shards of at most max_bytes (None: one per unit), named model-0000j-of-0000n at close()."""

    def __init__(self, folder: str, max_bytes: float | None):
        self.folder, self.max_bytes = folder, max_bytes
        self.buf, self.files, self.weight_map, self.total = {}, [], {}, 0

    def add(self, sd: dict):
        for k, t in sd.items():
            nbytes = t.numel() * t.element_size()
            if self.max_bytes and self.buf and self.size() + nbytes > self.max_bytes:
                self.flush()
            self.buf[k] = t.contiguous().cpu()
            self.total += nbytes
        if self.max_bytes is None:
            self.flush()

    def size(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buf.values())

    def flush(self):
        from safetensors.torch import save_file

        if self.buf:
            name = f"shard-{len(self.files):05d}"
            save_file(self.buf, os.path.join(self.folder, name), metadata={"format": "pt"})
            self.files.append(name)
            self.weight_map.update({k: name for k in self.buf})
            self.buf = {}

    def close(self):
        """Rename the shards to their final names and write model.safetensors.index.json."""
        self.flush()
        final = {name: f"model-{j + 1:05d}-of-{len(self.files):05d}.safetensors" for j, name in enumerate(self.files)}
        for name, new in final.items():
            os.rename(os.path.join(self.folder, name), os.path.join(self.folder, new))
        index = {"metadata": {"total_size": self.total},
                 "weight_map": {k: final[v] for k, v in sorted(self.weight_map.items())}}
        with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)


def write_unit(m, fam: "Family", keys: list[str], extra: dict, writer: ShardWriter, device: str) -> int:
    """Materialize the parameters `keys` of the meta model m (bf16; FP32_KEYS in float32) on `device`,
    initialize them, hand them and `extra` (tensors no parameter holds) to the writer under the Hub names, and
    drop them back to meta. Returns bytes."""
    for k in keys:
        p = m.get_parameter(k)
        checkpoint.assign(m, k, torch.empty(p.shape, device=device,
                                       dtype=torch.float32 if k.endswith(FP32_KEYS) else torch.bfloat16))
    init_weights(m, n_layers=len(m.layers))  # by full names, as train_tiny; meta: no-op
    fam.init(m, keys)
    sd = {**checkpoint.checkpoint_state_dict(m, keys=keys), **extra}
    writer.add(sd)
    for k in keys:
        p = m.get_parameter(k)
        checkpoint.assign(m, k, torch.empty(p.shape, dtype=p.dtype, device="meta"))
    return sum(t.numel() * t.element_size() for t in sd.values())


def with_experts(cfg: dict, experts: int) -> dict:
    """cfg with `experts` routed experts per MoE layer (and top-k at most that): a reduced layer of the same
    widths, for a quick run (bench/gpu_check.sh's CPU smoke run)."""
    text = cfg["text_config"]
    text["num_experts" if "num_experts" in text else "n_routed_experts"] = experts
    text["num_experts_per_tok"] = min(text["num_experts_per_tok"], experts)
    return cfg


def write_checkpoint(n_layers: int, out: str, seed: int = 0, device: str = "cpu", family: str = "qwen",
                     shard_gb: float | None = None, real_dir: str | None = None, experts: int | None = None) -> str:
    """Write the checkpoint folder `out` (replaced if present); returns out. shard_gb: the family's default
    when None (0: one shard per unit). experts: routed experts per MoE layer (default: the real model's)."""
    fam = FAMILIES[family]
    shard_gb = fam.shard_gb if shard_gb is None else (shard_gb or None)
    device = model.resolve_device(device)
    torch.manual_seed(seed)
    cfg = fam.config(n_layers, real_dir)
    if experts:
        cfg = with_experts(cfg, experts)
    with torch.device("meta"):
        m = model.MODELS[cfg["model_type"]](model.CONFIGS[cfg["model_type"]].from_dict(cfg)).to(torch.bfloat16)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    os.chmod(tmp, 0o755)
    writer = ShardWriter(tmp, None if shard_gb is None else shard_gb * GB)
    prefixes = tuple(m.layer_prefix(i) for i in range(n_layers))
    keys = list(m.state_dict())
    rest = [k for k in keys if not k.startswith(prefixes)]
    t0 = time.time()
    print(f"non-layer tensors: {write_unit(m, fam, rest, {}, writer, device) / GB:.2f} GB in "
          f"{time.time() - t0:.1f}s", flush=True)
    for i in range(n_layers):
        t0 = time.time()
        nbytes = write_unit(m, fam, [k for k in keys if k.startswith(prefixes[i])], fam.stale(cfg, i), writer, device)
        print(f"layer {i}: {nbytes / GB:.2f} GB in {time.time() - t0:.1f}s", flush=True)
    writer.close()
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    fam.side_files(tmp, real_dir)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.rename(tmp, out)
    return out


@torch.no_grad()
def forward_check(ckpt: str, n: int = 4, seed: int = 0):
    """Run the float model (streamed, one layer in memory) on n calibration samples; print per layer the RMS
    and max |x| of the hidden states (text and image positions) and, for MoE layers, how many experts the
    tokens reached and the largest expert's share of the routed slots; then the logits' std and finiteness."""
    import calibrate

    m = model.load_model(ckpt, dtype=torch.float32, lazy_layers=True)
    proc = processor.load_processor(ckpt)
    batches = [calibrate.on(m, calibrate.encode(proc, s)) for s in data_samples.load_samples("shapes", n=n, seed=seed, split="train")]
    hs = [m.embed(b["input_ids"], **processor.vision_inputs(b)) for b in batches]
    vis = torch.cat([b["is_vis"].flatten() for b in batches])
    rec = calibrate.RoutingRecorder(m)

    def stats(tag):
        x = torch.cat([h[0][0] for h in hs])  # (T, H), all samples
        rms = x.pow(2).mean(-1).sqrt()
        print(f"{tag}: rms text {rms[~vis].mean():.3g}, image {rms[vis].mean():.3g}; max |x| {x.abs().max():.3g}; "
              f"finite {bool(x.isfinite().all())}", end="")

    stats("embeddings")
    print()
    for i in range(len(m.layers)):
        layer, used = m.load_layer(i), []
        for j, (x, ctx) in enumerate(hs):
            hs[j] = (m.after_layer(i, layer(x, ctx), ctx), ctx)
            if i in rec.last:
                used.append(rec.last.pop(i)[0].flatten())
        m.unload_layer(i)
        stats(f"layer {i}")
        if used:
            counts = torch.cat(used).bincount(minlength=len(layer.mlp.experts))
            print(f"; experts reached {int((counts > 0).sum())}/{len(counts)}, largest share "
                  f"{counts.max() / counts.sum():.3f} (uniform {1 / len(counts):.3f})", end="")
        print()
    rec.remove()
    logits = torch.cat([m.head(x)[0] for x, _ in hs])
    print(f"logits: std {logits.std():.3g}, finite {bool(logits.isfinite().all())}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(FAMILIES), default="qwen")
    p.add_argument("--layers", type=int, required=True, help="decoder layers N")
    p.add_argument("--out", required=True, help="output checkpoint folder (replaced if present)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-gb", type=float, default=None,
                   help="largest shard (GB); 0: one shard per unit; default: the family's (qwen 0, kimi 2)")
    p.add_argument("--real-dir", default=None, help="kimi: folder with the real config.json etc. (default: "
                   "tests/fixtures/real/kimi-vl-a3b-instruct/ when present)")
    p.add_argument("--device", default="cpu", help="where the weights are drawn (written from the CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--experts", type=int, default=None, help="routed experts per MoE layer (default: the real "
                   "model's; fewer: a reduced layer of the same widths)")
    p.add_argument("--check", action="store_true", help="then run the float model on a few samples (forward_check)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    write_checkpoint(args.layers, args.out, args.seed, args.device, args.family, args.shard_gb, args.real_dir,
                     args.experts)
    print(f"synthetic_checkpoint: family={args.family} layers={args.layers} out={args.out} "
          f"seconds={time.time() - t0:.1f}")
    if args.check:
        forward_check(args.out)


if __name__ == "__main__":
    main()
