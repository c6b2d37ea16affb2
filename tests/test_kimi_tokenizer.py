"""Kimi's tiktoken tokenizer read by data.py (tiktoken.model + tokenizer_config.json, no tokenizer.json).

Oracle: `tiktoken.Encoding` (a test-only extra) with the same ranks, regex and special tokens, which is what
Kimi's remote code (TikTokenTokenizer) runs. The ranks come from byte-level BPEs built here: one trained by
`tokenizers` on mixed-script text (merges in the usual BPE order), one grown from random pairs (tokens with
many two-token splits, where the merge order recovered from the ranks matters most).
"""

import base64
import json
import os
import random
import re
import shutil

import pytest
import torch

from data import processor
from data import samples as data_samples
from data.processor import KIMI_PAT_STR
from data.samples import DataError

tiktoken = pytest.importorskip("tiktoken")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMED = ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>",
         "<|media_start|>", "<|media_content|>", "<|media_end|>", "<|media_pad|>"]

# Character pools for the training text and the odd test strings.
POOLS = {
    "latin": "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "accents": "éèêëàâäôöûüçñÉÈÀÇÑßøåæœ",
    "han": "".join(map(chr, range(0x4E00, 0x4E40))) + "東京都日本首北欢迎你",
    "kana": "".join(map(chr, range(0x3041, 0x3060))) + "アイウエオカキクケコ",
    "hangul": "".join(map(chr, range(0xAC00, 0xAC18))),
    "greek": "αβγδεζηθικλμνξοπρστυφχψωΑΒΓΔΣΩ",
    "cyrillic": "абвгдежзийклмнопрстуфхцчшщыэюяАБВГДЖЯ",
    "arabic": "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
    "devanagari": "कखगघचछजझटठडढणतथदधनपफबभमयरलवशसह" + "ािीुूेैोौं्",
    "digits": "0123456789" + "٠١٢٣" + "१२३",
    "punct": ".,;:!?'\"()[]{}<>|/\\-_=+*&^%$#@~`" + "、。「」！？…—«»",
    "emoji": "😀😃😄😁🙂🙃😉😊👍👎🏽🏿❤️🇯🇵🇫🇷" + "\u200d👨👩👧👦",
    "marks": "\u0301\u0300\u0308\u0327\u034f",
    "space": "  \t\n\r\u00a0\u3000\u2003",
}


def _odd_string(rng: random.Random, length: int) -> str:
    """Runs drawn from a few pools, so that pieces cross scripts and merges fire."""
    out = []
    while sum(map(len, out)) < length:
        pool = POOLS[rng.choice(list(POOLS))]
        out.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 8))))
    return "".join(out)


def _training_text(n: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = [_odd_string(rng, rng.randint(2, 6)) for _ in range(300)]  # a vocabulary, repeated so merges form
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice(["", ".", "\n", "\n\n"])
            for _ in range(n)]


def train_bpe_ranks(lines, vocab_size: int) -> list[bytes]:
    """Byte-level BPE trained by `tokenizers` with Kimi's split -> tokens by rank (bytes 0..255, then one
    token per merge, in merge order: tiktoken's convention)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(KIMI_PAT_STR), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    merges = json.loads(tok.to_str())["model"]["merges"]
    byte_of = {c: b for b, c in enumerate(processor._byte_chars())}
    tokens = [bytes([b]) for b in range(256)]
    seen = set(tokens)
    for a, b in merges:
        t = bytes(byte_of[c] for c in a + b)
        if t not in seen:
            tokens.append(t)
            seen.add(t)
    return tokens


def random_ranks(n: int, seed: int = 0) -> list[bytes]:
    """Tokens grown by concatenating random earlier tokens (short ones more often): a BPE-like vocabulary in
    which many tokens have several splits into two tokens."""
    rng = random.Random(seed)
    alphabet = [b for b in bytes(" etaoinshrdlu\n", "ascii")] + list("東é😀".encode())
    tokens = [bytes([b]) for b in range(256)]
    seen = set(tokens)
    base = [bytes([b]) for b in alphabet]
    pool = list(base)
    while len(tokens) < n:
        t = rng.choice(pool) + rng.choice(pool if rng.random() < 0.5 else base)
        if t not in seen and len(t) <= 8:
            tokens.append(t)
            seen.add(t)
            pool.append(t)
    return tokens


def write_tiktoken(path, tokens: list[bytes]) -> None:
    with open(path, "wb") as f:
        f.writelines(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(tokens))


def specials_for(n_ranks: int) -> dict[str, int]:
    """Kimi's layout: 258 ids after the ranks, the first ones named, `<|reserved_token_{id}|>` for the rest."""
    names = {n_ranks + i: s for i, s in enumerate(NAMED)}
    return {names.get(i, f"<|reserved_token_{i}|>"): i for i in range(n_ranks, n_ranks + 258)}


