"""Evaluate a (quantized) model: accuracy, and what changed against the float reference.

    python eval.py --model quantized/ --reference models/tiny-qwen3-vl-moe [--data shapes|FILE] [--n 500]
                   [--seed 0] [--json out.json] [--ppl FILE] [--random-tokens 128] [--fast-flips]
                   [--device cpu|cuda] [--dtype float32|bfloat16]
    python eval.py --model A --compare B --reference FLOAT      # paired differences A - B, same samples

Metrics, overall and per modality (image / text-only) and question type:
  * accuracy: greedy generation, normalized exact match (lower case, punctuation and extra spaces removed);
    multiple-choice samples are asked with lettered options and scored on the letter;
  * with --reference (the float model), on the gold answer tokens, teacher forced:
      kl        mean KL(P_ref || P_model) per answer token (nats),
      top1      fraction of answer tokens where both models' argmax agree,
      ce_delta  answer cross-entropy of the model minus that of the reference (nats/token),
      flips     fraction of samples whose greedy answer differs from the reference's greedy answer;
    --random-tokens N: KL on N sequences of uniformly random non-special token ids (teacher forced, every
    position), an input no calibration set contains. On small models accuracy hides what quantization does;
    KL, top-1 and flips are the primary metrics.
  * --ppl FILE: perplexity of a text file (non-overlapping windows).
Every metric is first computed per sample (a sample: its mean over its answer tokens), then averaged; its 95%
interval is a percentile bootstrap over the eval samples (`bootstrap_ci`), overall and per modality.
--compare B evaluates B on the same samples and prints A - B per metric with a paired bootstrap interval
(`paired_difference`), marked * where it excludes 0. (Intervals over calibration seeds x eval samples, for the
results tables, are bench/stats.py's.)
--fast-flips: greedy answers from one teacher-forced pass over the reference's answers (`answers_via_reference`;
a sample is generated only where the model may decode differently), tested equal to generating every answer.
For many models against one reference (bench/methods.py): `reference_outputs` once, `dequantize_once`, and a
`VisionCache` that reuses the float vision tower's outputs (bitwise-equal logits, tested).
Prints a markdown table; --json writes every number with the model, data, n, seed and command.
Does not handle: video, sampling-based decoding, LLM-as-judge scoring of free-form answers.
Read next: results/README.md (what these metrics showed on the bundled models) and bench/methods.py (the table).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data import processor
from data import samples as data_samples
from model import load_model, resolve_device
from quant import grid

MODALITIES = ("all", "image", "text")
METRICS = ("kl", "top1", "flips", "accuracy", "ce_delta", "random_kl")  # per-sample metrics


def normalize_answer(text: str) -> str:
    text = text.lower().strip()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def is_correct(prediction: str, s: data_samples.Sample) -> bool:
    if s.choices:  # letter match: the first letter-like token of the prediction
        m = re.search(r"\b([A-J])\b", prediction.strip().upper())
        return m is not None and m.group(1) == processor.gold_text(s)
    return normalize_answer(prediction) == normalize_answer(s.answer)


@torch.no_grad()
def greedy_ids(m, proc, samples, max_new_tokens: int = 16, device=None) -> list[list[int]]:
    """Each sample's greedy answer token ids (stop token excluded), one KV-cached generation per sample; the
    inputs go to `device` (default: the model's)."""
    device = m.device if device is None else device
    out = []
    for s in samples:
        e = processor.encode_sample(proc, s)
        vision = {k: v.to(device) for k, v in processor.vision_inputs(e).items()}
        out.append(m.generate(e["input_ids"].to(device), max_new_tokens, stop_ids=proc.stop_ids, **vision))
    return out


def greedy_answers(m, proc, samples, max_new_tokens: int = 16, device=None) -> list[str]:
    return [proc.tokenizer.decode(ids) for ids in greedy_ids(m, proc, samples, max_new_tokens, device)]


@torch.no_grad()
def answer_logprobs(m, proc, samples, batch_size: int = 32, device=None, answers=None) -> list[torch.Tensor]:
    """Per sample, log-probabilities (n_answer_tokens, V) at the gold answer (+ end) positions, teacher forced
    (answers: other answer ids to force, see processor.encode_qa_batch), float32 on `device` (default: the model's;
    only the answer rows of the logits are normalized and kept). Batches are made of samples of similar
    length (image ones together, then by question length), which cuts the padding, and the result put back in
    the samples' order."""
    device = m.device if device is None else device
    order = sorted(range(len(samples)),
                   key=lambda j: (samples[j].image is not None, len(processor.question_text(samples[j]))))
    out = [None] * len(samples)
    for i in range(0, len(samples), batch_size):
        idx = order[i:i + batch_size]
        forced = None if answers is None else [answers[j] for j in idx]
        b = processor.encode_qa_batch(proc, [samples[j] for j in idx], forced)
        vision = {k: v.to(device) for k, v in processor.vision_inputs(b).items()}
        logits = m(b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device), **vision)
        keep = b["labels"][:, 1:] != -100  # (B, T-1) on the CPU: the rows that predict an answer token
        logp = F.log_softmax(logits[:, :-1][keep.to(logits.device)].float(), -1)  # (answer rows of the batch, V)
        for j, lp in zip(idx, logp.split(keep.sum(1).tolist())):
            out[j] = lp
    return out


