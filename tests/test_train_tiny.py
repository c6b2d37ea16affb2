"""train_tiny's auxiliary labels line up with the patches each family's vision tower and projector see, and the
many-experts flags are checked."""

import numpy as np
import pytest
import torch

from data import processor
from data import samples as data_samples
import model
from tools import train_tiny


def test_patch_and_merged_labels_follow_the_model_order():
    samples = [s for s in data_samples.shapes_benchmark(40, seed=5, split="train") if s.image is not None][:4]
    centres = np.arange(8) * 8 + 4
    raster = torch.cat([torch.from_numpy(np.asarray(data_samples.draw_scene(s.objects, labels=True))[centres][:, centres]
                                         .astype(np.int64).reshape(-1)) for s in samples])
    assert torch.equal(train_tiny.patch_labels(samples, "raster"), raster)  # Kimi: raster, as the processor
    # MoonViT groups its raster output as (h/2, 2, w/2, 2) -> (block row, block col, 2 x 2): the merged labels
    groups = raster.view(len(samples), 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1, 4)
    assert torch.equal(train_tiny.merged_labels(samples), groups)
    # Qwen's pixel rows come in merge-block order, 4 consecutive rows per merged token
    assert torch.equal(train_tiny.patch_labels(samples, "merge_block").view(-1, 4), groups)


def test_set_experts_overrides_and_refuses_bad_values():
    tok = train_tiny.build_tokenizer(train_tiny.QWEN_SPECIALS)
    t = train_tiny.set_experts(train_tiny.qwen_config(tok), 64, 4, 40)["text_config"]
    assert (t["num_experts"], t["num_experts_per_tok"], t["moe_intermediate_size"]) == (64, 4, 40)
    ktok = train_tiny.build_tokenizer(train_tiny.KIMI_SPECIALS)
    k = train_tiny.set_experts(train_tiny.kimi_config(ktok), 16, None, None)["text_config"]
    assert (k["n_routed_experts"], k["num_experts_per_tok"], k["moe_intermediate_size"]) == (16, 2, 160)
    with pytest.raises(ValueError, match="--top-k"):
        train_tiny.set_experts(train_tiny.qwen_config(tok), 8, 9)
    with pytest.raises(ValueError, match="--experts"):
        train_tiny.set_experts(train_tiny.qwen_config(tok), 1)
    with pytest.raises(ValueError, match="--moe-intermediate"):
        train_tiny.set_experts(train_tiny.qwen_config(tok), 64, 4, 64)


def test_type_weights_curriculum_draws_by_weight_and_leaves_the_default_stream_alone():
    """Weighted draws: a type with weight 0 never appears, two types every scene can pose come in the ratio of
    their weights; the default (type_weights=None) keeps taking image types in turn."""
    w = {"exists": 3, "count": 1}  # both can be posed on every scene
    s = data_samples.shapes_benchmark(800, seed=2, split="train", text_fraction=0.0, type_weights=w)
    n = {t: sum(x.type == t for x in s) for t in data_samples.IMAGE_TYPES}
    assert n["exists"] + n["count"] == 800 and n["color"] == n["position"] == 0
    assert 2.4 < n["exists"] / n["count"] < 3.7  # 3:1 expected; binomial sd of the share ~1.5 points
    plain = data_samples.shapes_benchmark(60, seed=2, split="train", text_fraction=0.0)
    assert [x.type for x in plain] == [data_samples.IMAGE_TYPES[i % 6] for i in range(60)]
    with pytest.raises(data_samples.DataError, match="type weights"):
        data_samples.shapes_benchmark(5, type_weights={"colour": 1})
    with pytest.raises(data_samples.DataError, match="type weights"):
        data_samples.shapes_benchmark(5, type_weights={"color": 0})


def test_parse_type_weights():
    assert train_tiny.parse_type_weights("color=3,exists=2.5") == {"color": 3.0, "exists": 2.5}
    for bad in ("colr=3", "color", "color=x"):
        with pytest.raises(Exception, match=bad.split("=")[0]):
            train_tiny.parse_type_weights(bad)


def test_looked_at_object_holds_the_answer():
    """The object the attention supervision points at is the one the gold answer is read from: its colour or
    shape is the answer (exists: it is the object asked about); counts and "no" answers have none."""
    for s in data_samples.shapes_benchmark(400, seed=7, split="train"):
        if s.image is None:
            continue
        o = train_tiny.looked_at_object(s)
        if s.type == "count" or (s.type == "exists" and s.answer == "no"):
            assert o is None
        elif s.type == "exists":
            assert f"{o['color']} {o['shape']}" in s.question
        else:
            attr = {"color": "color", "shape": "shape"}.get(s.type) or s.question.split()[1]
            assert o[attr] == s.answer and o in s.objects


