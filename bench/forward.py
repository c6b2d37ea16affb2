"""Prefill throughput of the hand-written forward versus transformers on the same checkpoint.

Builds a small random Qwen3-VL-MoE checkpoint in the Hub layout (needs the test extra: transformers), runs
one prompt of a few hundred tokens with an image through both implementations (fp32, no grad), and prints
tokens/s for each and their ratio (ours / transformers; >= 1.0 means the hand-written model is no slower).
Also prints the max |logit difference| on that prompt, so the speed is for the same function.

    python bench/forward.py [--repeats 5] [--threads 2]
"""

import argparse
import os
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from data import processor  # noqa: E402
import model  # noqa: E402
from bench.timing import best_time  # noqa: E402
from helpers import make_tiny_qwen  # noqa: E402

# H != 2I, or the Hub and runtime expert layouts cannot be told apart (docs/architectures.md §4)
TEXT = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
            moe_intermediate_size=96, num_experts=16, num_experts_per_tok=4,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [6, 5, 5],
                             "mrope_interleaved": True})
VISION = dict(depth=4, hidden_size=128, num_heads=4, intermediate_size=256, patch_size=16,
              num_position_embeddings=256, deepstack_visual_indexes=[1, 2, 3])
PRE = dict(patch_size=16, size={"shortest_edge": 64 * 64, "longest_edge": 1024 * 1024})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per implementation (best is reported)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import Qwen3VLMoeForConditionalGeneration

    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_qwen(os.path.join(tmp, "bench-qwen"), seed=0, preprocessor=PRE, vision=VISION, **TEXT)
        ours = model.load_model(path, dtype=torch.float32)
        ref = Qwen3VLMoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        proc = processor.load_processor(path)
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (448, 512, 3), dtype=np.uint8))
        question = "what color is the circle ? how many shapes are there ? " * 4
        enc = proc.encode([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                          [img])
        T = enc["input_ids"].shape[1]
        vis = dict(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"])

        with torch.no_grad():
            run_ours = lambda: ours(enc["input_ids"], **vis)  # noqa: E731
            run_ref = lambda: ref(input_ids=enc["input_ids"], mm_token_type_ids=enc["is_vis"].int(), **vis).logits  # noqa: E731
            diff = (run_ours() - run_ref()).abs().max().item()
            t_ours, t_ref = best_time(run_ours, args.repeats), best_time(run_ref, args.repeats)
    print(f"prompt: {T} tokens ({int(enc['is_vis'].sum())} image tokens), fp32, {args.threads} threads, "
          f"best of {args.repeats}")
    print(f"max |dlogit| ours vs transformers: {diff:.2e}")
    print(f"{'implementation':<16}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'hand-written':<16}{t_ours:>10.4f}{T / t_ours:>12.1f}")
    print(f"{'transformers':<16}{t_ref:>10.4f}{T / t_ref:>12.1f}")
    print(f"forward: ratio={t_ref / t_ours:.2f} (ours tokens/s / transformers tokens/s; target >= 1.0)")


if __name__ == "__main__":
    main()