def gold_ids(proc, samples) -> list[torch.Tensor]:
    """The gold answer (+ end) token ids of each sample, from the tokenizer (CPU tensors; compare() moves them)."""
    return [torch.tensor(proc.tokenizer.encode(processor.gold_text(s)) + [proc.stop_ids[0]], device="cpu")
            for s in samples]


def group_mean(values, samples, key=lambda s: s.modality) -> dict:
    """Mean of per-sample values overall, per modality and per question type (None where a group is empty)."""
    groups = {"all": list(values)}
    for v, s in zip(values, samples):
        groups.setdefault(s.modality, []).append(v)
        groups.setdefault(f"type:{s.type}", []).append(v)
    out = {k: (sum(v) / len(v) if v else None) for k, v in groups.items()}
    for mod in MODALITIES:
        out.setdefault(mod, None)
    return out


# ----------------------------------------------------------------------------------------------------------
# Statistics. Every metric is a mean over eval samples of a per-sample value x_i, so its uncertainty from the
# choice of samples is that of a mean: resample the samples with replacement (the percentile bootstrap).

def bootstrap_ci(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> list[float] | None:
    """Percentile-bootstrap interval of the mean of per-sample `values` (resampling the eval samples)."""
    v = torch.as_tensor(values, dtype=torch.float64, device="cpu")  # reported numbers: on the CPU, seeded there
    if v.numel() < 2:
        return None
    g = torch.Generator(device="cpu").manual_seed(seed)
    means = v[torch.randint(v.numel(), (n_boot, v.numel()), generator=g, device="cpu")].mean(1)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64, device="cpu")
    lo, hi = torch.quantile(means, q).tolist()
    return [lo, hi]


def paired_difference(a, b, n_boot: int = 2000, seed: int = 0) -> dict:
    """a - b on the same eval samples (e.g. the per-sample KL of two quantized models): the mean difference,
    its bootstrap 95% interval, whether that interval excludes 0, the median difference, and the share of
    samples where a < b. Pairing removes the spread between samples, which dominates unpaired intervals."""
    d = torch.as_tensor(a, dtype=torch.float64, device="cpu") - torch.as_tensor(b, dtype=torch.float64, device="cpu")
    ci = bootstrap_ci(d, n_boot, seed)
    return {"mean": d.mean().item(), "ci95": ci, "significant": ci is not None and (ci[0] > 0 or ci[1] < 0),
            "median": d.median().item(), "a_lower_share": (d < 0).double().mean().item(), "n": d.numel()}


