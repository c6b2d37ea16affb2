"""The real checkpoints' metadata (tests/fixtures/real, provenance in its SOURCES.md) against model.py and data.py.

1. config.json parses into model.py's dataclasses with every size the raw JSON states, and the known numbers.
2. The model skeleton built from that config on the meta device binds exactly to the real tensor list (names
   and shapes), through model.py's own Hub-name resolution (fused Qwen experts), and writes the same list back
   (checkpoint_state_dict). The real shapes are also checked against shapes derived here from the raw config.
3. The chat prompts data.py renders equal the real chat templates rendered by transformers' apply_chat_template
   (text and ids), on a test tokenizer that has the real special tokens at their real ids.

Qwen3-VL-235B-A22B-Instruct: its Hub config.json was not found; what was found is the config as transformers 5.7
re-serializes it and the real tensor list (names, shapes) read from its safetensors, and both are checked as above
(the skeleton on its first two decoder layers, to stay fast). Kimi-VL-A3B-Instruct: only excerpts were found
(config.json's first 52 lines, 8 added tokens, the EasyDeL re-save of preprocessor_config.json); they are checked
field by field. A checkpoint whose files could not be found is skipped with the reason (SOURCES.md, "Missing")."""

import json
import os
import re

import pytest
import torch

from arch import checkpoint
from arch import kimi_vl
from arch import qwen3_vl_moe
from data import processor
import model
from helpers import build_tokenizer, random_image

REAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "real")
QWEN30 = os.path.join(REAL, "qwen3-vl-30b-a3b-thinking")  # architecture of Qwen3-VL-30B-A3B-Instruct too
QWEN30_INSTRUCT = os.path.join(REAL, "qwen3-vl-30b-a3b-instruct")
QWEN235 = os.path.join(REAL, "qwen3-vl-235b-a22b-instruct")
KIMI = os.path.join(REAL, "kimi-vl-a3b-instruct")

MISSING = {
    "Qwen/Qwen3-VL-235B-A22B-Instruct config.json as on the Hub, generation/tokenizer/preprocessor configs":
        "only transformers 5.7's re-serialization of config.json was found (SOURCES.md)",
    "moonshotai/Kimi-VL-A3B-Instruct full config.json, tokenizer_config.json, index, generation_config.json, "
    "tokenization_moonshot.py": "only excerpts were found (SOURCES.md)",
    "moonshotai/Kimi-VL-A3B-Thinking-2506": "none of its files was found (SOURCES.md)",
}


def read(path):
    with open(path) as f:
        return json.load(f) if path.endswith(".json") else f.read()


def real_tensors(folder) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in read(os.path.join(folder, "tensors.json"))["tensors"].items()}


