"""Speed and size of the packed quantized runtime (grid.QuantLinear: unpack the int32 words, scale, F.linear on
every call) against the float model, eager and through torch.compile (grid.use_compiled_quant_linear).

1. The bundled model, models/tiny-qwen3-vl-moe: calibrate.calibrate (n=16, no gradient pass) into a temporary
   folder, gptq.quantize_model with method rtn (the packed format is the one GPTQ writes) at W4 and W3, group 32,
   then model.load_model of the float and the two packed checkpoints. Measured, best of --repeats after a
   warm-up: prefill tokens/s (one forward of a right-padded batch of 16 shapes samples with images; tokens =
   unpadded tokens) and decode tokens/s (batch 1: a prompt with an image through the KV cache, then --decode
   greedy one-token steps, the loop of MoEVLM.generate). The compiled runs start with the packed linears routed
   through torch.compile(dynamic=True); the first prefill and the first decode compile (a one-token input is
   specialized), and their wall time is reported as the compile time, apart from the timings.
2. One real-width layer: a Qwen3-VL-30B-A3B decoder layer (GQA 32/4 heads with q/k norms, 128-expert top-8 MoE)
   with random weights (train_tiny.init_weights' scale), float32 against copies whose 388 linears are RTN-packed
   at W4 and W3, group 128. Time per forward of a fixed batch, best of --repeats: 1 token (decode: 8 experts
   run) and --prefill-tokens tokens (prefill: nearly every expert runs).
Bytes: the linears' weights as stored, packed codes + scales + zero points (the runtime's tensors; scales in
float32) against the same linears in float32 and in bf16 (the checkpoints' dtype). Routers, norms and
embeddings stay float in both and are not counted.

Last line (real-width layer; speed ratio = float time / packed time, > 1 means packed is faster):
  runtime: w4_bytes_ratio=<packed / bf16> w3_bytes_ratio=<..> w4_decode_ratio_eager=<..>
           w4_decode_ratio_compiled=<..> w4_prefill_ratio_eager=<..> w4_prefill_ratio_compiled=<..>

    OMP_NUM_THREADS=1 python bench/runtime.py [--repeats 3] [--threads 1] [--device cpu]
Memory: about 6 GB (the float layer, one float copy being packed, the packed layers).
"""

import argparse
import copy
import os
import sys
import tempfile
import time

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import calibrate  # noqa: E402
from arch import blocks  # noqa: E402
from arch import qwen3_vl_moe  # noqa: E402
from data import processor  # noqa: E402
from data import samples as data_samples  # noqa: E402
import gptq  # noqa: E402
import model  # noqa: E402
from quant import grid  # noqa: E402
from bench.synthetic_checkpoint import qwen_config  # noqa: E402
from bench.timing import best_time, timed  # noqa: E402
from tools.train_tiny import init_weights  # noqa: E402

TINY = os.path.join(ROOT, "models", "tiny-qwen3-vl-moe")
GB = 1e9


def print_rows(out: dict, timing_columns, unit: float):
    """One table line per model and mode: its timing columns, then the linear weights' stored bytes (in
    `unit`) and their ratios to float32 and bf16."""
    for name, r in out.items():
        for mode in ("eager", "compiled"):
            if mode in r:
                b = r["bytes"]
                print(f"   {name + ' ' + mode:<14}{timing_columns(r[mode])}{b['stored'] / unit:>11.3f}"
                      f"{b['stored'] / b['fp32']:>8.3f}{b['stored'] / b['bf16']:>8.3f}")


def linear_bytes(layers) -> dict:
    """Bytes of every linear weight in `layers`: as stored (packed QuantLinear tensors, or the float weight),
    and what the same shapes take in float32 and bf16."""
    b = {"stored": 0, "fp32": 0, "bf16": 0}
    for layer in layers:
        for mod in layer.modules():
            if isinstance(mod, grid.QuantLinear):
                b["stored"] += sum(t.numel() * t.element_size() for t in (mod.weight_packed, mod.weight_scale,
                                                                          mod.weight_zero_point) if t is not None)
                n = mod.in_features * mod.out_features
            elif isinstance(mod, nn.Linear):
                b["stored"] += mod.weight.numel() * mod.weight.element_size()
                n = mod.weight.numel()
            else:
                continue
            b["fp32"], b["bf16"] = b["fp32"] + 4 * n, b["bf16"] + 2 * n
    return b