def _answer_kl(lp_model, lp_ref) -> torch.Tensor:
    return (lp_ref.exp() * (lp_ref - lp_model)).sum(-1).mean()  # 0-dim, on the log-probabilities' device


def group_indices(per: dict, metric: str) -> dict:
    """all / image / text -> indices into per[metric] (random-token KL has no modality: 'all' only)."""
    if metric == "random_kl":
        return {"all": list(range(len(per[metric])))}
    mods = per["modality"]
    return {g: [i for i, mod in enumerate(mods) if g == "all" or mod == g] for g in MODALITIES}


def intervals(per: dict, n_boot: int = 2000) -> dict:
    """metric -> group -> bootstrap 95% interval of the metric's mean over that group's samples."""
    return {k: {g: bootstrap_ci([per[k][i] for i in idx], n_boot) for g, idx in group_indices(per, k).items()}
            for k in METRICS if k in per}


# ----------------------------------------------------------------------------------------------------------
# Comparisons with the reference.

def answer_kl(lp_model, lp_ref) -> float:
    """Mean KL(P_ref || P_model) over one sample's answer tokens; both (n_answer_tokens, V) log-probabilities."""
    return _answer_kl(lp_model, lp_ref).item()


def compare(lp_model, lp_ref, golds, samples) -> dict:
    """Token-level comparison on the gold answers; each sample contributes its mean over its answer tokens.
    Computed where lp_model is (the model's device); the per-sample numbers come back in one copy per metric."""
    kl, top1, ce = [], [], []
    for lm, lr, g in zip(lp_model, lp_ref, golds):
        lr, g = lr.to(lm.device), g.to(lm.device)
        kl.append(_answer_kl(lm, lr))
        top1.append((lm.argmax(-1) == lr.argmax(-1)).float().mean())
        ce.append((-lm.gather(1, g[:, None]) + lr.gather(1, g[:, None])).mean())
    kl, top1, ce = ([] if not v else torch.stack(v).tolist() for v in (kl, top1, ce))
    by_mod = {"all": kl, **{mod: [v for v, s in zip(kl, samples) if s.modality == mod] for mod in MODALITIES[1:]}}
    return {"kl": group_mean(kl, samples), "top1": group_mean(top1, samples), "ce_delta": group_mean(ce, samples),
            "kl_median": {k: (torch.tensor(v, device="cpu").median().item() if v else None)
                          for k, v in by_mod.items()},
            "per_sample": {"kl": kl, "top1": top1, "ce_delta": ce}}


def reproduces_greedy(lp, ids: list[int], stopped: bool, stop_ids, tol: float) -> bool:
    """Whether greedy decoding provably emits `ids` (then a stop token, if `stopped`), given the teacher-forced
    log-probs lp (len(ids) + stopped, V) of prompt + ids (+ stop): each forced token beats every other by at
    least tol (and a stop token every non-stop one), so that the KV-cached decode, whose logits differ from the
    batched forward's by float rounding, takes the same argmax."""
    for k, t in enumerate(ids):
        others = lp[k].clone()
        others[t] = -math.inf
        if lp[k, t] - others.max() < tol:
            return False
    if stopped:
        others = lp[len(ids)].clone()
        others[stop_ids] = -math.inf
        return bool(lp[len(ids), stop_ids].max() - others.max() >= tol)
    return True