def test_look_targets_and_loss_against_the_label_map():
    samples = [s for s in data_samples.shapes_benchmark(60, seed=8, split="train") if s.image is not None][:12]
    t = train_tiny.look_targets(samples)
    for s, row in zip(samples, t):
        o = train_tiny.looked_at_object(s)
        if o is None:
            assert not row.any()
            continue
        lab = np.asarray(data_samples.draw_scene(s.objects, labels=True))
        code = 1 + data_samples.SHAPES.index(o["shape"]) * len(data_samples.COLORS) + list(data_samples.COLORS).index(o["color"])
        for k in range(16):  # merged token k covers pixel block (k // 4, k % 4) of 16 x 16, patch centres 4 and 12
            br, bc = divmod(k, 4)
            centres = [(16 * br + dy, 16 * bc + dx) for dy in (4, 12) for dx in (4, 12)]
            assert bool(row[k]) == any(lab[y, x] == code for y, x in centres)
    # uniform attention over T keys: -log(targets / T), averaged over the rows that have a target
    ids = torch.full((len(samples), 20), 7)
    ids[:, 2:18] = 99  # 16 image tokens at positions 2..17
    labels = torch.full((len(samples), 20), -100)
    labels[:, 19] = 1  # answer at 19, predicted from position 18
    probs = torch.full((len(samples), 2, 20, 20), 1 / 20)
    want = torch.stack([-torch.log(r.sum() / 20 + 1e-6) for r in t if r.any()]).mean()
    got = train_tiny.look_loss([probs], {"input_ids": ids, "labels": labels}, samples, image_token_id=99)
    assert torch.allclose(got, want)


@pytest.mark.parametrize("name", ["tiny-qwen3-vl-moe", "tiny-kimi-vl"])
def test_temper_attention_scales_every_logit(name):
    """After temper_attention(m, f) the first decoder layer's attention rows are softmax(f * log p) of the rows
    before (log p is the logit up to a per-row constant; float64, so nothing underflows); later layers see other
    inputs once the first has changed, so for them: the query's last scale is f times what it was, and nothing
    else in the model moved."""
    import os


    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", name)
    m = model.load_model(path).double().eval()
    proc = processor.load_processor(path)
    b = processor.encode_qa_batch(proc, data_samples.shapes_benchmark(3, seed=1))
    probs = []
    m.layers[0].self_attn.probs_hook = probs.append
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        m(b["input_ids"], attention_mask=b["attention_mask"], **processor.vision_inputs(b))
        train_tiny.temper_attention(m, 0.4)
        m(b["input_ids"], attention_mask=b["attention_mask"], **processor.vision_inputs(b))
    rows = probs[0].sum(-1) > 0.5  # rows of padded queries may be all-masked
    assert torch.allclose(probs[1][rows], torch.softmax(0.4 * probs[0].log(), dim=-1)[rows], atol=1e-9)
    scaled = ".self_attn.q_norm.weight" if m.family == "qwen3_vl_moe" else ".self_attn.q_proj.weight"
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if k.endswith(scaled) and ".layers." in k and "visual" not in k}
    assert len(changed) == len(m.layers)
    for k in changed:
        assert torch.allclose(m.state_dict()[k], 0.4 * before[k])


def test_train_refuses_bad_attention_flags(tmp_path):
    """--attn-scale must be positive and --look-layers must name decoder layers; both fail before any step."""
    with pytest.raises(ValueError, match="--attn-scale"):
        train_tiny.train("kimi_vl", out=str(tmp_path / "a"), steps=1, attn_scale=0.0, threads=1)
    with pytest.raises(ValueError, match="--look-layers"):
        train_tiny.train("kimi_vl", out=str(tmp_path / "b"), steps=1, look=0.3, look_layers=[4], threads=1)


def test_eval_seed_picks_the_held_out_questions_scored_in_training(tmp_path, monkeypatch):
    """--eval-seed 1 scores checkpoints on the test split's seed-1 stream (the validation set), not on eval.py's
    seed-0 items: the samples handed to evaluate are exactly shapes_benchmark(eval_n, seed=1, split="test")."""
    seen = []
    monkeypatch.setattr(train_tiny, "evaluate", lambda m, proc, samples: seen.append(samples) or {"image": 0.0})
    train_tiny.train("kimi_vl", out=str(tmp_path / "k"), steps=1, batch=4, eval_n=6, eval_every=1, eval_seed=1,
                     threads=1)
    key = [(s.question, s.answer, s.objects) for s in data_samples.shapes_benchmark(6, seed=1, split="test")]
    default = [(s.question, s.answer, s.objects) for s in data_samples.shapes_benchmark(6, seed=0, split="test")]
    assert len(seen) == 1 and [(s.question, s.answer, s.objects) for s in seen[0]] == key != default
