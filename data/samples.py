"""The samples: what one calibration / evaluation item is (Sample), the bundled synthetic benchmark ("shapes",
deterministic, drawn with pillow), and the readers of JSONL, LLaVA / ShareGPT and COCO captions files, behind
one entry point, load_samples(spec, n, seed). Turning a sample into model inputs is data.py's (encode_sample,
encode_qa_batch). Bad input raises DataError naming the file and line.
This file never imports model.py.
"""

from __future__ import annotations

from dataclasses import dataclass
import json
import math
import os

import numpy as np
from PIL import Image


class DataError(ValueError):
    """Bad input data; the message names the file/sample/line."""


def read_json(path: str, what: str) -> dict | list:
    """The JSON in path (`what` it holds, for the error message); DataError if missing or invalid."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: not found ({what})")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e


# ----------------------------------------------------------------------------------------------------------
# The bundled synthetic benchmark ("shapes"): deterministic scenes drawn with pillow, and questions whose
# single-word answers need the vision tower (colour, shape, count, position) and the language model
# (relations, arithmetic). Used to train the bundled tiny models and to measure what quantization costs them.

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40),
          "purple": (150, 60, 190), "white": (245, 245, 245)}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen")
IMAGE_TYPES = ("color", "shape", "count", "exists", "position", "relation")
TEXT_TYPES = ("arithmetic", "order")
SPLIT_SEEDS = {"train": 0, "test": 1_000_003}  # disjoint random streams: the held-out split is fixed


@dataclass
class Sample:
    """One benchmark item. image is None for text-only items; choices is set for multiple choice."""

    question: str
    answer: str
    type: str
    image: Image.Image | None = None
    choices: list | None = None
    objects: list | None = None  # the scene behind a synthetic image (shape, color, x, y, r per object)

    @property
    def modality(self) -> str:
        return "text" if self.image is None else "image"


def _scene(rng, size=64):
    """1-4 non-overlapping objects; centres at least 7 px apart in x and in y, so left/right/top/bottom
    between any two objects is never ambiguous."""
    n = int(rng.integers(1, 5))
    objs, tries = [], 0
    while len(objs) < n:
        tries += 1
        if tries > 200:  # an early object blocked the rest: start the scene over
            objs, tries = [], 0
        r = int(rng.integers(8, 12))
        x, y = int(rng.integers(r, size - r)), int(rng.integers(r, size - r))
        if all(abs(x - o["x"]) >= 7 and abs(y - o["y"]) >= 7 and math.hypot(x - o["x"], y - o["y"]) > r + o["r"] + 1
               for o in objs):
            objs.append(dict(shape=SHAPES[rng.integers(3)], color=list(COLORS)[rng.integers(len(COLORS))],
                             x=x, y=y, r=r))
    return objs


def draw_scene(objs, size=64, labels: bool = False) -> Image.Image:
    """The scene on a grey background; with labels=True, an "L" image whose pixels hold 0 for background and
    1 + shape_index * len(COLORS) + color_index under each object (a segmentation map for training probes)."""
    from PIL import ImageDraw

    im = Image.new("L", (size, size), 0) if labels else Image.new("RGB", (size, size), (128, 128, 128))
    d = ImageDraw.Draw(im)
    for o in objs:
        x, y, r = o["x"], o["y"], o["r"]
        c = (1 + SHAPES.index(o["shape"]) * len(COLORS) + list(COLORS).index(o["color"])) if labels \
            else COLORS[o["color"]]
        if o["shape"] == "circle":
            d.ellipse([x - r, y - r, x + r, y + r], fill=c)
        elif o["shape"] == "square":
            d.rectangle([x - r + 2, y - r + 2, x + r - 2, y + r - 2], fill=c)
        else:
            d.polygon([(x, y - r), (x - r, y + r - 1), (x + r, y + r - 1)], fill=c)
    return im


def _unique(objs, key):
    """Objects whose `key` value occurs once in the scene."""
    return [o for o in objs if sum(p[key] == o[key] for p in objs) == 1]


def _image_question(rng, objs, qtype):
    """(question, answer) of type qtype for the scene, or None when the scene cannot pose it."""
    if qtype == "color":
        u = _unique(objs, "shape")
        return u and (f"what color is the {(o := u[rng.integers(len(u))])['shape']} ?", o["color"])
    if qtype == "shape":
        u = _unique(objs, "color")
        return u and (f"what shape is the {(o := u[rng.integers(len(u))])['color']} object ?", o["shape"])
    if qtype == "count":
        if rng.random() < 0.5:
            return "how many objects are there ?", NUMBERS[len(objs)]
        s = SHAPES[rng.integers(3)]
        return f"how many {s}s are there ?", NUMBERS[sum(o["shape"] == s for o in objs)]
    if qtype == "exists":
        o = objs[rng.integers(len(objs))]
        if rng.random() < 0.5:
            return f"is there a {o['color']} {o['shape']} ?", "yes"
        # hard negative: right colour with another shape, or right shape with another colour
        shape, color = o["shape"], o["color"]
        if rng.random() < 0.5:
            shape = SHAPES[(SHAPES.index(shape) + 1 + rng.integers(2)) % 3]
        else:
            color = list(COLORS)[(list(COLORS).index(color) + 1 + rng.integers(len(COLORS) - 1)) % len(COLORS)]
        present = any(p["shape"] == shape and p["color"] == color for p in objs)
        return f"is there a {color} {shape} ?", "yes" if present else "no"
    if qtype == "position":
        if len(objs) < 2:
            return None
        side = ("left", "right", "top", "bottom")[rng.integers(4)]
        key, pick = {"left": ("x", min), "right": ("x", max), "top": ("y", min), "bottom": ("y", max)}[side]
        o = pick(objs, key=lambda p: p[key])
        attr = ("shape", "color")[rng.integers(2)]
        return f"what {attr} is the {side}most object ?", o[attr]
    if qtype == "relation":  # nearest object on one side of a uniquely described anchor
        u = [o for o in objs if sum(p["shape"] == o["shape"] and p["color"] == o["color"] for p in objs) == 1]
        if len(objs) < 2 or not u:
            return None
        a = u[rng.integers(len(u))]
        side = ("left of", "right of", "above", "below")[rng.integers(4)]
        key, sign = {"left of": ("x", -1), "right of": ("x", 1), "above": ("y", -1), "below": ("y", 1)}[side]
        cands = [o for o in objs if o is not a and sign * (o[key] - a[key]) > 0]
        if not cands:
            return None
        o = min(cands, key=lambda p: abs(p[key] - a[key]))
        attr = ("shape", "color")[rng.integers(2)]
        return f"what {attr} is the object {side} the {a['color']} {a['shape']} ?", o[attr]
    raise ValueError(f"unknown image question type {qtype!r}")


def _text_question(rng, qtype):
    if qtype == "arithmetic":
        a, b = int(rng.integers(0, 10)), int(rng.integers(0, 10))
        if rng.random() < 0.5 or a < b:
            return f"what is {NUMBERS[a]} plus {NUMBERS[b]} ?", NUMBERS[a + b]
        return f"what is {NUMBERS[a]} minus {NUMBERS[b]} ?", NUMBERS[a - b]
    if qtype == "order":
        a = int(rng.integers(1, 17))
        word = ("after", "before")[rng.integers(2)]
        return f"what number comes {word} {NUMBERS[a]} ?", NUMBERS[a + 1 if word == "after" else a - 1]
    raise ValueError(f"unknown text question type {qtype!r}")


def shapes_benchmark(n: int, seed: int = 0, split: str = "test", text_fraction: float = 0.2,
                     type_weights: dict[str, float] | None = None) -> list[Sample]:
    """n deterministic samples of the given split ("train" or "test"; disjoint random streams), about
    `text_fraction` of them text-only, image question types in equal proportion (in turn), or drawn with
    probability proportional to `type_weights` (image type -> weight; a training curriculum)."""
    if split not in SPLIT_SEEDS:
        raise DataError(f"--split {split!r}: expected one of {sorted(SPLIT_SEEDS)}")
    if type_weights is not None:
        unknown = set(type_weights) - set(IMAGE_TYPES)
        if unknown or any(w < 0 for w in type_weights.values()) or sum(type_weights.values()) <= 0:
            raise DataError(f"type weights {type_weights}: expected non-negative weights, not all 0, for "
                            f"image question types among {IMAGE_TYPES}")
        p = np.array([type_weights.get(t, 0.0) for t in IMAGE_TYPES], dtype=float)
        p /= p.sum()
    rng = np.random.default_rng([SPLIT_SEEDS[split], seed])
    out = []
    while len(out) < n:
        if rng.random() < text_fraction:
            qtype = TEXT_TYPES[rng.integers(len(TEXT_TYPES))]
            q, a = _text_question(rng, qtype)
            out.append(Sample(q, a, qtype))
            continue
        qtype = IMAGE_TYPES[len(out) % len(IMAGE_TYPES) if type_weights is None else rng.choice(len(p), p=p)]
        objs = _scene(rng)
        qa = _image_question(rng, objs, qtype)
        if qa:
            out.append(Sample(qa[0], qa[1], qtype, image=draw_scene(objs), objects=objs))
    return out


def shapes_vocabulary() -> list[str]:
    """Every word the benchmark can ask or answer (used to train the tiny models' tokenizers)."""
    words = set(SHAPES) | set(COLORS) | set(NUMBERS) | {s + "s" for s in SHAPES}
    for s in shapes_benchmark(3000, split="train"):
        words |= set(s.question.split()) | {s.answer}
    return sorted(words)


# ----------------------------------------------------------------------------------------------------------
# Dataset readers.

SAMPLE_FIELDS = {"image", "question", "answer", "choices", "type", "id"}


def _resolve_image(path, root, where):
    full = path if os.path.isabs(path) else os.path.join(root, path)
    if not os.path.isfile(full):
        raise DataError(f"{where}: image {full!r} not found (paths are relative to the data file's folder or "
                        "--image-root)")
    return full


def read_jsonl(path: str, image_root: str | None = None) -> list[Sample]:
    """One JSON object per line: {"image": path?, "question": str, "answer": str, "choices": [str]?,
    "type": str?, "id": any?}. Images are relative to the file's folder (or image_root)."""
    root = image_root or os.path.dirname(os.path.abspath(path))
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e})") from e
            if not isinstance(d, dict) or "question" not in d or "answer" not in d:
                raise DataError(f"{where}: each line needs at least \"question\" and \"answer\"")
            unknown = set(d) - SAMPLE_FIELDS
            if unknown:
                raise DataError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(SAMPLE_FIELDS)}")
            image = _resolve_image(d["image"], root, where) if d.get("image") else None
            out.append(Sample(str(d["question"]), str(d["answer"]), d.get("type", "jsonl"), image=image,
                              choices=d.get("choices")))
    return out