def answers_via_reference(m, proc, samples, ref: "Reference", max_new_tokens: int, device="cpu", tol: float = 1e-2,
                          gold=None):
    """The model's greedy answers without generating most of them: one teacher-forced pass over the
    reference's greedy answers (+ stop where the reference stopped); where the model provably decodes the same
    tokens its answer is the reference's, elsewhere it is generated. gold: (gold_ids, the model's log-probs on
    them), reused for the samples whose reference answer is the gold one. Returns (answers, number generated)."""
    stopped = [len(ids) < max_new_tokens for ids in ref.ids]
    forced = [ids + [proc.stop_ids[0]] if st else ids for ids, st in zip(ref.ids, stopped)]
    lps = [lp if g.tolist() == f else None for g, lp, f in zip(*gold, forced)] if gold else [None] * len(forced)
    rest = [j for j, lp in enumerate(lps) if lp is None]
    for j, lp in zip(rest, answer_logprobs(m, proc, [samples[j] for j in rest], device=device,
                                           answers=[forced[j] for j in rest])):
        lps[j] = lp
    todo = [j for j, (lp, ids, st) in enumerate(zip(lps, ref.ids, stopped))
            if not reproduces_greedy(lp, ids, st, proc.stop_ids, tol)]
    answers = list(ref.answers)
    for j, a in zip(todo, greedy_answers(m, proc, [samples[j] for j in todo], max_new_tokens, device)):
        answers[j] = a
    return answers, len(todo)


def random_token_ids(proc, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """(n, length) token ids drawn uniformly from the vocabulary without its special tokens."""
    tok = proc.tokenizer.tok
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    plain = torch.tensor(sorted(set(tok.get_vocab(with_added_tokens=True).values()) - special))
    g = torch.Generator().manual_seed(seed)
    return plain[torch.randint(len(plain), (n, length), generator=g)]


@torch.no_grad()
def token_logprobs(m, ids: torch.Tensor, batch_size: int = 32, device="cpu") -> list[torch.Tensor]:
    """Per sequence of ids (N, L), the next-token log-probabilities at every position (L, V)."""
    out = []
    for i in range(0, ids.shape[0], batch_size):
        out += list(F.log_softmax(m(ids[i:i + batch_size].to(device)).float(), -1).cpu())
    return out


@torch.no_grad()
def perplexity(m, proc, path: str, window: int = 512, device=None) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of the file's tokens, on `device` (default: the
    model's); the NLL is summed there in float64 and read once."""
    device = m.device if device is None else device
    with open(path) as f:
        ids = proc.tokenizer.encode(f.read())
    if len(ids) < 2:
        raise data_samples.DataError(f"{path}: needs at least two tokens for perplexity")
    nll, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for i in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[i:i + window + 1]], device=device)
        logits = m(chunk[:, :-1])
        nll += F.cross_entropy(logits[0].float(), chunk[0, 1:], reduction="sum").double()
        count += chunk.shape[1] - 1
    return math.exp(float(nll) / count)


class VisionCache:
    """Vision-tower outputs remembered across models, for evaluating many quantized models that keep the float
    vision tower (bench/methods.py): in the bundled models the tower is 30-40% of an eval forward. Each vision
    module's output is stored under a digest of its weights and of its inputs, so a model with another tower
    (--quantize-vision) or another image never reads a wrong entry. `with cache.on(m):` routes m's vision
    modules (m.vision_modules()) through it; the stored features cost memory."""

    def __init__(self):
        self.store, self.hits, self.misses = {}, 0, 0

    @staticmethod
    def digest(values) -> str:
        h = hashlib.sha1()
        for v in values:
            if torch.is_tensor(v):
                t = v.detach().cpu().contiguous().reshape(-1)
                h.update(f"{t.dtype}{tuple(v.shape)}".encode() + t.view(torch.uint8).numpy().tobytes())
            else:
                h.update(repr(v).encode())
        return h.hexdigest()

    @contextlib.contextmanager
    def on(self, m):
        mods = m.vision_modules()
        for mod in mods:
            mod.forward = self._cached(mod.forward, self.digest(mod.state_dict().values()))
        try:
            yield self
        finally:
            for mod in mods:
                del mod.forward  # the class's forward again

    def _cached(self, forward, weights: str):
        def cached_forward(*args, **kwargs):
            key = (weights, self.digest([*args, *sorted(kwargs.items())]))
            if key in self.store:
                self.hits += 1
            else:
                self.misses += 1
                self.store[key] = forward(*args, **kwargs)
            return self.store[key]
        return cached_forward


