"""Cross-checks bench/peer_convert.py against GPTQModel's own dequantization of the same GPTQ checkpoint.

    GPTQMODEL_PYTHON bench/peer_check_gptq.py --gptq GPTQ_DIR --float FLOAT_DIR

Run it in GPTQModel's environment. FLOAT_DIR is `peer_convert.py --no-fuse --src GPTQ_DIR` (per-expert names, so
the two sides are compared tensor by tensor). The GPTQ folder is loaded by GPTQModel with its pure-torch kernel
(BACKEND.TORCH, in float16: the dtype of its stored scales; its kernel accepts only float16 / bfloat16) and each
quantized linear's `dequantize_weight()` compared with the converter's float32 weight rounded to float16 (the
kernel rounds the product scale * (q - zero) once to its dtype; the converter keeps it exact). The largest
absolute difference over all linears is printed; exit code 1 if it is not 0.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gptq", required=True)
    p.add_argument("--float", required=True)
    a = p.parse_args(argv)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # see peer_side.run_gptqmodel
    import torch
    from gptqmodel import BACKEND, GPTQModel
    from safetensors.torch import load_file

    ours = load_file(os.path.join(a.float, "model.safetensors"))
    m = GPTQModel.load(a.gptq, backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)  # its stored scale dtype
    worst, n = 0.0, 0
    for name, mod in m.model.named_modules():
        if not hasattr(mod, "dequantize_weight"):
            continue
        w = mod.dequantize_weight()  # (in, out), in the kernel's dequantization dtype
        mine = ours[f"{name}.weight"].to(w.dtype)  # ours rounded to that dtype, as the kernel computes in it
        w = w.float()
        mine = mine.float()
        if w.shape != mine.T.shape:
            raise SystemExit(f"{name}: GPTQModel dequantizes to {tuple(w.shape)}, the converter wrote "
                             f"{tuple(mine.shape)} (out, in)")
        worst = max(worst, (w.T - mine).abs().max().item())
        n += 1
    print(f"{n} quantized linears compared; largest |GPTQModel - peer_convert| = {worst:.3g}")
    return 0 if n and worst == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