@pytest.fixture(scope="module", params=["trained", "random"])
def pair(request, tmp_path_factory):
    """(our tokenizers.Tokenizer, the tiktoken.Encoding, tokens by rank) on one vocabulary."""
    tokens = train_bpe_ranks(_training_text(), 3000) if request.param == "trained" else random_ranks(3000)
    path = tmp_path_factory.mktemp(request.param) / "tiktoken.model"
    write_tiktoken(path, tokens)
    specials = specials_for(len(tokens))
    ours = processor.load_tiktoken_bpe(str(path), KIMI_PAT_STR, specials)
    ref = tiktoken.Encoding(request.param, pat_str=KIMI_PAT_STR, mergeable_ranks={t: r for r, t in enumerate(tokens)},
                            special_tokens=specials)
    return ours, ref, tokens


ODD = [
    "東京都は日本の首都です。北京欢迎你！한국어 텍스트도 있어요",
    "👍🏽 👨\u200d👩\u200d👧\u200d👦 🇯🇵🇫🇷 😀😀😀❤️",
    "1234567890" * 5 + " 3.14159265358979 ١٢٣٤ १२३४५",
    "a" + " " * 17 + "b   \t\t  \n\n\n   x  end   ",
    "line1\r\nline2\n\n\tindent\r\r\n \n",
    "Ελληνικά русский עברית العربية हिन्दी ÉCOLE école Ǆungla ǅ DŽ ʼn",
    "I'm, you're, THEY'LL, she'S won't ’s 'd'D",
    "e\u0301 a\u0300\u0308 \u0301\u0301 x\u034f",
    "(red) [blue] {green}... !!!??? --> <-- ==> \u3000\u3000全角\u00a0nbsp",
    "mixedCaseWords camelCase HTTPServer iPhone McDonald's 東京Tower東京",
    "",
    " ",
    "\n",
]


def _assert_same(ours, ref, text):
    ids = ours.encode(text, add_special_tokens=False).ids
    assert ids == ref.encode(text, allowed_special="all"), repr(text)
    assert ref.decode(ids) == text
    return ids


def test_matches_tiktoken_on_odd_text(pair):
    ours, ref, _ = pair
    for text in ODD:
        ids = _assert_same(ours, ref, text)
        assert ours.decode(ids) == text


