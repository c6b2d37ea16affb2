"""Turning (images, text) into model inputs, for each family: tokenizer, chat prompt, image preprocessing.

  * `load_processor(checkpoint_dir)` reads config.json (model_type), the tokenizer (tokenizer.json, or Kimi's
    tiktoken.model + tokenizer_config.json, with `tokenizers`) and preprocessor_config.json, and returns the
    family's processor.
  * `processor.encode(messages, images)` -> dict of tensors with the names and layout the model (and
    transformers' processor) use: input_ids, attention_mask, pixel_values, image_grid_thw (Qwen) or
    image_grid_hws (Kimi), plus `is_vis` (True at image-token positions). They are CPU tensors (tokenizers,
    pillow and numpy work there; every factory call below says so with device=CPU): the callers move them to the
    model's device, once per batch.

Messages follow the usual chat structure: [{"role": "user", "content": [{"type": "image"},
{"type": "text", "text": "..."}]}, ...]; a plain string content is text. Images are PIL images (any mode;
converted to RGB, transparency composited on white) or paths.

Specs: docs/architectures.md §3 (checked against transformers' processors in tests/).
Not handled: videos, tool calls, "thinking" templates.
The samples themselves (the shapes benchmark, dataset readers, load_samples) are data/samples.py's.
This file never imports model.py.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

CPU = torch.device("cpu")  # where the processor's tensors are made (module docstring)

from data.samples import DataError, read_json, Sample


# ----------------------------------------------------------------------------------------------------------
# Images


def load_image(image) -> Image.Image:
    """A PIL image in RGB. Paths are opened; transparency (RGBA, LA, P with a transparent colour) is composited
    onto a white background, the convention of the transformers processors."""
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                im.load()
                image = im.copy()
        except (OSError, SyntaxError) as e:  # PIL raises OSError/UnidentifiedImageError for unreadable files
            raise DataError(f"{image}: cannot read image ({e})") from e
    if not isinstance(image, Image.Image):
        raise DataError(f"expected a PIL image or a path, got {type(image).__name__}")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def normalize(image: Image.Image, mean, std) -> np.ndarray:
    """(C, H, W) float32: x/255, then (x - mean) / std per channel."""
    x = (np.asarray(image, dtype=np.float64) * (1 / 255)).astype(np.float32).transpose(2, 0, 1)
    mean = np.asarray(mean, dtype=np.float32)[:, None, None]
    std = np.asarray(std, dtype=np.float32)[:, None, None]
    return (x - mean) / std


def smart_resize(h: int, w: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen's resize rule: both sides multiples of `factor` (patch * merge), area within [min, max] pixels,
    aspect ratio kept as well as rounding allows."""
    if max(h, w) / min(h, w) > 200:
        raise DataError(f"image of {w}x{h}: aspect ratio above 200 is not supported by the Qwen processor")
    hb, wb = round(h / factor) * factor, round(w / factor) * factor
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb = max(factor, math.floor(h / beta / factor) * factor)
        wb = max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb = math.ceil(h * beta / factor) * factor
        wb = math.ceil(w * beta / factor) * factor
    return hb, wb


# ----------------------------------------------------------------------------------------------------------
# Tokenizer
#
# Qwen ships a `tokenizers` tokenizer.json. Kimi-VL ships tiktoken's format instead: tiktoken.model (one
# "<base64 token bytes> <rank>" line per token, no merges), the pre-tokenizer regex in its remote code
# (tokenization_moonshot.py, `TikTokenTokenizer.pat_str`) and the special tokens in tokenizer_config.json.
# `load_tiktoken_bpe` rebuilds the same tokenizer as a `tokenizers` byte-level BPE, in memory.

