"""gptq.py's packed output, read the way vLLM reads it, without vLLM; and the other direction: a checkpoint that
compressed-tensors packs the way llm-compressor does loads in model.py.

The rules below were read from vLLM 0.33.0 (the wheel's sources) and are restated here in our own code; each
names the vLLM file and function it comes from (paths under vllm/model_executor/). They cover what decides
whether vLLM loads a compressed-tensors `pack-quantized` checkpoint of these two families:
  * names: the model's checkpoint-to-vLLM prefix renames (its `hf_to_vllm_mapper`), the modules vLLM fuses
    (q/k/v -> qkv_proj, gate/up -> gate_up_proj, MLA's q_a_proj + kv_a_proj_with_mqa -> fused_qkv_a_proj), and
    routed experts loaded per expert into one RoutedExperts module;
  * which modules are built with the quantization config at all (Kimi-VL's vision tower and projector and its
    DeepSeek router are not; Qwen3-VL's vision tower and its router are);
  * the `ignore` list as vLLM matches it (exact names renamed first, `re:` patterns as written, matched with
    re.match against vLLM's module names; a fused module and its shards must agree);
  * the scheme lookup (`targets`), the config fields it parses, and the tensors and shapes each scheme allocates.
What they do not cover: which kernels run it, per target and tensor-parallel size (quant/servable.py, read from
vLLM 0.32.0, tested in tests/test_servable.py), runtime numerics (bench/vllm_check.py runs vLLM itself).

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_vllm_format.py
"""

import json
import os
import re
import shutil
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import calibrate
from arch import checkpoint
from data import processor
from data import samples as data_samples
import gptq
import model
from quant import folders
from quant import grid
from quant import servable

ct = pytest.importorskip("compressed_tensors", reason="test extra: pip install compressed-tensors")
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = {"qwen": os.path.join(ROOT, "models", "tiny-qwen3-vl-moe"),
           "kimi": os.path.join(ROOT, "models", "tiny-kimi-vl")}
# the outputs checked: W4 and W8 symmetric (what vLLM runs) and W4 asymmetric (zero points; vLLM runs it too)
SCHEMES = {"w4-g32": dict(bits=4, group_size=32, sym=True), "w8-channel": dict(bits=8, group_size=-1, sym=True),
           "w4-g32-asym": dict(bits=4, group_size=32, sym=False)}


# ----------------------------------------------------------------------------------------------------------
# What vLLM builds for each family


@dataclass
class VllmArch:
    """The parts of a vLLM model class that decide how a compressed-tensors checkpoint is matched and loaded."""

    # prefix renames applied to checkpoint tensor names and to exact (dotted, non-`re:`) ignore entries
    prefix_map: list[tuple[str, str]]
    # vLLM module (last name component) -> the checkpoint modules it is built from, in shard order
    fusions: dict[str, list[str]]
    # the packed_modules_mapping the quantization config sees (used to split a fused name into shards when
    # matching `ignore`); not always the same as `fusions`
    quant_packed_map: dict[str, list[str]]
    # module-name prefixes (vLLM names) of sub-models built without the quantization config: always float
    no_quant_config: tuple[str, ...] = ()
    router_gets_quant_config: bool = False
    expert_projections: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")