def test_matches_tiktoken_on_random_text(pair):
    """Random runs from many scripts, random code points, random bytes decoded with replacement characters."""
    ours, ref, _ = pair
    rng = random.Random(1)
    texts = [_odd_string(rng, rng.randint(1, 80)) for _ in range(400)]
    texts += ["".join(chr(rng.choice([rng.randint(0, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
                      for _ in range(rng.randint(1, 30))) for _ in range(100)]
    texts += [bytes(rng.randrange(256) for _ in range(rng.randint(1, 60))).decode("utf-8", "replace")
              for _ in range(100)]
    for text in texts:
        ids = _assert_same(ours, ref, text)
        assert ours.decode(ids) == text


def test_special_tokens_in_text(pair):
    """Special token strings anywhere in the text become their ids (allowed_special="all" in the remote code),
    reserved ones included; decoding skips them."""
    ours, ref, tokens = pair
    n = len(tokens)
    text = (f"<|im_user|>user<|im_middle|>hi<|media_start|>image<|media_content|><|media_pad|><|media_end|>"
            f"x<|im_end|>[BOS]a[EOS]<|reserved_token_{n + 200}|> <|im_end |> <|im_end|")
    ids = _assert_same(ours, ref, text)
    user = ours.encode("user", add_special_tokens=False).ids
    assert ids[:1 + len(user)] == [n + NAMED.index("<|im_user|>"), *user]
    assert n + 200 in ids and n + NAMED.index("[BOS]") in ids
    assert ours.decode(ids) == "userhiimagexa <|im_end |> <|im_end|"


def test_every_token_alone(pair):
    """Each token decodes to its bytes, and its text (where it is valid UTF-8) encodes as tiktoken does: to
    the token itself where the regex keeps it whole (the whole-piece rule, ignore_merges in `tokenizers`)."""
    ours, ref, tokens = pair
    for r, t in enumerate(tokens):
        assert ours.decode([r]) == t.decode("utf-8", "replace")
        try:
            text = t.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert ours.encode(text, add_special_tokens=False).ids == ref.encode(text, allowed_special="all")


# -- the checkpoint folder --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kimi_tiktoken_dir(tmp_path_factory):
    """models/tiny-kimi-vl with its tokenizer.json replaced by tiktoken.model (its byte-level BPE vocabulary,
    id = rank) and tokenizer_config.json (its special tokens, at the ids right after the ranks)."""
    src = os.path.join(ROOT, "models", "tiny-kimi-vl")
    out = tmp_path_factory.mktemp("tiny-kimi-tiktoken")
    for name in ("config.json", "preprocessor_config.json", "generation_config.json"):
        shutil.copy(os.path.join(src, name), out / name)
    tj = json.load(open(os.path.join(src, "tokenizer.json")))
    byte_of = {c: b for b, c in enumerate(processor._byte_chars())}
    vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(vocab)))
    write_tiktoken(out / "tiktoken.model", [bytes(byte_of[c] for c in s) for s, _ in vocab])
    dec = {str(a["id"]): {"content": a["content"], "special": True} for a in tj["added_tokens"]}
    assert min(map(int, dec)) == len(vocab)
    json.dump({"added_tokens_decoder": dec}, open(out / "tokenizer_config.json", "w"))
    return out


def test_kimi_processor_on_tiktoken_checkpoint(kimi_tiktoken_dir):
    """KimiProcessor reads tiktoken.model + tokenizer_config.json; the prompt's ids are tiktoken's, image
    placeholders expanded, no BOS in front; the special ids are those of the tokenizer.json checkpoint."""
    from PIL import Image

    proc = processor.load_processor(str(kimi_tiktoken_dir))
    assert isinstance(proc, processor.KimiProcessor) and proc.tokenizer.path.endswith("tiktoken.model")
    ref_proc = processor.KimiProcessor(os.path.join(ROOT, "models", "tiny-kimi-vl"))
    for tok in ["[BOS]", "[EOS]", "<|im_end|>", "<|im_system|>", "<|media_start|>", "<|media_pad|>", "[PAD]"]:
        assert proc.tokenizer.token_id(tok) == ref_proc.tokenizer.token_id(tok)
    assert proc.image_token_id == ref_proc.image_token_id and proc.stop_ids == ref_proc.stop_ids

    tokens = processor.read_tiktoken_ranks(str(kimi_tiktoken_dir / "tiktoken.model"))
    specials = processor.kimi_special_tokens(str(kimi_tiktoken_dir / "tokenizer_config.json"), len(tokens))
    ref = tiktoken.Encoding("tiny", pat_str=KIMI_PAT_STR, mergeable_ranks={t: r for r, t in enumerate(tokens)},
                            special_tokens=specials)
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    for s in data_samples.shapes_benchmark(8, seed=3):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}]
        out = proc.encode(msgs, [image])
        n_img = int(out["is_vis"].sum())
        text = proc.chat_text(msgs).replace("<|media_pad|>", "<|media_pad|>" * n_img)
        assert out["input_ids"][0].tolist() == ref.encode(text, allowed_special="all")
        assert out["input_ids"][0, 0].item() == proc.tokenizer.token_id("<|im_system|>")  # no [BOS]
        assert n_img == proc.num_image_tokens(out["image_grid_hws"][0].tolist()) > 0
        assert proc.tokenizer.decode(proc.tokenizer.encode(s.question)) == s.question
    assert torch.equal(out["pixel_values"], ref_proc.encode(msgs, [image])["pixel_values"])


def _kimi_cuts(text: str, specials, max_chars: int, max_run: int) -> list[str]:
    """TikTokenTokenizer's cuts as transformers reaches them, written as a loop: split at special tokens, then
    windows of max_chars, then a new chunk whenever a whitespace / non-whitespace run passes max_run."""
    out = []
    for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        for w in range(0, len(part), max_chars):
            s, start, run, space = part[w:w + max_chars], 0, 0, None
            for i, ch in enumerate(s):
                if ch.isspace() != space:
                    run, space = 1, ch.isspace()
                else:
                    run += 1
                    if run > max_run:
                        out.append(s[start:i])
                        start, run = i, 1
            out.append(s[start:])
    return out


