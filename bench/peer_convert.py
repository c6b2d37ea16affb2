"""Converts a GPTQ-format checkpoint (what GPTQModel writes) into a float checkpoint that `model.load_model` reads.

    python bench/peer_convert.py --src GPTQ_DIR --dst FLOAT_DIR

model.py reads float checkpoints and compressed-tensors `pack-quantized` ones, not the GPTQ format. So each
quantized linear (`<name>.qweight`, `.qzeros`, `.scales`, optionally `.g_idx`) is dequantized to the float weight
it stands for, W[o, i] = scales[g(i), o] * (q[i, o] - zero[g(i), o]), stored as float32 (exact: an fp16 or bf16
scale times a small integer), and, for Qwen3-VL-MoE, the per-expert linears `mlp.experts.{e}.{gate,up,down}_proj`
are fused back into the checkpoint's own layout, `mlp.experts.gate_up_proj [E, H, 2I]` and
`mlp.experts.down_proj [E, I, H]` (used as x @ W), which arch/checkpoint.py resolves. Every other tensor is
copied unchanged; config.json loses its `quantization_config` (recorded under `moe_vlm_quant.converted_from`).
The dequantized model computes with the same weights as the packed one, so its KL is that of the peer's output.

The format (AutoGPTQ's, kept by GPTQModel as `checkpoint_format: gptq`): `qweight` int32 (in * bits / 32, out)
holds the integer codes of the input channels little-endian in a bit stream per output column (value k at bits
[bits*k, bits*(k+1)), a value may straddle two words, as 3-bit codes do); `qzeros` int32 (groups, out * bits /
32) holds the zero points the same way along the output axis, stored minus one in `gptq` (v1) and as they are
in `gptq_v2`; `scales` (groups, out); `g_idx` int32 (in,) the group of each input channel (act-order permutes
it; without it, channel i is in group i // group_size).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

QSUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class ConvertError(ValueError):
    """The source folder is not a GPTQ checkpoint this converter understands; the message names file and tensor."""


def unpack_codes(packed: torch.Tensor, bits: int, n: int, dim: int) -> torch.Tensor:
    """The `n` unsigned `bits`-bit codes stored along `dim` of int32 tensor `packed`, as int64 (bit stream,
    little-endian within and across words: code k at bits [bits*k, bits*(k+1)))."""
    p = packed.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF  # the words as unsigned 32-bit values
    bit_stream = ((p[..., :, None] >> torch.arange(32)) & 1).flatten(-2)  # (..., 32 * words)
    if bit_stream.shape[-1] < n * bits:
        raise ConvertError(f"{tuple(packed.shape)} int32 words along dim {dim} hold fewer than {n} {bits}-bit codes")
    codes = (bit_stream[..., :n * bits].reshape(*bit_stream.shape[:-1], n, bits) << torch.arange(bits)).sum(-1)
    return codes.movedim(-1, dim)


def dequantize(qweight, qzeros, scales, g_idx, bits: int, zero_offset: int) -> torch.Tensor:
    """The float32 weight (out, in) of one GPTQ linear; zero_offset is 1 for the v1 `gptq` format, 0 for v2."""
    n_groups, out_f = scales.shape
    in_f = qweight.shape[0] * 32 // bits
    if g_idx is None:
        if in_f % n_groups:
            raise ConvertError(f"{in_f} input channels do not split into {n_groups} equal groups and no g_idx is given")
        g_idx = torch.arange(in_f) // (in_f // n_groups)
    q = unpack_codes(qweight, bits, in_f, 0)  # (in, out)
    z = unpack_codes(qzeros, bits, out_f, 1) + zero_offset  # (groups, out)
    g = g_idx.to(torch.int64)
    w = scales.float()[g] * (q - z[g]).float()  # (in, out): exact, a small integer times the stored scale
    return w.T.contiguous()


def read_tensors(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's safetensors files (one file or shards)."""
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise ConvertError(f"{folder}: no .safetensors files")
    out = {}
    for name in files:
        with safe_open(os.path.join(folder, name), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def gptq_settings(folder: str) -> dict:
    """bits, zero offset and symmetry from the folder's quantize_config.json (or config.json's quantization_config)."""
    path = os.path.join(folder, "quantize_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            qc = json.load(f)
    else:
        with open(os.path.join(folder, "config.json")) as f:
            qc = json.load(f).get("quantization_config")
        if qc is None:
            raise ConvertError(f"{folder}: neither quantize_config.json nor a quantization_config in config.json")
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    if fmt not in ("gptq", "gptq_v2"):
        raise ConvertError(f"{folder}: checkpoint_format {fmt!r}; only gptq (v1) and gptq_v2 are converted")
    return {"bits": int(qc["bits"]), "zero_offset": 1 if fmt == "gptq" else 0, "format": fmt,
            "group_size": int(qc.get("group_size", -1)), "sym": qc.get("sym"), "desc_act": qc.get("desc_act")}


def fuse_experts(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert 2-D weights -> the Hub's fused gate_up_proj [E, H, 2I] / down_proj [E, I, H] (experts 0..E-1)."""
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key in [k for k in sd if _EXPERT.match(k)]:
        m = _EXPERT.match(key)
        groups.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = sd.pop(key)
    for base, experts in groups.items():
        if sorted(experts) != list(range(len(experts))) or any(len(w) != 3 for w in experts.values()):
            raise ConvertError(f"{base}: experts {sorted(experts)} are not 0..E-1 each with gate/up/down_proj")
        order = [experts[e] for e in range(len(experts))]
        sd[f"{base}.gate_up_proj"] = torch.stack([torch.cat([w["gate_proj"].T, w["up_proj"].T], 1) for w in order])
        sd[f"{base}.down_proj"] = torch.stack([w["down_proj"].T for w in order])
    return sd


def convert(src: str, dst: str, fuse: bool = True) -> dict:
    """Writes the float checkpoint of GPTQ folder `src` to `dst` (replaced); -> what was done (for the table)."""
    qs = gptq_settings(src)
    tensors = read_tensors(src)
    bases = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".qweight")})
    sd = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in bases or k.rsplit(".", 1)[1] not in QSUFFIXES}
    for base in bases:
        missing = [s for s in ("qzeros", "scales") if f"{base}.{s}" not in tensors]
        if missing:
            raise ConvertError(f"{src}: {base}.qweight without {', '.join(missing)}")
        sd[f"{base}.weight"] = dequantize(tensors[f"{base}.qweight"], tensors[f"{base}.qzeros"],
                                          tensors[f"{base}.scales"], tensors.get(f"{base}.g_idx"), qs["bits"],
                                          qs["zero_offset"])
    if fuse:
        sd = fuse_experts(sd)
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    os.makedirs(dst)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(dst, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg.pop("quantization_config", None)
    cfg.setdefault("moe_vlm_quant", {})["converted_from"] = {"format": qs["format"], "bits": qs["bits"],
                                                             "group_size": qs["group_size"], "sym": qs["sym"],
                                                             "desc_act": qs["desc_act"], "linears": len(bases)}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in os.listdir(src):  # tokenizer, processor and generation files
        if name.endswith(".json") and name not in ("config.json", "model.safetensors.index.json",
                                                   "quantize_config.json"):
            shutil.copy(os.path.join(src, name), dst)
    return {**qs, "linears": len(bases)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="GPTQ-format folder (quantize_config.json, qweight/qzeros/scales)")
    p.add_argument("--dst", required=True, help="float checkpoint folder to write (replaced if present)")
    p.add_argument("--no-fuse", action="store_true", help="keep per-expert linears under their own names")
    a = p.parse_args(argv)
    print(convert(a.src, a.dst, fuse=not a.no_fuse))


if __name__ == "__main__":
    main()