def vllm_arch(cfg) -> VllmArch:
    if cfg.model_type == "qwen3_vl_moe":
        return VllmArch(
            # models/qwen3_vl.py, Qwen3VLForConditionalGeneration.hf_to_vllm_mapper (orig_to_new_prefix); the
            # config gets its rename-only part (models/utils.py WeightsMapper.get_rename_mapper)
            prefix_map=[("model.visual.", "visual."), ("lm_head.", "language_model.lm_head."),
                        ("model.language_model.", "language_model.model.")],
            # models/qwen3_moe.py Qwen3MoeAttention (qkv_proj) and Qwen3MoeMLP (gate_up_proj); the vision
            # attention's `qkv` is already one tensor (qwen2_5_vl.py Qwen2_5_VisionAttention)
            fusions={"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]},
            # models/qwen3_vl.py Qwen3VLForConditionalGeneration.packed_modules_mapping (+ the language model's)
            quant_packed_map={"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"],
                              "qkv": ["qkv"]},
            # models/qwen3_vl.py: Qwen3_VisionTransformer(quant_config=quant_config), so the vision linears
            # are quantized unless ignored; models/qwen3_moe.py Qwen3MoeSparseMoeBlock: the router is a
            # GateLinear(quant_config=quant_config)
            router_gets_quant_config=True,
        )
    if cfg.model_type == "kimi_vl":
        fusions = {"gate_up_proj": ["gate_proj", "up_proj"]}  # models/deepseek_v2.py DeepseekV2MLP
        if cfg.text.q_lora_rank is not None:  # models/deepseek_v2.py DeepseekV2MLAAttention: fused_qkv_a_proj
            fusions["fused_qkv_a_proj"] = ["q_a_proj", "kv_a_proj_with_mqa"]
        return VllmArch(
            prefix_map=[],  # models/kimi_vl.py: load_weights passes no mapper; names are the checkpoint's
            fusions=fusions,
            # models/kimi_vl.py KimiVLForConditionalGeneration has no packed_modules_mapping and is not
            # SupportsQuant, and model_loader/utils.py configure_quant_config reads the top-level class only:
            # the quantization config sees no fused names (DeepseekV2ForCausalLM's mapping stays unused)
            quant_packed_map={},
            # models/kimi_vl.py: MoonVitPretrainedModel and KimiVLMultiModalProjector get no quant_config;
            # models/deepseek_v2.py DeepseekV2MoE: GateLinear(...) without quant_config
            no_quant_config=("vision_tower.", "multi_modal_projector."),
            router_gets_quant_config=False,
        )
    raise ValueError(cfg.model_type)


def to_vllm_name(name: str, arch: VllmArch) -> str:
    """models/utils.py WeightsMapper._map_name_with_shard: each prefix rule in order, first occurrence."""
    for old, new in arch.prefix_map:
        if name.startswith(old):
            name = name.replace(old, new, 1)
    return name


def vllm_ignore_list(ignore: list[str], arch: VllmArch) -> list[str]:
    """layers/quantization/compressed_tensors/compressed_tensors.py CompressedTensorsConfig.apply_vllm_mapper:
    only entries that contain a dot and do not start with `re:` are renamed; `re:` patterns and bare names
    (`lm_head`, `Linear`) are kept as written."""
    return [to_vllm_name(e, arch) if "." in e and not e.startswith("re:") else e for e in ignore]


def matches(value: str, target: str, contains: bool = False) -> bool:
    """layers/quantization/utils/config_utils.py is_equal_or_regex_match: `re:` + re.match (anchored at the start
    only), else equality; class-name targets compare case-insensitively as a substring."""
    if target.startswith("re:"):
        return re.match(target[3:], value) is not None
    if contains:
        return target.lower() in value.lower()
    return target == value


def shard_names(layer: str, packed: dict[str, list[str]]) -> list[str]:
    """config_utils.py find_matching_patterns: a fused name's shards replace its last component."""
    last = layer.split(".")[-1]
    return [layer.replace(last, s) for s in packed[last]] if last in packed else [layer]


def should_ignore(layer: str, ignore: list[str], packed: dict[str, list[str]]) -> bool:
    """compressed_tensors/utils.py should_ignore_layer: an entry matching the layer itself wins; otherwise each
    shard of a fused layer is matched, and shards that disagree are an error (vLLM raises ValueError)."""
    if any(matches(layer, t) for t in ignore):
        return True
    flags = [any(matches(s, t) for t in ignore) for s in shard_names(layer, packed)]
    if any(flags) and not all(flags):
        raise ValueError(f"{layer}: its shards {shard_names(layer, packed)} are partly ignored; vLLM requires one "
                         "scheme for all shards of a fused module")
    return all(flags)


