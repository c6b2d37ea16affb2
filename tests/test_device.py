"""`--device`: every path that takes it keeps its tensors on that device, and `--dtype bfloat16` stores the model in
bf16 while statistics and Hessians accumulate in fp32 / fp64.

On a CPU-only machine a tensor created on the CPU by mistake sits next to CPU data, so a leak passes every
ordinary test and fails (or crawls) only on a GPU. The pipeline tests here therefore run under
device_guard.ExplicitDevice, which raises at any torch factory call without an explicit device: calibrate
(random and MACS), gptq (batched experts with act-order, AWQ, ECMFQ with int8 activations and the vision tower,
VEQ-MA interrupted and resumed) and eval (greedy answers, KL against the float model, perplexity), on the
bundled tiny models, through the CLIs. What the guard cannot see on a CPU (a tensor moved to the CPU on purpose
and left there) is what MOE_VLM_TEST_DEVICE=cuda checks on a GPU: the same tests then run there, the models are
compared with transformers on the CPU, and a quantization on the GPU with the same one on the CPU
(bench/gpu_check.sh runs this file that way). MOE_VLM_TEST_DEVICE=cpu:0 runs those GPU-only tests on the CPU:
they then compare the CPU with itself, a check of the tests' own code.
"""

import json
import os

import pytest
import torch

import calibrate
from data import processor
import gptq
import model
from quant import batched
from quant import grid
import eval as evaluation
import hessian
from quant import folders
from device_guard import ExplicitDevice
from helpers import assert_parity, interrupt_after_layer, random_image as image, user

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN = os.path.join(ROOT, "models", "tiny-qwen3-vl-moe")
KIMI = os.path.join(ROOT, "models", "tiny-kimi-vl")
DEVICE = os.environ.get("MOE_VLM_TEST_DEVICE", "cpu")
on_gpu_only = pytest.mark.skipif(DEVICE == "cpu", reason="compares a MOE_VLM_TEST_DEVICE run with the CPU's")


@pytest.fixture(autouse=True, scope="module")
def exact_float32():
    """No TF32 on a GPU: the parity tolerances are float32's (cuDNN's convolutions use TF32 by default)."""
    if DEVICE == "cpu":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def quantize(out, calib, *args, model_dir=QWEN, device=DEVICE):
    """gptq.py on the tiny model (its closing comparison with the float model only where asked)."""
    argv = ["--model", model_dir, "--calib", str(calib), "--out", str(out), "--device", device, *args]
    return gptq.main(argv if "--eval-n" in args else argv + ["--no-eval"])


def codes(folder) -> dict:
    """Every packed linear of a quantized folder, dequantized (float32, CPU)."""
    m = model.load_model(str(folder))
    return {n: mod.dequantize() for n, mod in m.named_modules() if isinstance(mod, grid.QuantLinear)}


# ----------------------------------------------------------------------------------------------------------
# The pipeline keeps its tensors on the device


def test_qwen_pipeline_creates_no_tensor_off_the_device(tmp_path, monkeypatch):
    calib, macs_calib = tmp_path / "calib", tmp_path / "calib-macs"
    text = tmp_path / "text.txt"
    text.write_text("what color is the circle ? how many shapes are there ? one two three")
    guard = ExplicitDevice()
    with guard:
        calibrate.main(["--model", QWEN, "--n", "4", "--out", str(calib), "--device", DEVICE])
        calibrate.main(["--model", QWEN, "--n", "2", "--select", "macs", "--pool-factor", "2", "--no-gamma",
                        "--out", str(macs_calib), "--device", DEVICE])
        quantize(tmp_path / "gptq", calib, "--method", "gptq", "--bits", "4", "--group-size", "32", "--sym",
                 "--batched-experts", "--eval-n", "4")  # act-order (the default) in the batched solver
        quantize(tmp_path / "awq", calib, "--method", "awq", "--bits", "3", "--group-size", "32")
        quantize(tmp_path / "ecmfq", macs_calib, "--method", "ecmfq", "--bits", "4", "--abits", "8",
                 "--group-size", "-1", "--quantize-vision")  # FAQ's attention hooks, ECS, per-expert GPTQ
        original = interrupt_after_layer(monkeypatch, 0)
        veq = ["--method", "veq-ma", "--bits", "3", "--group-size", "32", "--batched-experts", "--no-act-order"]
        with pytest.raises(KeyboardInterrupt):
            quantize(tmp_path / "veq", calib, *veq)
        monkeypatch.setattr(folders, "print_layer", original)
        quantize(tmp_path / "veq", calib, *veq, "--resume")  # layer 0 restored into QuantLinear shells
        result = evaluation.main(["--model", str(tmp_path / "gptq"), "--reference", QWEN, "--n", "4",
                                  "--max-new-tokens", "4", "--ppl", str(text), "--device", DEVICE])
    assert guard.calls > 1000  # the guard saw the factory calls of the whole run
    assert 0 <= result["kl"]["all"] < 0.05 and 0.5 <= result["top1"]["all"] <= 1
    assert 1 < result["perplexity"] < float("inf")  # of text the tiny model never saw: large, but finite
    with open(tmp_path / "veq" / "report.json") as f:
        assert len(json.load(f)["layers"]) == 4


