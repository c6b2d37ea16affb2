"""Packed quantized weights: the compressed-tensors `pack-quantized` layout, run by dequantizing on the fly.
Codes are unsigned b-bit integers (compressed-tensors' signed codes + 2^(b-1)); Ŵ = scale · (code - zero) per
output row and group of `group_size` input columns (gptq.py computes them). Packing: the codes of one row form
a little-endian bit stream (code i at bits [i·b, (i+1)·b)) cut into int32 words, ceil(n·b/32) words per row.
For b = 2, 4, 8 that is 32/b whole codes per word, the layout vLLM loads. For b = 3, 32 codes fill 3 words
and a code may straddle two words: the dense layout compressed-tensors >= 0.20 writes and reads (checked in
tests/test_gptq.py); vLLM's kernels do not run 3-bit weights, so 3-bit checkpoints load here only.

Also the runtime: QuantLinear (dequantize on the fly, optional per-token int8 activations; `torch.compile` path
with use_compiled_quant_linear), dequantize_once for a layer run many times.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


PACK_BITS = (2, 3, 4, 8)
_WORD_BITS = 32
_WORD_MASK = (1 << _WORD_BITS) - 1


def _bit_positions(n: int, bits: int, device):
    """Word index and bit shift (n,) of each of n codes in a row's bit stream."""
    start = torch.arange(n, device=device, dtype=torch.int64) * bits
    return start // _WORD_BITS, start % _WORD_BITS


