"""Our GPTQ against a peer's (llm-compressor's `oneshot` + `GPTQModifier`) on the same model and samples.

    python bench/peer.py [--model models/tiny-qwen3-vl-moe] [--bits 4,3] [--group-size 32] [--n-calib 32]
                         [--n-eval 1000] [--methods gptq,veq-ma] [--peer-python PYTHON] [--threads 1]

Both sides quantize the same linears (the decoder's attention and expert linears; vision tower, routers and
lm_head float) to W`bits` symmetric with groups of `--group-size`, from the same calibration token sequences
(prompt + gold answer of the first `--n-calib` image questions of the shapes train split: the peer's traced
pipeline takes one call signature, so image samples only). Both outputs are compressed-tensors checkpoints that
`model.py` loads; each is compared with the float model on the same `--n-eval` held-out samples: mean KL per
answer token with a bootstrap 95% interval, the median, and the paired difference from the peer (ours - peer,
with its interval: "significant" when the interval excludes 0). Times are the wall seconds of the
quantization call on each side (`gptq.quantize_model`, which includes loading the layers and writing the
output; llm-compressor's `oneshot` on a model already loaded, without saving), the best of `--repeats`, at
`--threads` torch threads.

llm-compressor is optional: it is run in a subprocess with `--peer-python` (default: this interpreter), so it
can live in its own virtual environment (it pins its own transformers); without it the bench says so and
reports our side only. The peer's choices are its 0.14 defaults: dampening 0.01, `actorder: static`, min-max
observer, every token through every expert while calibrating (`moe_calibrate_all_experts`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import calibrate  # noqa: E402
from data import processor  # noqa: E402
from data import samples as data_samples  # noqa: E402
import gptq  # noqa: E402
import model  # noqa: E402
import eval as evaluation  # noqa: E402
from quant import folders  # noqa: E402

PEER_MISSING = 3  # exit code of --peer-run when llm-compressor cannot be imported


def peer_run(model: str, calib: str, bits: int, group_size: int, out: str, threads: int, repeats: int):
    """Runs inside the peer's interpreter: llm-compressor GPTQ on the samples of our calib/ folder."""
    try:
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.gptq import GPTQModifier
        from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast
    except ImportError as e:
        print(f"llm-compressor is not installed in {sys.executable} ({e}); skipping the peer", file=sys.stderr)
        sys.exit(PEER_MISSING)
    torch.set_num_threads(threads)
    rows = []
    for e in folders.CalibSet.load(calib).samples:  # prompt + gold answer + end: the sequences gptq.py calibrates on
        rows.append({"input_ids": e["input_ids"][0].tolist(), "attention_mask": [1] * e["input_ids"].shape[1],
                     "pixel_values": e["pixel_values"].tolist(), "image_grid_thw": e["image_grid_thw"].tolist(),
                     "mm_token_type_ids": e["is_vis"][0].int().tolist()})  # transformers 5 wants it with images

    def collate(batch):  # one sample per batch, as tensors with a batch dimension on the token axes
        out = {k: torch.tensor(v) for k, v in batch[0].items()}
        return {k: v[None] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
                for k, v in out.items()}

    scheme = {"targets": ["Linear"], "weights": {"num_bits": bits, "type": "int", "symmetric": True,
                                                 "strategy": "group", "group_size": group_size}}
    recipe = GPTQModifier(config_groups={"group_0": scheme}, dampening_frac=0.01,
                          ignore=["lm_head", "re:.*visual.*", "re:.*mlp.gate$"])
    seconds = []
    for _ in range(repeats):  # each on a freshly loaded float model (oneshot quantizes it in place)
        m = AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32)
        t0 = time.time()
        oneshot(model=m, processor=PreTrainedTokenizerFast(tokenizer_file=os.path.join(model, "tokenizer.json")),
                dataset=Dataset.from_list(rows), recipe=recipe.model_copy(deep=True),
                num_calibration_samples=len(rows), data_collator=collate)
        seconds.append(time.time() - t0)
    m.save_pretrained(out, save_compressed=True)
    for name in ("tokenizer.json", "preprocessor_config.json", "generation_config.json"):
        shutil.copy(os.path.join(model, name), out)
    with open(os.path.join(out, "peer.json"), "w") as f:
        json.dump({"seconds": min(seconds), "all_seconds": seconds}, f)


