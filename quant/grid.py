"""The quantizer grid, in one place: group parameters, quantize, dequantize, round-to-nearest, the packed
int32 storage (compressed-tensors `pack-quantized`), and QuantLinear, the runtime linear that dequantizes it.
Both GPTQ solvers (gptq.py, quant/batched.py), the scale searches (ecs.py), the model loader (model.py) and the
exporter (quant/folders.py) use these functions; nothing else computes a grid.

Grid (the IST-DASLab GPTQ reference's and compressed-tensors'):
  codes are unsigned integers in [0, 2^bits - 1]; Ŵ = scale · (code - zero), one (scale, zero) per output row
  and group of `group_size` consecutive input columns (-1: one group spanning the row, "per channel").
  asymmetric: the range [min(w, 0), max(w, 0)] is cut into 2^bits - 1 steps, zero = round(-min / scale);
  symmetric:  scale = max|w| / ((2^bits - 1) / 2), zero = 2^(bits-1) fixed (not stored).
  compressed-tensors stores signed codes (code - 2^(bits-1)) and adds the offset back when packing, so the
  packed int32 words are identical.
Packing: the codes of one row form a little-endian bit stream (code i at bits [i·b, (i+1)·b)) cut into int32
words, ceil(n·b/32) words per row. For b = 2, 4, 8 that is 32/b whole codes per word, the layout vLLM loads.
For b = 3, 32 codes fill 3 words and a code may straddle two words: the dense layout compressed-tensors >= 0.20
writes and reads (tests/test_gptq.py); vLLM's kernels do not run 3-bit weights, so 3-bit checkpoints load here only.
Activations (W4A8): per-token dynamic symmetric fake quantization, as vLLM's dynamic int8 path (fake_quant_act).

Also what both GPTQ solvers return and raise (Quantized, GPTQError, DAMP_ESCALATION), so that neither imports
the other. Read next: quant/folders.py (where the packed layers go on disk).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

BITS = (2, 3, 4, 8)  # supported weight widths (quantized and packed)
DAMP_ESCALATION = 10.0  # each Cholesky retry of a GPTQ solver multiplies the damping by this
_WORD_BITS = 32
_WORD_MASK = (1 << _WORD_BITS) - 1


class GPTQError(RuntimeError):
    """The damped Hessian could not be Cholesky-factorized at any damping tried. The message names the
    matrix, its shape and the dampings."""


# ----------------------------------------------------------------------------------------------------------
# The grid


def check_bits(bits: int, name: str):
    if bits not in BITS:
        raise ValueError(f"{name}: bits={bits} is not supported; use one of {BITS}")


def check_grid(bits: int, group_size: int, name: str):
    check_bits(bits, name)
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"{name}: group_size={group_size}; use a positive group size or -1 (per output channel)")


def n_groups(in_features: int, group_size: int) -> int:
    """Number of column groups per row; a last partial group is allowed (ceil)."""
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def group_len(in_features: int, group_size: int) -> int:
    """Columns per group (the whole row for group_size -1)."""
    return in_features if group_size == -1 else group_size


def expand(t: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """Per-group (out, n_groups) -> per-column (out, in)."""
    return t.repeat_interleave(group_len(in_features, group_size), dim=1)[:, :in_features]


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other dtype (bfloat16 weights are solved in float32)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


CLIP_GRID, CLIP_MAX_SHRINK, CLIP_NORM = 100, 0.8, 2.4  # --clip: the GPTQ reference's Quantizer(mse=True)


def quant_params(W: torch.Tensor, *, bits: int, sym: bool, dim: int = -1,
                 clip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """scale, zero (out,) for one group of columns W (out, g) (or (..., g) -> (...); the group along `dim`).
    zero is integer-valued (float tensor). clip: shrink the range, clip_search."""
    lo, hi = W.amin(dim=dim), W.amax(dim=dim)
    zeros = torch.zeros_like(lo)
    xmin = torch.minimum(lo, zeros)  # the range always contains 0, so zero lands in [0, maxq]
    xmax = torch.maximum(hi, zeros)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = xmax == xmin  # an all-zero row: any scale works; the reference uses [-1, 1]
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    if clip:
        return clip_search(W.movedim(dim, -1), xmin, xmax, bits=bits, sym=sym)
    return range_params(xmin, xmax, bits=bits, sym=sym)


def range_params(xmin: torch.Tensor, xmax: torch.Tensor, *, bits: int, sym: bool):
    """scale, zero of the grid spanning [xmin, xmax] (xmin <= 0 <= xmax)."""
    scale = (xmax - xmin) / (2**bits - 1)
    zero = torch.full_like(scale, 2 ** (bits - 1)) if sym else torch.round(-xmin / scale)
    return scale, zero


def clip_search(W: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, *, bits: int, sym: bool):
    """MSE clipping (GPTQ reference, Quantizer.find_params with mse=True): the grid of p·[xmin, xmax] for
    p = 1, 1 − 1/CLIP_GRID, ... (CLIP_MAX_SHRINK · CLIP_GRID steps), keeping per row the p with the least
    Σ_j |w_j − ŵ_j|^CLIP_NORM over the group W (..., g); ties keep the wider range."""
    best = scale = zero = None
    for i in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
        s, z = range_params((1 - i / CLIP_GRID) * xmin, (1 - i / CLIP_GRID) * xmax, bits=bits, sym=sym)
        q = torch.clamp(torch.round(W / s[..., None]) + z[..., None], 0, 2**bits - 1)
        err = ((q - z[..., None]) * s[..., None] - W).abs().pow(CLIP_NORM).sum(-1)
        if best is None:
            best, scale, zero = err, s, z
        else:
            better = err < best
            best, scale = torch.where(better, err, best), torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
    return scale, zero


def group_params(W: torch.Tensor, *, bits: int, group_size: int, sym: bool,
                 clip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """scale, zero (out, n_groups) for W (out, in), groups of `group_size` consecutive columns (-1: one)."""
    params = [quant_params(Wg, bits=bits, sym=sym, clip=clip)
              for Wg in W.split(group_len(W.shape[1], group_size), dim=1)]
    return torch.stack([s for s, _ in params], 1), torch.stack([z for _, z in params], 1)


def quantize(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *, bits: int, group_size: int):
    """Integer codes (out, in) uint8 in [0, 2^bits - 1]: clamp(round(W / scale) + zero)."""
    s, z = expand(scale, W.shape[1], group_size), expand(zero.to(scale.dtype), W.shape[1], group_size)
    return torch.clamp(torch.round(W / s) + z, 0, 2**bits - 1).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, *, bits: int,
               group_size: int) -> torch.Tensor:
    """Ŵ = scale · (codes - zero) (out, in), in scale's dtype; zero None means symmetric (zero = 2^(bits-1)).
    Whole groups are computed as (out, n_groups, g) views, without per-column copies of scale and zero."""
    out_f, in_f = codes.shape
    ng = scale.shape[1]
    zero = torch.full_like(scale, 2 ** (bits - 1)) if zero is None else zero.to(scale.dtype)
    g = group_len(in_f, group_size)
    if in_f == ng * g:
        w = codes.reshape(out_f, ng, g).to(scale.dtype)
        return ((w - zero[..., None]) * scale[..., None]).view(out_f, in_f)
    return (codes.to(scale.dtype) - expand(zero, in_f, group_size)) * expand(scale, in_f, group_size)


@dataclass
class Quantized:
    """One quantized matrix, as RTN and both GPTQ solvers return it."""

    codes: torch.Tensor  # (out, in) uint8 in [0, 2^bits - 1], original column order
    scale: torch.Tensor  # (out, n_groups) float32 (float64 if W was)
    zero: torch.Tensor | None  # (out, n_groups) uint8; None when symmetric (implicit 2^(bits-1))
    W_hat: torch.Tensor  # (out, in) = dequantize(codes, scale, zero)
    damp: float | None = None  # GPTQ: the absolute damping added to diag(H) (percdamp · mean diag H · 10^retries)
    retries: int = 0  # GPTQ: Cholesky failures before success (each escalated the damping 10x)
    row_loss: torch.Tensor | None = None  # GPTQ: (out,) its objective per row, Σ_j (w_j - q_j)² / Hinv_jj² / 2
    n_dead: int = 0  # GPTQ: input columns with H_jj == 0 (no input ever reached them)

    @property
    def loss(self) -> float:
        return float(self.row_loss.sum())


def split_rows(r: Quantized, sizes: Sequence[int]) -> list[Quantized]:
    """One result of row-concatenated matrices -> one result per matrix (`sizes` rows each)."""
    zeros = r.zero.split(sizes) if r.zero is not None else [None] * len(sizes)
    return [Quantized(codes=c, scale=s, zero=z, W_hat=w, damp=r.damp, retries=r.retries, row_loss=l,
                      n_dead=r.n_dead)
            for c, s, z, w, l in zip(r.codes.split(sizes), r.scale.split(sizes), zeros, r.W_hat.split(sizes),
                                     r.row_loss.split(sizes))]


@torch.no_grad()
def rtn(W: torch.Tensor, *, bits: int, group_size: int = 128, sym: bool = False, clip: bool = False) -> Quantized:
    """Round-to-nearest with min/max (or symmetric max-abs) group parameters (clip: MSE-clipped ranges,
    clip_search). W (out, in), any float dtype; computed in float32 (float64 if W is)."""
    check_grid(bits, group_size, "rtn")
    W = W.detach().to(compute_dtype(W))
    scale, zero = group_params(W, bits=bits, group_size=group_size, sym=sym, clip=clip)
    codes = quantize(W, scale, zero, bits=bits, group_size=group_size)
    zero_out = None if sym else zero.to(torch.uint8)
    return Quantized(codes, scale, zero_out, dequantize(codes, scale, zero_out, bits=bits, group_size=group_size))


def fake_quant_act(x: torch.Tensor, *, bits: int = 8) -> torch.Tensor:
    """Per-token dynamic symmetric fake quantization of activations x (..., d), as vLLM's dynamic int8 path:
    s = max|x| / (2^(bits-1) - 1) per token, x̂ = round(x / s) · s with codes in ±(2^(bits-1) - 1) (-2^(bits-1)
    is never produced, since |x| <= max|x|). Computed in float32 (float64 if x is), returned in x's dtype.
    bits=16: x unchanged. The runtime linear (W4A8) and the scale searches (ecs.py) both call it."""
    if bits == 16:
        return x
    qmax = 2 ** (bits - 1) - 1
    xf = x.to(compute_dtype(x))
    s = xf.abs().amax(dim=-1, keepdim=True) / qmax  # (..., 1)
    s = torch.where(s == 0, torch.ones_like(s), s)  # an all-zero token: any scale gives zeros back
    return (torch.clamp(torch.round(xf / s), -qmax, qmax) * s).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Packed storage: int32 words


def _bit_positions(n: int, bits: int, device):
    """Word index and bit shift (n,) of each of n codes in a row's bit stream."""
    start = torch.arange(n, device=device, dtype=torch.int64) * bits
    return start // _WORD_BITS, start % _WORD_BITS


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer codes (..., n), each < 2^bits, along the last dim into int32 (..., ceil(n·bits/32))."""
    check_bits(bits, "packing")
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
    check_bits(bits, "packing")
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


def _frozen(t: torch.Tensor) -> nn.Parameter:
    """A Parameter without grad: the loader (`assign`) swaps Parameters, whatever their dtype."""
    return nn.Parameter(t, requires_grad=False)


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
        check_bits(bits, "packing")
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
        """Ŵ (out, in) = scale · (code - zero), in weight_scale's dtype: the grid's `dequantize` of the unpacked
        codes and zero points."""
        out_f, in_f = self.out_features, self.in_features
        codes = unpack_int32(self.weight_packed, self.bits, (out_f, in_f))
        zero = None if self.sym else \
            unpack_int32(self.weight_zero_point.T, self.bits, (self.weight_scale.shape[1], out_f)).T
        return dequantize(codes, self.weight_scale, zero, bits=self.bits, group_size=self.group_size)

    def forward(self, x):
        return QUANT_LINEAR_FN["fn"](self, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, abits={self.abits}")