# Kimi's pre-tokenizer regex (`pat_str` of TikTokenTokenizer in the Kimi-VL / Moonlight remote code), one
# alternative per line. Unlike GPT-4's: a run of Han characters is a piece of its own, a word never mixes Han
# with other letters (`&&[^\p{Han}]` intersects two classes), and numbers are cut every 3 digits.
KIMI_PAT_STR = "|".join([
    r"[\p{Han}]+",  # Chinese characters
    # a word that ends in lowercase: one optional non-letter/digit in front, capitals, lowercase, 's 're ...
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    # a word that starts in capitals (ALL-CAPS, or Capitalized)
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",  # 1-3 digits
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",  # punctuation and symbols, with one space before and line breaks after
    r"\s*[\r\n]+",  # whitespace up to the last line break
    r"\s+(?!\S)",  # whitespace, but not the last space before a word (that space goes with the word)
    r"\s+",
])
# Special tokens take the ids after the ranks: `num_reserved_special_tokens + 2` of them in the remote code
# (256 + 2), so Kimi-VL's last two, <|reserved_token_163840|> and <|reserved_token_163841|>, lie past the
# model's 163,840 embedding rows (only reached if a text spells them out).
KIMI_NUM_RESERVED_SPECIAL = 256 + 2
# TikTokenTokenizer.encode cuts text into 400,000-character windows, and cuts runs of whitespace or of
# non-whitespace after every 25,000 characters, before tiktoken sees it (tiktoken issue 195).
KIMI_MAX_CHARS, KIMI_MAX_RUN = 400_000, 25_000


def _byte_chars() -> list[str]:
    """The byte-level BPE alphabet (GPT-2's, used by `tokenizers`' ByteLevel): byte b is written as one
    printable character, itself for the printable Latin-1 bytes, U+0100 onward (in byte order) for the rest."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    others = iter(range(0x100, 0x200))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


def read_tiktoken_ranks(path: str) -> list[bytes]:
    """tiktoken.model -> the tokens' bytes, indexed by rank. Ranks must be 0..n-1, each once; every single
    byte must be a token (the BPE starts from bytes)."""
    by_rank: dict[int, bytes] = {}
    seen: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.decode("latin-1").split()
            if len(fields) != 2:
                raise DataError(f"{path}:{n}: expected '<base64 token> <rank>', got {line[:80]!r}")
            try:
                token = base64.b64decode(fields[0], validate=True)
            except (binascii.Error, ValueError) as e:
                raise DataError(f"{path}:{n}: token {fields[0][:80]!r} is not valid base64 ({e})") from e
            if not (fields[1].isascii() and fields[1].isdigit()):
                raise DataError(f"{path}:{n}: rank {fields[1][:80]!r} is not a non-negative integer")
            rank = int(fields[1])
            if rank in by_rank:
                raise DataError(f"{path}:{n}: rank {rank} was already given to another token")
            if token in seen:
                raise DataError(f"{path}:{n}: token {token!r} already has rank {seen[token]}")
            by_rank[rank], seen[token] = token, rank
    missing = sorted(set(range(len(by_rank))) - by_rank.keys())
    if missing:
        raise DataError(f"{path}: ranks must be 0..{len(by_rank) - 1} without gaps; rank {missing[0]} is missing "
                        f"and the largest is {max(by_rank)}")
    absent = [b for b in range(256) if bytes([b]) not in seen]
    if absent:
        raise DataError(f"{path}: {len(absent)} single bytes are not tokens (first: {bytes(absent[:1])!r}); "
                        "a byte-level BPE needs all 256")
    return [by_rank[r] for r in range(len(by_rank))]


def load_tiktoken_bpe(path: str, pat_str: str, special_tokens: dict[str, int]):
    """tiktoken.model -> a `tokenizers.Tokenizer` (see `tiktoken_bpe`)."""
    return tiktoken_bpe(read_tiktoken_ranks(path), pat_str, special_tokens, where=path)


def tiktoken_bpe(tokens: list[bytes], pat_str: str, special_tokens: dict[str, int], where: str = "tiktoken.model"):
    """A `tokenizers.Tokenizer` that encodes exactly like `tiktoken.Encoding(pat_str=pat_str, mergeable_ranks=
    {token: rank}, special_tokens=special_tokens)` with every special token allowed: special tokens matched
    first, then the regex split, then byte-level BPE on each piece. Ids are the ranks; special ids follow them.

    tiktoken's BPE on one piece: if the whole piece is a token, that token; otherwise start from single bytes
    and merge, again and again, the adjacent pair whose concatenation has the lowest rank, until no adjacent
    concatenation is a token. A `tokenizers` BPE does the same when its merges are ordered by the rank of the
    token they make, and `ignore_merges=True` gives the whole-piece rule. So the merges follow from the ranks:
    every split of a token into two tokens is a merge that makes it, at its rank. (Two splits of one token
    can both apply at once only where they overlap, parts x, y, z with x+y == y+z: tiktoken merges the
    leftmost, `tokenizers` the merge listed first, here by the halves' ranks. tests/test_kimi_tokenizer.py
    compares the two on odd text and on a vocabulary with many splits per token; no difference was found.)"""
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    rank = {t: r for r, t in enumerate(tokens)}
    merges = []  # (left, right) byte strings, ordered by the rank of left + right
    for t in tokens:
        splits = [(t[:i], t[i:]) for i in range(1, len(t)) if t[:i] in rank and t[i:] in rank]
        merges += sorted(splits, key=lambda lr: (rank[lr[0]], rank[lr[1]])) if len(splits) > 1 else splits
    byte_chars = dict(enumerate(_byte_chars()))
    as_text = {t: t.decode("latin-1").translate(byte_chars) for t in tokens}  # bytes -> byte-level string
    vocab = {as_text[t]: r for r, t in enumerate(tokens)}
    taken = set(range(len(tokens)))
    for s, i in special_tokens.items():  # in the model's vocab too, so that each keeps its id
        if i in taken or s in vocab:
            raise DataError(f"{where}: special token {s!r} (id {i}) collides with a BPE token or another "
                            f"special token; special ids must be distinct and at least {len(tokens)}")
        vocab[s] = i
        taken.add(i)
    tok = HFTokenizer(models.BPE(vocab, [(as_text[a], as_text[b]) for a, b in merges], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pat_str), behavior="isolated"),  # regex matches (and any text between them)
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])  # UTF-8 bytes -> byte-level chars
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special_tokens])
    return tok


def kimi_special_tokens(config_path: str, n_ranks: int) -> dict[str, int]:
    """Kimi's special tokens (TikTokenTokenizer.__init__): ids n_ranks .. n_ranks+257, named by
    tokenizer_config.json's added_tokens_decoder, `<|reserved_token_{id}|>` where it names none."""
    cfg = read_json(config_path, "the tokenizer's special tokens (added_tokens_decoder)")
    ids = range(n_ranks, n_ranks + KIMI_NUM_RESERVED_SPECIAL)
    named = {}
    for key, tok in (cfg.get("added_tokens_decoder") or {}).items():
        if not key.isdigit() or int(key) not in ids or not isinstance(tok, dict) or "content" not in tok:
            raise DataError(f"{config_path}: added_tokens_decoder[{key!r}] must have a \"content\" and an id in "
                            f"{ids.start}..{ids.stop - 1} (the ids after tiktoken.model's {n_ranks} ranks)")
        named[int(key)] = tok["content"]
    return {named.get(i, f"<|reserved_token_{i}|>"): i for i in ids}