def compiled_quant_linear():
    """Route QuantLinear through a fresh torch.compile: dynamo's caches are reset first, so every model's compile
    time is its own (grid.use_compiled_quant_linear raises dynamo's graph limit for the many linear shapes)."""
    torch._dynamo.reset()
    grid.use_compiled_quant_linear(True)


# ---- 1. the bundled model --------------------------------------------------------------------------------


def decode(m, enc: dict, steps: int):
    """The KV-cache prompt pass, then `steps` greedy one-token steps (MoEVLM.generate's loop)."""
    cache = blocks.KVCache(len(m.layers))
    logits = m(enc["input_ids"], cache=cache, **processor.vision_inputs(enc))
    for _ in range(steps):
        logits = m(logits[:, -1:].argmax(-1), cache=cache)


def tiny_rates(m, batch: dict, prompt: dict, a, compiled: bool) -> dict:
    """prefill and decode tokens/s of model m (best of a.repeats); with compiled, the compile time first."""
    n_prefill = int(batch["attention_mask"].sum())
    vision = processor.vision_inputs(batch)
    prefill = lambda: m(batch["input_ids"], attention_mask=batch["attention_mask"], **vision)  # noqa: E731
    step = lambda: decode(m, prompt, a.decode)  # noqa: E731
    prompt_only = lambda: decode(m, prompt, 0)  # noqa: E731
    r = {"compile_s": timed(prefill)[1] + timed(step)[1] if compiled else 0.0}
    r["prefill_tps"] = n_prefill / best_time(prefill, a.repeats)
    r["decode_tps"] = a.decode / (best_time(step, a.repeats) - best_time(prompt_only, a.repeats))
    return r


def tiny_model(a, tmp: str) -> dict:
    dev = a.device
    calib = os.path.join(tmp, "calib")
    calibrate.calibrate(TINY, n=16, out=calib, gamma=False, device=dev, command="bench/runtime.py")
    paths = {"float": TINY}
    for bits in (4, 3):
        paths[f"w{bits}"] = os.path.join(tmp, f"w{bits}")
        gptq.quantize_model(TINY, calib, paths[f"w{bits}"], gptq.Settings.of(method="rtn", bits=bits, group_size=32),
                            device=dev, command="bench/runtime.py")
    proc = processor.load_processor(TINY)
    samples = data_samples.shapes_benchmark(32, split="test")
    batch = processor.encode_qa_batch(proc, [s for s in samples if s.image is not None][:16])
    prompt = processor.encode_sample(proc, next(s for s in samples if s.image is not None))
    batch, prompt = ({k: v.to(dev) for k, v in d.items()} for d in (batch, prompt))
    out = {}
    with torch.no_grad():
        for name, path in paths.items():
            m = model.load_model(path, dtype=torch.float32, device=dev)
            out[name] = {"bytes": linear_bytes(m.layers), "eager": tiny_rates(m, batch, prompt, a, compiled=False)}
            if name != "float":
                compiled_quant_linear()
                out[name]["compiled"] = tiny_rates(m, batch, prompt, a, compiled=True)
                grid.use_compiled_quant_linear(False)
    print(f"1. {TINY}: prefill {int(batch['attention_mask'].sum())} tokens (16 samples), decode {a.decode} steps "
          f"after a {prompt['input_ids'].shape[1]}-token prompt; rtn g32; best of {a.repeats}")
    print(f"   {'model':<14}{'prefill tok/s':>14}{'decode tok/s':>14}{'compile s':>11}{'linear MB':>11}"
          f"{'/ fp32':>8}{'/ bf16':>8}")
    print_rows(out, lambda t: f"{t['prefill_tps']:>14.1f}{t['decode_tps']:>14.1f}{t['compile_s']:>11.1f}", 1e6)
    return out


# ---- 2. one real-width layer ---------------------------------------------------------------------------


def real_layer(device: str):
    """A random Qwen3-VL-30B-A3B decoder layer (float32) and the model (meta) whose text_rope it uses."""
    cfg = qwen3_vl_moe.Qwen3VLMoeConfig.from_dict(qwen_config(48))
    with torch.device("meta"):
        m = qwen3_vl_moe.Qwen3VLMoeModel(cfg)
    layer = m.layers[0].to_empty(device=device)
    init_weights(layer, n_layers=48)
    return m, layer