def weights_table(folder) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The tensor list of a model-inspector report's weight table (weights_table.md, SOURCES.md): rows name a
    tensor, or a run of them as `prefix.A-B.suffix` (×N ...); returns ({name: shape}, the summary lines)."""
    text = read(os.path.join(folder, "weights_table.md"))
    summary = dict(re.findall(r"^- \*\*(.+?)\*\*: (.+)$", text, re.M))
    out = {}
    for name, shape, dtype in re.findall(r"^\| `([^`]+)`[^|]*\| `(\[[0-9, ]+\])` \| `([^`]+)` \|", text, re.M):
        assert dtype == "torch.bfloat16", name
        m = re.fullmatch(r"(.*?)\.(\d+)-(\d+)\.(.*)", name)
        names = [f"{m[1]}.{i}.{m[4]}" for i in range(int(m[2]), int(m[3]) + 1)] if m else [name]
        for n in names:
            assert n not in out, n
            out[n] = tuple(json.loads(shape))
    return out, summary


def as_checkpoint_dir(tmp_path, config: dict) -> str:
    """A folder holding `config` as config.json (for model.load_config)."""
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    return str(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# 1. configs


QWEN_TEXT_FIELDS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "head_dim", "intermediate_size", "moe_intermediate_size", "num_experts_per_tok", "rms_norm_eps",
                    "decoder_sparse_step", "mlp_only_layers", "attention_bias"]  # same name in config.json and ours
QWEN_VISION_FIELDS = ["depth", "hidden_size", "num_heads", "intermediate_size", "patch_size", "temporal_patch_size",
                      "spatial_merge_size", "in_channels", "out_hidden_size", "num_position_embeddings",
                      "deepstack_visual_indexes", "hidden_act"]
QWEN_TOP_FIELDS = ["image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                   "tie_word_embeddings"]


def assert_qwen_fields(cfg, raw, experts_key: str):
    """Every field of a real Qwen3-VL-MoE config.json that model.py reads, compared one by one."""
    t, v = raw["text_config"], raw["vision_config"]
    for key in QWEN_TEXT_FIELDS:
        assert getattr(cfg.text, key) == t[key], key
    assert cfg.text.num_experts == t[experts_key]
    for key in QWEN_VISION_FIELDS:
        assert getattr(cfg.vision, key) == v[key], key
    for key in QWEN_TOP_FIELDS:
        assert getattr(cfg, key) == raw[key], key


def test_qwen30b_config_fields_map_one_to_one():
    raw = read(os.path.join(QWEN30, "config.json"))
    cfg = qwen3_vl_moe.Qwen3VLMoeConfig.from_dict(raw)
    t, v = raw["text_config"], raw["vision_config"]
    assert_qwen_fields(cfg, raw, "num_experts")
    assert cfg.text.rope_theta == t["rope_theta"]
    assert cfg.text.mrope_section == t["rope_scaling"]["mrope_section"]
    assert t["rope_scaling"]["mrope_interleaved"] is True and t["rope_scaling"]["rope_type"] == "default"
    assert "rope_theta" not in v and cfg.vision.rope_theta == 10000.0  # no vision rope field: the code's 10000
    # the published numbers of Qwen3-VL-30B-A3B (model card / docs/architectures.md §1.1)
    assert (cfg.text.num_hidden_layers, cfg.text.num_experts, cfg.text.num_experts_per_tok) == (48, 128, 8)
    assert (cfg.text.hidden_size, cfg.text.num_attention_heads, cfg.text.num_key_value_heads) == (2048, 32, 4)
    assert (cfg.text.moe_intermediate_size, cfg.text.vocab_size, cfg.text.head_dim) == (768, 151936, 128)
    assert (cfg.vision.depth, cfg.vision.deepstack_visual_indexes) == (27, [8, 16, 24])
    assert all(cfg.text.is_moe(i) for i in range(48))  # no dense layer
    assert not cfg.tie_word_embeddings
    assert model.load_config(QWEN30) == cfg  # the file loader gives the same


def test_qwen30b_preprocessor_and_generation_config():
    pre = processor.QwenImageConfig.from_file(os.path.join(QWEN30, "preprocessor_config.json"))
    raw = read(os.path.join(QWEN30, "preprocessor_config.json"))
    assert (pre.patch_size, pre.temporal_patch_size, pre.merge_size) == (16, 2, 2)
    assert (pre.min_pixels, pre.max_pixels) == (raw["size"]["shortest_edge"], raw["size"]["longest_edge"])
    assert (pre.min_pixels, pre.max_pixels) == (256 * 256, 4096 * 4096)
    assert list(pre.image_mean) == raw["image_mean"] and list(pre.image_std) == raw["image_std"]
    gen = read(os.path.join(QWEN30, "generation_config.json"))
    tok = read(os.path.join(QWEN30, "tokenizer_config.json"))["added_tokens_decoder"]
    assert {tok[str(i)]["content"] for i in gen["eos_token_id"]} == {"<|im_end|>", "<|endoftext|>"}


@pytest.mark.parametrize("name", sorted(MISSING))
def test_missing_checkpoint_files(name):
    pytest.skip(f"{name}: {MISSING[name]}")


# ----------------------------------------------------------------------------------------------------------
# 2. the skeleton against the real tensor list


def qwen_tensors_from_config(raw) -> dict[str, tuple[int, ...]]:
    """Every tensor a Qwen3-VL-MoE Hub checkpoint holds, with its shape, written from config.json alone
    (docs/architectures.md §1.2; independent of model.py)."""
    t, v = raw["text_config"], raw["vision_config"]
    H, nh, nkv, d = t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"]
    E, I, V = t.get("num_experts") or t["num_local_experts"], t["moe_intermediate_size"], t["vocab_size"]
    assert t["decoder_sparse_step"] == 1 and t["mlp_only_layers"] == []  # every layer MoE (else add dense MLPs)
    out = {"model.language_model.embed_tokens.weight": (V, H), "model.language_model.norm.weight": (H,)}
    if not raw["tie_word_embeddings"]:
        out["lm_head.weight"] = (V, H)
    for i in range(t["num_hidden_layers"]):
        p = f"model.language_model.layers.{i}."
        out.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                    p + "self_attn.q_proj.weight": (nh * d, H), p + "self_attn.k_proj.weight": (nkv * d, H),
                    p + "self_attn.v_proj.weight": (nkv * d, H), p + "self_attn.o_proj.weight": (H, nh * d),
                    p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
                    p + "mlp.gate.weight": (E, H), p + "mlp.experts.gate_up_proj": (E, H, 2 * I),
                    p + "mlp.experts.down_proj": (E, I, H)})
    D, Iv, m, Do = v["hidden_size"], v["intermediate_size"], v["spatial_merge_size"], v["out_hidden_size"]
    Dm = D * m * m
    out.update({"model.visual.patch_embed.proj.weight": (D, v["in_channels"], v["temporal_patch_size"],
                                                         v["patch_size"], v["patch_size"]),
                "model.visual.patch_embed.proj.bias": (D,),
                "model.visual.pos_embed.weight": (v["num_position_embeddings"], D)})
    linear = lambda p, o, i: {p + ".weight": (o, i), p + ".bias": (o,)}  # noqa: E731
    norm = lambda p, n: {p + ".weight": (n,), p + ".bias": (n,)}  # noqa: E731
    for i in range(v["depth"]):
        p = f"model.visual.blocks.{i}."
        out.update({**norm(p + "norm1", D), **norm(p + "norm2", D), **linear(p + "attn.qkv", 3 * D, D),
                    **linear(p + "attn.proj", D, D), **linear(p + "mlp.linear_fc1", Iv, D),
                    **linear(p + "mlp.linear_fc2", D, Iv)})
    out.update({**norm("model.visual.merger.norm", D), **linear("model.visual.merger.linear_fc1", Dm, Dm),
                **linear("model.visual.merger.linear_fc2", Do, Dm)})
    for k in range(len(v["deepstack_visual_indexes"])):
        p = f"model.visual.deepstack_merger_list.{k}."
        out.update({**norm(p + "norm", Dm), **linear(p + "linear_fc1", Dm, Dm), **linear(p + "linear_fc2", Do, Dm)})
    return out


class HeaderOnlyCheckpoint:
    """What model.bind needs of a Checkpoint (names, shapes), from the fixture's tensor list: no weights."""

    dir = "tests/fixtures/real"

    def __init__(self, tensors):
        self.tensors = tensors

    def __contains__(self, key):
        return key in self.tensors

    def shape(self, key):
        return self.tensors[key]

    def keys(self):
        return self.tensors.keys()