class Tokenizer:
    """`tokenizers` on a checkpoint folder's tokenizer.json or, failing that, on its tiktoken.model with
    tokenizer_config.json (Kimi); special tokens written in the text are recognized, and no BOS is added."""

    def __init__(self, checkpoint_dir: str, pat_str: str | None = None):
        """pat_str: the pre-tokenizer regex for a tiktoken.model (it is not in the file); None: tokenizer.json
        is required."""
        from tokenizers import Tokenizer as HFTokenizer

        self.path = os.path.join(checkpoint_dir, "tokenizer.json")
        tiktoken_path = os.path.join(checkpoint_dir, "tiktoken.model")
        self.max_chars = self.max_run = None  # tiktoken.model only: TikTokenTokenizer's cuts of long text
        if os.path.isfile(self.path):
            self.tok = HFTokenizer.from_file(self.path)
        elif pat_str is not None and os.path.isfile(tiktoken_path):
            self.path, tokens = tiktoken_path, read_tiktoken_ranks(tiktoken_path)
            specials = kimi_special_tokens(os.path.join(checkpoint_dir, "tokenizer_config.json"), len(tokens))
            self.tok = tiktoken_bpe(tokens, pat_str, specials, where=tiktoken_path)
            self.max_chars, self.max_run = KIMI_MAX_CHARS, KIMI_MAX_RUN
            self._special_split = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len)[::-1])) + ")")
        else:
            raise DataError(f"{self.path}: not found" + (" (nor tiktoken.model)" if pat_str is not None else "")
                            + "; the checkpoint folder needs its tokenizer files")

    def encode(self, text: str) -> list[int]:
        if self.max_run is None or len(text) <= self.max_run:
            return self.tok.encode(text, add_special_tokens=False).ids
        return [i for chunk in self._chunks(text) for i in self.tok.encode(chunk, add_special_tokens=False).ids]

    def _chunks(self, text: str):
        """Kimi's cuts as transformers reaches them (its `tokenize` splits at special tokens, then calls
        TikTokenTokenizer.encode on each stretch): windows of max_chars characters, and runs of whitespace or
        of non-whitespace (str.isspace) cut after every max_run characters."""
        long_run = re.compile(rf"\s{{{self.max_run + 1},}}|\S{{{self.max_run + 1},}}")
        for part in self._special_split.split(text):
            for w in range(0, len(part), self.max_chars):
                window = part[w:w + self.max_chars]
                cuts = [m.start() + k for m in long_run.finditer(window)
                        for k in range(self.max_run, m.end() - m.start(), self.max_run)]
                yield from (window[a:b] for a, b in zip([0, *cuts], [*cuts, len(window)]))

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def token_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise DataError(f"{self.path}: special token {token!r} is not in the vocabulary")
        return i


