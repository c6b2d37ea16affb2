import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """A tiny random Qwen3-VL-MoE checkpoint in the Hub layout (fused experts [E, H, 2I] / [E, I, H])."""
    from helpers import make_tiny_qwen

    return make_tiny_qwen(tmp_path_factory.mktemp("ckpt") / "tiny-qwen", seed=0)


@pytest.fixture(scope="session")
def hf_qwen(tiny_qwen):
    """transformers' Qwen3VLMoeForConditionalGeneration on the same Hub-layout files (the oracle)."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    return Qwen3VLMoeForConditionalGeneration.from_pretrained(tiny_qwen, dtype=torch.float32).eval()