@dataclass
class Reference:
    """The float model's outputs on the eval samples: computed once when many models are compared with it."""

    answers: list[str]  # greedy answers
    ids: list[list[int]]  # their token ids, stop token excluded
    logprobs: list[torch.Tensor]  # (n_answer_tokens, V) per sample, gold answer forced
    random_ids: torch.Tensor | None = None  # (N, L) random-token sequences (--random-tokens)
    random_logprobs: list[torch.Tensor] | None = None  # (L, V) per sequence


def reference_outputs(reference: str, proc, samples, max_new_tokens: int = 16, device="cpu", dtype=torch.float32,
                      random_tokens: int = 0, random_length: int = 32, seed: int = 0,
                      vision_cache: VisionCache | None = None) -> Reference:
    ref = load_model(reference, dtype=dtype, device=device)
    with vision_cache.on(ref) if vision_cache else contextlib.nullcontext():
        ids = greedy_ids(ref, proc, samples, max_new_tokens, device)
        r = Reference([proc.tokenizer.decode(i) for i in ids], ids, answer_logprobs(ref, proc, samples, device=device))
    if random_tokens:
        r.random_ids = random_token_ids(proc, random_tokens, random_length, seed)
        r.random_logprobs = token_logprobs(ref, r.random_ids, device=device)
    return r


def evaluate(model: str, reference: str | None = None, data_spec: str = "shapes", n: int = 500, seed: int = 0,
             ppl: str | None = None, device: str = "cpu", dtype=torch.float32, max_new_tokens: int = 16,
             command: str | None = None, ref_outputs: Reference | None = None, fast_flips: bool = False,
             random_tokens: int = 0, random_length: int = 32, dequantize_once: bool = False,
             vision_cache: VisionCache | None = None) -> dict:
    """Everything eval.py reports, as a dict (the JSON written by --json). ref_outputs: a precomputed
    reference_outputs(...) for the same samples, instead of running the reference again. dequantize_once: a
    packed model's weights dequantized once, not on every forward (same values; the float weights' memory).
    vision_cache: reuse vision-tower outputs computed for other models with the same tower (VisionCache)."""
    t0 = time.time()
    resolve_device(device)  # before any work: a device this machine lacks is an error naming --device
    if (fast_flips or random_tokens) and not reference:
        raise ValueError("--fast-flips and --random-tokens need --reference (the float model to compare with)")
    samples = data_samples.load_samples(data_spec, n=n, seed=seed, split="test")
    proc = processor.load_processor(model)
    m = load_model(model, dtype=dtype, device=device)
    ref = None if not reference else ref_outputs or reference_outputs(
        reference, proc, samples, max_new_tokens, device, dtype, random_tokens, random_length, seed)
    result = {"model": model, "reference": reference, "data": data_spec, "n": len(samples), "seed": seed,
              "command": command or " ".join(sys.argv)}
    with contextlib.ExitStack() as stack:
        if dequantize_once:
            stack.enter_context(grid.dequantize_once(m))
        if vision_cache is not None:
            stack.enter_context(vision_cache.on(m))
        result.update(metrics(m, proc, samples, ref, max_new_tokens=max_new_tokens, device=device,
                              fast_flips=fast_flips, tol=1e-2 if dtype == torch.float32 else 0.1))
        if ppl:
            result["perplexity"] = perplexity(m, proc, ppl, device=device)
    result["seconds"] = time.time() - t0
    return result