def test_long_runs_are_cut_like_kimi(kimi_tiktoken_dir):
    """Long texts: the 400,000-character windows and 25,000-character runs of the remote code, scaled down."""
    tok = processor.Tokenizer(str(kimi_tiktoken_dir), pat_str=KIMI_PAT_STR)
    tokens = processor.read_tiktoken_ranks(str(kimi_tiktoken_dir / "tiktoken.model"))
    specials = processor.kimi_special_tokens(str(kimi_tiktoken_dir / "tokenizer_config.json"), len(tokens))
    ref = tiktoken.Encoding("tiny", pat_str=KIMI_PAT_STR, mergeable_ranks={t: r for r, t in enumerate(tokens)},
                            special_tokens=specials)
    tok.max_chars, tok.max_run = 23, 5
    rng = random.Random(0)
    texts = ["aaaaaaaaaaaaa    bbbbbbbbbbbbbbbbb<|im_end|>cc            \n\n\n\n\n  dd what color is it?",
             " " * 40 + "x" * 40 + "<|media_pad|>" * 3 + "y" * 7] + \
            ["".join(rng.choice(["ab", "c", " ", "  ", "\n", "<|im_end|>", "red", "?"]) for _ in range(40))
             for _ in range(50)]
    for text in texts:
        want = [i for c in _kimi_cuts(text, specials, 23, 5) for i in ref.encode(c, allowed_special="all")]
        assert tok.encode(text) == want, repr(text)
    assert tok.encode("abc") == ref.encode("abc")  # short text: one piece


# -- errors ----------------------------------------------------------------------------------------------


def _bad(tmp_path, lines: list[bytes]):
    p = tmp_path / "tiktoken.model"
    p.write_bytes(b"".join(lines))
    return str(p)


def _byte_lines(n=256):
    return [base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(n)]


@pytest.mark.parametrize("line, message", [
    (b"!!notbase64 256\n", ":257: token '!!notbase64' is not valid base64"),
    (base64.b64encode(b"ab") + b" x1\n", ":257: rank 'x1'"),
    (base64.b64encode(b"ab") + b" -3\n", ":257: rank '-3'"),
    (base64.b64encode(b"ab") + b" 255\n", ":257: rank 255 was already given"),
    (base64.b64encode(b"a") + b" 256\n", ":257: token b'a' already has rank 97"),
    (base64.b64encode(b"ab") + b" 257\n", "rank 256 is missing"),
    (base64.b64encode(b"ab") + b"\n", ":257: expected '<base64 token> <rank>'"),
])
def test_malformed_tiktoken_model(tmp_path, line, message):
    path = _bad(tmp_path, _byte_lines() + [line])
    with pytest.raises(DataError, match=re.escape(message)) as e:
        processor.load_tiktoken_bpe(path, KIMI_PAT_STR, {})
    assert path in str(e.value)


def test_missing_bytes_and_bad_specials(tmp_path):
    path = _bad(tmp_path, _byte_lines(255))
    with pytest.raises(DataError, match=r"1 single bytes are not tokens \(first: b'\\xff'\)"):
        processor.load_tiktoken_bpe(path, KIMI_PAT_STR, {})
    path = _bad(tmp_path, _byte_lines())
    with pytest.raises(DataError, match="collides"):
        processor.load_tiktoken_bpe(path, KIMI_PAT_STR, {"<|x|>": 255})
    with pytest.raises(DataError, match="collides"):
        processor.load_tiktoken_bpe(path, KIMI_PAT_STR, {"<|x|>": 256, "<|y|>": 256})


def test_checkpoint_folder_errors(tmp_path):
    with pytest.raises(DataError, match=r"tokenizer.json: not found \(nor tiktoken.model\)"):
        processor.Tokenizer(str(tmp_path), pat_str=KIMI_PAT_STR)
    _bad(tmp_path, _byte_lines())
    with pytest.raises(DataError, match=r"tokenizer.json: not found;"):  # no regex: tiktoken.model not used
        processor.Tokenizer(str(tmp_path))
    with pytest.raises(DataError, match=r"tokenizer_config.json: not found"):
        processor.Tokenizer(str(tmp_path), pat_str=KIMI_PAT_STR)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"100": {"content": "x"}}}))
    with pytest.raises(DataError, match=r"tokenizer_config.json: added_tokens_decoder\['100'\].*256\.\.513"):
        processor.Tokenizer(str(tmp_path), pat_str=KIMI_PAT_STR)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"257": {"content": "[EOS]"}}}))
    tok = processor.Tokenizer(str(tmp_path), pat_str=KIMI_PAT_STR)
    assert tok.token_id("[EOS]") == 257 and tok.token_id("<|reserved_token_256|>") == 256
    assert tok.tok.get_vocab_size() == 256 + 258 and tok.token_id("<|reserved_token_513|>") == 513
    with pytest.raises(DataError, match=r"tiktoken.model: special token '<\|im_end\|>' is not in the vocabulary"):
        tok.token_id("<|im_end|>")
