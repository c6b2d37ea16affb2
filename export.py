"""The quantized output folder: packed weights in compressed-tensors `pack-quantized` naming, sharded one
safetensors file per decoder layer (write_output, write_index), its `quantization_config` (quantization_config,
ignored_modules: what stays float, by exact checkpoint name, as vLLM and llm-compressor read it), and the
dequantized export in the original float layout (export_fake_quant, `python gptq.py --fake-quant`).

Every folder is built under a temporary name and renamed into place (model.temporary_output_dir,
model.publish_output_dir). Does not: quantize (layerwise.py), or pack codes (model.QuantLinear).
"""

from __future__ import annotations

from dataclasses import asdict
import json
import os
import shutil

from safetensors import safe_open
from safetensors.torch import save_file
import torch
import torch.nn as nn

import methods
import model as model_lib
from methods import QuantArgs


def save_atomic(tensors: dict, path: str, metadata: dict | None = None):
    """save_file to path.tmp, then rename: a crash never leaves a half-written path."""
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def quantization_config(q: QuantArgs, ignore: list[str]) -> dict:
    """compressed-tensors `pack-quantized` description of what was done (vLLM / llm-compressor read it)."""
    weights = {"num_bits": q.bits, "type": "int", "symmetric": q.sym, "dynamic": False, "observer": "minmax",
               "strategy": "channel" if q.group_size == -1 else "group",
               "group_size": None if q.group_size == -1 else q.group_size,
               "actorder": "static" if q.act_order and methods.get(q.method).solver == "gptq" else None}
    acts = None if q.abits >= 16 else {"num_bits": q.abits, "type": "int", "symmetric": True, "dynamic": True,
                                        "strategy": "token"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
            "ignore": ignore, "moe_vlm_quant": asdict(q)}


def ignored_modules(m) -> list[str]:
    """Module names that stay float: every nn.Linear outside the decoder layers, and the routers, each by its
    exact checkpoint name (as llm-compressor writes them). Exact dotted names, not `re:` patterns: vLLM renames
    exact entries with the model's checkpoint-to-vLLM prefix map before matching them against its own module
    names, but leaves `re:` entries as they are (compressed_tensors.py, CompressedTensorsConfig.apply_vllm_mapper),
    so a regex over checkpoint names misses e.g. Qwen3-VL's `language_model.model.layers.N.mlp.gate`; and vLLM's
    Qwen3-MoE router is a GateLinear built with the quantization config (qwen3_moe.py), which a `Linear` target
    then quantizes unless the ignore list matches it."""
    in_layers = {id(mod) for layer in m.layers for mod in layer.modules()}
    names = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear) and id(mod) not in in_layers]
    routers = [m.layer_prefix(i) + s.router for i, s in enumerate(map(model_lib.layer_structure, m.layers))
               if s.router is not None]
    return names + routers


def write_output(m, model_dir: str, out: str, q: QuantArgs, partial: str, report: dict, inputs=(),
                 overwrite: bool = False):
    """Assemble out/: config.json with quantization_config, the weights as shards (the float non-layer tensors,
    then one shard per decoder layer: the finished per-layer files, hard-linked, so nothing is copied or held
    in memory at any depth) with model.safetensors.index.json, the tokenizer / preprocessor files, report.json.
    Written to a temporary folder and renamed (`model.publish_output_dir`: only a previous output is replaced,
    unless `overwrite`); the per-layer partial results are removed only after that."""
    tmp = model_lib.temporary_output_dir(out, "quantized")
    n = len(m.layers)
    shards = [f"model-{j + 1:05d}-of-{n + 1:05d}.safetensors" for j in range(n + 1)]
    prefixes = tuple(m.layer_prefix(i) for i in range(n))
    tensors = model_lib.checkpoint_state_dict(m, keys=[k for k in m.state_dict() if not k.startswith(prefixes)])
    save_atomic(tensors, os.path.join(tmp, shards[0]), metadata={"format": "pt"})
    for i in range(n):
        os.link(os.path.join(partial, f"layer_{i:04d}.safetensors"), os.path.join(tmp, shards[i + 1]))
    write_index(tmp, shards)
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = quantization_config(q, ignored_modules(m))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in os.listdir(model_dir):  # tokenizer, preprocessor, generation config, chat template ...
        copied = name.endswith((".json", ".jinja", ".model", ".txt")) and not name.startswith("model.safetensors")
        if copied and name not in ("config.json", model_lib.OUTPUT_MARKER):
            shutil.copy(os.path.join(model_dir, name), tmp)
    with open(os.path.join(tmp, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    model_lib.publish_output_dir(tmp, out, "quantized", inputs, overwrite)
    shutil.rmtree(partial)


def write_index(folder: str, shards: list[str]):
    """model.safetensors.index.json: every tensor name -> its shard, and the tensors' total bytes (each file's
    size less its 8-byte length prefix and JSON header)."""
    weight_map, total = {}, 0
    for name in shards:
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            total += os.path.getsize(path) - 8 - int.from_bytes(f.read(8), "little")
        with safe_open(path, framework="pt") as f:
            weight_map.update({k: name for k in f.keys()})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def export_fake_quant(quantized: str, dst: str, inputs=(), overwrite: bool = False):
    """Write the dequantized weights of a packed checkpoint in the original float layout (Hub names, fused
    Qwen experts, no quantization_config), so any harness that reads the float model (lmms-eval,
    transformers, SGLang) evaluates the quantized one unchanged. Written to a temporary folder, then renamed
    (only over a previous fake-quant export, unless `overwrite`; never into `quantized` itself or `inputs`)."""
    model_lib.check_output_dir(dst, "fake-quant", inputs, overwrite, "--fake-quant output", container=quantized)
    m = model_lib.load_model(quantized, dtype=torch.float32)
    for layer in list(m.layers) + m.vision_modules():
        for name, ql in [(n, mod) for n, mod in layer.named_modules() if isinstance(mod, model_lib.QuantLinear)]:
            lin = nn.Linear(ql.in_features, ql.out_features, bias=ql.bias is not None)
            lin.weight = nn.Parameter(ql.dequantize().float(), requires_grad=False)
            if ql.bias is not None:
                lin.bias = nn.Parameter(ql.bias.float(), requires_grad=False)
            layer.set_submodule(name, lin)
    tmp = model_lib.temporary_output_dir(dst, "fake-quant")
    sd = {k: v.contiguous() for k, v in model_lib.checkpoint_state_dict(m).items()}
    save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(quantized, "config.json")) as f:
        cfg = json.load(f)
    cfg.pop("quantization_config")
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in os.listdir(quantized):  # tokenizer, preprocessor ...; not the packed shards or their index
        weights = name.endswith(".safetensors") or name == "model.safetensors.index.json"
        if not weights and name not in ("config.json", "report.json", model_lib.OUTPUT_MARKER) \
                and os.path.isfile(os.path.join(quantized, name)):
            shutil.copy(os.path.join(quantized, name), tmp)
    model_lib.publish_output_dir(tmp, dst, "fake-quant", inputs, overwrite, "--fake-quant output", container=quantized)