def test_kimi_pipeline_creates_no_tensor_off_the_device(tmp_path):
    """Kimi-VL's own paths: MLA, sigmoid routing with its fp32 bias, shared experts, the dense first layer,
    MoonViT (its rope and position table) and the projector under --quantize-vision."""
    calib = tmp_path / "calib"
    guard = ExplicitDevice()
    with guard:
        calibrate.main(["--model", KIMI, "--n", "3", "--out", str(calib), "--device", DEVICE])
        quantize(tmp_path / "q", calib, "--method", "veq-ma", "--bits", "4", "--group-size", "32",
                 "--batched-experts", "--quantize-vision", "--eval-n", "3", model_dir=KIMI)
    assert guard.calls > 1000


def test_guard_names_a_factory_call_without_a_device():
    """The guard itself: it raises at the call and names the line, and lets explicit devices through."""
    with ExplicitDevice():
        torch.zeros(2, device="cpu")
        torch.as_tensor(torch.ones(2, device="cpu"))  # a tensor keeps its device
        with pytest.raises(AssertionError, match=r"torch\.arange without device= at .*test_device\.py:\d+"):
            torch.arange(3)
        with pytest.raises(AssertionError, match="torch.as_tensor without device="):
            torch.as_tensor([1.0, 2.0])


def test_batched_cholesky_retry_keeps_its_indices_on_the_device():
    """damped_reverse_cholesky's retry path (an expert whose damped Hessian is indefinite) indexes its CPU-made
    expert list with the device's success mask: an error on a GPU before the fix, not reached by the pipeline."""

    g = torch.Generator(device="cpu").manual_seed(0)
    X = torch.randn(64, 16, generator=g, device="cpu")
    bad = torch.diag(torch.tensor([1.0] * 15 + [-5.0], device="cpu"))  # mean diagonal 0.625: damping 6.25 fixes it
    H = torch.stack([X.T @ X / 64, bad]).to(DEVICE)
    W = torch.randn(2, 8, 16, generator=g, device="cpu").to(DEVICE)
    with ExplicitDevice():
        res = batched.gptq_batched(W, H, bits=4, group_size=-1, percdamp=0.01, max_retries=3)
    assert res[0].retries == 0 and res[1].retries == 3  # damping 1x, 10x, 100x fail; 1000x succeeds
    assert res[1].codes.device.type == torch.device(DEVICE).type


# ----------------------------------------------------------------------------------------------------------
# --dtype bfloat16: bf16 storage, wide accumulation


def test_bfloat16_runs_with_hessians_in_float64(tmp_path, monkeypatch):
    """calibrate.py and gptq.py with --dtype bfloat16: the layers (and the Hessians' inputs) are bf16, every
    Hessian accumulates in float64; the result is close to the float32 run on the same calibration set (the
    oracle: bf16 changes the weights by ~0.4% and the activations likewise, so most codes stay equal)."""
    seen = []

    class Spy(hessian.Hessian):
        def add(self, x, weight=None):
            seen.append((x.dtype, self.S.dtype, x.device.type))
            return super().add(x, weight)

    monkeypatch.setattr(hessian, "Hessian", Spy)
    calib = tmp_path / "calib"
    with ExplicitDevice():
        calibrate.main(["--model", QWEN, "--n", "4", "--out", str(calib), "--device", DEVICE, "--dtype", "bfloat16"])
        report = quantize(tmp_path / "bf16", calib, "--method", "gptq", "--bits", "4", "--group-size", "32",
                          "--eval-n", "4", "--dtype", "bfloat16")
    assert {x for x, _, _ in seen} == {torch.bfloat16} and {s for _, s, _ in seen} == {torch.float64}
    assert {d for _, _, d in seen} == {torch.device(DEVICE).type}
    with open(calib / "calib.json") as f:
        cal = json.load(f)
    assert cal["info"]["dtype"] == "bfloat16" and cal["gamma"] > 0
    quantize(tmp_path / "fp32", calib, "--method", "gptq", "--bits", "4", "--group-size", "32")
    a, b = codes(tmp_path / "bf16"), codes(tmp_path / "fp32")
    same = sum(int((a[k] == b[k]).sum()) for k in a) / sum(b[k].numel() for k in b)
    print(f"\nbf16 vs fp32 run: {same:.2%} of the weights equal")
    assert a.keys() == b.keys() and same > 0.8, f"bf16 and fp32 runs agree on {same:.1%} of the weights"
    errors = [r["rel_error"] for rep in report["layers"].values() for r in rep["linears"].values()]
    assert max(errors) < 0.1