def packed_copy(layer, bits: int, group_size: int):
    """A copy of `layer` with every nn.Linear replaced by its RTN-packed QuantLinear (asymmetric)."""
    q = copy.deepcopy(layer)
    for name, lin in [(n, mod) for n, mod in q.named_modules() if isinstance(mod, nn.Linear)]:
        r = grid.rtn(lin.weight, bits=bits, group_size=group_size)
        parent, _, attr = name.rpartition(".")
        setattr(q.get_submodule(parent), attr, grid.QuantLinear.from_codes(r.codes, r.scale, r.zero, bits=bits,
                                                                            group_size=group_size, sym=False))
    return q


def layer_inputs(m, T: int, device: str, seed: int = 0):
    """Hidden states (1, T, 2048) at the residual stream's scale, and the DecoderInputs of positions 0..T-1."""
    g = torch.Generator(device="cpu").manual_seed(seed)  # the same draws on every device
    x = torch.randn(1, T, m.cfg.text.hidden_size, generator=g, device="cpu").to(device)
    pos = torch.arange(T, device=device)[None, None].expand(3, 1, T)
    return x, blocks.DecoderInputs(rope=m.text_rope(pos, torch.float32), mask=None)


def real_width(a) -> dict:
    m, layer = real_layer(a.device)
    layers = {"float": layer}
    for bits in (4, 3):
        t0 = time.time()
        layers[f"w{bits}"] = packed_copy(layer, bits, 128)
        print(f"   packed W{bits} g128 in {time.time() - t0:.0f}s", flush=True)
    batches = {"decode": layer_inputs(m, 1, a.device), "prefill": layer_inputs(m, a.prefill_tokens, a.device)}
    out = {}
    with torch.no_grad():
        for name, lay in layers.items():
            out[name] = {"bytes": linear_bytes([lay])}
            for mode in ("eager", "compiled") if name != "float" else ("eager",):
                compiled_quant_linear() if mode == "compiled" else grid.use_compiled_quant_linear(False)
                r = {"compile_s": sum(timed(lambda: lay(*b))[1] for b in batches.values()) if mode == "compiled" else 0}
                for kind, (x, ctx) in batches.items():
                    r[kind] = best_time(lambda: lay(x, ctx), a.repeats)
                out[name][mode] = r
            grid.use_compiled_quant_linear(False)
    print(f"2. one Qwen3-VL-30B-A3B decoder layer (random): 1 token (decode) and {a.prefill_tokens} tokens "
          f"(prefill) per forward; rtn g128; best of {a.repeats}")
    print(f"   {'layer':<14}{'decode ms':>11}{'prefill ms':>12}{'compile s':>11}{'linear GB':>11}{'/ fp32':>8}"
          f"{'/ bf16':>8}")
    print_rows(out, lambda t: f"{1e3 * t['decode']:>11.1f}{1e3 * t['prefill']:>12.1f}{t['compile_s']:>11.1f}", GB)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best is reported)")
    p.add_argument("--decode", type=int, default=32, help="greedy decode steps (bundled model)")
    p.add_argument("--prefill-tokens", type=int, default=256, help="tokens per prefill forward (real-width layer)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda; an error if absent)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model.resolve_device(a.device)  # before any work: a device this machine lacks is an error naming --device
    print(f"torch {torch.__version__}, {a.threads} thread(s), device {a.device}")
    with tempfile.TemporaryDirectory() as tmp:
        tiny = tiny_model(a, tmp)
    f = tiny["float"]["eager"]
    for q in ("w4", "w3"):
        print(f"   {q} / float tokens/s: " + "; ".join(
            f"{kind} eager {tiny[q]['eager'][kind] / f[kind]:.3f} compiled {tiny[q]['compiled'][kind] / f[kind]:.3f}"
            for kind in ("prefill_tps", "decode_tps")))
    real = real_width(a)
    fl, w4 = real["float"]["eager"], real["w4"]
    ratio = {f"w4_{kind}_ratio_{mode}": fl[kind] / w4[mode][kind]
             for kind in ("decode", "prefill") for mode in ("eager", "compiled")}
    bytes_ratio = {f"{q}_bytes_ratio": real[q]["bytes"]["stored"] / real[q]["bytes"]["bf16"] for q in ("w4", "w3")}
    print("runtime: " + " ".join(f"{k}={v:.3f}" for k, v in {**bytes_ratio, **ratio}.items()))


if __name__ == "__main__":
    main()
