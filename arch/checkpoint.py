"""Reading a checkpoint folder: the field spellings of config.json (Hub and transformers-5), the safetensors
files behind a name (Checkpoint: one file or a sharded index, read lazily), and the tensor names: where each
parameter of our module tree comes from (resolve: the Hub's fused Qwen expert tensors included, presence and shape
checked from the headers) and the way back (checkpoint_state_dict). Every error is a CheckpointError naming the
file and the tensor. Does not: build a model (model.load_model) or know a family's fields (qwen3_vl_moe.py,
kimi_vl.py).
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable

import torch
import torch.nn as nn


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or inconsistent. The message names the file/tensor."""


def _pick(d: dict, *names, default=None):
    """First present key among `names` (accepts both the Hub and the transformers-5 spelling)."""
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    return default


def _rope_fields(d: dict, default_theta: float) -> tuple[float, dict]:
    """(theta, extra rope dict) from either `rope_theta`+`rope_scaling` or `rope_parameters`."""
    params = dict(d.get("rope_parameters") or {})
    scaling = dict(d.get("rope_scaling") or {})
    theta = _pick(d, "rope_theta", default=None) or params.get("rope_theta") or default_theta
    return float(theta), {**scaling, **params}


class Checkpoint:
    """Name -> file index over a checkpoint folder (`model.safetensors` or a sharded
    `model.safetensors.index.json`); tensors are read lazily with `safe_open`."""

    def __init__(self, checkpoint_dir: str):
        self.dir = checkpoint_dir
        index = os.path.join(checkpoint_dir, "model.safetensors.index.json")
        single = os.path.join(checkpoint_dir, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            files = ["model.safetensors"]
        else:
            raise CheckpointError(f"{checkpoint_dir}: no model.safetensors or model.safetensors.index.json found")
        self.where: dict[str, str] = {}
        self.handles = {}  # file -> open safe_open handle (a memory map), reopened after release()
        for name in files:
            if not os.path.isfile(os.path.join(checkpoint_dir, name)):
                raise CheckpointError(f"{os.path.join(checkpoint_dir, name)}: listed in the index but missing; "
                                      "re-download the shard")
            for key in self._handle(name).keys():
                self.where[key] = name

    def _handle(self, name: str):
        from safetensors import safe_open

        if name not in self.handles:
            path = os.path.join(self.dir, name)
            try:
                self.handles[name] = safe_open(path, framework="pt")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it may be truncated") from e
        return self.handles[name]

    def release(self):
        """Close the files' memory maps: the pages read so far stop counting in this process's resident memory
        (streaming reads every layer once; kept open, a 48-layer run would map the whole checkpoint)."""
        self.handles.clear()

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def keys(self):
        return self.where.keys()

    def get(self, key: str) -> torch.Tensor:
        name = self.where[key]
        try:
            return self._handle(name).get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{os.path.join(self.dir, name)}: cannot read tensor {key!r} ({e}); "
                                  "the file may be truncated") from e

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(self.where[key]).get_slice(key).get_shape())

    def get_expert(self, key: str, e: int) -> torch.Tensor:
        """Row e of a fused [E, ...] tensor, read without loading the other experts."""
        name = self.where[key]
        try:
            return self._handle(name).get_slice(key)[e]
        except Exception as e_:
            raise CheckpointError(f"{os.path.join(self.dir, name)}: cannot read expert {e} of {key!r} ({e_}); "
                                  "the file may be truncated") from e_


# Tensors present in real checkpoints that the forward pass does not use, skipped by name.
STALE_KEYS = [re.compile(r".*\.rotary_emb\.inv_freq$")]

# Per-expert names in our module tree, which may come from the Hub's fused 3-D tensors instead.
_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def resolve(ckpt: Checkpoint, key: str, shape: tuple[int, ...]) -> tuple[str, Callable[[], torch.Tensor]]:
    """Where parameter `key` (of `shape`) comes from: (checkpoint key, reader). Checks presence and shape from
    the file headers only, so a whole 60 GB checkpoint is validated without reading it.

    Per-expert weights are read either under their own names (`experts.{e}.gate_proj.weight`, the layout
    quantization toolkits write) or from the Hub's fused tensors: `gate_up_proj [E, H, 2I]` (columns [:I] gate,
    [I:] up, used as x @ W) and `down_proj [E, I, H]`."""
    if key in ckpt:
        if ckpt.shape(key) != tuple(shape):
            raise CheckpointError(f"{ckpt.dir}: tensor {key!r} has shape {ckpt.shape(key)}, expected {tuple(shape)} "
                                  "(does config.json match the weights?)")
        return key, lambda: ckpt.get(key)
    m = _EXPERT_KEY.match(key)
    fused = m and (f"{m.group(1)}.down_proj" if m.group(3) == "down_proj" else f"{m.group(1)}.gate_up_proj")
    if not m or fused not in ckpt:
        raise CheckpointError(f"{ckpt.dir}: tensor {key!r} is missing (expected shape {tuple(shape)})")
    e, proj, (out_f, in_f) = int(m.group(2)), m.group(3), shape
    E, a, b = ckpt.shape(fused)
    want = (in_f, out_f) if proj == "down_proj" else (in_f, 2 * out_f)
    if (a, b) != want or e >= E:
        raise CheckpointError(f"{ckpt.dir}: fused tensor {fused!r} has shape {(E, a, b)}, expected "
                              f"(>{e}, {want[0]}, {want[1]}) to provide {key!r}")

    def read():
        W = ckpt.get_expert(fused, e)  # (H, 2I) or (I, H), used as x @ W
        if proj == "down_proj":
            return W.T
        return (W[:, :out_f] if proj == "gate_proj" else W[:, out_f:]).T

    return fused, read


def checkpoint_state_dict(model: nn.Module, keys=None) -> dict[str, torch.Tensor]:
    """The model's weights (or only `keys`) under the family's on-disk names: the inverse of `resolve`. For the
    Qwen family float per-expert weights are fused back into the Hub layout (gate_up_proj [E, H, 2I],
    down_proj [E, I, H]); packed (quantized) experts keep their per-expert names."""
    sd = dict(model.state_dict())
    if keys is not None:
        sd = {k: sd[k] for k in keys}
    if not getattr(model, "fused_experts", False):
        return sd
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key in [k for k in sd if _EXPERT_KEY.match(k)]:
        m = _EXPERT_KEY.match(key)
        groups.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = sd.pop(key)
    for base, experts in groups.items():
        order = [experts[e] for e in range(len(experts))]
        sd[f"{base}.gate_up_proj"] = torch.stack([torch.cat([w["gate_proj"].T, w["up_proj"].T], 1) for w in order])
        sd[f"{base}.down_proj"] = torch.stack([w["down_proj"].T for w in order])
    return sd


def assign(model: nn.Module, key: str, t: torch.Tensor):
    """Replace the parameter at dotted path `key` by `t` (used to swap meta tensors for real ones and back)."""
    mod_name, _, name = key.rpartition(".")
    setattr(model.get_submodule(mod_name), name, nn.Parameter(t, requires_grad=False))
