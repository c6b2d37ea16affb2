"""quant/servable.py: which outputs vLLM 0.32.0 loads and runs, decided before any work, on the bundled models and
the real checkpoints' shapes (tests/fixtures/real), and gptq.py --vllm refusing before it writes anything.

The expected outcomes are worked out by hand from vLLM's rules as the module cites them (e.g. Qwen3-VL-30B-A3B's
768-wide experts split into 192 columns per rank at TP 4, which a group of 128 does not divide), and, where this
machine ran vLLM, from what vLLM did (results/vllm/, bench/vllm_check.py).

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_servable.py
"""

import json
import os

import pytest

import calibrate
import gptq
import model
from arch import kimi_vl
from quant import servable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN = os.path.join(ROOT, "models", "tiny-qwen3-vl-moe")
KIMI = os.path.join(ROOT, "models", "tiny-kimi-vl")
REAL = os.path.join(ROOT, "tests", "fixtures", "real")
QWEN30 = os.path.join(REAL, "qwen3-vl-30b-a3b-instruct")


def args(bits=4, group_size=32, sym=True, abits=16, quantize_vision=False):
    return dict(bits=bits, group_size=group_size, sym=sym, abits=abits, quantize_vision=quantize_vision)


def runs(cfg, target, **kw) -> bool:
    return servable.problems(cfg, args(**kw), target) == []


@pytest.fixture(scope="module")
def kimi_real():
    """Kimi-VL-A3B-Instruct's config as far as the excerpt shows it (the MoE, MLA and vision widths)."""
    with open(os.path.join(REAL, "kimi-vl-a3b-instruct", "config.excerpt.json")) as f:
        return kimi_vl.KimiVLConfig.from_dict({**json.load(f), "model_type": "kimi_vl"})


def test_bundled_qwen_group_sizes_against_its_160_wide_experts():
    cfg = model.load_config(QWEN)
    for g in (64, 128):
        (p,) = servable.problems(cfg, args(group_size=g), "cuda-tp1")
        assert "MoE intermediate size per rank 160 not divisible by the group size" in p and str(g) in p
        assert "compressed_tensors_moe_wna16.py create_weights" in p
    assert runs(cfg, "cuda-tp1", group_size=32) and runs(cfg, "cuda-tp1", group_size=-1)
    assert not runs(cfg, "cuda-tp2", group_size=32)  # 80 columns per rank


def test_qwen30b_g128_runs_up_to_tp2_and_not_at_tp4():
    cfg = model.load_config(QWEN30)
    assert runs(cfg, "cuda-tp1", group_size=128) and runs(cfg, "cuda-tp2", group_size=128)  # 768, 384 per rank
    (p,) = servable.problems(cfg, args(group_size=128), "cuda-tp4")
    assert "MoE intermediate 768, 192 per rank at TP 4" in p
    assert "per rank 96 not divisible" in servable.problems(cfg, args(group_size=128), "cuda-tp8")[0]
    assert all(runs(cfg, f"cuda-tp{tp}", group_size=32) for tp in (1, 2, 4, 8))  # 768 / 8 = 96 = 3 x 32


