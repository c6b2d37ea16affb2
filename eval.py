"""Evaluate a (quantized) model: accuracy, and what changed against the float reference.

    python eval.py --model quantized/ --reference models/tiny-qwen3-vl-moe [--data shapes|FILE] [--n 500]
                   [--seed 0] [--json out.json] [--ppl FILE] [--device cpu|cuda] [--dtype float32|bfloat16]

Metrics, overall and per modality (image / text-only) and question type:
  * accuracy: greedy generation, normalized exact match (lower case, punctuation and extra spaces removed);
    multiple-choice samples are asked with lettered options and scored on the letter;
  * with --reference (the float model), on the gold answer tokens, teacher forced:
      kl        mean KL(P_ref || P_model) per answer token (nats),
      top1      fraction of answer tokens where both models' argmax agree,
      ce_delta  answer cross-entropy of the model minus that of the reference (nats/token),
      flips     fraction of samples whose greedy answer differs from the reference's greedy answer.
    On small models accuracy hides what quantization does; these are the primary metrics.
  * --ppl FILE: perplexity of a text file (non-overlapping windows).
Prints a markdown table; --json writes every number with the model, data, n, seed and command.
Does not handle: video, sampling-based decoding, LLM-as-judge scoring of free-form answers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

import torch
import torch.nn.functional as F

import data
import model as modeling

MODALITIES = ("all", "image", "text")


def normalize_answer(text: str) -> str:
    text = text.lower().strip()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def is_correct(prediction: str, s: data.Sample) -> bool:
    if s.choices:  # letter match: the first letter-like token of the prediction
        m = re.search(r"\b([A-J])\b", prediction.strip().upper())
        return m is not None and m.group(1) == data.gold_text(s)
    return normalize_answer(prediction) == normalize_answer(s.answer)


@torch.no_grad()
def greedy_answers(m, proc, samples, max_new_tokens: int = 16, device=None) -> list[str]:
    """Greedy answers (decoded text), one prompt at a time; the inputs go to `device` (default: the model's)."""
    device = m.device if device is None else device
    out = []
    for s in samples:
        e = data.encode_sample(proc, s)
        vision = {k: v.to(device) for k, v in data.vision_inputs(e).items()}
        ids = m.generate(e["input_ids"].to(device), max_new_tokens, stop_ids=proc.stop_ids, **vision)
        out.append(proc.tokenizer.decode(ids))
    return out


@torch.no_grad()
def answer_logprobs(m, proc, samples, batch_size: int = 32, device=None) -> list[torch.Tensor]:
    """Per sample, log-probabilities (n_answer_tokens, V) at the gold answer (+ end) positions, teacher forced,
    float32 on `device` (default: the model's). Only the answer rows of the logits are normalized and kept (the
    whole (B, T, V) log-softmax is never formed, nor copied to the CPU)."""
    device = m.device if device is None else device
    out = []
    for i in range(0, len(samples), batch_size):
        b = data.encode_qa_batch(proc, samples[i:i + batch_size])
        vision = {k: v.to(device) for k, v in data.vision_inputs(b).items()}
        logits = m(b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device), **vision)
        keep = b["labels"][:, 1:] != -100  # (B, T-1) on the CPU: the rows that predict an answer token
        logp = F.log_softmax(logits[:, :-1][keep.to(logits.device)].float(), -1)  # (answer rows of the batch, V)
        out += list(logp.split(keep.sum(1).tolist()))
    return out


def gold_ids(proc, samples) -> list[torch.Tensor]:
    """The gold answer (+ end) token ids of each sample, from the tokenizer (CPU tensors; compare() moves them)."""
    return [torch.tensor(proc.tokenizer.encode(data.gold_text(s)) + [proc.stop_ids[0]], device="cpu")
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
            "kl_ci95": {k: bootstrap_ci(v) for k, v in by_mod.items()},
            "kl_median": {k: (torch.tensor(v, device="cpu").median().item() if v else None)
                          for k, v in by_mod.items()},
            "per_sample": {"kl": kl, "modality": [s.modality for s in samples]}}


@torch.no_grad()
def perplexity(m, proc, path: str, window: int = 512, device=None) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of the file's tokens, on `device` (default: the
    model's); the NLL is summed there in float64 and read once."""
    device = m.device if device is None else device
    with open(path) as f:
        ids = proc.tokenizer.encode(f.read())
    if len(ids) < 2:
        raise data.DataError(f"{path}: needs at least two tokens for perplexity")
    nll, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for i in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[i:i + window + 1]], device=device)
        logits = m(chunk[:, :-1])
        nll += F.cross_entropy(logits[0].float(), chunk[0, 1:], reduction="sum").double()
        count += chunk.shape[1] - 1
    return math.exp(float(nll) / count)


