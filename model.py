"""The model: hand-written forward passes for Mixture-of-Experts vision-language models, loaded from safetensors
with no transformers at run time. This file reads a checkpoint folder into the right model (load_config,
load_model) and answers a prompt (the CLI); the model code lives in arch/:

  * arch/blocks.py        what both families share: norms, rotary embeddings, attention, SwiGLU, the decoder
                          layer, the expert loop, the KV cache, MoEVLM (weight streaming, generation), and each
                          decoder layer as data for the quantizers (Routing, expert_assignments, layer_structure);
  * arch/qwen3_vl_moe.py  Qwen3-VL-MoE (e.g. Qwen3-VL-30B-A3B-Instruct): ViT with DeepStack, M-RoPE, softmax MoE;
  * arch/kimi_vl.py       Kimi-VL (e.g. Kimi-VL-A3B-Instruct): MoonViT + DeepSeek-V3 style LLM (MLA, sigmoid MoE);
  * arch/checkpoint.py    config.json spellings, the safetensors files, tensor names (fused Qwen experts included).
The spec these follow is docs/architectures.md (checked against transformers 5.23 in tests/). The modules mirror
the checkpoint's tensor names, so the state dict of a model *is* the checkpoint's key list (the fused Qwen expert
tensors split into per-expert 2-D weights). Loading is strict, optionally one decoder layer at a time
(`load_model(..., lazy_layers=True)`, then `model.load_layer(i)` / `model.unload_layer(i)`, as gptq.py's loop
does); a packed checkpoint (a `quantization_config`) loads into quant/grid.py's QuantLinear.
Does not: video inputs, training-time features (dropout, aux losses), sampling.
Read next: arch/blocks.py (a decoder layer, its router and its experts).

Run:  python model.py --model DIR --image IMG --prompt "What is in the picture?"
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn as nn

from arch.checkpoint import Checkpoint, CheckpointError, STALE_KEYS
from arch.kimi_vl import KimiVLConfig, KimiVLModel
from arch.qwen3_vl_moe import Qwen3VLMoeConfig, Qwen3VLMoeModel
from data.processor import load_processor, vision_inputs
from quant.grid import QuantLinear, use_compiled_quant_linear

DEFAULT_MODEL = "models/tiny-qwen3-vl-moe"  # the bundled tiny model: calibrate.py's and gptq.py's default
CONFIGS: dict[str, type] = {"qwen3_vl_moe": Qwen3VLMoeConfig, "kimi_vl": KimiVLConfig}  # model_type -> config
MODELS: dict[str, type] = {"qwen3_vl_moe": Qwen3VLMoeModel, "kimi_vl": KimiVLModel}  # model_type -> model


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
# Loading: build the model of a config, then bind it to the checkpoint's tensors (checkpoint.py), strictly.


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
    """Replace every nn.Linear in `layer` by an empty QuantLinear of the same shape (filled by the loader), on the
    linear's device (the meta device while loading; the model's device when a quantized layer is restored)."""
    for name, lin in [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]:
        parent, _, attr = name.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, attr,
                QuantLinear(lin.in_features, lin.out_features, bits=bits, group_size=group_size, sym=sym,
                            abits=abits, bias=lin.bias is not None, device=lin.weight.device))


def resolve_device(device) -> torch.device:
    """The torch.device of a `--device` value, checked before any work: a device this machine does not have (e.g.
    `--device cuda` on a CPU-only torch build) raises a ValueError naming the flag, never falls back to the CPU."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {device!r}: not a torch device ({e}); use cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES?)")
            raise ValueError(f"--device {device}: CUDA is not available: {why} (torch {torch.__version__}); "
                             "use --device cpu or a CUDA build of torch on a GPU machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    return dev


def load_model(checkpoint_dir: str, dtype=torch.float32, device="cpu", lazy_layers: bool = False):
    """Build the model of `checkpoint_dir/config.json` and load its safetensors strictly.

    dtype/device: where the weights live (fp32 on CPU; bf16 on GPU); a device this machine lacks is an error
    naming --device (resolve_device). With lazy_layers=True the decoder layers
    stay on the meta device (no memory); materialize one with `model.load_layer(i)` and drop it with
    `model.unload_layer(i)`. Every tensor of every layer is checked (presence, shape) up front; tensors in the
    checkpoint that no parameter uses are reported by name. Errors are CheckpointError naming file and tensor."""
    device = resolve_device(device)
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

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if args.device == "cpu" else torch.bfloat16)
    model = load_model(args.model, dtype=dtype, device=args.device)
    proc = load_processor(args.model)
    content = [{"type": "image"} for _ in args.image] + [{"type": "text", "text": args.prompt}]
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": content}]
    enc = proc.encode(messages, images=args.image)
    vision = {k: v.to(args.device) for k, v in vision_inputs(enc).items()}
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