def test_qwen30b_per_rank_widths_replicate_kv_heads():
    """vLLM's QKVParallelLinear gives each rank max(1, kv_heads / TP) KV heads: Qwen3-VL-30B-A3B has 32 query and
    4 KV heads of 128, so at TP 8 a rank holds 4 query heads and one K and one V head: 512 + 128 + 128."""
    cfg = model.load_config(QWEN30)
    lins = {x.name.split(".")[-1]: x for x in servable.quantized_linears(cfg, quantize_vision=False)}
    assert lins["qkv_proj"].per_rank(1) == (2048, 4096 + 512 + 512)
    assert lins["qkv_proj"].per_rank(8) == (2048, 512 + 128 + 128)
    assert lins["o_proj"].per_rank(4) == (1024, 2048)
    assert set(lins) == {"qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # the experts' three
    assert lins["down_proj"].split == "experts" and lins["down_proj"].n_in == 768


def test_qwen30b_vision_tower_has_no_grouped_kernel():
    """The real vision MLP is 4304 wide (= 16 x 269): no group size of the CUDA kernels divides its fc2 input,
    so --quantize-vision runs on a GPU only per channel."""
    cfg = model.load_config(QWEN30)
    for g in (32, 64, 128):
        p = servable.problems(cfg, args(group_size=g, quantize_vision=True), "cuda-tp1")
        assert any("blocks.N.mlp.linear_fc2 (4304 in" in x for x in p), p
    assert runs(cfg, "cuda-tp1", group_size=-1, quantize_vision=True)


def test_kimi_real_moe_1408_under_tensor_parallelism(kimi_real):
    """1408 = 11 x 128: g128 at TP 1 only, g64 up to TP 2, g32 up to TP 4."""
    assert [runs(kimi_real, f"cuda-tp{tp}", group_size=128) for tp in (1, 2, 4, 8)] == [True, False, False, False]
    assert [runs(kimi_real, f"cuda-tp{tp}", group_size=64) for tp in (1, 2, 4, 8)] == [True, True, False, False]
    assert [runs(kimi_real, f"cuda-tp{tp}", group_size=32) for tp in (1, 2, 4, 8)] == [True, True, True, False]


def test_kimi_on_cpu_mla_latent_and_routing(kimi_real):
    tiny = model.load_config(KIMI)
    p = servable.problems(tiny, args(), "cpu-zentorch")
    assert any("MLA latent width kv_lora_rank + qk_rope_head_dim = 80" in x for x in p)
    assert any("DeepSeek-V3's grouped sigmoid routing" in x for x in p)
    assert not any("MLA latent" in x for x in servable.problems(kimi_real, args(), "cpu-zentorch"))  # 512 + 64
    # the tiny model's kv_a_proj_with_mqa writes 64 + 16 = 80 columns: not a multiple of 32 for the CPU kernel
    assert any("kv_a_proj_with_mqa (128 in x 80 out)" in x for x in servable.problems(tiny, args(), "cpu-amx"))


def test_cpu_targets_take_int4_symmetric_groups_only():
    cfg = model.load_config(QWEN)
    assert runs(cfg, "cpu-zentorch", group_size=32) and not runs(cfg, "cpu-amx", group_size=32)
    assert not runs(cfg, "cpu-zentorch", sym=False) and not runs(cfg, "cpu-zentorch", bits=8, group_size=-1)
    assert not runs(cfg, "cpu-zentorch", group_size=-1)
    qwen30 = model.load_config(QWEN30)
    assert runs(qwen30, "cpu-amx", group_size=128) and runs(qwen30, "cpu-zentorch", group_size=128)
    # without AMX and outside the Zen platform, vLLM has no kernel for quantized experts at all
    assert not any(runs(c, "cpu", group_size=g) for c in (cfg, qwen30) for g in (-1, 32, 64, 128))


def test_cpu_target_follows_vllms_platform_choice():
    """This machine (AMD, AVX2, zentorch installed or not) is `cpu`: vLLM takes its Zen platform only with AVX-512."""
    assert servable.cpu_target("AuthenticAMD", avx512=False, amx=False, zentorch=True) == "cpu"
    assert servable.cpu_target("AuthenticAMD", avx512=True, amx=False, zentorch=True) == "cpu-zentorch"
    assert servable.cpu_target("AuthenticAMD", avx512=True, amx=False, zentorch=False) == "cpu"
    assert servable.cpu_target("GenuineIntel", avx512=True, amx=True, zentorch=True) == "cpu-amx"
    assert servable.cpu_target("GenuineIntel", avx512=True, amx=False, zentorch=False) == "cpu"


@pytest.mark.parametrize("target", servable.TARGETS)
def test_refused_everywhere(target):
    qwen, kimi = model.load_config(QWEN), model.load_config(KIMI)
    assert not runs(qwen, target, abits=8) and not runs(qwen, target, bits=8, group_size=-1, abits=8)
    assert not runs(qwen, target, bits=3) and not runs(qwen, target, bits=2)
    assert not runs(qwen, target, bits=8, sym=False)
    p = servable.problems(kimi, args(quantize_vision=True), target)
    assert any(x.startswith("--quantize-vision: vLLM builds Kimi-VL's vision tower") for x in p)


def test_gptq_vllm_refuses_before_any_work(tmp_path):
    cal, out = str(tmp_path / "calib"), str(tmp_path / "q")
    calibrate.calibrate(QWEN, n=2, seed=0, out=cal, gamma=False, command="test")
    with pytest.raises(ValueError, match=r"(?s)--vllm cuda-tp1: vLLM 0.32.0 would refuse.*MoE intermediate 160"):
        gptq.main(["--model", QWEN, "--calib", cal, "--out", out, "--bits", "4", "--sym", "--group-size", "128",
                   "--vllm", "--no-eval"])
    assert sorted(os.listdir(tmp_path)) == ["calib"]  # no output, no OUT.partial/
    report = gptq.main(["--model", QWEN, "--calib", cal, "--out", out, "--bits", "4", "--sym", "--group-size", "32",
                        "--method", "rtn", "--vllm", "--no-eval"])
    with open(os.path.join(out, "report.json")) as f:
        written = json.load(f)["vllm"]
    assert written == report["vllm"] and written["targets"]["cuda-tp1"] == []
    assert written["targets"]["cuda-tp2"] and written["vllm"] == "0.32.0"
    with pytest.raises(SystemExit):  # an unknown target is an argparse error
        gptq.main(["--calib", cal, "--out", out, "--vllm", "cuda-tp3"])


RECORDED = os.path.join(ROOT, "results", "vllm")


def recorded_runs():
    """bench/vllm_check.py's JSON records of gptq.py outputs (vLLM itself run on this machine's CPU)."""
    names = sorted(n for n in os.listdir(RECORDED) if n.endswith(".json")) if os.path.isdir(RECORDED) else []
    runs_ = []
    for n in names:
        with open(os.path.join(RECORDED, n)) as f:
            rec = json.load(f)
        if "quantization" in rec:
            runs_.append(pytest.param(rec, id=n))
    return runs_


@pytest.mark.parametrize("rec", recorded_runs())
def test_rules_agree_with_what_vllm_did(rec):
    """The rules, recomputed now, against vLLM's recorded outcome on the CPU target the run's machine was."""
    env = rec["environment"]
    target = servable.cpu_target(env["cpu_vendor"], env["avx512"], env["amx"], bool(env["zentorch"]))
    assert target == rec["target"]
    predicted = servable.problems(model.load_config(os.path.join(ROOT, rec["float_model"])), rec["quantization"], target)
    assert bool(predicted) == ("refused" in rec), (rec["summary"], predicted)


def test_recorded_runs_are_there():
    assert len(recorded_runs()) >= 2  # Qwen and Kimi W4 g32 sym (results/vllm.md)