# ----------------------------------------------------------------------------------------------------------
# A device this machine lacks is an error naming the flag


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_names_the_flag(tmp_path):
    with pytest.raises(ValueError, match=r"--device cuda: CUDA is not available"):
        model.load_model(QWEN, device="cuda")
    with pytest.raises(ValueError, match=r"--device cuda: CUDA is not available"):
        calibrate.main(["--model", QWEN, "--n", "2", "--out", str(tmp_path / "c"), "--device", "cuda"])
    with pytest.raises(ValueError, match=r"--device cuda:1: CUDA is not available"):
        gptq.main(["--model", QWEN, "--calib", str(tmp_path / "none"), "--out", str(tmp_path / "q"),
                   "--device", "cuda:1"])
    with pytest.raises(ValueError, match=r"--device 'gpu': not a torch device"):
        evaluation.main(["--model", QWEN, "--n", "2", "--device", "gpu"])
    assert not os.path.exists(tmp_path / "c") and not os.path.exists(tmp_path / "q")


# ----------------------------------------------------------------------------------------------------------
# On a GPU (MOE_VLM_TEST_DEVICE=cuda): transformers parity, and the same quantization as on the CPU


def ours(m, enc, keys):
    vision = {k: enc[k].to(m.device) for k in keys if k in enc}
    mask = enc.get("attention_mask")
    return m(enc["input_ids"].to(m.device), attention_mask=None if mask is None else mask.to(m.device),
             **vision).cpu()


@pytest.fixture(scope="module")
def kimi_oracle(tmp_path_factory):
    from kimi_helpers import make_tiny_kimi

    return make_tiny_kimi(tmp_path_factory.mktemp("ckpt") / "tiny-kimi", seed=0)


@on_gpu_only
def test_qwen_parity_with_transformers_on_the_device(tiny_qwen, hf_qwen):
    m, proc = model.load_model(tiny_qwen, device=DEVICE), processor.load_processor(tiny_qwen)
    keys = ("pixel_values", "image_grid_thw")
    e1 = proc.encode(user(None, "what color is the circle ?"), [image(48, 64, 0)])
    e2 = proc.encode(user(None, "describe", None, "and this one"), [image(48, 64, 1), image(40, 90, 2)])
    e3 = proc.encode(user("how many shapes are there ? one two three"))
    e4 = proc.encode(user(None, "how many shapes are there ? one two three four"), [image(40, 90, 2)])
    for enc in (e1, e2, e3, processor.pad_batch([e1, e4], side="left")):
        kw = dict(input_ids=enc["input_ids"], attention_mask=enc.get("attention_mask"))
        if "pixel_values" in enc:
            kw.update(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"],
                      mm_token_type_ids=enc["is_vis"].int())
        with torch.no_grad():
            want = hf_qwen(**kw).logits
        keep = enc["attention_mask"].bool() if enc["input_ids"].shape[0] > 1 else None
        assert_parity(want, ours(m, enc, keys), keep=keep)
    m16 = model.load_model(tiny_qwen, device=DEVICE, dtype=torch.bfloat16)
    a, b = ours(m, e1, keys), ours(m16, e1, keys)
    assert b.dtype == torch.float32 and (a - b).abs().max() < 0.1 * a.abs().max()


@on_gpu_only
def test_kimi_parity_with_transformers_on_the_device(kimi_oracle):
    path, hf = kimi_oracle
    m, proc = model.load_model(path, device=DEVICE), processor.load_processor(path)
    for enc in (proc.encode(user(None, "what color is the circle ?", None, "and here"),
                            [image(165, 150, 0), image(60, 50, 1)]),
                proc.encode(user("how many shapes are there ? one two three"))):
        kw = dict(input_ids=enc["input_ids"], attention_mask=enc.get("attention_mask"))
        if "pixel_values" in enc:
            g = enc["image_grid_hws"]
            kw.update(pixel_values=enc["pixel_values"], image_grid_thw=torch.cat([torch.ones_like(g[:, :1]), g], 1))
        with torch.no_grad():
            want = hf(**kw).logits
        assert_parity(want, ours(m, enc, ("pixel_values", "image_grid_hws")))


@on_gpu_only
def test_quantization_on_the_device_matches_the_cpu(tmp_path):
    """The same calibration set, GPTQ (act-order) and batched GPTQ on DEVICE and on the CPU: float rounding
    differs between the two, which flips a few rounding ties; the codes must still agree almost everywhere."""
    calib = tmp_path / "calib"
    calibrate.main(["--model", QWEN, "--n", "4", "--out", str(calib), "--device", "cpu"])
    for extra in ([], ["--batched-experts"]):
        args = ["--method", "gptq", "--bits", "4", "--group-size", "32", *extra]
        quantize(tmp_path / "dev", calib, *args)
        quantize(tmp_path / "cpu", calib, *args, device="cpu")
        a, b = codes(tmp_path / "dev"), codes(tmp_path / "cpu")
        same = sum(int((a[k] == b[k]).sum()) for k in a) / sum(b[k].numel() for k in b)
        print(f"\n{DEVICE} vs cpu, gptq {' '.join(extra)}: {same:.4%} of the weights equal")
        assert same > 0.95