def metrics(m, proc, samples, ref: Reference | None = None, *, max_new_tokens: int = 16, device="cpu",
            fast_flips: bool = False, tol: float = 1e-2) -> dict:
    """Accuracy and, given the reference's outputs, KL / top-1 / CE change / flips (and the random-token KL):
    their means per group, intervals and per-sample values. fast_flips: see answers_via_reference (tol)."""
    golds = gold_ids(proc, samples)
    lp_gold = answer_logprobs(m, proc, samples, device=device) if ref is not None else None
    if fast_flips:
        answers, generated = answers_via_reference(m, proc, samples, ref, max_new_tokens, device, tol, (golds, lp_gold))
    else:
        answers, generated = greedy_answers(m, proc, samples, max_new_tokens, device), len(samples)
    per = {"modality": [s.modality for s in samples],
           "accuracy": [float(is_correct(a, s)) for a, s in zip(answers, samples)]}
    result = {"accuracy": group_mean(per["accuracy"], samples), "generated": generated}
    if ref is not None:
        result["reference_accuracy"] = group_mean([float(is_correct(a, s)) for a, s in zip(ref.answers, samples)],
                                                  samples)
        cmp = compare(lp_gold, ref.logprobs, golds, samples)
        per.update(cmp.pop("per_sample"))
        result.update(cmp)
        per["flips"] = [float(normalize_answer(a) != normalize_answer(b)) for a, b in zip(answers, ref.answers)]
        result["flips"] = group_mean(per["flips"], samples)
        if ref.random_ids is not None:
            per["random_kl"] = [answer_kl(q, r) for q, r in zip(token_logprobs(m, ref.random_ids, device=device),
                                                                ref.random_logprobs)]
            result["random_kl"] = {"all": sum(per["random_kl"]) / len(per["random_kl"]),
                                   "sequences": list(ref.random_ids.shape)}
    return {**result, "ci95": intervals(per), "per_sample": per}


def compare_models(a: dict, b: dict, n_boot: int = 2000) -> dict:
    """metric -> group -> paired_difference(a - b) of two evaluate() results on the same samples."""
    pa, pb = a["per_sample"], b["per_sample"]
    if pa["modality"] != pb["modality"] or len(pa.get("random_kl", [])) != len(pb.get("random_kl", [])):
        raise ValueError(f"--compare: {a['model']} and {b['model']} were not evaluated on the same samples "
                         f"(n {a['n']} vs {b['n']}); use the same --data, --n, --seed and --random-tokens")
    return {k: {g: paired_difference([pa[k][i] for i in idx], [pb[k][i] for i in idx], n_boot)
                for g, idx in group_indices(pa, k).items() if len(idx) > 0}
            for k in METRICS if k in pa and k in pb}


FMT = {"accuracy": "{:.1%}", "reference_accuracy": "{:.1%}", "top1": "{:.1%}", "flips": "{:.1%}",
       "kl": "{:.2e}", "ce_delta": "{:+.2e}", "random_kl": "{:.2e}"}


def with_ci(fmt: str, value, ci) -> str:
    return "-" if value is None else fmt.format(value) + (f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]" if ci else "")