def matched_target(layer: str, cls: str, targets: list[str], packed: dict[str, list[str]]) -> str | None:
    """compressed_tensors/utils.py find_matched_target: the layer name, then all shards of a fused layer, then
    the module's class name (substring)."""
    for t in targets:
        if matches(layer, t):
            return t
    last = layer.split(".")[-1]
    if last in packed:
        found = [next((t for t in targets if matches(s, t)), None) for s in shard_names(layer, packed)]
        if all(found):
            return found[0]
    return next((t for t in targets if matches(cls, t, contains=True)), None)


def scheme_of(layer: str, cls: str, qc: dict, arch: VllmArch) -> dict | None:
    """compressed_tensors.py CompressedTensorsConfig.get_scheme_dict: None for an ignored layer or one no target
    matches, else the config group's weights/input_activations."""
    packed = arch.quant_packed_map
    if should_ignore(layer, vllm_ignore_list(qc.get("ignore", []), arch), packed):
        return None
    groups = list(qc["config_groups"].values())
    targets = [t for g in groups for t in g["targets"]]
    # compressed_tensors.py _add_fused_moe_to_target_scheme_map: a `Linear` target also covers RoutedExperts
    if "Linear" in targets and "RoutedExperts" not in targets:
        targets.append("RoutedExperts")
    t = matched_target(layer, cls, targets, packed)
    if t is None:
        return None
    g = next(g for g in groups if (t if t != "RoutedExperts" else "Linear") in g["targets"])
    return {"weights": g["weights"], "input_activations": g.get("input_activations")}


# ----------------------------------------------------------------------------------------------------------
# The vLLM modules of a model, from our float model (whose module names are the checkpoint's)

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.([a-z_]+)$")


@dataclass
class VllmLayer:
    name: str  # vLLM module name
    cls: str  # vLLM class name (the `Linear` target matches every vLLM linear class by substring)
    shards: list[str]  # checkpoint module names loaded into it
    quant_config: bool  # built with the quantization config
    experts: bool = False


def vllm_layers(m, arch: VllmArch) -> list[VllmLayer]:
    """Every module vLLM asks the quantization config about (linear layers, routers, the output head), with the
    checkpoint modules each one is loaded from."""
    linears = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)]
    routers = [n for n, mod in m.named_modules() if n.endswith(".mlp.gate") and not isinstance(mod, nn.Linear)]
    shard_of = {s: fused for fused, shards in arch.fusions.items() for s in shards}
    out: dict[str, VllmLayer] = {}
    for n in linears + routers:
        parent, _, last = n.rpartition(".")
        e = _EXPERT.match(n)
        if e:  # layers/fused_moe/routed_experts.py build_expert_params_mapping: experts.{e}.{proj} -> one module
            name, cls, experts = to_vllm_name(e.group(1), arch), "RoutedExperts", True
        elif n in routers:
            name, cls, experts = to_vllm_name(n, arch), "GateLinear", False
        elif n == "lm_head" or n.endswith(".lm_head"):
            name, cls, experts = to_vllm_name(n, arch), "ParallelLMHead", False
        elif last in shard_of:
            fused = shard_of[last]
            cls = "QKVParallelLinear" if fused == "qkv_proj" else "MergedColumnParallelLinear"
            name, experts = to_vllm_name(f"{parent}.{fused}", arch), False
        else:
            name, cls, experts = to_vllm_name(n, arch), "ColumnParallelLinear", False
        quant = not name.startswith(arch.no_quant_config) and (n not in routers or arch.router_gets_quant_config)
        out.setdefault(name, VllmLayer(name, cls, [], quant, experts)).shards.append(n)
    return list(out.values())


# ----------------------------------------------------------------------------------------------------------
# The checks