def run_peer(python: str, model: str, calib: str, bits: int, group_size: int, out: str, threads: int,
             repeats: int):
    """-> the peer's quantization seconds (best of `repeats`), or None when llm-compressor is not installed."""
    cmd = [python, os.path.abspath(__file__), "--peer-run", "--model", model, "--calib", calib, "--bits",
           str(bits), "--group-size", str(group_size), "--out", out, "--threads", str(threads),
           "--repeats", str(repeats)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode == PEER_MISSING:
        print(r.stderr.strip())
        return None
    if r.returncode != 0:
        raise RuntimeError(f"the peer failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")
    with open(os.path.join(out, "peer.json")) as f:
        return json.load(f)["seconds"]


def kl_per_sample(folder: str, proc, samples, ref_logprobs) -> torch.Tensor:
    lq = evaluation.answer_logprobs(model.load_model(folder), proc, samples)
    return torch.tensor([evaluation.answer_kl(q, r) for q, r in zip(lq, ref_logprobs)])


def row(name: str, kl: torch.Tensor, img: torch.Tensor, seconds: float | None, peer: dict | None) -> str:
    ci = evaluation.bootstrap_ci(kl)
    cells = [name, f"{kl.mean():.2e} [{ci[0]:.2e}, {ci[1]:.2e}]", f"{kl.median():.2e}", f"{kl[img].mean():.2e}",
             f"{kl[~img].mean():.2e}", "-" if seconds is None else f"{seconds:.1f}"]
    if peer is not None:
        d = evaluation.paired_difference(kl, peer["kl"])
        cells += [f"{kl.mean() / peer['kl'].mean():.2f}", f"{d['mean']:+.1e} [{d['ci95'][0]:+.1e}, {d['ci95'][1]:+.1e}]"
                  + (" *" if d["significant"] else ""), f"{seconds / peer['seconds']:.2f}" if seconds else "-"]
    return "| " + " | ".join(cells) + " |"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ROOT, "models", "tiny-qwen3-vl-moe"))
    p.add_argument("--bits", default="4,3", help="comma-separated weight widths")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--n-calib", type=int, default=32, help="calibration samples (image questions)")
    p.add_argument("--seed", type=int, default=0, help="calibration sample seed")
    p.add_argument("--n-eval", type=int, default=1000, help="held-out samples for the KL")
    p.add_argument("--methods", default="gptq,veq-ma", help="our methods, each with our defaults")
    p.add_argument("--peer-python", default=sys.executable, help="interpreter that has llm-compressor")
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    p.add_argument("--repeats", type=int, default=3, help="times are the best of this many runs on each side")
    p.add_argument("--work", default=None, help="folder for the outputs (default: a temporary one, removed)")
    p.add_argument("--peer-run", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--calib", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.peer_run:
        return peer_run(a.model, a.calib, int(a.bits), a.group_size, a.out, a.threads, a.repeats)
    torch.set_num_threads(a.threads)
    work = a.work or tempfile.mkdtemp(prefix="peer-")
    calib = os.path.join(work, "calib")
    calibrate.calibrate(a.model, "shapes-image", a.n_calib, a.seed, calib, command="bench/peer.py", overwrite=True)
    samples = data_samples.load_samples("shapes", n=a.n_eval, seed=0, split="test")
    proc = processor.load_processor(a.model)
    ref = evaluation.answer_logprobs(model.load_model(a.model), proc, samples)
    img = torch.tensor([s.image is not None for s in samples])
    print(f"model {a.model}, W-bits {a.bits}, group {a.group_size}, symmetric, {a.n_calib} image calibration "
          f"samples (seed {a.seed}), {a.n_eval} eval samples, {a.threads} thread(s)\n")
    print("| bits / method | KL [95% CI] | median | KL image | KL text | s | KL / peer | ours - peer [95% CI] "
          "| time / peer |\n" + "|---" * 9 + "|")
    for bits in [int(b) for b in a.bits.split(",")]:
        out = os.path.join(work, f"peer-w{bits}")
        seconds = run_peer(a.peer_python, a.model, calib, bits, a.group_size, out, a.threads, a.repeats)
        peer = None if seconds is None else {"kl": kl_per_sample(out, proc, samples, ref), "seconds": seconds}
        if peer is not None:
            print(row(f"W{bits} llm-compressor", peer["kl"], img, seconds, None), flush=True)
        for method in a.methods.split(","):
            q = gptq.Settings.of(method=method, bits=bits, group_size=a.group_size, sym=True)
            out = os.path.join(work, f"ours-w{bits}-{method}")
            seconds = []
            for _ in range(a.repeats):
                t0 = time.time()
                gptq.quantize_model(a.model, calib, out, q, command="bench/peer.py", overwrite=True)
                seconds.append(time.time() - t0)
            print(row(f"W{bits} {method}", kl_per_sample(out, proc, samples, ref), img, min(seconds), peer),
                  flush=True)
    if a.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