def shipped_chat_template(checkpoint_dir: str) -> str:
    """The chat template a checkpoint folder ships (chat_template.jinja, chat_template.json or
    tokenizer_config.json, in that order), or "" when it has none. Read only to detect variants."""
    path = os.path.join(checkpoint_dir, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path) as f:
            return f.read()
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = os.path.join(checkpoint_dir, name)
        if os.path.isfile(path):
            template = read_json(path, "the checkpoint's chat template").get("chat_template")
            if isinstance(template, str):
                return template
    return ""


def _content_items(content):
    """Message content as a list of {"type": "image"} / {"type": "text", "text": ...} items."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return content


class ChatProcessor:
    """What both families' processors share: one placeholder token per image in the chat text, expanded to
    the image's token count. Subclasses set `placeholder`, `grid_key`, `image_token_id` and define
    `chat_text`, `preprocess_image` and `num_image_tokens`."""

    placeholder = ""
    grid_key = ""

    def encode(self, messages, images=(), add_generation_prompt: bool = True) -> dict:
        return self.encode_text(self.chat_text(messages, add_generation_prompt), images)

    def encode_text(self, text: str, images=()) -> dict:
        """Tokenize a prompt that has one placeholder per image; expand each to its image's token count.
        -> input_ids (1, T), attention_mask, is_vis (1, T) and, with images, pixel_values and the grids."""
        pads = text.count(self.placeholder)
        if pads != len(images):
            raise DataError(f"the prompt has {pads} image placeholders ({self.placeholder}) but {len(images)} "
                            "images were given")
        pv, grids = zip(*[self.preprocess_image(im) for im in images]) if images else ((), ())
        parts = text.split(self.placeholder)
        ids = self.tokenizer.encode(parts[0])
        for grid, part in zip(grids, parts[1:]):
            ids += [self.image_token_id] * self.num_image_tokens(grid) + self.tokenizer.encode(part)
        out = {"input_ids": torch.tensor([ids], device=CPU),
               "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=CPU)}
        if images:
            out["pixel_values"] = torch.cat(pv)
            out[self.grid_key] = torch.tensor(grids, device=CPU)
        out["is_vis"] = out["input_ids"] == self.image_token_id
        return out


# ----------------------------------------------------------------------------------------------------------
# Qwen3-VL


@dataclass
class QwenImageConfig:
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)

    @classmethod
    def from_file(cls, path: str) -> "QwenImageConfig":
        d = read_json(path, "the checkpoint's image preprocessing settings")
        size = d.get("size") or {}
        return cls(
            patch_size=d.get("patch_size", 16), temporal_patch_size=d.get("temporal_patch_size", 2),
            merge_size=d.get("merge_size", 2),
            min_pixels=d.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or 65536,
            max_pixels=d.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or 16777216,
            image_mean=tuple(d.get("image_mean", (0.5,) * 3)), image_std=tuple(d.get("image_std", (0.5,) * 3)),
        )


class QwenProcessor(ChatProcessor):
    """Qwen ChatML with `<|vision_start|><|image_pad|>*N<|vision_end|>` per image, and Qwen2-VL image
    preprocessing (smart_resize, PIL bicubic, normalization, merge-block patch order, temporal duplication)."""

    family = "qwen3_vl_moe"
    placeholder, grid_key = "<|image_pad|>", "image_grid_thw"

    def __init__(self, checkpoint_dir: str):
        self.tokenizer = Tokenizer(checkpoint_dir)
        self.image_cfg = QwenImageConfig.from_file(os.path.join(checkpoint_dir, "preprocessor_config.json"))
        cfg = read_json(os.path.join(checkpoint_dir, "config.json"), "model config")
        self.image_token_id = cfg.get("image_token_id", self.tokenizer.token_id("<|image_pad|>"))
        self.stop_ids = [self.tokenizer.token_id("<|im_end|>"), self.tokenizer.token_id("<|endoftext|>")]
        # Qwen3-VL *-Thinking checkpoints' template opens the answer with "<think>\n" (the Instruct one does not)
        gen = shipped_chat_template(checkpoint_dir).rpartition("add_generation_prompt")[2]
        self.think_prefix = "<think>\n" if "<think>" in gen else ""

    # -- images ------------------------------------------------------------------------------------------
    def preprocess_image(self, image) -> tuple[torch.Tensor, list[int]]:
        """-> pixel_values (gh*gw, C*T*P*P) in merge-block order, grid [1, gh, gw]."""
        c = self.image_cfg
        image = load_image(image)
        hb, wb = smart_resize(image.height, image.width, c.patch_size * c.merge_size, c.min_pixels, c.max_pixels)
        if (hb, wb) != (image.height, image.width):
            image = image.resize((wb, hb), Image.BICUBIC)
        x = normalize(image, c.image_mean, c.image_std)  # (C, hb, wb)
        P, m, T = c.patch_size, c.merge_size, c.temporal_patch_size
        gh, gw = hb // P, wb // P
        x = x.reshape(3, gh // m, m, P, gw // m, m, P).transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, P, P)
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], T, P, P))  # a still image = T equal frames
        return torch.from_numpy(np.ascontiguousarray(x).reshape(gh * gw, 3 * T * P * P)), [1, gh, gw]

    def num_image_tokens(self, grid) -> int:
        return grid[0] * grid[1] * grid[2] // self.image_cfg.merge_size ** 2

    # -- prompt ------------------------------------------------------------------------------------------
    def chat_text(self, messages, add_generation_prompt: bool = True) -> str:
        """The Qwen3-VL chat template (no default system prompt); one `<|image_pad|>` per image, expanded later.
        A Thinking checkpoint's generation prompt ends in "<think>\n" (tests/test_real_checkpoints.py)."""
        out = []
        for msg in messages:
            body = "".join("<|vision_start|><|image_pad|><|vision_end|>" if it["type"] == "image" else it["text"]
                           for it in _content_items(msg["content"]))
            out.append(f"<|im_start|>{msg['role']}\n{body}<|im_end|>\n")
        if add_generation_prompt:
            out.append("<|im_start|>assistant\n" + getattr(self, "think_prefix", ""))
        return "".join(out)



