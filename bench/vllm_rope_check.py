"""vLLM's rotary embedding on CPU against a float32 recomputation, in the shapes DeepSeek-V2 / Kimi-VL's MLA
passes it (results/vllm.md, "Custom ops"). Runs in vLLM's own Python, not this project's:

    VLLM_PYTHON bench/vllm_rope_check.py

For GPT-J-style (interleaved) rope, rope dims 16 and 64, 1 to 16 query heads, it prints the largest error of
forward_native and of forward_cpu (the C++ kernel eager mode runs) on a (tokens, heads, dim) query, and of
forward_cpu on the same query flattened to (tokens, heads * dim).
"""

import torch
from vllm.config import VllmConfig, set_current_vllm_config


def reference(positions, x, theta):
    """Interleaved pairs (x[2i], x[2i+1]) rotated by position * theta^(-2i/d), in float32."""
    d = x.shape[-1]
    angle = positions.float()[:, None] * theta ** (-torch.arange(0, d, 2).float() / d)  # (T, d/2)
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)


def main():
    import vllm
    from vllm.model_executor.layers.rotary_embedding import get_rope

    print(f"vLLM {vllm.__version__}, torch {torch.__version__}")
    theta, T = 800000.0, 23
    torch.manual_seed(0)
    with set_current_vllm_config(VllmConfig()):
        for d, heads in ((16, 1), (16, 4), (64, 1), (64, 4), (64, 16)):
            rope = get_rope(d, max_position=4096, is_neox_style=False, dtype=torch.float32,
                            rope_parameters={"rope_theta": theta, "rope_type": "default"})
            pos, q, k = torch.arange(T), torch.randn(T, heads, d), torch.randn(T, 1, d)
            want = reference(pos, q, theta)
            native = rope.forward_native(pos, q.clone(), k.clone())[0]
            cpu = rope.forward_cpu(pos, q.clone(), k.clone())[0]
            flat = rope.forward_cpu(pos, q.clone().reshape(T, -1), k.clone().reshape(T, -1))[0].reshape(T, heads, d)
            print(f"rope dim {d:2d}, {heads:2d} heads: max error native {(native - want).abs().max():.1e}, "
                  f"cpu kernel {(cpu - want).abs().max():.1e}, cpu kernel on the flattened query "
                  f"{(flat - want).abs().max():.1e}")


if __name__ == "__main__":
    main()
