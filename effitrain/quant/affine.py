"""Affine quantization arithmetic (Jacob et al. 2018; Krishnamoorthi 2018), in one place.

A tensor's range [lo, hi] (widened to include 0, so zero is exact) maps onto integer levels
qmin..qmax: scale = (hi - lo) / (qmax - qmin), zero_point = round(qmin - lo / scale),
q = clamp(round(x / scale) + zero_point, qmin, qmax), x̂ = (q - zero_point) · scale. Symmetric
quantization uses ±max|x| over levels -(2^(b-1) - 1)..2^(b-1) - 1 with zero_point 0.
Per-channel quantization gives every output channel (dim 0) its own scale and zero point.
"""

from __future__ import annotations

import torch
from torch import Tensor

from effitrain.errors import require

BITS = (4, 8)
SCHEMES = ("affine", "symmetric")


def check_bits(bits: int, where: str) -> None:
    require(bits in BITS, where, bits, ", ".join(map(str, BITS)))


def qrange(bits: int, scheme: str) -> tuple[int, int]:
    """Integer levels (qmin, qmax) for `bits` under `scheme`."""
    if scheme == "symmetric":
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def choose_qparams(x: Tensor, bits: int, scheme: str, per_channel: bool) -> tuple[Tensor, Tensor]:
    """(scale, zero_point) for `x`: scalars, or one per channel of dim 0 (shaped to broadcast)."""
    qmin, qmax = qrange(bits, scheme)
    flat = x.detach().float().reshape(x.shape[0], -1) if per_channel else x.detach().float().reshape(1, -1)
    lo = flat.min(dim=1).values.clamp(max=0)
    hi = flat.max(dim=1).values.clamp(min=0)
    if scheme == "symmetric":
        scale = torch.maximum(hi, -lo) / qmax
        zero_point = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero_point = torch.zeros_like(scale)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero channel: any scale is exact
    if scheme == "affine":
        zero_point = (qmin - lo / scale).round().clamp(qmin, qmax)
    shape = (-1,) + (1,) * (x.dim() - 1) if per_channel else ()
    return scale.reshape(shape), zero_point.reshape(shape)


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int, scheme: str) -> Tensor:
    """Integer levels of `x` in qmin..qmax (as int16, which holds every level of b <= 8)."""
    qmin, qmax = qrange(bits, scheme)
    levels = (x / scale).round() + zero_point
    return levels.clamp(qmin, qmax).to(torch.int16)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    return (q.float() - zero_point) * scale


def fake_quantize(x: Tensor, bits: int, scheme: str, per_channel: bool) -> Tensor:
    """Quantize-dequantize `x` in the forward pass; the straight-through estimator passes the
    gradient unchanged in the backward pass (Bengio et al. 2013, as in QAT)."""
    scale, zero_point = choose_qparams(x, bits, scheme, per_channel)
    rounded = dequantize(quantize(x, scale, zero_point, bits, scheme), scale, zero_point).to(x.dtype)
    return x + (rounded - x).detach()


def pack(q: Tensor, bits: int, scheme: str) -> Tensor:
    """Store levels compactly: int8 → uint8 (offset), int4 → two levels per uint8."""
    qmin, _ = qrange(bits, scheme)
    unsigned = (q.to(torch.int16) - qmin).to(torch.uint8).flatten()
    if bits == 8:
        return unsigned
    if unsigned.numel() % 2:
        unsigned = torch.cat([unsigned, unsigned.new_zeros(1)])
    return unsigned[0::2] | (unsigned[1::2] << 4)


def unpack(packed: Tensor, bits: int, scheme: str, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of `pack`: int16 levels of the given shape."""
    qmin, _ = qrange(bits, scheme)
    if bits == 8:
        unsigned = packed.to(torch.int16)
    else:
        unsigned = torch.stack([packed & 0x0F, packed >> 4], dim=1).flatten().to(torch.int16)
    count = 1
    for size in shape:
        count *= size
    return (unsigned[:count] + qmin).reshape(shape)
