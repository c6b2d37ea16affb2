"""Qwen3-VL-MoE: logits parity with transformers on tiny Hub-layout checkpoints, loading paths, generation."""

import json
import os
import shutil

import pytest
import torch

from arch import blocks
from data import processor
import model

TOL = 1e-4


from helpers import assert_parity, random_image as image, user  # noqa: E402


def hf_logits(hf, enc):
    kw = dict(input_ids=enc["input_ids"], attention_mask=enc.get("attention_mask"))
    if "pixel_values" in enc:
        kw.update(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"],
                  mm_token_type_ids=enc["is_vis"].int())
    with torch.no_grad():
        return hf(**kw).logits


def ours(m, enc):
    vision = {k: enc[k] for k in ("pixel_values", "image_grid_thw") if k in enc}
    return m(enc["input_ids"], attention_mask=enc.get("attention_mask"), **vision)


@pytest.fixture(scope="module")
def qwen(tiny_qwen):
    return model.load_model(tiny_qwen, dtype=torch.float32), processor.load_processor(tiny_qwen)


CASES = {
    "image+text": (user(None, "what color is the circle ?"), [(48, 64)]),
    "text-only": (user("how many shapes are there ? one two three"), []),
    "two images": (user(None, "describe", None, "and this one"), [(48, 64), (40, 90)]),
    "non-square": (user(None, "is there a square left of the triangle?"), [(30, 130)]),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_parity(case, qwen, hf_qwen):
    m, proc = qwen
    messages, sizes = CASES[case]
    enc = proc.encode(messages, [image(h, w, i) for i, (h, w) in enumerate(sizes)])
    if case == "two images":  # the position table is 6x6 patches: exercise both up- and down-sampling
        assert enc["image_grid_thw"][:, 1:].max() > 6 and enc["image_grid_thw"][:, 1:].min() < 6
    assert_parity(hf_logits(hf_qwen, enc), ours(m, enc))


def test_batch_of_two_prompts_left_padded(qwen, hf_qwen):
    m, proc = qwen
    e1 = proc.encode(user(None, "what"), [image(48, 64, 1)])
    e2 = proc.encode(user(None, "how many shapes are there ? one two three four"), [image(40, 90, 2)])
    batch = processor.pad_batch([e1, e2], side="left")
    assert batch["attention_mask"][0, 0] == 0  # prompts differ in length: the first one is padded
    got = ours(m, batch)
    assert_parity(hf_logits(hf_qwen, batch), got, keep=batch["attention_mask"].bool())
    # padding does not change the unpadded prompt's logits
    alone = ours(m, e1)
    assert (got[0, -alone.shape[1]:] - alone[0]).abs().max() <= TOL


def test_text_only_batch_right_padded(qwen, hf_qwen):
    m, proc = qwen
    batch = processor.pad_batch([proc.encode(user("one two")), proc.encode(user("the quick brown fox jumps"))],
                           side="right")
    assert_parity(hf_logits(hf_qwen, batch), ours(m, batch), keep=batch["attention_mask"].bool())


def test_kv_cache_generation_equals_no_cache_loop(qwen):
    m, proc = qwen
    enc = proc.encode(user(None, "what color"), [image(48, 64, 3)])
    vision = {k: enc[k] for k in ("pixel_values", "image_grid_thw")}
    cached = m.generate(enc["input_ids"], max_new_tokens=8, **vision)
    ids, plain = enc["input_ids"], []
    for _ in range(8):  # recompute the whole sequence every step (no cache)
        nxt = int(m(ids, **vision)[0, -1].argmax())
        plain.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert cached == plain


def test_decode_step_logits_match_full_forward(qwen):
    """M-RoPE offsets on decode steps: logits of a cached step equal those of the full forward."""
    m, proc = qwen
    enc = proc.encode(user(None, "what color"), [image(40, 90, 4)])
    vision = {k: enc[k] for k in ("pixel_values", "image_grid_thw")}
    cache = blocks.KVCache(len(m.layers))
    m(enc["input_ids"], cache=cache, **vision)
    extra = torch.tensor([[5, 17, 42]])
    step = m(extra, cache=cache)
    full = m(torch.cat([enc["input_ids"], extra], 1), **vision)
    assert (step[0] - full[0, -3:]).abs().max() <= TOL


def test_per_expert_layout_and_sharded_index(qwen, tiny_qwen, tmp_path):
    """The layout quantization toolkits write (experts.{j}.gate_proj.weight ...), split over two shards."""
    from safetensors.torch import load_file, save_file

    m, proc = qwen
    sd = load_file(os.path.join(tiny_qwen, "model.safetensors"))
    out = {}
    for k, v in sd.items():
        if k.endswith("experts.gate_up_proj"):
            inter = v.shape[2] // 2
            for e in range(v.shape[0]):
                out[f"{k[:-len('gate_up_proj')]}{e}.gate_proj.weight"] = v[e, :, :inter].T.contiguous()
                out[f"{k[:-len('gate_up_proj')]}{e}.up_proj.weight"] = v[e, :, inter:].T.contiguous()
        elif k.endswith("experts.down_proj"):
            for e in range(v.shape[0]):
                out[f"{k[:-len('down_proj')]}{e}.down_proj.weight"] = v[e].T.contiguous()
        else:
            out[k] = v
    names = sorted(out)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for f, keys in shards.items():
        save_file({k: out[k] for k in keys}, tmp_path / f)
    json.dump({"weight_map": {k: f for f, keys in shards.items() for k in keys}},
              open(tmp_path / "model.safetensors.index.json", "w"))
    for f in ("config.json", "tokenizer.json", "preprocessor_config.json"):
        shutil.copy(os.path.join(tiny_qwen, f), tmp_path / f)
    m2 = model.load_model(str(tmp_path))
    enc = proc.encode(user(None, "what"), [image(48, 64, 5)])
    assert torch.equal(ours(m, enc), ours(m2, enc))


def test_transformers5_config_spelling(qwen, tiny_qwen, tmp_path):
    m, proc = qwen
    shutil.copytree(tiny_qwen, tmp_path / "c")
    cfg = json.load(open(tmp_path / "c" / "config.json"))
    tc = cfg["text_config"]
    tc["rope_parameters"] = {**tc.pop("rope_scaling"), "rope_theta": tc.pop("rope_theta")}
    tc["num_local_experts"] = tc.pop("num_experts")
    cfg["vision_config"]["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "axial"}
    json.dump(cfg, open(tmp_path / "c" / "config.json", "w"))
    m2 = model.load_model(str(tmp_path / "c"))
    enc = proc.encode(user("one two three"))
    assert torch.equal(ours(m, enc), ours(m2, enc))


def test_lazy_layer_streaming_equals_full_model(qwen, tiny_qwen):
    m, proc = qwen
    lazy = model.load_model(tiny_qwen, lazy_layers=True)
    assert all(p.is_meta for p in lazy.layers.parameters())
    enc = proc.encode(user(None, "what color"), [image(48, 64, 6)])
    x, ctx = lazy.embed(enc["input_ids"], pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"])
    for i in range(len(lazy.layers)):
        x = lazy.after_layer(i, lazy.load_layer(i)(x, ctx), ctx)
        lazy.unload_layer(i)
        assert all(p.is_meta for p in lazy.layers[i].parameters())
    assert torch.equal(lazy.head(x), ours(m, enc))


def test_bfloat16_runs_close_to_float32(qwen, tiny_qwen):
    m, proc = qwen
    m16 = model.load_model(tiny_qwen, dtype=torch.bfloat16)
    assert m16.lm_head.weight.dtype == torch.bfloat16
    enc = proc.encode(user(None, "what"), [image(48, 64, 7)])
    a, b = ours(m, enc), ours(m16, enc)
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert (a - b).abs().max() < 0.1 * a.abs().max()  # bf16 rounding, not a different function


def test_router_renormalizes_topk(qwen):
    m, _ = qwen
    moe = m.layers[0].mlp
    x = torch.randn(10, m.cfg.text.hidden_size)
    idx, w, probs = moe.gate(x)
    ref = torch.softmax(x.double() @ moe.gate.weight.double().T, -1)  # float64 recomputation
    top = ref.topk(m.cfg.text.num_experts_per_tok, -1)
    assert torch.equal(idx, top.indices)
    assert torch.allclose(w.double(), top.values / top.values.sum(-1, keepdim=True), atol=1e-6)


def test_generation_cli(tiny_qwen, tmp_path, capsys):
    path = tmp_path / "img.png"
    image(50, 70, 8).save(path)
    model.main(["--model", tiny_qwen, "--image", str(path), "--prompt", "what color", "--max-new-tokens", "4"])
    assert capsys.readouterr().out.endswith("\n")


@pytest.mark.parametrize("padded", [False, True])
def test_fused_attention_equals_the_written_out_reference(padded):
    """blocks.attention (SDPA, GQA, kernel causal path) against blocks.attention_reference (softmax written out)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 7, 16, generator=g) for h in (4, 2, 2))
    am = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7]) if padded else None
    mask = blocks.causal_mask(am, 7, 0, torch.float32, "cpu")
    full = mask if mask is not None else blocks.causal_mask(torch.ones(2, 7, dtype=torch.long), 7, 0, torch.float32, "cpu")
    got = blocks.attention(q, k, v, scale=0.25, mask=mask, causal=True)
    want, probs = blocks.attention_reference(q, k, v, scale=0.25, mask=full)
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(probs.sum(-1), torch.ones(2, 4, 7))
    bidir, _ = blocks.attention_reference(q, k, v, scale=0.25)
    assert torch.allclose(blocks.attention(q, k, v, scale=0.25), bidir, atol=1e-5)