def _check_pack_bits(bits: int):
    if bits not in PACK_BITS:
        raise ValueError(f"packing: bits={bits} is not supported; use one of {PACK_BITS}")


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer codes (..., n), each < 2^bits, along the last dim into int32 (..., ceil(n·bits/32))."""
    _check_pack_bits(bits)
    n = codes.shape[-1]
    v = codes.reshape(-1, n).to(torch.int64)  # (rows, n)
    if codes.is_floating_point() or bool(((v < 0) | (v >= 2**bits)).any()):
        raise ValueError(f"pack_int32: codes must be integers in [0, {2**bits - 1}] for bits={bits}")
    n_words = math.ceil(n * bits / _WORD_BITS)
    word, shift = _bit_positions(n, bits, codes.device)
    v = v << shift  # < 2^39, so each code spans at most two words
    words = torch.zeros(v.shape[0], n_words + 1, dtype=torch.int64, device=codes.device)
    words.index_add_(1, word, v & _WORD_MASK)  # the low part, in the code's own word
    words.index_add_(1, word + 1, v >> _WORD_BITS)  # the part that spills into the next word (bits never overlap)
    words = words[:, :n_words]
    words = torch.where(words > _WORD_MASK >> 1, words - (1 << _WORD_BITS), words)  # as signed 32-bit
    return words.to(torch.int32).reshape(*codes.shape[:-1], n_words)


def unpack_int32(packed: torch.Tensor, bits: int, shape) -> torch.Tensor:
    """Inverse of pack_int32: int32 (..., ceil(n·bits/32)) -> uint8 codes of the original `shape` (..., n)."""
    _check_pack_bits(bits)
    shape = tuple(int(s) for s in shape)
    n, n_words = shape[-1], math.ceil(shape[-1] * bits / _WORD_BITS)
    if packed.dtype != torch.int32 or packed.shape[-1] != n_words or packed.shape[:-1] != shape[:-1]:
        raise ValueError(f"unpack_int32: packed {packed.dtype} {tuple(packed.shape)} does not hold {shape} at "
                         f"{bits} bits (expected int32 (..., {n_words}))")
    if _WORD_BITS % bits == 0:  # 2, 4, 8 bits: whole codes per word, code j at bits [j·bits, (j+1)·bits)
        shifts = torch.arange(0, _WORD_BITS, bits, device=packed.device, dtype=torch.int32)
        v = (packed.reshape(-1, n_words, 1) >> shifts) & ((1 << bits) - 1)  # the mask drops the sign fill
        return v.reshape(-1, n_words * len(shifts))[:, :n].to(torch.uint8).reshape(shape)
    p = packed.reshape(-1, n_words).to(torch.int64) & _WORD_MASK  # (rows, n_words) as unsigned words
    p = F.pad(p, (0, 1))  # a zero word at the end, so every code has a "next word"
    word, shift = _bit_positions(n, bits, packed.device)
    v = ((p[:, word] | (p[:, word + 1] << _WORD_BITS)) >> shift) & ((1 << bits) - 1)  # (rows, n)
    return v.to(torch.uint8).reshape(shape)


def fake_quant_act(x: torch.Tensor, *, bits: int = 8) -> torch.Tensor:
    """Per-token dynamic symmetric fake quantization of activations x (..., d), as vLLM's dynamic int8 path:
    s = max|x| / (2^(bits-1) - 1) per token, x̂ = round(x / s) · s with codes in ±(2^(bits-1) - 1) (-2^(bits-1)
    is never produced, since |x| <= max|x|). Computed in float32, returned in x's dtype. Same math as
    ecs.fake_quant_act, which the scale search uses on (n, d) tensors without importing this file."""
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True) / qmax  # (..., 1)
    s = torch.where(s == 0, torch.ones_like(s), s)  # an all-zero token: any scale gives zeros back
    return (torch.clamp(torch.round(xf / s), -qmax, qmax) * s).to(x.dtype)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    """A Parameter without grad: the loader (`assign`) swaps Parameters, whatever their dtype."""
    return nn.Parameter(t, requires_grad=False)


def _expand_groups(t: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """Per-group (out, n_groups) -> per-column (out, in); group_size -1 means one group per row."""
    return t.repeat_interleave(in_features if group_size == -1 else group_size, dim=1)[:, :in_features]


def quant_linear_forward(ql: "QuantLinear", x):
    """What a QuantLinear computes: optional per-token activation fake-quant, dequantize, F.linear."""
    if ql.abits is not None:
        x = fake_quant_act(x, bits=ql.abits)
    W = getattr(ql, "W_once", None)  # set by dequantize_once
    W = ql.dequantize() if W is None else W
    return F.linear(x, W.to(x.dtype), None if ql.bias is None else ql.bias.to(x.dtype))


@contextlib.contextmanager
def dequantize_once(module: nn.Module):
    """Inside the block, every QuantLinear of `module` uses its weight dequantized once on entry instead of on
    every forward (the same values): the quantization driver runs each finished layer over every calibration
    sample, and at 128 experts re-dequantizing per sample took ~60 s of a layer's ~200 s. Costs the float
    weights' memory while inside."""
    qls = [mod for mod in module.modules() if isinstance(mod, QuantLinear)]
    for ql in qls:
        ql.W_once = ql.dequantize()
    try:
        yield
    finally:
        for ql in qls:
            del ql.W_once


# The function every QuantLinear calls. `use_compiled_quant_linear()` swaps in a torch.compile'd version at the
# call site (the CLI's --compile); nothing compiled is stored in the modules or the checkpoint.
QUANT_LINEAR_FN = {"fn": quant_linear_forward}


COMPILE_GRAPHS = 64  # graphs torch.compile may build for quant_linear_forward


def use_compiled_quant_linear(enabled: bool = True):
    """Route every QuantLinear through torch.compile(quant_linear_forward), or back to the eager function.
    Dynamo specializes on each linear's int attributes (features, bits) and the input's rank, so a model needs
    more graphs than its default limit of 8; past the limit it would silently run the rest eager. The limit is
    raised to COMPILE_GRAPHS and hitting it raises instead."""
    if enabled:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_GRAPHS)
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    QUANT_LINEAR_FN["fn"] = torch.compile(quant_linear_forward, dynamic=True) if enabled else quant_linear_forward