def reference_outputs(reference: str, proc, samples, max_new_tokens: int = 16, device="cpu", dtype=torch.float32):
    """(greedy answers, answer log-probs) of the reference model: computed once when many quantized models are
    compared with the same float model (bench/methods.py)."""
    ref = modeling.load_model(reference, dtype=dtype, device=device)
    return (greedy_answers(ref, proc, samples, max_new_tokens, device),
            answer_logprobs(ref, proc, samples, device=device))


def evaluate(model: str, reference: str | None = None, data_spec: str = "shapes", n: int = 500, seed: int = 0,
             ppl: str | None = None, device: str = "cpu", dtype=torch.float32, max_new_tokens: int = 16,
             command: str | None = None, ref_outputs=None) -> dict:
    """Everything eval.py reports, as a dict (the JSON written by --json). ref_outputs: a precomputed
    reference_outputs(...) for the same samples, instead of running the reference again."""
    t0 = time.time()
    modeling.resolve_device(device)  # before any work: a device this machine lacks is an error naming --device
    samples = data.load_samples(data_spec, n=n, seed=seed, split="test")
    proc = data.load_processor(model)
    m = modeling.load_model(model, dtype=dtype, device=device)
    answers = greedy_answers(m, proc, samples, max_new_tokens, device)
    result = {"model": model, "reference": reference, "data": data_spec, "n": len(samples), "seed": seed,
              "command": command or " ".join(sys.argv),
              "accuracy": group_mean([float(is_correct(a, s)) for a, s in zip(answers, samples)], samples)}
    if reference:
        ref_answers, ref_logprobs = ref_outputs or reference_outputs(reference, proc, samples, max_new_tokens,
                                                                     device, dtype)
        result["reference_accuracy"] = group_mean([float(is_correct(a, s)) for a, s in zip(ref_answers, samples)],
                                                  samples)
        result.update(compare(answer_logprobs(m, proc, samples, device=device), ref_logprobs,
                              gold_ids(proc, samples), samples))
        result["flips"] = group_mean([float(normalize_answer(a) != normalize_answer(b))
                                      for a, b in zip(answers, ref_answers)], samples)
    if ppl:
        result["perplexity"] = perplexity(m, proc, ppl, device=device)
    result["seconds"] = time.time() - t0
    return result


def markdown(result: dict) -> str:
    """One row per group (all / image / text / each question type), one column per metric."""
    metrics = [k for k in ("accuracy", "reference_accuracy", "kl", "top1", "flips", "ce_delta") if k in result]
    groups = [g for g in result["accuracy"] if result["accuracy"][g] is not None]
    groups = [g for g in MODALITIES if g in groups] + sorted(g for g in groups if g not in MODALITIES)
    fmt = {"accuracy": "{:.1%}", "reference_accuracy": "{:.1%}", "top1": "{:.1%}", "flips": "{:.1%}",
           "kl": "{:.2e}", "ce_delta": "{:+.2e}"}
    lines = ["| group | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for g in groups:
        cells = [fmt[k].format(result[k][g]) if result[k].get(g) is not None else "-" for k in metrics]
        lines.append(f"| {g.replace('type:', '')} | " + " | ".join(cells) + " |")
    head = f"model {result['model']}, data {result['data']}, n {result['n']}, seed {result['seed']}"
    if result.get("reference"):
        head += f", reference {result['reference']}"
    tail = f"\nperplexity: {result['perplexity']:.3f}" if "perplexity" in result else ""
    if "kl_ci95" in result:
        tail += "\nKL mean [bootstrap 95% interval over samples], median: " + "; ".join(
            f"{g} {result['kl'][g]:.2e} [{ci[0]:.2e}, {ci[1]:.2e}], {result['kl_median'][g]:.2e}"
            for g, ci in result["kl_ci95"].items() if ci is not None)
    return head + "\n\n" + "\n".join(lines) + tail


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
    p.add_argument("--data", default="shapes", help="'shapes' (bundled benchmark, held-out split) or a file: "
                   ".jsonl, LLaVA .json, COCO captions_*.json")
    p.add_argument("--n", type=int, default=500, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="sample selection seed")
    p.add_argument("--ppl", default=None, help="text file to measure perplexity on")
    p.add_argument("--json", default=None, help="write all numbers to this JSON file")
    p.add_argument("--max-new-tokens", type=int, default=16, help="generation limit per answer")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N (an error if absent)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights and activations of both models (log-probabilities and KL in float32)")
    args = p.parse_args(argv)
    result = evaluate(args.model, args.reference, args.data, args.n, args.seed, args.ppl, args.device,
                      getattr(torch, args.dtype), args.max_new_tokens,
                      command="python eval.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(markdown(result))
    if args.json:
        write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