def tensor_index(folder: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype string, shape) from the file headers."""
    ck = checkpoint.Checkpoint(folder)
    return {k: (ck._handle(ck.where[k]).get_slice(k).get_dtype(), ck.shape(k)) for k in ck.keys()}


FLOAT_DTYPES = {"F32", "F16", "BF16"}
INT_DTYPES = {"I32", "I64"}


def config_problems(qc: dict) -> list[str]:
    """The quantization_config fields vLLM reads (compressed_tensors.py CompressedTensorsConfig.from_config and
    _quantization_scheme_map_from_config), parsed with compressed-tensors' own pydantic models."""
    try:
        QuantizationConfig.model_validate(qc)
    except ValueError as e:  # pydantic's ValidationError
        return [f"compressed-tensors refuses the config: {e}"]
    p = []
    if qc.get("quant_method") != "compressed-tensors":  # layers/quantization/__init__.py: the method's name
        p.append(f"quant_method {qc.get('quant_method')!r}")
    if qc.get("format") != "pack-quantized":  # compressed_tensors.py _get_scheme_from_parts: WNA16 needs it
        p.append(f"format {qc.get('format')!r}")
    for name, g in qc["config_groups"].items():
        w = QuantizationArgs.model_validate(g["weights"])
        if "Linear" not in g["targets"]:  # _add_fused_moe_to_target_scheme_map copies only a `Linear` target
            p.append(f"{name}: targets {g['targets']} lack 'Linear', so RoutedExperts would get no scheme")
        if w.actorder in ("group", "dynamic"):  # _quantization_scheme_map_from_config raises on these
            p.append(f"{name}: actorder {w.actorder}")
        if w.type != "int" or w.dynamic or w.strategy not in ("group", "channel"):  # _is_wNa16_group_channel
            p.append(f"{name}: weights {w.type} dynamic={w.dynamic} strategy={w.strategy} are not WNA16")
        if (w.strategy == "group") != (w.group_size is not None and w.group_size > 0):  # CompressedTensorsWNA16
            p.append(f"{name}: strategy {w.strategy} with group_size {w.group_size}")
    kv = qc.get("kv_cache_scheme")  # compressed_tensors.py CompressedTensorsKVCacheMethod.validate_kv_cache_scheme
    if kv is not None and not (kv.get("type") == "float" and kv.get("num_bits") == 8 and kv.get("symmetric")):
        p.append(f"kv_cache_scheme {kv}")
    return p


