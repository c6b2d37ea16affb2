"""A guard for the tests that check that a `--device` run keeps its tensors on that device.

On a CPU-only machine a tensor created without `device=` lands on the CPU, which is also where the data is, so a
leak (a Hessian accumulated on the CPU while the activations are on the GPU) passes every CPU test and fails,
or is slow, only on a GPU. ExplicitDevice turns such a creation into an error here: inside it, every torch
factory call (zeros, ones, arange, tensor, eye, ...) must name its device, or take its data from a tensor
(torch.as_tensor of a tensor keeps that tensor's device). The error names the file and line of the call.

Why not `torch.set_default_device("meta")` (tried first): tensors created without a device then land on the
meta device, but several CPU kernels accept a meta operand without checking it and read whatever memory is there
(`cpu_tensor[torch.arange(2)]` and `cpu.addmm_(cpu, meta)` return garbage instead of raising), so a leak could
pass silently; this guard raises at the line that creates the tensor.

Calls made by torch's own Python code are not checked (its internals are not this project's to fix), nor are
`torch.from_numpy` (always a CPU tensor: the processor's pixels, moved to the device by the callers) and CPU
generators.
"""

from __future__ import annotations

import os
import sys

import torch
from torch.overrides import TorchFunctionMode

FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.linspace, torch.logspace,
             torch.eye, torch.tensor, torch.rand, torch.randn, torch.randint, torch.randperm, torch.empty_strided,
             torch.scalar_tensor, torch.tril_indices, torch.triu_indices}
_TORCH_DIR = os.path.dirname(torch.__file__)
_HERE = os.path.abspath(__file__)


def _caller():
    """The first frame outside this file and outside torch: (filename, line, in_torch) of the call."""
    f = sys._getframe(2)
    while f is not None and os.path.abspath(f.f_code.co_filename) == _HERE:
        f = f.f_back
    first = f
    in_torch = first is not None and first.f_code.co_filename.startswith(_TORCH_DIR)
    while f is not None and f.f_code.co_filename.startswith(_TORCH_DIR):
        f = f.f_back
    where = f"{f.f_code.co_filename}:{f.f_lineno}" if f is not None else "?"
    return where, in_torch


class ExplicitDevice(TorchFunctionMode):
    """Raise on every torch factory call without an explicit `device=` (see the module docstring).
    `calls` counts the factory calls checked (so a test can see the guard was active); collect=True records the
    call sites in `leaks` (where -> function name) instead of raising."""

    def __init__(self, collect: bool = False):
        super().__init__()
        self.calls, self.collect, self.leaks = 0, collect, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        implicit = func in FACTORIES and kwargs.get("device") is None
        if func is torch.as_tensor and kwargs.get("device") is None and not isinstance(args[0], torch.Tensor):
            implicit = True
        if implicit:
            where, in_torch = _caller()
            if not in_torch and self.collect:
                self.leaks[where] = func.__name__
            elif not in_torch:
                raise AssertionError(f"torch.{func.__name__} without device= at {where}: on a GPU run this tensor "
                                     "would be on the CPU; pass device= (the data's or the model's device)")
        if func in FACTORIES or func is torch.as_tensor:
            self.calls += 1
        return func(*args, **kwargs)