@pytest.fixture(scope="module")
def qwen30_skeleton():
    cfg = model.load_config(QWEN30)
    with torch.device("meta"):
        return model.MODELS[cfg.model_type](cfg).eval().requires_grad_(False)


def test_qwen30b_real_tensor_list_is_what_the_config_implies():
    real = real_tensors(QWEN30)
    want = qwen_tensors_from_config(read(os.path.join(QWEN30, "config.json")))
    assert sorted(set(real) - set(want)) == [] and sorted(set(want) - set(real)) == []
    assert {k: s for k, s in real.items() if want[k] != s} == {}
    assert len(real) == 882
    # the shapes are real ones: in bf16 they add up to the index's total_size exactly
    total = read(os.path.join(QWEN30, "tensors.json"))["metadata"]["total_size"]
    assert 2 * sum(torch.Size(s).numel() for s in real.values()) == total


def test_qwen30b_skeleton_binds_exactly_to_the_real_tensors(qwen30_skeleton):
    """model.bind resolves every parameter to a real tensor (own name, or a fused Hub expert tensor) and checks
    its shape; nothing real is left unused (what load_model would report as unexpected)."""
    real = real_tensors(QWEN30)
    ckpt = HeaderOnlyCheckpoint(real)
    qwen30_skeleton.bind(ckpt, torch.float32, "cpu")  # raises CheckpointError on a missing name or wrong shape
    used = {src for src, _ in qwen30_skeleton.sources.values()}
    unused = sorted(k for k in real if k not in used and not any(p.match(k) for p in checkpoint.STALE_KEYS))
    assert unused == [], f"real tensors the skeleton does not read: {unused[:10]}"
    assert used <= set(real)


