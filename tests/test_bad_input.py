"""Bad input raises an error that names the file / tensor and what was expected."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from arch import checkpoint
from data import processor
from data import samples as data_samples
import model


@pytest.fixture
def ckpt(tiny_qwen, tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(tiny_qwen, dst)
    return dst


def edit_weights(ckpt, fn):
    path = ckpt / "model.safetensors"
    sd = load_file(path)
    fn(sd)
    save_file(sd, path)


def test_missing_config(ckpt):
    os.remove(ckpt / "config.json")
    with pytest.raises(checkpoint.CheckpointError, match=r"config\.json: not found"):
        model.load_model(str(ckpt))


def test_unknown_model_type(ckpt):
    cfg = json.load(open(ckpt / "config.json"))
    cfg["model_type"] = "llava"
    json.dump(cfg, open(ckpt / "config.json", "w"))
    with pytest.raises(checkpoint.CheckpointError, match=r"config\.json: model_type 'llava' is not supported"):
        model.load_model(str(ckpt))


def test_missing_safetensors(ckpt):
    os.remove(ckpt / "model.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="no model.safetensors"):
        model.load_model(str(ckpt))


def test_missing_shard(ckpt):
    json.dump({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}},
              open(ckpt / "model.safetensors.index.json", "w"))
    with pytest.raises(checkpoint.CheckpointError, match="model-00002-of-00002.safetensors: listed in the index but missing"):
        model.load_model(str(ckpt))


def test_truncated_safetensors(ckpt):
    path = ckpt / "model.safetensors"
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])
    with pytest.raises(checkpoint.CheckpointError, match=r"model\.safetensors: .*truncated"):
        model.load_model(str(ckpt))


def test_missing_tensor(ckpt):
    edit_weights(ckpt, lambda sd: sd.pop("model.language_model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(checkpoint.CheckpointError, match=r"'model\.language_model\.layers\.1\.self_attn\.k_norm\.weight' is missing"):
        model.load_model(str(ckpt), lazy_layers=True)  # checked up front, even for layers not yet loaded


def test_wrong_shape(ckpt):
    def f(sd):
        sd["model.visual.merger.linear_fc2.weight"] = torch.zeros(3, 3)
    edit_weights(ckpt, f)
    with pytest.raises(checkpoint.CheckpointError, match=r"'model\.visual\.merger\.linear_fc2\.weight' has shape \(3, 3\), expected"):
        model.load_model(str(ckpt))


def test_wrong_fused_expert_shape(ckpt):
    """The transformers runtime layout [E, 2I, H] is not the Hub layout [E, H, 2I]: refuse, don't guess."""
    def f(sd):
        k = "model.language_model.layers.0.mlp.experts.gate_up_proj"
        sd[k] = sd[k].transpose(1, 2).contiguous()
    edit_weights(ckpt, f)
    with pytest.raises(checkpoint.CheckpointError, match=r"fused tensor '.*layers\.0\.mlp\.experts\.gate_up_proj' has shape"):
        model.load_model(str(ckpt))


def test_unexpected_tensor_reported(ckpt):
    def f(sd):
        sd["model.language_model.layers.0.mlp.shared_expert.weight"] = torch.zeros(2)
    edit_weights(ckpt, f)
    with pytest.raises(checkpoint.CheckpointError, match=r"unexpected tensors .*layers\.0\.mlp\.shared_expert\.weight"):
        model.load_model(str(ckpt))


def test_stale_rotary_buffer_skipped(ckpt):
    def f(sd):
        sd["model.language_model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)
    edit_weights(ckpt, f)
    model.load_model(str(ckpt))


def test_unreadable_image(ckpt, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    proc = processor.load_processor(str(ckpt))
    with pytest.raises(data_samples.DataError, match="broken.png: cannot read image"):
        proc.encode([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], [str(bad)])


def test_missing_image_file(ckpt, tmp_path):
    proc = processor.load_processor(str(ckpt))
    with pytest.raises(data_samples.DataError, match="nope.jpg: cannot read image"):
        proc.encode([{"role": "user", "content": [{"type": "image"}]}], [str(tmp_path / "nope.jpg")])


def test_image_count_mismatch(ckpt):
    proc = processor.load_processor(str(ckpt))
    with pytest.raises(data_samples.DataError, match=r"1 image placeholders \(<\|image_pad\|>\) but 0 images"):
        proc.encode([{"role": "user", "content": [{"type": "image"}]}], [])


def test_image_tokens_without_pixels(ckpt):
    m = model.load_model(str(ckpt))
    ids = torch.tensor([[1, 2, m.cfg.image_token_id, 3]])
    with pytest.raises(ValueError, match="image tokens but no pixel_values"):
        m(ids)


def test_video_tokens_are_refused(ckpt):
    m = model.load_model(str(ckpt))
    with pytest.raises(ValueError, match="video inputs are not supported"):
        m(torch.tensor([[1, m.cfg.video_token_id, 2]]))
