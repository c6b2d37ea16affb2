"""The peer half of bench/peer.py: runs ONE peer toolkit inside that peer's own interpreter (its own virtual
environment, which pins its own torch / transformers) and writes its quantized checkpoint.

    PEER_PYTHON bench/peer_side.py --peer llm-compressor|gptqmodel|autoround --model DIR --calib CALIB_DIR
        --bits B --group-size G --out OUT [--threads 1] [--repeats 1] [--damp F] [--act-order] [--iters N]

It needs only torch, safetensors and the peer (nothing of the project is imported: the peer's environment does
not have the project's dependencies). The calibration sequences are read from our calib/ folder
(samples.safetensors, written by calibrate.py): the same token ids, pixels and grids our GPTQ calibrates on,
handed to each peer as ready tensors (prompt + gold answer, one sample per batch), never re-tokenized.

Each peer quantizes the decoder's attention and expert linears to W`bits`, symmetric, groups of `--group-size`;
the vision tower, the routers (`mlp.gate`) and lm_head stay float; everything else is the peer's default
(see PEER_DEFAULTS). The timed call is the peer's quantization on a model already loaded, without saving; the
best of `--repeats` fresh loads. OUT/peer.json records the seconds, the versions, the settings and the output
format (`compressed-tensors`: model.py reads it; `gptq`: bench/peer_convert.py makes it readable).
Exit code 3 (MISSING) when the peer cannot be imported in this interpreter; the message says what is missing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import sys
import time

MISSING = 3
PACKAGES = {"llm-compressor": "llmcompressor", "gptqmodel": "gptqmodel", "autoround": "auto-round"}
PEER_DEFAULTS = {  # what each peer does that we do not set (its defaults at the versions in results/peers.md)
    "llm-compressor": "GPTQModifier defaults: dampening_frac 0.01, actorder static, min-max observer, "
                      "every token through every expert while calibrating",
    "gptqmodel": "QuantizeConfig defaults: damp_percent 0.05 (auto-increment 0.01), desc_act False with "
                 "act_group_aware True, RTN fallback for experts reached by < 0.5% of the tokens, tokens routed",
    "autoround": "AutoRound defaults: sign-gradient rounding with min-max tuning, lr = min-max lr = 1/iters, "
                 "seed 42, torch.compile on (its own decision); set here: iterations (200 unless --autoround-iters), "
                 "batch 1 with gradient accumulation 8 (its default batch of 8; samples differ in length)",
}
KEEP_FILES = ("tokenizer.json", "preprocessor_config.json", "generation_config.json")


def pin_threads(threads: int):
    """torch threads, and the process pinned to as many cores, so a peer's worker threads cannot use more."""
    import torch

    torch.set_num_threads(threads)
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus[:threads])


def load_rows(calib: str) -> list[dict]:
    """Our calib/ samples as model inputs with a batch dimension: input_ids, attention_mask, mm_token_type_ids
    (1, T) and the image's pixel_values (patches, D) and image_grid_thw (1, 3)."""
    import torch
    from safetensors.torch import load_file

    with open(os.path.join(calib, "calib.json")) as f:
        n = json.load(f)["n"]
    flat = load_file(os.path.join(calib, "samples.safetensors"))
    rows = []
    for j in range(n):
        if f"{j}.pixel_values" not in flat:
            raise ValueError(f"{calib}: sample {j} has no image; bench/peer.py calibrates on image questions only")
        ids = flat[f"{j}.input_ids"].long()
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                     "mm_token_type_ids": flat[f"{j}.is_vis"].long(),  # transformers 5 wants it with images
                     "pixel_values": flat[f"{j}.pixel_values"].float(),
                     "image_grid_thw": flat[f"{j}.image_grid_thw"].long()})
    return rows