def test_qwen30b_skeleton_writes_the_real_layout(qwen30_skeleton):
    """checkpoint_state_dict (the writer used for quantized/float exports) gives the Hub names and shapes."""
    sd = checkpoint.checkpoint_state_dict(qwen30_skeleton)
    real = real_tensors(QWEN30)
    assert sorted(set(sd) ^ set(real)) == []
    assert {k: tuple(t.shape) for k, t in sd.items() if tuple(t.shape) != real[k]} == {}


# ----------------------------------------------------------------------------------------------------------
# 3. chat prompts against the real templates


def tokenizer_at_ids(specials: dict[int, str]):
    """A small byte-level BPE whose special tokens sit at the given (real) ids: the base vocabulary is padded
    with unreachable filler entries up to the first special id, and unnamed ids in the special range get
    `<|reserved_token_{id}|>` (the Kimi tokenizer's own name for them)."""
    from tokenizers import Tokenizer

    d = json.loads(build_tokenizer([], vocab_size=300).to_str())
    vocab = d["model"]["vocab"]
    first, last = min(specials), max(specials)
    for i in range(len(vocab), first):
        vocab[f"ĀĀfiller{i}"] = i
    tok = Tokenizer.from_str(json.dumps(d))
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(specials.get(i, f"<|reserved_token_{i}|>"), special=True, normalized=False)
                            for i in range(first, last + 1)])
    assert all(tok.token_to_id(c) == i for i, c in specials.items())
    return tok


def hf_tokenizer(tok, template):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template)


def hf_ids(hf, msgs, gen):
    out = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
    out = out["input_ids"] if hasattr(out, "keys") else out
    return list(out[0] if out and isinstance(out[0], list) else out)


def assert_renders_as_template(chat_text, tokenizer, hf, msgs, gen):
    """data.py's prompt text and ids equal the real template rendered by transformers; returns (text, ids)."""
    text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert chat_text(msgs, add_generation_prompt=gen) == text
    ids = hf_ids(hf, msgs, gen)
    assert tokenizer.encode(text) == ids
    return text, ids


IMAGE_MSG = [{"type": "image"}, {"type": "text", "text": "what color is the circle ?"}]
CONVERSATIONS = {
    "text": [{"role": "user", "content": "how many shapes are there ?"}],
    "text+system": [{"role": "system", "content": "You answer in one word."},
                    {"role": "user", "content": "how many shapes are there ?"}],
    "image": [{"role": "user", "content": IMAGE_MSG}],
    "image+system": [{"role": "system", "content": "You answer in one word."},
                     {"role": "user", "content": IMAGE_MSG}],
    "multi-turn": [{"role": "user", "content": IMAGE_MSG}, {"role": "assistant", "content": "red"},
                   {"role": "user", "content": [{"type": "text", "text": "and the square ?"}]}],
}


