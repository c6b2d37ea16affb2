"""Kimi-VL: logits parity with transformers (DeepseekV3ForCausalLM for the text half, Kimi_K25ForConditionalGeneration
for the whole model) on tiny random checkpoints in the original Kimi-VL layout; the processor against a
recomputation written here with plain loops; routing invariants; packed-image isolation; bad input."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from arch import blocks
from arch import checkpoint
from arch import kimi_vl
from data import processor
from data import samples as data_samples
import model
from kimi_helpers import deepseek_text_dir, kimi_config, make_tiny_kimi

TOL = 1e-4
# Variant exercising the low-rank query (q_a_proj path) and group-limited routing (2 groups of 4, keep 1).
QLORA = dict(q_lora_rank=24, n_group=2, topk_group=1, num_experts_per_tok=3)


from helpers import assert_parity as max_diff, random_image as image, user  # noqa: E402




def ours(m, enc):
    vision = {k: enc[k] for k in ("pixel_values", "image_grid_hws") if k in enc}
    return m(enc["input_ids"], attention_mask=enc.get("attention_mask"), **vision)


def k25_logits(hf, enc):
    """transformers' K2.5 on our processor's output: pixel_values fed directly, grid rows (h, w) -> (1, h, w)."""
    kw = dict(input_ids=enc["input_ids"], attention_mask=enc.get("attention_mask"))
    if "pixel_values" in enc:
        g = enc["image_grid_hws"]
        kw.update(pixel_values=enc["pixel_values"], image_grid_thw=torch.cat([torch.ones_like(g[:, :1]), g], 1))
    with torch.no_grad():
        return hf(**kw).logits


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    """(checkpoint dir, transformers K2.5 oracle, our model, our processor) for the Kimi-VL-A3B-like config."""
    path, hf = make_tiny_kimi(tmp_path_factory.mktemp("ckpt") / "tiny-kimi", seed=0)
    return path, hf, model.load_model(path, dtype=torch.float32), processor.load_processor(path)


@pytest.fixture(scope="module")
def kimi_qlora(tmp_path_factory):
    path, hf = make_tiny_kimi(tmp_path_factory.mktemp("ckpt") / "tiny-kimi-qlora", seed=1, text=QLORA,
                              small_latents=True)
    return path, hf, model.load_model(path, dtype=torch.float32), processor.load_processor(path)


# ----------------------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("variant", ["q_proj", "q_lora+groups"])
def test_text_parity_with_deepseek_v3(variant, kimi, kimi_qlora, tmp_path):
    from transformers import DeepseekV3ForCausalLM

    path, _, m, _ = kimi if variant == "q_proj" else kimi_qlora
    ds, info = DeepseekV3ForCausalLM.from_pretrained(deepseek_text_dir(path, tmp_path / "ds"), dtype=torch.float32,
                                                     attn_implementation="eager", output_loading_info=True)
    assert not any(info.values()), info  # transformers read every per-expert tensor of the Kimi-VL layout
    assert isinstance(m.layers[0].mlp, blocks.SwiGLU)  # first_k_dense_replace = 1
    assert all(isinstance(layer.mlp, kimi_vl.KimiMoE) for layer in m.layers[1:])
    assert hasattr(m.layers[0].self_attn, "q_a_proj") == (variant != "q_proj")
    ids = torch.randint(0, m.cfg.text.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ds(input_ids=ids).logits
    print(f"\n{variant}: max |dlogit| vs DeepseekV3ForCausalLM = {max_diff(want, m(ids)):.3g}")
    # left padding: our positions are cumsum(mask) - 1; transformers takes them as explicit position_ids
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        want = ds(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    max_diff(want, m(ids, attention_mask=mask), keep=mask.bool())


def test_group_limited_routing_is_exercised(kimi_qlora):
    """In the grouped variant, some tokens' global top-k (of s + b) spans both groups, so the group limit
    changes the choice: the parity above really covers it."""
    _, _, m, _ = kimi_qlora
    seen = []
    hook = m.layers[1].mlp.gate.register_forward_hook(lambda mod, args, out: seen.append((args[0], out[0])))
    m(torch.randint(0, m.cfg.text.vocab_size, (1, 30), generator=torch.Generator().manual_seed(1)))
    hook.remove()
    x, chosen = seen[0]
    gate = m.layers[1].mlp.gate
    s = torch.sigmoid(x.double() @ gate.weight.double().T) + gate.e_score_correction_bias.double()
    glob = s.topk(QLORA["num_experts_per_tok"], -1).indices
    per_group = 8 // QLORA["n_group"]
    assert ((glob // per_group).amin(-1) != (glob // per_group).amax(-1)).any()
    assert ((chosen // per_group).amin(-1) == (chosen // per_group).amax(-1)).all()  # one group kept


def test_whole_model_parity_two_images(kimi):
    _, hf, m, proc = kimi
    # 165x150 px pads to 168x168: a 12x12 grid (table is 8x8: up-sampling); 60x50 px pads to 84x56: 6x4 (down)
    enc = proc.encode(user(None, "what color is the circle ?", None, "and here"), [image(165, 150, 0),
                                                                                   image(60, 50, 1)])
    assert enc["image_grid_hws"].tolist() == [[12, 12], [6, 4]]
    diff = max_diff(k25_logits(hf, enc), ours(m, enc))
    print(f"\nwhole model, two packed images: max |dlogit| vs Kimi_K25 = {diff:.3g}")


def test_whole_model_parity_text_only(kimi):
    _, hf, m, proc = kimi
    enc = proc.encode(user("how many shapes are there ? one two three"))
    diff = max_diff(k25_logits(hf, enc), ours(m, enc))
    print(f"\nwhole model, text only: max |dlogit| vs Kimi_K25 = {diff:.3g}")


def test_left_padded_batch_with_image(kimi):
    _, hf, m, proc = kimi
    e1 = proc.encode(user(None, "what"), [image(40, 60, 2)])
    e2 = proc.encode(user("the quick brown fox jumps over the lazy dog"))
    batch = processor.pad_batch([e1, e2], side="left")
    assert batch["attention_mask"][0, 0] == 0
    got = ours(m, batch)
    alone = ours(m, e1)
    assert (got[0, -alone.shape[1]:] - alone[0]).abs().max() <= TOL
    max_diff(k25_logits(hf, e1), alone)


def test_decode_steps_match_full_forward(kimi):
    _, _, m, proc = kimi
    enc = proc.encode(user(None, "what color"), [image(50, 70, 3)])
    vision = {k: enc[k] for k in ("pixel_values", "image_grid_hws")}
    cache = blocks.KVCache(len(m.layers))
    m(enc["input_ids"], cache=cache, **vision)
    extra = torch.tensor([[5, 17, 42]])
    steps = torch.cat([m(extra[:, i:i + 1], cache=cache) for i in range(3)], dim=1)
    full = m(torch.cat([enc["input_ids"], extra], 1), **vision)
    assert (steps[0] - full[0, -3:]).abs().max() <= TOL


def test_generation_cli_and_stop_ids(kimi, tmp_path, capsys):
    path, _, _, proc = kimi
    tok = proc.tokenizer
    assert proc.stop_ids == [tok.token_id("<|im_end|>"), tok.token_id("[EOS]")]
    image(50, 70, 4).save(tmp_path / "img.png")
    model.main(["--model", path, "--image", str(tmp_path / "img.png"), "--prompt", "what", "--max-new-tokens", "3"])
    assert capsys.readouterr().out.endswith("\n")


def test_lazy_layers_and_bf16(kimi):
    path, _, m, proc = kimi
    enc = proc.encode(user(None, "what"), [image(30, 40, 5)])
    lazy = model.load_model(path, lazy_layers=True)
    x, ctx = lazy.embed(enc["input_ids"], pixel_values=enc["pixel_values"], image_grid_hws=enc["image_grid_hws"])
    for i in range(len(lazy.layers)):
        x = lazy.after_layer(i, lazy.load_layer(i)(x, ctx), ctx)
        lazy.unload_layer(i)
    assert torch.equal(lazy.head(x), ours(m, enc))
    m16 = model.load_model(path, dtype=torch.bfloat16)
    assert m16.layers[1].mlp.gate.weight.dtype == torch.bfloat16
    assert m16.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32  # selection bias stays fp32
    a, b = ours(m, enc), ours(m16, enc)
    assert b.dtype == torch.float32 and (a - b).abs().max() < 0.1 * a.abs().max()


def test_transformers_config_spelling(kimi, tmp_path):
    path, _, m, proc = kimi
    shutil.copytree(path, tmp_path / "c")
    cfg = json.load(open(tmp_path / "c" / "config.json"))
    t, v = cfg["text_config"], cfg["vision_config"]
    t["rope_parameters"] = {"rope_type": "default", "rope_theta": t.pop("rope_theta")}
    t.pop("rope_scaling")
    t["num_local_experts"] = t.pop("n_routed_experts")
    v["pos_emb_height"], v["pos_emb_width"] = v.pop("init_pos_emb_height"), v.pop("init_pos_emb_width")
    json.dump(cfg, open(tmp_path / "c" / "config.json", "w"))
    enc = proc.encode(user("one two"))
    assert torch.equal(ours(m, enc), ours(model.load_model(str(tmp_path / "c")), enc))


# ----------------------------------------------------------------------------------------------------------
# Routing invariants (float64 recomputation of the sigmoid scores)


def router(seed, **text):
    cfg = kimi_vl.KimiTextConfig.from_dict(kimi_config(300, 299, text)["text_config"])
    r = kimi_vl.KimiRouter(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        r.weight.copy_(0.3 * torch.randn(r.weight.shape, generator=g))
    return r, torch.randn(64, cfg.hidden_size, generator=g), cfg


def unbiased_weights(r, x, idx, cfg):
    s = torch.sigmoid(x.double() @ r.weight.double().T).gather(1, idx)
    return s / s.sum(-1, keepdim=True) * cfg.routed_scaling_factor


@pytest.mark.parametrize("groups", [{}, QLORA])
def test_bias_changes_choice_not_weights(groups):
    r, x, cfg = router(0, **groups)
    idx0, w0, _ = r(x)
    bias = 0.3 * torch.randn(cfg.n_routed_experts, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        r.e_score_correction_bias.copy_(bias)
    idx1, w1, _ = r(x)
    same = [n for n in range(len(x)) if set(idx0[n].tolist()) == set(idx1[n].tolist())]
    assert 0 < len(same) < len(x), "the bias should change the choice for some tokens, not all"
    for n in same:  # same experts -> same weight for each of them
        a = dict(zip(idx0[n].tolist(), w0[n].tolist()))
        b = dict(zip(idx1[n].tolist(), w1[n].tolist()))
        assert all(abs(a[e] - b[e]) < 1e-6 for e in a)
    assert torch.allclose(w1.double(), unbiased_weights(r, x, idx1, cfg), atol=1e-6)


@pytest.mark.parametrize("groups", [{}, QLORA])
def test_large_bias_forces_expert(groups):
    r, x, cfg = router(1, **groups)
    j = 5
    with torch.no_grad():
        r.e_score_correction_bias[j] = 100.0
    idx, w, _ = r(x)
    assert (idx == j).any(-1).all()
    want = unbiased_weights(r, x, idx, cfg)  # its unbiased normalized sigmoid score times routed_scaling_factor
    assert torch.allclose(w.double(), want, atol=1e-6)
    assert torch.allclose(w[idx == j].double(), want[idx == j], atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Vision tower


def test_packed_images_do_not_see_each_other(kimi):
    _, _, m, proc = kimi
    pa, ga = proc.preprocess_image(image(90, 60, 6))
    pb, gb = proc.preprocess_image(image(40, 110, 7))
    alone_a = m.image_features(pa, torch.tensor([ga]))
    alone_b = m.image_features(pb, torch.tensor([gb]))
    packed = m.image_features(torch.cat([pa, pb]), torch.tensor([ga, gb]))
    assert torch.allclose(packed[:len(alone_a)], alone_a, atol=1e-5)
    assert torch.allclose(packed[len(alone_a):], alone_b, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Processor


def processor_with(kimi, tmp_path, **pre):
    """Our processor on a copy of the checkpoint with preprocessor_config.json fields overridden (None drops)."""
    path = kimi[0]
    for f in ("config.json", "tokenizer.json"):
        shutil.copy(os.path.join(path, f), tmp_path / f)
    cfg = json.load(open(os.path.join(path, "preprocessor_config.json")))
    cfg.update(pre)
    json.dump({k: v for k, v in cfg.items() if v is not None}, open(tmp_path / "preprocessor_config.json", "w"))
    return processor.load_processor(str(tmp_path))


def reference_patches(img, limit, mean, std, P=14):
    """The Kimi-VL preprocessing recomputed with loops: shrink rule, black pad to multiples of 2P, normalize,
    patches row by row."""
    w, h = img.size
    if (w // P) * (h // P) > limit:
        s = math.sqrt(limit / ((w // P) * (h // P)))
        img = img.resize((int(w * s), int(h * s)), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float64) / 255  # (h, w, 3)
    H, W = -(-arr.shape[0] // (2 * P)) * 2 * P, -(-arr.shape[1] // (2 * P)) * 2 * P
    canvas = np.zeros((H, W, 3))
    canvas[:arr.shape[0], :arr.shape[1]] = arr
    canvas = (canvas - np.array(mean)) / np.array(std)
    patches = [canvas[r * P:(r + 1) * P, c * P:(c + 1) * P].transpose(2, 0, 1)
               for r in range(H // P) for c in range(W // P)]
    return np.stack(patches), [H // P, W // P]


@pytest.mark.parametrize("h, w", [(50, 13), (37, 100), (150, 200)])
def test_preprocess_matches_loop_recomputation(kimi, tmp_path, h, w):
    limit = 40  # 150x200 px has 10*14 = 140 patches > 40: shrunk
    proc = processor_with(kimi, tmp_path, in_token_limit=limit)
    img = image(h, w, h + w)
    pv, grid = proc.preprocess_image(img)
    want, want_grid = reference_patches(img, limit, [0.5] * 3, [0.5] * 3)
    assert grid == want_grid and pv.shape == (want.shape[0], 3, 14, 14) and pv.dtype == torch.float32
    assert np.allclose(pv.numpy(), want, atol=1e-6)
    enc = proc.encode(user(None, "hi"), [img])
    assert int(enc["is_vis"].sum()) == (grid[0] // 2) * (grid[1] // 2)
    if (h, w) == (150, 200):
        assert grid[0] * grid[1] < 140


def test_mean_std_fall_back_to_clip_only_when_absent(kimi, tmp_path):
    proc = processor_with(kimi, tmp_path, image_mean=None, image_std=None)
    pv, _ = proc.preprocess_image(Image.new("RGB", (28, 28), (255, 255, 255)))
    clip_mean, clip_std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    want = [(1 - mu) / sd for mu, sd in zip(clip_mean, clip_std)]
    assert np.allclose(pv[0, :, 0, 0].numpy(), want, atol=1e-6)
    pv, _ = kimi[3].preprocess_image(Image.new("RGB", (28, 28), (255, 255, 255)))
    assert np.allclose(pv[0, :, 0, 0].numpy(), 1.0)  # the checkpoint's own 0.5 / 0.5


def test_too_wide_image_is_rejected(kimi):
    with pytest.raises(data_samples.DataError, match="512"):
        kimi[3].preprocess_image(Image.new("RGB", (14 * 520, 14)))


def test_chat_prompt_text_and_ids(kimi):
    proc = kimi[3]
    text = proc.chat_text(user(None, "what color"))
    assert text == ("<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>"
                    "<|im_user|>user<|im_middle|><|media_start|>image<|media_content|><|media_pad|><|media_end|>"
                    "what color<|im_end|><|im_assistant|>assistant<|im_middle|>")
    given = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "yes"}]
    assert proc.chat_text(given, add_generation_prompt=False) == (
        "<|im_system|>system<|im_middle|>be brief<|im_end|><|im_user|>user<|im_middle|>hi<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>yes<|im_end|>")
    enc = proc.encode(user(None, "what color"), [image(60, 90, 8)])  # pads to 84x112: 3x4 merged tokens
    tok = proc.tokenizer
    sp = {t: tok.token_id(t) for t in ("<|im_system|>", "<|im_middle|>", "<|im_end|>", "<|im_user|>",
                                       "<|media_start|>", "<|media_content|>", "<|media_end|>", "<|im_assistant|>")}
    want = ([sp["<|im_system|>"]] + tok.encode("system") + [sp["<|im_middle|>"]]
            + tok.encode("You are a helpful assistant") + [sp["<|im_end|>"], sp["<|im_user|>"]] + tok.encode("user")
            + [sp["<|im_middle|>"], sp["<|media_start|>"]] + tok.encode("image") + [sp["<|media_content|>"]]
            + [tok.token_id("<|media_pad|>")] * 12 + [sp["<|media_end|>"]] + tok.encode("what color")
            + [sp["<|im_end|>"], sp["<|im_assistant|>"]] + tok.encode("assistant") + [sp["<|im_middle|>"]])
    assert enc["input_ids"][0].tolist() == want
    assert enc["image_grid_hws"].tolist() == [[6, 8]]


# ----------------------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture
def ckpt(kimi, tmp_path):
    shutil.copytree(kimi[0], tmp_path / "c")
    return tmp_path / "c"


def edit_weights(ckpt, fn):
    sd = load_file(ckpt / "model.safetensors")
    fn(sd)
    save_file(sd, ckpt / "model.safetensors")


def test_missing_tensor(ckpt):
    key = "language_model.model.layers.2.mlp.experts.3.up_proj.weight"
    edit_weights(ckpt, lambda sd: sd.pop(key))
    with pytest.raises(checkpoint.CheckpointError, match=f"{key}' is missing"):
        model.load_model(str(ckpt))


def test_wrong_shape(ckpt):
    key = "vision_tower.encoder.blocks.0.wqkv.weight"
    edit_weights(ckpt, lambda sd: sd.update({key: torch.zeros(3, 32)}))
    with pytest.raises(checkpoint.CheckpointError, match=f"{key}' has shape"):
        model.load_model(str(ckpt))


def test_unknown_tensor(ckpt):
    key = "language_model.model.layers.0.self_attn.extra_proj.weight"
    edit_weights(ckpt, lambda sd: sd.update({key: torch.zeros(2, 2)}))
    with pytest.raises(checkpoint.CheckpointError, match=f"unexpected tensors.*{key}"):
        model.load_model(str(ckpt))


def test_stale_inv_freq_is_skipped(kimi):
    path, _, m, _ = kimi
    stale = [k for k in load_file(os.path.join(path, "model.safetensors")) if k.endswith("rotary_emb.inv_freq")]
    assert len(stale) == len(m.layers)  # the fixture writes them, like the Hub checkpoint
    assert not any(k.endswith("inv_freq") for k in m.state_dict())


def test_bad_vision_inputs(kimi):
    _, _, m, proc = kimi
    enc = proc.encode(user(None, "what"), [image(30, 40, 9)])
    ids, pv, grid = enc["input_ids"], enc["pixel_values"], enc["image_grid_hws"]
    with pytest.raises(ValueError, match="pixel_values has shape"):
        m(ids, pixel_values=pv.flatten(1), image_grid_hws=grid)
    with pytest.raises(ValueError, match="image_grid_hws"):
        m(ids, pixel_values=pv, image_grid_hws=grid + 2)
    with pytest.raises(ValueError, match="media tokens but no pixel_values"):
        m(ids)
    media = int((ids == m.cfg.media_placeholder_token_id).nonzero()[0, 1])
    with pytest.raises(ValueError, match="3 media tokens .* gives 4 image features"):
        m(torch.cat([ids[:, :media], ids[:, media + 1:]], 1), pixel_values=pv, image_grid_hws=grid)
