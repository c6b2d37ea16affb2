"""The vLLM-shaped bundled Kimi (models/tiny-kimi-vl-vllm): its remote-code processor, loaded the way vLLM loads it
(transformers' AutoProcessor with trust_remote_code), gives exactly data/processor.py's input ids, pixel values
and grids; its shapes are the ones vLLM's CPU build runs (quant/servable.py); model.py loads it.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_kimi_remote_code.py
"""

import filecmp
import os

import pytest
import torch
from PIL import Image

from data import processor
from data import samples as data_samples
import model
from quant import servable

transformers = pytest.importorskip("transformers", reason="test extra: pip install transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIMI_VLLM = os.path.join(ROOT, "models", "tiny-kimi-vl-vllm")
CODE = os.path.join(ROOT, "tools", "kimi_vl_processor")


@pytest.fixture(scope="module")
def both():
    hf = transformers.AutoProcessor.from_pretrained(KIMI_VLLM, trust_remote_code=True)
    return hf, processor.load_processor(KIMI_VLLM)


def test_the_checkpoint_ships_the_code_in_tools():
    names = sorted(n for n in os.listdir(CODE) if n.endswith(".py"))
    assert names == ["image_processing_kimi_vl.py", "processing_kimi_vl.py"]
    assert all(filecmp.cmp(os.path.join(CODE, n), os.path.join(KIMI_VLLM, n), shallow=False) for n in names)


def hf_encode(hf, text, images):
    out = hf(text=text, images=images or None)
    ids = out["input_ids"][0]
    return {"input_ids": torch.as_tensor(ids).reshape(1, -1), **{k: out[k] for k in out if k != "input_ids"}}


def test_remote_code_processor_equals_data_processor(both):
    hf, ours = both
    images = [Image.new("RGB", (100, 37), (200, 30, 30)), Image.linear_gradient("L").resize((700, 500)),
              Image.new("RGBA", (9, 70), (0, 0, 255, 128))]  # padding, shrinking past in_token_limit, alpha
    cases = [(s, [s.image] if s.image is not None else []) for s in data_samples.load_samples("shapes", n=60, seed=0)]
    checked = 0
    for s, ims in cases + [(None, [im]) for im in images]:
        q = processor.question_text(s) if s is not None else "What is shown?"
        text = ours.chat_text([{"role": "user", "content": [{"type": "image"}] * len(ims) + [{"type": "text", "text": q}]}])
        a, b = hf_encode(hf, text, [processor.load_image(im) for im in ims]), ours.encode_text(text, ims)
        assert torch.equal(a["input_ids"], b["input_ids"]), q
        if ims:
            assert torch.equal(a["image_grid_hws"], b["image_grid_hws"])
            assert torch.equal(a["pixel_values"], b["pixel_values"])  # bitwise: the same float32 arithmetic
            checked += 1
    assert checked >= 40


def test_shapes_vllm_runs_on_cpu_and_model_py_loads():
    cfg = model.load_config(KIMI_VLLM)
    assert cfg.text.kv_lora_rank + cfg.text.qk_rope_head_dim == servable.CPU_MLA_LATENT
    assert all(x % 32 == 0 for lin in servable.quantized_linears(cfg, False) for x in (lin.n_in, lin.n_out))
    w4 = servable.problems(cfg, dict(bits=4, group_size=32, sym=True, abits=16), "cpu-zentorch")
    assert w4 and all("routing" in p for p in w4)  # only the experts' routing stops W4 g32 on vLLM's CPU build
    m = model.load_model(KIMI_VLLM)
    assert m.layers[0].self_attn.kv_a_proj_with_mqa.weight.shape[0] == 576


def test_gptq_output_keeps_the_remote_code(tmp_path):
    """vLLM's Kimi-VL loads the processor from the quantized folder too: gptq.py copies the checkpoint's .py files."""
    import calibrate
    import gptq

    calib, out = tmp_path / "calib", tmp_path / "q"
    calibrate.main(["--model", KIMI_VLLM, "--n", "2", "--out", str(calib), "--no-gamma"])
    gptq.main(["--model", KIMI_VLLM, "--calib", str(calib), "--method", "rtn", "--bits", "4", "--sym",
               "--group-size", "32", "--no-eval", "--out", str(out)])
    for n in ("image_processing_kimi_vl.py", "processing_kimi_vl.py", "processor_config.json"):
        assert filecmp.cmp(os.path.join(KIMI_VLLM, n), out / n, shallow=False), n