@pytest.fixture(scope="module")
def qwen_setup(tmp_path_factory):
    """A checkpoint folder with the real config.json / preprocessor_config.json and a test tokenizer.json with
    the real added tokens (tokenizer_config.json's added_tokens_decoder) at their real ids."""
    d = tmp_path_factory.mktemp("qwen-real")
    added = read(os.path.join(QWEN30, "tokenizer_config.json"))["added_tokens_decoder"]
    tok = tokenizer_at_ids({int(i): t["content"] for i, t in added.items()})
    tok.save(str(d / "tokenizer.json"))
    for f in ("config.json", "preprocessor_config.json"):
        with open(os.path.join(QWEN30, f)) as src, open(d / f, "w") as dst:
            dst.write(src.read())
    return str(d), tok


@pytest.fixture(scope="module")
def qwen_instruct(qwen_setup):
    folder, tok = qwen_setup
    template = read(os.path.join(QWEN30_INSTRUCT, "chat_template.json"))["chat_template"]
    return processor.QwenProcessor(folder), hf_tokenizer(tok, template)


@pytest.fixture(scope="module")
def qwen_thinking(qwen_setup, tmp_path_factory):
    """The same folder plus the Thinking checkpoint's chat_template.json."""
    folder, tok = qwen_setup
    d = tmp_path_factory.mktemp("qwen-thinking")
    for f in os.listdir(folder):
        with open(os.path.join(folder, f), "rb") as src, open(d / f, "wb") as dst:
            dst.write(src.read())
    with open(os.path.join(QWEN30, "chat_template.json")) as src, open(d / "chat_template.json", "w") as dst:
        dst.write(src.read())
    template = read(os.path.join(QWEN30, "chat_template.json"))["chat_template"]
    return processor.QwenProcessor(str(d)), hf_tokenizer(tok, template)


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
def test_qwen_instruct_prompt_matches_real_template(conv, gen, qwen_instruct):
    proc, hf = qwen_instruct
    assert_renders_as_template(proc.chat_text, proc.tokenizer, hf, CONVERSATIONS[conv], gen)
    assert proc.image_token_id == 151655 == proc.tokenizer.token_id("<|image_pad|>")
    assert proc.stop_ids == [151645, 151643]


def test_qwen_instruct_image_prompt_ids_match_transformers_processor(qwen_instruct, monkeypatch):
    """One image, real template and real preprocessor_config: the expanded ids equal Qwen3VLProcessor's."""
    from transformers import ProcessorMixin, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda *a, **k: None)
    proc, hf_tok = qwen_instruct
    pre = {k: v for k, v in read(os.path.join(QWEN30, "preprocessor_config.json")).items()
           if k not in ("processor_class", "image_processor_type")}
    hf = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessorPil(**pre), tokenizer=hf_tok,
                          video_processor=None, chat_template=hf_tok.chat_template)
    msgs, img = CONVERSATIONS["image+system"], random_image(120, 200, 3)
    text = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ref = hf(text=[text], images=[img], return_tensors="pt")
    enc = proc.encode(msgs, [img])
    assert torch.equal(enc["input_ids"], ref["input_ids"])
    assert torch.equal(enc["image_grid_thw"], ref["image_grid_thw"])


@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
def test_qwen_thinking_generation_prompt_matches_real_template(conv, qwen_thinking, qwen_instruct):
    """The Thinking checkpoint's template opens the answer with `<think>\\n`; a folder that ships it (its
    chat_template.json) gets the same prompt from data.py. (Only prompts ending in a user turn: for a final
    assistant turn the Thinking template also writes an empty `<think>` block, which data.py does not.)"""
    proc, hf = qwen_thinking
    msgs = CONVERSATIONS[conv]
    text, _ = assert_renders_as_template(proc.chat_text, proc.tokenizer, hf, msgs, True)
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    assert qwen_instruct[0].chat_text(msgs) + "<think>\n" == text  # Instruct: the same prompt without it


