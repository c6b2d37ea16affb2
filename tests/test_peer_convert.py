"""bench/peer_convert.py against oracles written here, with no peer toolkit installed.

The GPTQ packing is written in this file from the format's definition (each output column's codes laid end to end
as one little-endian bit stream, `bits` bits per code, cut into 32-bit words; zero points likewise along the
output axis, stored minus one in the v1 format), so the converter's unpacking is checked against an independent
writer: the dequantized weight must equal scale * (q - zero) exactly. Then a whole GPTQ folder in the layout
GPTQModel writes (per-expert linears) is converted and read back with the project's own loader, which must see
the same weights through the fused expert tensors.
"""

import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import peer_convert  # noqa: E402

TINY = os.path.join(ROOT, "models", "tiny-qwen3-vl-moe")


def pack_columns(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words of the (n, cols) unsigned codes, packed along n: code k of a column occupies bits
    [bits*k, bits*(k+1)) of the column's words read as one little-endian bit stream (a code may straddle two
    words), written one code at a time."""
    n, cols = codes.shape
    words = torch.zeros((n * bits + 31) // 32, cols, dtype=torch.int64)
    for k in range(n):
        t, shift = divmod(bits * k, 32)
        words[t] |= (codes[k].long() << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # the high bits spill into the next word
            words[t + 1] |= codes[k].long() >> (32 - shift)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)  # as signed int32


_CODES = {}


def gptq_linear(out_f: int, in_f: int, bits: int, group: int, seed: int, act_order: bool, v1: bool = True):
    """(tensors of one GPTQ linear, the float weight they stand for). The codes, zero points and g_idx are drawn
    once per shape and settings (packing is the slow part), the scales per seed, so every linear differs."""
    n_groups = in_f // group
    key = (out_f, in_f, bits, group, act_order, v1)
    if key not in _CODES:
        g = torch.Generator().manual_seed(len(_CODES))
        q = torch.randint(0, 2 ** bits, (in_f, out_f), generator=g)
        zero = torch.randint(1 if v1 else 0, 2 ** bits, (n_groups, out_f), generator=g)  # v1 cannot store 0
        g_idx = torch.arange(in_f) // group
        if act_order:
            g_idx = g_idx[torch.randperm(in_f, generator=g)]
        stored_zero = zero - 1 if v1 else zero
        packed = {"qweight": pack_columns(q, bits), "g_idx": g_idx.int(),
                  "qzeros": pack_columns(stored_zero.T.contiguous(), bits).T.contiguous()}  # packed along out
        _CODES[key] = (packed, q, zero, g_idx)
    packed, q, zero, g_idx = _CODES[key]
    scales = (torch.rand(n_groups, out_f, generator=torch.Generator().manual_seed(seed)) * 0.02 + 1e-3).half()
    weight = (scales.double()[g_idx] * (q - zero[g_idx]).double()).T  # the oracle, in float64
    return {**{k: v.clone() for k, v in packed.items()}, "scales": scales}, weight


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_matches_the_definition(bits, act_order):
    t, w = gptq_linear(40, 96, bits, 32, seed=bits, act_order=act_order)
    got = peer_convert.dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, zero_offset=1)
    assert got.dtype == torch.float32 and got.shape == (40, 96)
    assert torch.equal(got.double(), w)


def test_v2_and_implicit_groups():
    t, w = gptq_linear(32, 64, 4, 32, seed=7, act_order=False, v1=False)
    got = peer_convert.dequantize(t["qweight"], t["qzeros"], t["scales"], None, 4, zero_offset=0)
    assert torch.equal(got.double(), w)


def test_zero_point_of_zero_in_v1_wraps():
    """v1 stores zero - 1, so a zero point 0 is stored as all ones (-1 mod 2^bits) and reads back as 2^bits."""
    q = torch.full((32, 8), 5)
    qzeros = pack_columns(torch.full((8, 1), 2 ** 4 - 1), 4).T.contiguous()  # stored -1 -> 15
    w = peer_convert.dequantize(pack_columns(q, 4), qzeros, torch.ones(1, 8).half(), None, 4, zero_offset=1)
    # 15 + 1 = 16, not 0: GPTQ's v1 kernels add the one after unpacking, without a wrap, and the converter must
    # compute what they compute (a symmetric checkpoint's zero point is 2^(bits-1), never 0).
    assert torch.equal(w, torch.full((8, 32), 5.0 - 16))


def test_folder_round_trips_through_the_project_loader(tmp_path):
    """A GPTQ folder of the bundled model (attention and per-expert linears quantized with known codes,
    everything else float) converts to a float checkpoint whose weights model.load_model reads back exactly,
    the experts through the fused gate_up_proj / down_proj tensors."""
    sys.path.insert(0, ROOT)
    import model as project_model

    src, dst = tmp_path / "gptq", tmp_path / "float"
    src.mkdir()
    base = load_file(os.path.join(TINY, "model.safetensors"))
    cfg = json.load(open(os.path.join(TINY, "config.json")))
    n_layers, E = cfg["text_config"]["num_hidden_layers"], cfg["text_config"]["num_experts"]
    H, I = cfg["text_config"]["hidden_size"], cfg["text_config"]["moe_intermediate_size"]
    sd = {k: v for k, v in base.items() if ".mlp.experts." not in k}
    expected = {}
    for layer in range(n_layers):
        pre = f"model.language_model.layers.{layer}"
        linears = {f"{pre}.self_attn.{p}": tuple(base[f"{pre}.self_attn.{p}.weight"].shape)
                   for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
        for e in range(E):
            linears.update({f"{pre}.mlp.experts.{e}.gate_proj": (I, H), f"{pre}.mlp.experts.{e}.up_proj": (I, H),
                            f"{pre}.mlp.experts.{e}.down_proj": (H, I)})
        for j, (name, (out_f, in_f)) in enumerate(linears.items()):
            sd.pop(f"{name}.weight", None)
            t, w = gptq_linear(out_f, in_f, 3, 32, seed=1000 * layer + j, act_order=(j % 2 == 1))
            sd.update({f"{name}.{k}": v for k, v in t.items()})
            expected[f"{name}.weight"] = w.float()
    save_file(sd, str(src / "model.safetensors"))
    json.dump({**cfg, "quantization_config": {"quant_method": "gptq", "bits": 3, "group_size": 32}},
              open(src / "config.json", "w"))
    json.dump({"bits": 3, "group_size": 32, "sym": True, "desc_act": True, "checkpoint_format": "gptq"},
              open(src / "quantize_config.json", "w"))
    for name in ("tokenizer.json", "preprocessor_config.json", "generation_config.json"):
        shutil.copy(os.path.join(TINY, name), src)

    info = peer_convert.convert(str(src), str(dst))
    assert info["linears"] == n_layers * (4 + 3 * E) and info["zero_offset"] == 1
    written = load_file(str(dst / "model.safetensors"))
    assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in written
    assert written["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (E, H, 2 * I)
    assert not any(k.endswith((".qweight", ".qzeros", ".scales", ".g_idx")) for k in written)
    assert "quantization_config" not in json.load(open(dst / "config.json"))

    m = project_model.load_model(str(dst))
    got = m.state_dict()
    for k, w in expected.items():
        assert torch.equal(got[k], w), k
    for k, v in base.items():  # the float tensors are untouched (the model computes in float32)
        if ".mlp.experts." not in k and k in got and k not in expected:
            assert torch.equal(got[k], v.float()), k