def image_processor(model: str):
    """The checkpoint's image processor in its PIL flavor, for a peer that insists on a processor although our
    samples arrive as ready tensors (it is stored, never called). Not the full Qwen3-VL processor: that one also
    builds a video processor, which needs torchvision, and PyPI's torchvision (a CUDA build) does not load its
    operators beside the CPU torch of this environment (results/peers.md)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(model)


def run_llmc(a, rows) -> tuple[list[float], object, str]:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast

    data = Dataset.from_list([{k: v[0].tolist() if k in ("input_ids", "attention_mask", "mm_token_type_ids")
                               else v.tolist() for k, v in r.items()} for r in rows])

    def collate(batch):  # one sample per batch, the token axes given back their batch dimension
        out = {k: torch.tensor(v) for k, v in batch[0].items()}
        return {k: v[None] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
                for k, v in out.items()}

    scheme = {"targets": ["Linear"], "weights": {"num_bits": a.bits, "type": "int", "symmetric": True,
                                                 "strategy": "group", "group_size": a.group_size}}
    kw = {} if a.damp is None else {"dampening_frac": a.damp}
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head", "re:.*visual.*", "re:.*mlp.gate$"],
                          **kw)
    seconds = []
    for _ in range(a.repeats):  # each on a freshly loaded float model (oneshot quantizes it in place)
        m = AutoModelForImageTextToText.from_pretrained(a.model, dtype=torch.float32)
        t0 = time.time()
        oneshot(model=m, processor=PreTrainedTokenizerFast(tokenizer_file=os.path.join(a.model, "tokenizer.json")),
                dataset=data, recipe=recipe.model_copy(deep=True), num_calibration_samples=len(rows),
                data_collator=collate)
        seconds.append(time.time() - t0)
    m.save_pretrained(a.out, save_compressed=True)
    return seconds, "compressed-tensors"


def run_gptqmodel(a, rows):
    """GPTQModel's GPTQ. Its Qwen3-VL definition builds calibration batches from chat messages through the
    processor; here `prepare_dataset` is replaced on the loaded model by a pass-through that hands over our
    ready tensors unchanged. Its module tree quantizes the attention and the (defused) expert linears and leaves
    the vision tower, the routers and lm_head float. The output is the GPTQ format (converted by peer_convert)."""
    import torch

    # Its thread pool gives the model loader 2 CPU workers and refuses a parent pool of fewer, which is what it
    # sizes by default on a 2-core machine: 2 workers (the process stays pinned to `--threads` cores).
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel, QuantizeConfig

    kw = {} if a.damp is None else {"damp_percent": a.damp}
    if a.act_order:
        kw.update(desc_act=True, act_group_aware=False)
    seconds = []
    for _ in range(a.repeats):
        cfg = QuantizeConfig(bits=a.bits, group_size=a.group_size, sym=True, **kw)
        m = GPTQModel.load(a.model, quantize_config=cfg, device="cpu", dtype=torch.float32)
        m.prepare_dataset = lambda calibration_dataset, batch_size=1, **_: list(calibration_dataset)
        t0 = time.time()
        m.quantize([dict(r) for r in rows], batch_size=1)
        seconds.append(time.time() - t0)
    m.save(a.out)
    return seconds, "gptq"


def run_autoround(a, rows):
    """AutoRound's sign-gradient rounding (its default algorithm) at `--iters` iterations. A list of ready input
    dicts is fed to the model as they are; it still asks for a processor (see image_processor). Samples
    differ in length, so batches hold one sample and the gradient is accumulated over 8 of them (its default
    batch of 8). Blocks of the language model only (its default for multimodal models): the vision tower stays
    float, and so do lm_head and the routers. Saved in its `llm_compressor` format (compressed-tensors)."""
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast

    seconds = []
    for _ in range(a.repeats):
        m = AutoModelForImageTextToText.from_pretrained(a.model, dtype=torch.float32)
        tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(a.model, "tokenizer.json"))
        proc = image_processor(a.model)
        ar = AutoRound(m, tokenizer=tok, processor=proc, image_processor=proc, scheme="W4A16", bits=a.bits,
                       group_size=a.group_size, sym=True, dataset=[dict(r) for r in rows], iters=a.iters,
                       nsamples=len(rows), batch_size=1, gradient_accumulate_steps=8, device_map="cpu")
        t0 = time.time()
        ar.quantize()
        seconds.append(time.time() - t0)
    ar.save_quantized(a.out, format="llm_compressor")
    return seconds, "compressed-tensors"


RUNNERS = {"llm-compressor": run_llmc, "gptqmodel": run_gptqmodel, "autoround": run_autoround}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer", required=True, choices=sorted(RUNNERS))
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True, help="calib/ folder written by calibrate.py (image samples)")
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--out", required=True, help="output folder (replaced)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--damp", type=float, default=None, help="dampening (fraction of the mean Hessian diagonal); "
                   "default: the peer's")
    p.add_argument("--act-order", action="store_true", help="gptqmodel: desc_act True (act_group_aware off)")
    p.add_argument("--iters", type=int, default=200, help="autoround: tuning iterations")
    a = p.parse_args(argv)
    try:
        version = importlib.metadata.version(PACKAGES[a.peer])
    except importlib.metadata.PackageNotFoundError:
        print(f"{a.peer}: package {PACKAGES[a.peer]!r} is not installed in {sys.executable}; "
              "see results/peers.md for its environment", file=sys.stderr)
        return MISSING
    pin_threads(a.threads)
    import torch
    import transformers

    rows = load_rows(a.calib)
    if os.path.isdir(a.out):
        shutil.rmtree(a.out)
    seconds, fmt = RUNNERS[a.peer](a, rows)
    for name in KEEP_FILES:
        if not os.path.isfile(os.path.join(a.out, name)):
            shutil.copy(os.path.join(a.model, name), a.out)
    with open(os.path.join(a.out, "peer.json"), "w") as f:
        json.dump({"peer": a.peer, "version": version, "torch": torch.__version__,
                   "transformers": transformers.__version__, "python": sys.executable, "format": fmt,
                   "seconds": min(seconds), "all_seconds": seconds, "threads": a.threads,
                   "settings": {"bits": a.bits, "group_size": a.group_size, "sym": True, "damp": a.damp,
                                "act_order": a.act_order, "iters": a.iters if a.peer == "autoround" else None},
                   "defaults": PEER_DEFAULTS[a.peer]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