def read_llava(path: str, image_root: str | None = None) -> list[Sample]:
    """LLaVA / ShareGPT JSON: a list of {"image": path?, "conversations": [{"from": "human", "value":
    "<image>\\nquestion"}, {"from": "gpt", "value": answer}, ...]}; the first human/gpt turn becomes a sample."""
    root = image_root or os.path.dirname(os.path.abspath(path))
    items = read_json(path, "LLaVA / ShareGPT samples")
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of samples")
    out = []
    for n, d in enumerate(items):
        where = f"{path}: item {n}"
        conv = d.get("conversations") if isinstance(d, dict) else None
        if not conv or len(conv) < 2 or conv[0].get("from") != "human" or conv[1].get("from") != "gpt":
            raise DataError(f"{where}: expected \"conversations\" starting with a human turn then a gpt turn")
        question = conv[0]["value"].replace("<image>", "").strip()
        image = _resolve_image(d["image"], root, where) if d.get("image") else None
        out.append(Sample(question, conv[1]["value"].strip(), "llava", image=image))
    return out


def read_coco_captions(path: str, image_root: str | None = None,
                       prompt: str = "Describe this image in one sentence.") -> list[Sample]:
    """COCO captions: annotations/captions_*.json ({"images": [{"id", "file_name"}], "annotations":
    [{"image_id", "caption"}]}); images in image_root (default: ../<split name> next to annotations/, e.g.
    val2017/). The first caption of each image is the reference answer."""
    d = read_json(path, "COCO captions annotations")
    if not isinstance(d, dict) or "images" not in d or "annotations" not in d:
        raise DataError(f"{path}: not a COCO captions file (needs \"images\" and \"annotations\")")
    split = os.path.basename(path).replace("captions_", "").replace(".json", "")
    root = image_root or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), split)
    first = {}
    for a in d["annotations"]:
        first.setdefault(a["image_id"], a["caption"].strip())
    return [Sample(prompt, first[im["id"]], "caption",
                   image=_resolve_image(im["file_name"], root, f"{path}: image id {im['id']}"))
            for im in d["images"] if im["id"] in first]