# Kimi-VL special ids (docs/architectures.md §3.2; SOURCES.md "Kimi tokenizer facts"): the real tokenizer_config.json
# was not found, so these come from the spec table, not from a file.
KIMI_SPECIAL = {163584: "[BOS]", 163585: "[EOS]", 163586: "<|im_end|>", 163587: "<|im_user|>",
                163588: "<|im_assistant|>", 163594: "<|im_system|>", 163601: "<|im_middle|>",
                163602: "<|media_start|>", 163603: "<|media_content|>", 163604: "<|media_end|>",
                163605: "<|media_pad|>", 163839: "[PAD]"}


@pytest.fixture(scope="module")
def kimi_tok(tmp_path_factory):
    tok = tokenizer_at_ids(KIMI_SPECIAL)
    path = tmp_path_factory.mktemp("kimi-real") / "tokenizer.json"
    tok.save(str(path))
    return hf_tokenizer(tok, read(os.path.join(KIMI, "chat_template.jinja"))), processor.Tokenizer(str(path.parent))


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
def test_kimi_prompt_matches_real_template(conv, gen, kimi_tok):
    hf, ours = kimi_tok
    proc = object.__new__(processor.KimiProcessor)  # chat_text needs no checkpoint files
    _, ids = assert_renders_as_template(proc.chat_text, ours, hf, CONVERSATIONS[conv], gen)
    assert ids[0] == 163594 != 163584  # the prompt opens with <|im_system|>: no BOS
    if "image" in conv:
        media = [163602, *ours.encode("image"), 163603, 163605, 163604]
        assert any(ids[i:i + len(media)] == media for i in range(len(ids)))


def test_kimi_template_fixture_is_the_one_described():
    """Guards the reconstructed fixture itself (SOURCES.md): 31 lines, 1031 bytes, the media and role tokens."""
    raw = read(os.path.join(KIMI, "chat_template.jinja"))
    assert len(raw.encode()) == 1031 and raw.count("\n") + 1 == 31
    assert re.findall(r"<\|[a-z_]+\|>", raw) == [
        "<|im_system|>", "<|im_middle|>", "<|im_end|>", "<|im_system|>", "<|im_user|>", "<|im_assistant|>",
        "<|im_middle|>", "<|im_end|>", "<|media_start|>", "<|media_content|>", "<|media_pad|>", "<|media_end|>",
        "<|im_end|>", "<|im_assistant|>", "<|im_middle|>"]


# ----------------------------------------------------------------------------------------------------------
# 4. Qwen3-VL-30B-A3B-Instruct: its own config.json and tensor list (a model-inspector report, SOURCES.md)


def test_qwen30b_instruct_weight_table_is_the_real_tensor_list():
    """The Instruct checkpoint's tensor list (read from its safetensors by a third-party report) is the one the
    Thinking index gives: same 882 names and shapes, same parameter count."""
    table, summary = weights_table(QWEN30_INSTRUCT)
    real = real_tensors(QWEN30)
    assert sorted(set(table) ^ set(real)) == []
    assert {k: s for k, s in table.items() if real[k] != s} == {}
    assert summary["权重张量数"] == "882" == str(len(table))
    params = sum(torch.Size(s).numel() for s in table.values())
    assert summary["参数总量"] == f"{params:,}" == "31,070,754,032"
    assert 2 * params == read(os.path.join(QWEN30, "tensors.json"))["metadata"]["total_size"]


def test_qwen30b_instruct_config_both_spellings_parse_the_same():
    """The Instruct config.json and transformers 5.7's re-serialization of it (rope_parameters,
    num_local_experts, qwen3_vl_moe_vision) give model.py the same dataclass: the transformers-5 spelling is
    read correctly, which the 235B check below relies on."""
    raw = read(os.path.join(QWEN30_INSTRUCT, "config.json"))
    t5 = read(os.path.join(QWEN30_INSTRUCT, "config.transformers5.json"))
    assert "rope_parameters" in t5["text_config"] and "num_local_experts" in t5["text_config"]
    assert "rope_scaling" not in t5["text_config"] and "num_experts" not in t5["text_config"]
    assert qwen3_vl_moe.Qwen3VLMoeConfig.from_dict(t5) == qwen3_vl_moe.Qwen3VLMoeConfig.from_dict(raw) == model.load_config(QWEN30)
    assert qwen_tensors_from_config(t5) == qwen_tensors_from_config(raw)