def markdown(result: dict) -> str:
    """One row per group (all / image / text / each question type), one column per metric; the modality rows
    carry [95% bootstrap intervals] over their samples."""
    metrics = [k for k in ("accuracy", "reference_accuracy", "kl", "top1", "flips", "ce_delta") if k in result]
    groups = [g for g in result["accuracy"] if result["accuracy"][g] is not None]
    groups = [g for g in MODALITIES if g in groups] + sorted(g for g in groups if g not in MODALITIES)
    ci = result.get("ci95", {})
    lines = ["| group | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for g in groups:
        cells = [with_ci(FMT[k], result[k].get(g), ci.get(k, {}).get(g)) for k in metrics]
        lines.append(f"| {g.replace('type:', '')} | " + " | ".join(cells) + " |")
    head = f"model {result['model']}, data {result['data']}, n {result['n']}, seed {result['seed']}"
    if result.get("reference"):
        head += f", reference {result['reference']}"
    tail = f"\nperplexity: {result['perplexity']:.3f}" if "perplexity" in result else ""
    if "kl_median" in result:
        tail += "\nKL median: " + "; ".join(f"{g} {v:.2e}" for g, v in result["kl_median"].items() if v is not None)
    if "random_kl" in result:
        n_seq, length = result["random_kl"]["sequences"]
        tail += (f"\nKL on {n_seq} random-token sequences of {length}: "
                 + with_ci(FMT["random_kl"], result["random_kl"]["all"], ci["random_kl"]["all"]))
    return head + "\n\n" + "\n".join(lines) + tail


def markdown_difference(diff: dict, a: str, b: str) -> str:
    lines = [f"paired differences {a} - {b} on the same samples (* : the 95% bootstrap interval excludes 0)", "",
             "| metric | group | a - b [95% CI] | median | share a < b | n |", "|---|---|---|---|---|---|"]
    for k, groups in diff.items():
        for g, d in groups.items():
            fmt = "{:+.2e}" if k in ("kl", "ce_delta", "random_kl") else "{:+.1%}"
            lines.append(f"| {k} | {g} | {with_ci(fmt, d['mean'], d['ci95'])}{' *' if d['significant'] else ''} | "
                         f"{fmt.format(d['median'])} | {d['a_lower_share']:.1%} | {d['n']} |")
    return "\n".join(lines)


def write_json(result: dict, path: str):
    """Atomic write: a temporary file in the same folder, then rename."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/tiny-qwen3-vl-moe", help="checkpoint folder to evaluate")
    p.add_argument("--reference", default=None, help="float checkpoint to compare against (KL, top-1, flips)")
    p.add_argument("--compare", default=None, help="a second checkpoint: paired differences --model minus it")
    p.add_argument("--data", default="shapes", help="'shapes' (bundled benchmark, held-out split) or a file: "
                   ".jsonl, LLaVA .json, COCO captions_*.json")
    p.add_argument("--n", type=int, default=500, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="sample selection seed (and random-token seed)")
    p.add_argument("--ppl", default=None, help="text file to measure perplexity on")
    p.add_argument("--random-tokens", type=int, default=0, help="also KL on this many random-token sequences")
    p.add_argument("--random-length", type=int, default=32, help="tokens per random sequence")
    p.add_argument("--fast-flips", action="store_true", help="greedy answers from the reference's where the "
                   "model provably decodes the same (needs --reference); generated elsewhere")
    p.add_argument("--dequantize-once", action="store_true", help="dequantize a packed model's weights once "
                   "(faster; holds the float weights in memory too)")
    p.add_argument("--json", default=None, help="write all numbers to this JSON file")
    p.add_argument("--max-new-tokens", type=int, default=16, help="generation limit per answer")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N (an error if absent)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights and activations of both models (log-probabilities and KL in float32)")
    args = p.parse_args(argv)
    command = "python eval.py " + " ".join(argv if argv is not None else sys.argv[1:])
    kw = dict(reference=args.reference, data_spec=args.data, n=args.n, seed=args.seed, device=args.device,
              dtype=getattr(torch, args.dtype), max_new_tokens=args.max_new_tokens, command=command,
              fast_flips=args.fast_flips, random_tokens=args.random_tokens, random_length=args.random_length,
              dequantize_once=args.dequantize_once)
    if args.compare and args.reference:  # the reference's outputs, once for both models
        proc = processor.load_processor(args.model)
        kw["ref_outputs"] = reference_outputs(args.reference, proc, data_samples.load_samples(args.data, args.n, args.seed),
                                              args.max_new_tokens, args.device, kw["dtype"], args.random_tokens,
                                              args.random_length, args.seed)
    result = evaluate(args.model, ppl=args.ppl, **kw)
    print(markdown(result))
    if args.compare:
        other = evaluate(args.compare, ppl=None, **kw)
        diff = compare_models(result, other)
        print("\n" + markdown(other) + "\n\n" + markdown_difference(diff, args.model, args.compare))
        result = {"a": result, "b": other, "difference": diff, "command": command}
    if args.json:
        write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