# ----------------------------------------------------------------------------------------------------------
# Kimi-VL (docs/architectures.md §3.2)

# The Kimi-VL image processor's defaults (OpenAI CLIP), used only where preprocessor_config.json has no mean/std.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class KimiImageConfig:
    patch_size: int = 14
    in_token_limit: int = 4096  # max patches before the image is shrunk
    merge_kernel_size: tuple = (2, 2)
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    max_grid: int = 512  # MoonViT's rope table side: a grid side must stay below it ("Exceed pos emb")

    @classmethod
    def from_file(cls, path: str) -> "KimiImageConfig":
        d = read_json(path, "the checkpoint's image preprocessing settings")
        if d.get("pad_input", True) is not True:
            raise DataError(f"{path}: pad_input={d['pad_input']!r} (center-crop) is not supported; "
                            "Kimi-VL-A3B-Instruct pads (pad_input true)")
        return cls(patch_size=d.get("patch_size", 14), in_token_limit=d.get("in_token_limit", 4096),
                   merge_kernel_size=tuple(d.get("merge_kernel_size", (2, 2))),
                   image_mean=tuple(d.get("image_mean") or CLIP_MEAN), image_std=tuple(d.get("image_std") or CLIP_STD))


class KimiProcessor(ChatProcessor):
    """Kimi chat format (`<|im_user|>user<|im_middle|>...<|im_end|>`, no newlines between turns) with
    `<|media_start|>image<|media_content|><|media_pad|><|media_end|>` per image, and MoonViT preprocessing:
    shrink to at most in_token_limit patches (PIL bicubic), pad right/bottom with black to multiples of
    patch*merge, normalize, raster-order patches (L, 3, P, P)."""

    family = "kimi_vl"
    placeholder, grid_key = "<|media_pad|>", "image_grid_hws"
    media = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>"
    roles = {"system": "<|im_system|>", "user": "<|im_user|>", "assistant": "<|im_assistant|>"}
    default_system = "You are a helpful assistant"

    def __init__(self, checkpoint_dir: str):
        self.tokenizer = Tokenizer(checkpoint_dir, pat_str=KIMI_PAT_STR)
        self.image_cfg = KimiImageConfig.from_file(os.path.join(checkpoint_dir, "preprocessor_config.json"))
        cfg = read_json(os.path.join(checkpoint_dir, "config.json"), "model config")
        self.image_token_id = cfg.get("media_placeholder_token_id", self.tokenizer.token_id("<|media_pad|>"))
        self.stop_ids = [self.tokenizer.token_id("<|im_end|>"), self.tokenizer.token_id("[EOS]")]

    # -- images ------------------------------------------------------------------------------------------
    def resize_and_pad(self, image: Image.Image) -> Image.Image:
        """Shrink by sqrt(limit / patches) if (w//P)*(h//P) > in_token_limit, then pad to multiples of P*merge."""
        c, P = self.image_cfg, self.image_cfg.patch_size
        w, h = image.size
        if (w // P) * (h // P) > c.in_token_limit:
            s = math.sqrt(c.in_token_limit / ((w // P) * (h // P)))
            image = image.resize((int(w * s), int(h * s)), Image.BICUBIC)
        w, h = image.size
        ph, pw = P * c.merge_kernel_size[0], P * c.merge_kernel_size[1]
        canvas = Image.new("RGB", (w + (pw - w % pw) % pw, h + (ph - h % ph) % ph))  # black
        canvas.paste(image, (0, 0))
        if canvas.width // P >= c.max_grid or canvas.height // P >= c.max_grid:
            raise DataError(f"image of {w}x{h} px gives a {canvas.height // P}x{canvas.width // P} patch grid; "
                            f"MoonViT supports sides below {c.max_grid} patches (lower in_token_limit)")
        return canvas

    def preprocess_image(self, image) -> tuple[torch.Tensor, list[int]]:
        """-> pixel_values (gh*gw, 3, P, P) in raster (row-major) patch order, grid [gh, gw]."""
        P = self.image_cfg.patch_size
        image = self.resize_and_pad(load_image(image))
        x = normalize(image, self.image_cfg.image_mean, self.image_cfg.image_std)  # (3, H, W)
        gh, gw = x.shape[1] // P, x.shape[2] // P
        x = x.reshape(3, gh, P, gw, P).transpose(1, 3, 0, 2, 4).reshape(gh * gw, 3, P, P)
        return torch.from_numpy(np.ascontiguousarray(x)), [gh, gw]

    def num_image_tokens(self, grid) -> int:
        kh, kw = self.image_cfg.merge_kernel_size
        return (grid[0] // kh) * (grid[1] // kw)

    # -- prompt ------------------------------------------------------------------------------------------
    def chat_text(self, messages, add_generation_prompt: bool = True) -> str:
        """The Kimi-VL chat template; a default system turn when the first message is not a system one."""
        out = []
        if messages and messages[0]["role"] != "system":
            out.append(f"<|im_system|>system<|im_middle|>{self.default_system}<|im_end|>")
        for i, msg in enumerate(messages):
            if msg["role"] not in self.roles:
                raise DataError(f"message {i}: role {msg['role']!r} is not one of {sorted(self.roles)}")
            body = "".join(self.media if it["type"] == "image" else it["text"] for it in _content_items(msg["content"]))
            out.append(f"{self.roles[msg['role']]}{msg['role']}<|im_middle|>{body}<|im_end|>")
        if add_generation_prompt:
            out.append("<|im_assistant|>assistant<|im_middle|>")
        return "".join(out)



PROCESSORS = {"qwen3_vl_moe": QwenProcessor, "kimi_vl": KimiProcessor}


def load_processor(checkpoint_dir: str):
    cfg = read_json(os.path.join(checkpoint_dir, "config.json"), "model config")
    kind = cfg.get("model_type")
    if kind not in PROCESSORS:
        raise DataError(f"{checkpoint_dir}/config.json: model_type {kind!r} has no processor; "
                        f"expected one of {sorted(PROCESSORS)}")
    return PROCESSORS[kind](checkpoint_dir)


def pad_batch(encoded: list[dict], pad_id: int = 0, side: str = "left") -> dict:
    """Stack single-prompt encodings into one batch, padding input_ids/attention_mask/is_vis on `side`;
    pixel tensors and grids are concatenated in prompt order."""
    T = max(e["input_ids"].shape[1] for e in encoded)
    out = {k: [] for k in ("input_ids", "attention_mask", "is_vis")}
    for e in encoded:
        n = T - e["input_ids"].shape[1]
        for k, fill in (("input_ids", pad_id), ("attention_mask", 0), ("is_vis", False)):
            pad = torch.full((1, n), fill, dtype=e[k].dtype, device=e[k].device)
            out[k].append(torch.cat([pad, e[k]] if side == "left" else [e[k], pad], dim=1))
    out = {k: torch.cat(v) for k, v in out.items()}
    for k in ("pixel_values", "image_grid_thw", "image_grid_hws"):
        parts = [e[k] for e in encoded if k in e]
        if parts:
            out[k] = torch.cat(parts)
    return out


# ----------------------------------------------------------------------------------------------------------
# Question-answer batches and dataset readers.

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJ"


def question_text(s: Sample) -> str:
    """The user text of a sample: the question, and for multiple choice the lettered options and the usual
    instruction."""
    if not s.choices:
        return s.question
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(s.choices))
    return f"{s.question}\n{options}\n{MC_INSTRUCTION}"


def gold_text(s: Sample) -> str:
    """The reference answer as the model should say it: the letter for multiple choice."""
    if s.choices and s.answer in s.choices:
        return LETTERS[s.choices.index(s.answer)]
    return s.answer


def encode_sample(proc, s: Sample) -> dict:
    content = ([{"type": "image"}] if s.image is not None else []) + [{"type": "text", "text": question_text(s)}]
    return proc.encode([{"role": "user", "content": content}], [s.image] if s.image is not None else [])


def encode_qa_batch(proc, samples: list[Sample], answers: list[list[int]] | None = None) -> dict:
    """Right-padded batch of prompt + gold answer + end token, for teacher forcing. `labels` holds the answer
    and end token ids at their positions and -100 elsewhere (B, T). answers: other answer ids to force instead
    (one list per sample, end token included where wanted), e.g. a reference model's greedy answers."""
    encs, labels = [], []
    end = proc.stop_ids[0]
    for j, s in enumerate(samples):
        e = encode_sample(proc, s)
        ans = proc.tokenizer.encode(gold_text(s)) + [end] if answers is None else list(answers[j])
        n = e["input_ids"].shape[1]
        e["input_ids"] = torch.cat([e["input_ids"], torch.tensor([ans], device=CPU)], 1)
        e["attention_mask"] = torch.ones_like(e["input_ids"])
        e["is_vis"] = torch.cat([e["is_vis"], torch.zeros(1, len(ans), dtype=torch.bool, device=CPU)], 1)
        encs.append(e)
        labels.append([-100] * n + ans)
    batch = pad_batch(encs, side="right")
    T = batch["input_ids"].shape[1]
    batch["labels"] = torch.tensor([lab + [-100] * (T - len(lab)) for lab in labels], device=CPU)
    return batch


def vision_inputs(batch: dict) -> dict:
    """The image tensors of an encoded batch, under the names the model's forward takes."""
    return {k: batch[k] for k in ("pixel_values", "image_grid_thw", "image_grid_hws") if k in batch}