def expected_tensors(params: dict[str, tuple], scheme: dict | None) -> dict[str, tuple]:
    """suffix -> (dtype set, shape) that vLLM allocates for one checkpoint module, given its float parameters
    (suffix -> shape: `weight`, and `bias` or a router's `e_score_correction_bias` where it has them) and the
    scheme of the vLLM layer it is loaded into. Float: those parameters. WNA16
    (compressed_tensors/schemes/compressed_tensors_wNa16.py CompressedTensorsWNA16.create_weights;
    compressed_tensors_moe/compressed_tensors_moe_wna16.py CompressedTensorsWNA16MoEMethod.create_weights and
    get_weight_shape): `weight` becomes `weight_packed` int32 (out, in·bits/32), `weight_scale` (out, in // group)
    in any float dtype (vLLM copies it into the model dtype), `weight_shape` (2,) integer, and
    `weight_zero_point` int32 (out·bits/32, in // group) only when asymmetric; no `weight_g_idx` (0.33 has none)."""
    t = {k: (FLOAT_DTYPES, shape) for k, shape in params.items()}
    if scheme is None:
        return t
    out_f, in_f = t.pop("weight")[1]
    w = scheme["weights"]
    bits, g = w["num_bits"], (in_f if w["strategy"] == "channel" else w["group_size"])
    t.update(weight_packed=({"I32"}, (out_f, in_f * bits // 32)), weight_scale=(FLOAT_DTYPES, (out_f, in_f // g)),
             weight_shape=(INT_DTYPES, (2,)))
    if not w["symmetric"]:
        t["weight_zero_point"] = ({"I32"}, (out_f * bits // 32, in_f // g))
    return t


def format_problems(out_dir: str, float_model, qc: dict | None = None, tensors: dict | None = None) -> list[str]:
    """Everything vLLM would refuse in out_dir (or in the given config / tensor index instead of its own)."""
    cfg = model.load_config(out_dir)
    qc = qc if qc is not None else json.load(open(os.path.join(out_dir, "config.json")))["quantization_config"]
    tensors = tensors if tensors is not None else tensor_index(out_dir)
    arch = vllm_arch(cfg)
    p = config_problems(qc)
    sd = float_model.state_dict()
    claimed = set()
    for layer in vllm_layers(float_model, arch):
        try:
            if layer.experts:
                # compressed_tensors_moe/compressed_tensors_moe.py get_moe_method: the scheme is looked up on
                # expert 0's three projections (vLLM names) and they must agree
                per_proj = [scheme_of(f"{layer.name}.0.{proj}", layer.cls, qc, arch)
                            for proj in arch.expert_projections]
                if any(s != per_proj[0] for s in per_proj):
                    p.append(f"{layer.name}: the expert projections get different schemes {per_proj}")
                scheme = per_proj[0]
            else:
                scheme = scheme_of(layer.name, layer.cls, qc, arch) if layer.quant_config else None
        except ValueError as e:
            p.append(str(e))
            continue
        if layer.cls == "ParallelLMHead" and scheme is not None:
            p.append(f"{layer.name}: a quantized output head (vLLM 0.33 only runs it with a name target)")
        for shard in layer.shards:
            out_f, in_f = sd[f"{shard}.weight"].shape
            if scheme is not None:
                w = scheme["weights"]
                g = in_f if w["strategy"] == "channel" else w["group_size"]
                if in_f % g or (in_f * w["num_bits"]) % 32 or (not w["symmetric"] and (out_f * w["num_bits"]) % 32):
                    # CompressedTensorsWNA16.create_weights floors in // group; the MoE method divides
                    # hidden/intermediate by the group size and the pack factor and raises otherwise
                    p.append(f"{shard}: ({out_f}, {in_f}) is not a whole number of groups of {g} / int32 words "
                             f"at {w['num_bits']} bits")
                    continue
            params = {k[len(shard) + 1:]: tuple(v.shape) for k, v in sd.items() if k.rpartition(".")[0] == shard}
            want = expected_tensors(params, scheme)
            have = {k[len(shard) + 1:] for k in tensors if k.rpartition(".")[0] == shard}
            if have != set(want):
                state = "quantized" if scheme is not None else "float"
                p.append(f"{shard} -> vLLM {layer.name} ({state}): expects {sorted(want)}, "
                         f"checkpoint has {sorted(have)}")
                continue
            for suffix, (dtypes, shape) in want.items():
                dt, sh = tensors[f"{shard}.{suffix}"]
                if dt not in dtypes or tuple(sh) != shape:
                    p.append(f"{shard}.{suffix}: {dt} {tuple(sh)}, vLLM allocates {sorted(dtypes)} {shape}")
                claimed.add(f"{shard}.{suffix}")
    # whatever is left must be one of the model's float non-linear tensors (norms, embeddings, router bias ...);
    # an unknown tensor under a linear's name is an unexpected parameter to vLLM's loader
    for k in sorted(set(tensors) - claimed):
        if k not in sd or tensors[k][0] not in FLOAT_DTYPES:
            p.append(f"{k}: not a tensor of any vLLM parameter")
    return p


# ----------------------------------------------------------------------------------------------------------
# Fixtures: the bundled models quantized quickly (RTN; the format does not depend on the method)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """(model name, scheme name) -> (float dir, packed output dir)."""
    out = {}
    for name, path in BUNDLED.items():
        cal = str(tmp_path_factory.mktemp("calib") / name)
        calibrate.calibrate(path, n=2, seed=0, out=cal, gamma=False, command="test")
        for scheme, kw in SCHEMES.items():
            q = str(tmp_path_factory.mktemp("q") / f"{name}-{scheme}")
            gptq.quantize_model(path, cal, q, gptq.Settings.of(method="rtn", **kw), command="test")
            out[name, scheme] = (path, q)
    return out


@pytest.fixture(scope="module")
def float_models():
    return {name: model.load_model(path) for name, path in BUNDLED.items()}


CASES = [(n, s) for n in BUNDLED for s in SCHEMES]


@pytest.mark.parametrize("name, scheme", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_output_is_what_vllm_loads(name, scheme, outputs, float_models):
    src, out = outputs[name, scheme]
    assert format_problems(out, float_models[name]) == []
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert servable.problems(model.load_config(src), qc["moe_vlm_quant"], "cuda-tp1") == []


@pytest.mark.parametrize("name", list(BUNDLED))
def test_every_router_and_float_linear_is_ignored_under_vllm_names(name, outputs, float_models):
    """The rule the old `re:` router entry broke: every module that vLLM builds with the quantization config and
    that we keep float is matched by an ignore entry, after vLLM renames the entries."""
    _, out = outputs[name, "w4-g32"]
    arch = vllm_arch(model.load_config(out))
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    ignore, tensors = vllm_ignore_list(qc["ignore"], arch), tensor_index(out)
    layers = vllm_layers(float_models[name], arch)
    kept_float = [ly for ly in layers if ly.quant_config and ly.cls != "ParallelLMHead"
                  and f"{ly.shards[0]}.weight" in tensors]
    assert all(should_ignore(ly.name, ignore, arch.quant_packed_map) for ly in kept_float)
    gates = [ly for ly in layers if ly.cls == "GateLinear"]
    n_moe = sum(hasattr(layer.mlp, "gate") for layer in float_models[name].layers)
    assert len(gates) == n_moe > 0
    if name == "qwen":  # the routers and the vision tower are built with the config: they must be ignored
        assert {ly.cls for ly in kept_float} == {"GateLinear", "ColumnParallelLinear"} and len(kept_float) > n_moe
        assert gates[0].name == "language_model.model.layers.0.mlp.gate" and gates[0].quant_config
    else:  # Kimi-VL: neither the router nor the vision tower / projector ever see it
        assert kept_float == [] and not any(ly.quant_config for ly in gates)


@pytest.mark.parametrize("name", list(BUNDLED))
def test_the_checks_fail_on_a_mismatch(name, outputs, float_models):
    """Each rule catches the deviation it is about (mutations of a real output, in memory)."""
    src, out = outputs[name, "w4-g32"]
    fm = float_models[name]
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    tensors = tensor_index(out)
    prefix = model.MODELS[model.load_config(out).model_type].layer_prefix(1)

    def fails(qc2=None, t2=None):
        return format_problems(out, fm, qc=qc2 or qc, tensors=t2 or tensors) != []

    # a router entry as a regex over checkpoint names (what gptq.py wrote before): vLLM's names differ for Qwen
    old = [e for e in qc["ignore"] if not e.endswith("mlp.gate")]
    old.append(f"re:{re.escape(prefix).replace('1', '[0-9]+', 1)}mlp\\.gate$")
    assert fails(dict(qc, ignore=old)) == (name == "qwen")  # Kimi's router never sees the config
    # a dropped weight_shape of one expert; a g_idx vLLM 0.33 has no parameter for; a float scale made int
    key = next(k for k in tensors if k.endswith("experts.3.up_proj.weight_shape"))
    assert fails(t2={k: v for k, v in tensors.items() if k != key})
    assert fails(t2=dict(tensors, **{key.replace("weight_shape", "weight_g_idx"): ("I32", (128,))}))
    scale = key.replace("weight_shape", "weight_scale")
    assert fails(t2=dict(tensors, **{scale: ("I32", tensors[scale][1])}))
    # ignoring one shard of a fused module (Qwen's q_proj inside qkv_proj) or one expert projection
    shard = f"{prefix}self_attn.q_proj" if name == "qwen" else f"{prefix}mlp.experts.0.down_proj"
    assert fails(dict(qc, ignore=qc["ignore"] + [shard]))
    # a config group that only targets attention: the routed experts get no scheme but hold packed weights
    only_attn = json.loads(json.dumps(qc))
    only_attn["config_groups"]["group_0"]["targets"] = ["re:.*self_attn.*"]
    assert fails(only_attn)
    # group actorder (vLLM 0.33 refuses it) and a group size that does not divide the expert width (160)
    for w in ({"actorder": "group"}, {"group_size": 64}):
        bad = json.loads(json.dumps(qc))
        bad["config_groups"]["group_0"]["weights"].update(w)
        assert fails(bad)


def test_kimi_with_q_lora_rank_keeps_fused_qkv_a_proj_uniform(tmp_path):
    """Kimi-VL-A3B has q_lora_rank null (models/tiny-kimi-vl too); with a q_lora_rank vLLM fuses q_a_proj and
    kv_a_proj_with_mqa into fused_qkv_a_proj (models/deepseek_v2.py), so both must be quantized alike."""
    pytest.importorskip("transformers")
    from kimi_helpers import make_tiny_kimi

    path, _ = make_tiny_kimi(tmp_path / "kimi-qlora", seed=1, text=dict(q_lora_rank=24))
    calibrate.calibrate(path, n=2, seed=0, out=str(tmp_path / "cal"), gamma=False, command="test")
    gptq.quantize_model(path, str(tmp_path / "cal"), str(tmp_path / "q"),
                             gptq.Settings.of(method="rtn", bits=4, group_size=8, sym=True), command="test")
    fm = model.load_model(path)
    layers = {ly.name: ly for ly in vllm_layers(fm, vllm_arch(model.load_config(path)))}
    fused = layers["language_model.model.layers.1.self_attn.fused_qkv_a_proj"]
    assert fused.shards == ["language_model.model.layers.1.self_attn.q_a_proj",
                            "language_model.model.layers.1.self_attn.kv_a_proj_with_mqa"]
    assert format_problems(str(tmp_path / "q"), fm) == []


@pytest.mark.parametrize("kw, runs", [
    (dict(bits=4, group_size=32, sym=True), True), (dict(bits=4, group_size=-1, sym=True), True),
    (dict(bits=4, group_size=32, sym=False), True), (dict(bits=8, group_size=-1, sym=True), True),
    (dict(bits=4, group_size=32, sym=True, act_order=True, static_groups=True), True),
    (dict(bits=4, group_size=128, sym=True), False), (dict(bits=4, group_size=64, sym=True), False),
    (dict(bits=3, group_size=32, sym=True), False), (dict(bits=2, group_size=32, sym=True), False),
    (dict(bits=8, group_size=32, sym=False), False), (dict(bits=4, group_size=16, sym=True), False),
    (dict(bits=4, group_size=32, sym=True, abits=8), False), (dict(bits=8, group_size=-1, sym=True, abits=8), False),
], ids=lambda v: str(v) if isinstance(v, bool) else "-".join(f"{k}{v}" for k, v in v.items()))
def test_which_settings_vllm_runs(kw, runs):
    """The config gptq.py writes for each setting parses as compressed-tensors, and vLLM 0.32 on a GPU runs it or
    not on the bundled Qwen (160-wide experts: g64 and g128 do not divide them; g16: no linear kernel)."""
    q = gptq.Settings.of(**kw)
    qc = folders.quantization_config(q.args(), gptq.get_method(q.method).solver, ignore=[])
    assert config_problems(qc) == []
    assert (servable.problems(model.load_config(BUNDLED["qwen"]), q.args(), "cuda-tp1") == []) == runs


# ----------------------------------------------------------------------------------------------------------
# The other direction: a checkpoint compressed the way llm-compressor does, loaded by model.py


def compress_like_llm_compressor(src: str, dst: str, *, sym: bool, group_size: int = 32):
    """What llm-compressor's W4A16 RTN (QuantizationModifier, min-max observer) leaves on disk, made with the
    compressed-tensors library: schemes applied to the bf16 model's decoder linears (vision tower and head
    ignored by pattern), per-group min/max qparams, ModelCompressor.compress_model (pack-quantized), the
    per-expert state dict saved, ModelCompressor.update_config writing its quantization_config."""
    from safetensors.torch import save_file
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationScheme, apply_quantization_config
    from compressed_tensors.quantization.utils import calculate_qparams

    m = model.load_model(src, dtype=torch.bfloat16)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=sym, strategy="group", group_size=group_size)
    head = "lm_head" if m.cfg.model_type == "qwen3_vl_moe" else "language_model.lm_head"
    vision = [rf"re:{re.escape(p)}\..*" for p in ("model.visual", "vision_tower", "multi_modal_projector")]
    cfg = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                             ignore=[head] + vision)
    apply_quantization_config(m, cfg, show_progress=False)
    for mod in m.modules():
        if getattr(mod, "quantization_scheme", None) is not None:
            g = mod.weight.data.reshape(mod.weight.shape[0], -1, group_size)
            scale, zero = calculate_qparams(g.amin(-1), g.amax(-1), args)
            mod.weight_scale.data.copy_(scale)
            mod.weight_zero_point.data.copy_(zero)
    compressor = ModelCompressor.from_pretrained_model(m, quantization_format="pack-quantized")
    compressor.compress_model(m)
    os.makedirs(dst)
    save_file({k: v.contiguous() for k, v in checkpoint.checkpoint_state_dict(m).items()},
              os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(src):
        if name.endswith(".json"):
            shutil.copy(os.path.join(src, name), dst)
    compressor.update_config(dst)
    return args


def decompressed_reference(src: str, packed: str, args) -> nn.Module:
    """The float model with every packed linear replaced by compressed-tensors' own decompression of it."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    ref, ck = model.load_model(src), checkpoint.Checkpoint(packed)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    for key in [k for k in ck.keys() if k.endswith(".weight_packed")]:
        base = key[: -len(".weight_packed")]
        names = ["weight_packed", "weight_scale", "weight_shape"] + ([] if args.symmetric else ["weight_zero_point"])
        tensors = {n: ck.get(f"{base}.{n}") for n in names}
        tensors["weight_scale"] = tensors["weight_scale"].float()
        ref.get_submodule(base).weight.data.copy_(PackedQuantizationCompressor.decompress(tensors, scheme)["weight"])
    return ref


def image_logits(m, folder: str):
    proc = processor.load_processor(folder)
    e = processor.encode_sample(proc, next(s for s in data_samples.shapes_benchmark(5) if s.image is not None))
    vision = {k: v for k, v in e.items() if k in ("pixel_values", "image_grid_thw", "image_grid_hws")}
    with torch.no_grad():
        return m(e["input_ids"], **vision)


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("name", list(BUNDLED))
def test_llm_compressor_checkpoint_loads_in_model_py(name, sym, tmp_path, float_models):
    src, dst = BUNDLED[name], str(tmp_path / "lc")
    args = compress_like_llm_compressor(src, dst, sym=sym)
    qc = json.load(open(os.path.join(dst, "config.json")))["quantization_config"]
    # the same config and names our writer produces: vLLM's rules hold for it too
    assert format_problems(dst, float_models[name]) == []
    assert sorted(e for e in qc["ignore"] if e.endswith("mlp.gate")) == sorted(
        e for e in folders.ignored_modules(float_models[name]) if e.endswith("mlp.gate"))
    packed = model.load_model(dst)
    assert isinstance(packed.layers[1].mlp.experts[0].down_proj, grid.QuantLinear)
    ours, ref = image_logits(packed, dst), image_logits(decompressed_reference(src, dst, args), dst)
    assert (ours - ref).abs().max() <= 1e-4
    assert (ours - image_logits(float_models[name], src)).abs().max() > 1e-3  # it is the quantized model


@pytest.mark.parametrize("name", list(BUNDLED))
def test_quantized_vision_tower(name, tmp_path, float_models):
    """--quantize-vision: Qwen3-VL builds its vision linears with the quantization config, so packed vision
    weights load (when the group size divides every vision width); Kimi-VL builds its vision tower and projector
    without it (models/kimi_vl.py), so vLLM expects them float."""
    cal, out = str(tmp_path / "cal"), str(tmp_path / "q")
    calibrate.calibrate(BUNDLED[name], n=2, seed=0, out=cal, gamma=False, command="test")
    gptq.quantize_model(BUNDLED[name], cal, out, gptq.Settings.of(method="rtn", bits=4, group_size=32, sym=True,
                                                                         quantize_vision=True), command="test")
    problems = format_problems(out, float_models[name])
    if name == "qwen":
        assert problems == []
    else:
        assert problems and all(p.startswith(("vision_tower.", "multi_modal_projector.")) for p in problems)