# ----------------------------------------------------------------------------------------------------------
# 5. Qwen3-VL-235B-A22B-Instruct (config as transformers 5.7 re-serializes it; tensor list from a report)


@pytest.fixture(scope="module")
def qwen235_cfg(tmp_path_factory):
    return model.load_config(as_checkpoint_dir(tmp_path_factory.mktemp("q235"),
                                           read(os.path.join(QWEN235, "config.transformers5.json"))))


def test_qwen235b_config_fields_map_one_to_one(qwen235_cfg):
    cfg, raw = qwen235_cfg, read(os.path.join(QWEN235, "config.transformers5.json"))
    t = raw["text_config"]
    assert_qwen_fields(cfg, raw, "num_local_experts")  # transformers 5's spelling
    assert cfg.text.rope_theta == t["rope_parameters"]["rope_theta"] == 5_000_000
    assert cfg.text.mrope_section == t["rope_parameters"]["mrope_section"] == [24, 20, 20]
    # the published numbers of Qwen3-VL-235B-A22B (model card)
    assert (cfg.text.num_hidden_layers, cfg.text.num_experts, cfg.text.num_experts_per_tok) == (94, 128, 8)
    assert (cfg.text.hidden_size, cfg.text.num_attention_heads, cfg.text.num_key_value_heads) == (4096, 64, 4)
    assert (cfg.text.moe_intermediate_size, cfg.text.vocab_size, cfg.text.head_dim) == (1536, 151936, 128)
    assert (cfg.vision.depth, cfg.vision.out_hidden_size, cfg.vision.deepstack_visual_indexes) == (27, 4096,
                                                                                                   [8, 16, 24])
    assert all(cfg.text.is_moe(i) for i in range(94)) and not cfg.tie_word_embeddings


def test_qwen235b_real_tensor_list_is_what_the_config_implies():
    table, summary = weights_table(QWEN235)
    want = qwen_tensors_from_config(read(os.path.join(QWEN235, "config.transformers5.json")))
    assert sorted(set(table) - set(want)) == [] and sorted(set(want) - set(table)) == []
    assert {k: s for k, s in table.items() if want[k] != s} == {}
    assert summary["权重张量数"] == "1,388" and len(table) == 1388
    assert summary["参数总量"] == f"{sum(torch.Size(s).numel() for s in table.values()):,}" == "235,670,022,896"


def test_qwen235b_skeleton_binds_exactly_to_the_real_tensors():
    """The meta skeleton at the 235B sizes, cut to its first two decoder layers (the other 92 are the same
    modules), binds exactly to the real tensors of those layers plus every non-layer tensor, and writes them back."""
    raw = read(os.path.join(QWEN235, "config.transformers5.json"))
    raw = {**raw, "text_config": {**raw["text_config"], "num_hidden_layers": 2}}
    cfg = qwen3_vl_moe.Qwen3VLMoeConfig.from_dict(raw)
    table, _ = weights_table(QWEN235)
    real = {k: s for k, s in table.items()
            if not (m := re.match(r"model\.language_model\.layers\.(\d+)\.", k)) or int(m[1]) < 2}
    with torch.device("meta"):
        skel = model.MODELS[cfg.model_type](cfg).eval().requires_grad_(False)
    skel.bind(HeaderOnlyCheckpoint(real), torch.float32, "cpu")
    used = {src for src, _ in skel.sources.values()}
    assert sorted(k for k in real if k not in used and not any(p.match(k) for p in checkpoint.STALE_KEYS)) == []
    sd = checkpoint.checkpoint_state_dict(skel)
    assert sorted(set(sd) ^ set(real)) == []
    assert {k: tuple(t.shape) for k, t in sd.items() if tuple(t.shape) != real[k]} == {}


# ----------------------------------------------------------------------------------------------------------
# 6. Kimi-VL-A3B-Instruct excerpts (SOURCES.md): config.json's first lines, added tokens, preprocessor values


