"""Qwen processor: pixel_values / image_grid_thw against transformers' Qwen2VLImageProcessorPil, prompt ids
against transformers' Qwen3VLProcessor with the chat template, on a test tokenizer with the Qwen specials."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from data import processor
from helpers import QWEN_CHAT_TEMPLATE, QWEN_SPECIAL, build_tokenizer

# The Qwen3-VL family's preprocessor_config.json values (docs/architectures.md §3.1)
REAL = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
            size={"shortest_edge": 65536, "longest_edge": 16777216})


def make_dir(path, pre):
    os.makedirs(path, exist_ok=True)
    tok = build_tokenizer(QWEN_SPECIAL)
    tok.save(os.path.join(path, "tokenizer.json"))
    json.dump(pre, open(os.path.join(path, "preprocessor_config.json"), "w"))
    json.dump({"model_type": "qwen3_vl_moe", "image_token_id": tok.token_to_id("<|image_pad|>")},
              open(os.path.join(path, "config.json"), "w"))
    return str(path)


def rand_rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def images():
    rgba = np.concatenate([rand_rgb(37, 53, 1), np.random.default_rng(2).integers(0, 256, (37, 53, 1),
                                                                                dtype=np.uint8)], -1)
    pal = Image.fromarray(rand_rgb(61, 45, 3)).convert("P", palette=Image.ADAPTIVE, colors=16)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    return {
        "RGBA": Image.fromarray(rgba, "RGBA"),
        "L": Image.fromarray(rand_rgb(50, 70, 4)[..., 0], "L"),
        "P": pal,
        "P+transparency": pal_t,
        "20x20": Image.fromarray(rand_rgb(20, 20, 5)),
        "1000x64": Image.fromarray(rand_rgb(64, 1000, 6)),
        "odd 333x517": Image.fromarray(rand_rgb(517, 333, 7)),
    }


@pytest.mark.parametrize("name", list(images()))
def test_pixels_match_transformers_pil_processor(name, tmp_path):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    img = images()[name]
    proc = processor.load_processor(make_dir(tmp_path, REAL))
    ref = Qwen2VLImageProcessorPil(**REAL)(images=[img], return_tensors="pt")
    pv, grid = proc.preprocess_image(img)
    assert grid == ref["image_grid_thw"][0].tolist()
    assert pv.shape == ref["pixel_values"].shape
    assert (pv - ref["pixel_values"]).abs().max() <= 1e-6


def test_max_pixels_branch(tmp_path):
    """An image above max_pixels is shrunk (configured small here so the test stays fast)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pre = {**REAL, "size": {"shortest_edge": 4096, "longest_edge": 128 * 128}}
    img = Image.fromarray(rand_rgb(300, 410, 8))
    proc = processor.load_processor(make_dir(tmp_path, pre))
    pv, grid = proc.preprocess_image(img)
    hb, wb = grid[1] * 16, grid[2] * 16
    assert hb * wb <= 128 * 128 < 300 * 410  # the max_pixels branch was taken
    ref = Qwen2VLImageProcessorPil(**pre)(images=[img], return_tensors="pt")
    assert grid == ref["image_grid_thw"][0].tolist()
    assert (pv - ref["pixel_values"]).abs().max() <= 1e-6


def test_smart_resize_example():
    # docs/architectures.md §3.1: 150x230 -> 224x320 (grid 14x20, 70 tokens)
    assert processor.smart_resize(150, 230, 32, 65536, 16777216) == (224, 320)


@pytest.mark.parametrize("system", [None, "You answer in one word."])
def test_prompt_ids_match_transformers_processor(system, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerFast, ProcessorMixin, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # without torchvision, transformers' processor class check trips over its video-processor registry
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda *a, **k: None)
    d = make_dir(tmp_path, REAL)
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(d, "tokenizer.json"))
    hf = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessorPil(**REAL), tokenizer=tok,
                          video_processor=None, chat_template=QWEN_CHAT_TEMPLATE)
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the circle ?"},
                                     {"type": "image"}, {"type": "text", "text": " and here?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "how many shapes are there ?"}]
    imgs = [Image.fromarray(rand_rgb(300, 200, 9)), Image.fromarray(rand_rgb(256, 420, 10))]
    text = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ref = hf(text=[text], images=imgs, return_tensors="pt")
    proc = processor.load_processor(d)
    assert proc.chat_text(msgs) == text
    enc = proc.encode(msgs, imgs)
    assert torch.equal(enc["input_ids"], ref["input_ids"])
    assert torch.equal(enc["image_grid_thw"], ref["image_grid_thw"])
    assert (enc["pixel_values"] - ref["pixel_values"]).abs().max() <= 1e-6
    assert torch.equal(enc["is_vis"].int(), ref["mm_token_type_ids"].int())