SHAPES_SPECS = {"shapes": 0.2, "shapes-image": 0.0, "shapes-text": 1.0}  # --data name -> share of text-only


def load_samples(spec: str = "shapes", n: int | None = None, seed: int = 0, split: str = "test",
                 image_root: str | None = None) -> list[Sample]:
    """`shapes` (the bundled benchmark; `shapes-image` / `shapes-text`: its image / text-only questions alone),
    a .jsonl file, a LLaVA/ShareGPT .json list, or a COCO captions .json.
    For files, n samples are drawn without replacement with `seed` (all of them when n is None)."""
    if spec in SHAPES_SPECS:
        return shapes_benchmark(n or 500, seed=seed, split=split, text_fraction=SHAPES_SPECS[spec])
    if not os.path.isfile(spec):
        raise DataError(f"--data {spec!r}: not one of {sorted(SHAPES_SPECS)} and not an existing file")
    if spec.endswith(".jsonl"):
        samples = read_jsonl(spec, image_root)
    elif os.path.basename(spec).startswith("captions_"):
        samples = read_coco_captions(spec, image_root)
    elif spec.endswith(".json"):
        samples = read_llava(spec, image_root)
    else:
        raise DataError(f"--data {spec!r}: unknown format; use .jsonl, a LLaVA .json list or COCO captions_*.json")
    if n is not None and n < len(samples):
        idx = np.random.default_rng(seed).choice(len(samples), size=n, replace=False)
        samples = [samples[i] for i in sorted(idx)]
    return samples