def test_kimi_config_excerpt_fields_map_one_to_one():
    """Every field the excerpt of the real config.json shows is read by model.py under that spelling, with the
    known numbers. (Fields past the excerpt, e.g. rms_norm_eps, rope_theta, are not checked here.)"""
    raw = read(os.path.join(KIMI, "config.excerpt.json"))
    assert raw["architectures"] == ["KimiVLForConditionalGeneration"]
    cfg = kimi_vl.KimiVLConfig.from_dict({**raw, "model_type": "kimi_vl"})
    t, v = raw["text_config"], raw["vision_config"]
    for key in ["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_attention_heads", "n_shared_experts", "n_routed_experts", "routed_scaling_factor",
                "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group",
                "topk_group", "num_experts_per_tok", "moe_layer_freq", "first_k_dense_replace", "norm_topk_prob"]:
        assert getattr(cfg.text, key) == t[key], key
    assert (t["topk_method"], t["scoring_func"]) == ("noaux_tc", "sigmoid")  # the only routing model.py runs
    for ours, key in [("patch_size", "patch_size"), ("num_attention_heads", "num_attention_heads"),
                      ("num_hidden_layers", "num_hidden_layers"), ("hidden_size", "hidden_size"),
                      ("intermediate_size", "intermediate_size"), ("pos_emb_height", "init_pos_emb_height"),
                      ("pos_emb_width", "init_pos_emb_width")]:
        assert getattr(cfg.vision, ours) == v[key], ours
    assert list(cfg.vision.merge_kernel_size) == v["merge_kernel_size"] and v["model_type"] == "moonvit"
    # the known numbers (docs/architectures.md §2.1)
    tc = cfg.text
    assert (tc.num_hidden_layers, tc.hidden_size, tc.n_routed_experts, tc.n_shared_experts) == (27, 2048, 64, 2)
    assert (tc.num_experts_per_tok, tc.first_k_dense_replace, tc.kv_lora_rank, tc.q_lora_rank) == (6, 1, 512, None)
    assert (tc.vocab_size, tc.moe_intermediate_size, tc.intermediate_size) == (163840, 1408, 11264)
    assert not tc.is_moe(0) and all(tc.is_moe(i) for i in range(1, 27))
    assert (cfg.vision.num_hidden_layers, cfg.vision.hidden_size, cfg.vision.patch_size) == (27, 1152, 14)


def test_kimi_added_tokens_excerpt_matches_the_ids_data_and_the_spec_use():
    """The real added_tokens_decoder entries the excerpt shows sit at the ids docs/architectures.md §3.2 (and the
    Kimi tests above) give them, all special."""
    added = read(os.path.join(KIMI, "added_tokens_decoder.excerpt.json"))["added_tokens_decoder"]
    assert len(added) == 8 and all(t["special"] and not t["normalized"] for t in added.values())
    assert {int(i): t["content"] for i, t in added.items()} == {i: c for i, c in KIMI_SPECIAL.items()
                                                                 if i in map(int, added)}
    assert "<|media_start|>" == added["163602"]["content"]  # not K2's <|media_begin|>


def test_kimi_preprocessor_values(tmp_path):
    """processor.KimiImageConfig reads the real preprocessor values (EasyDeL's re-save): mean/std 0.5, not the
    CLIP defaults it falls back to when a file has none."""
    path = tmp_path / "preprocessor_config.json"
    path.write_text(open(os.path.join(KIMI, "preprocessor_config.easydel.json")).read())
    raw, pre = read(str(path)), processor.KimiImageConfig.from_file(str(path))
    assert list(pre.image_mean) == raw["image_mean"] == [0.5] * 3 != list(processor.CLIP_MEAN)
    assert list(pre.image_std) == raw["image_std"] == [0.5] * 3
    assert (pre.patch_size, pre.in_token_limit, list(pre.merge_kernel_size)) == (14, 4096, [2, 2])
    assert raw["pad_input"] is True and raw["image_processor_type"] == "KimiVLImageProcessor"
