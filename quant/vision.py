"""--quantize-vision: the vision tower's and projector's linears, quantized before the decoder loop, so the decoder
is calibrated on the quantized tower's features. Each linear from the Hessian of its inputs on the calibration
images (unweighted, every patch), with the run's solver (GPTQ, or RTN for the RTN methods); the patch embedding
stays float. Called by gptq.py's quantize_model; tests: tests/test_pipeline.py, tests/test_distributed.py.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from data.processor import vision_inputs
from hessian import Hessian, relative_output_error
from quant import distributed
from quant.grid import QuantLinear


def quantize_vision_tower(m, samples: list[dict], q, solve: Callable,
                          group: distributed.Group = distributed.SINGLE) -> dict:
    """Quantize every nn.Linear of m's vision modules in place; returns the report (tokens, relative output error
    per linear). samples: calib/'s encoded samples (this rank's share); solve(Ws, H, name) -> [Quantized]. With
    several processes the linears are solved round-robin over the ranks, each from the Hessian summed over all
    ranks, and shared."""
    linears = {f"v{j}.{n}": (root, n, mod) for j, root in enumerate(m.vision_modules())
               for n, mod in root.named_modules() if isinstance(mod, nn.Linear)}  # report key -> where it is
    H = {k: Hessian(mod.in_features, dtype=torch.float64, device=mod.weight.device)
         for k, (_, _, mod) in linears.items()}
    handles = [mod.register_forward_pre_hook(lambda mod_, a, k=k: H[k].add(a[0]))
               for k, (_, _, mod) in linears.items()]
    try:
        with torch.no_grad():
            for s in samples:
                if "pixel_values" in s:
                    vision = {k: v.to(m.device) for k, v in vision_inputs(s).items()}
                    m.embed(s["input_ids"].to(m.device), **vision)
    finally:
        for h in handles:
            h.remove()
    owner = {k: j % group.world for j, k in enumerate(linears)}
    if group.active:  # each Hessian summed on the rank that solves it
        distributed.reduce_hessians(group, H, owner, {k: mod.in_features for k, (_, _, mod) in linears.items()})
    report = {}
    for k, (root, name, lin) in linears.items():
        if owner[k] != group.rank:  # another process solves it
            continue
        Hk, W = H[k].finalize(), lin.weight.float()
        (r,) = solve([W], Hk.float(), k)
        ql = QuantLinear.from_codes(r.codes, r.scale, r.zero, bits=q.bits, group_size=q.group_size,
                                    sym=q.sym, bias=None if lin.bias is None else lin.bias.float())
        root.set_submodule(name, ql.to(lin.weight.device))
        report[k] = {"tokens": H[k].n_tokens, "rel_error": relative_output_error(W, r.W_hat, Hk)}
    if group.active:  # every rank gets the others' packed linears and report entries
        report = distributed.share_linears(
            group, {k: (root, name) for k, (root, name, _) in linears.items()}, owner, report,
            lambda lin: QuantLinear(lin.in_features, lin.out_features, bits=q.bits, group_size=q.group_size,
                                    sym=q.sym, bias=lin.bias is not None))
    return report