class QuantLinear(nn.Module):
    """A bias-optional linear layer whose weight is stored packed and dequantized on every forward (plain torch
    ops, then F.linear). Tensors under compressed-tensors' names:
      weight_packed (out, ceil(in·bits/32)) int32; weight_scale (out, n_groups);
      weight_zero_point (ceil(out·bits/32), n_groups) int32, packed along the output dim (asymmetric only);
      weight_shape (2,) = (out, in).
    group_size -1 means one group per output row. abits: fake-quantize the inputs per token (fake_quant_act).
    device: where the tensors are made (None: torch's default device, the meta device inside model.load_model)."""

    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int, sym: bool,
                 abits: int | None = None, bias: bool = False, scale_dtype=torch.float32, device=None):
        super().__init__()
        _check_pack_bits(bits)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym, self.abits = bits, group_size, sym, abits
        g = in_features if group_size == -1 else group_size
        n_groups = math.ceil(in_features / g)
        self.weight_packed = _frozen(torch.zeros(out_features, math.ceil(in_features * bits / _WORD_BITS),
                                                 dtype=torch.int32, device=device))
        self.weight_scale = _frozen(torch.ones(out_features, n_groups, dtype=scale_dtype, device=device))
        self.weight_zero_point = None if sym else _frozen(
            torch.zeros(math.ceil(out_features * bits / _WORD_BITS), n_groups, dtype=torch.int32, device=device))
        self.weight_shape = _frozen(torch.tensor([out_features, in_features], device=device))
        self.bias = _frozen(torch.zeros(out_features, dtype=scale_dtype, device=device)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_codes(cls, codes, scale, zero, *, bits: int, group_size: int, sym: bool, abits: int | None = None,
                   bias: torch.Tensor | None = None) -> "QuantLinear":
        """Build from unsigned codes (out, in), scale (out, n_groups) and zero (out, n_groups) (None iff sym),
        as gptq.rtn / gptq.gptq return them; packed on the codes' device (no round trip through the CPU)."""
        if (zero is None) != sym:
            raise ValueError(f"QuantLinear.from_codes: sym={sym} but zero is {'None' if zero is None else 'given'}"
                             " (symmetric weights have no zero point; asymmetric ones need one)")
        out_features, in_features = codes.shape
        m = cls(in_features, out_features, bits=bits, group_size=group_size, sym=sym, abits=abits,
                bias=bias is not None, scale_dtype=scale.dtype, device=codes.device)
        if tuple(scale.shape) != tuple(m.weight_scale.shape):
            raise ValueError(f"QuantLinear.from_codes: scale {tuple(scale.shape)} does not match codes "
                             f"{tuple(codes.shape)} with group_size={group_size} (expected {tuple(m.weight_scale.shape)})")
        m.weight_packed.copy_(pack_int32(codes, bits))
        m.weight_scale.copy_(scale)
        if not sym:
            m.weight_zero_point.copy_(pack_int32(zero.T, bits).T)  # packed along the output dim
        if bias is not None:
            m.bias.copy_(bias)
        return m

    def dequantize(self) -> torch.Tensor:
        """Ŵ (out, in) = scale · (code - zero), in weight_scale's dtype."""
        out_f, in_f = self.out_features, self.in_features
        codes = unpack_int32(self.weight_packed, self.bits, (out_f, in_f))
        scale, n_groups = self.weight_scale, self.weight_scale.shape[1]  # (out, n_groups)
        if self.sym:
            zero = torch.full_like(scale, 2 ** (self.bits - 1))
        else:
            zero = unpack_int32(self.weight_zero_point.T, self.bits, (n_groups, out_f)).T.to(scale.dtype)
        g = in_f if self.group_size == -1 else self.group_size
        if in_f == n_groups * g:  # whole groups: (out, n_groups, g) views, no per-column copies of scale / zero
            w = codes.view(out_f, n_groups, g).to(scale.dtype)
            return ((w - zero[..., None]) * scale[..., None]).view(out_f, in_f)
        scale, zero = (_expand_groups(t, in_f, self.group_size) for t in (scale, zero))  # a ragged last group
        return (codes.to(scale.dtype) - zero) * scale

    def forward(self, x):
        return QUANT_LINEAR_FN["fn"](self, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, abits={self.abits}")
