"""Integer packing in the compressed-tensors ``pack-quantized`` layout (readable by vLLM and compressed-tensors).

A b-bit code is stored as an unsigned field: signed codes ``v`` in ``[-2^(b-1), 2^(b-1)-1]`` as ``v + 2^(b-1)``,
unsigned codes (asymmetric quantization, ``[0, 2^b-1]``) as they are. ``32 // b`` fields fill one int32, field
``i`` of each group at bits ``b*i``; the packed dim is zero-padded to a multiple of ``32 // b``.
INT4: 8 nibbles per int32; INT8: 4 bytes per int32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SUPPORTED_BITS = (4, 8)


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"packing supports {SUPPORTED_BITS} bits, got {bits}")
    return 32 // bits


def pack_int32(q: Tensor, bits: int, packed_dim: int = 1) -> Tensor:
    """Pack 2-D codes (int8 signed or uint8 unsigned) into int32 along ``packed_dim`` (1 = columns, 0 = rows)."""
    factor = _check_bits(bits)
    if q.ndim != 2:
        raise ValueError(f"expected a 2-D code tensor, got shape {tuple(q.shape)}")
    if packed_dim not in (0, 1):
        raise ValueError(f"packed_dim must be 0 or 1, got {packed_dim}")
    if q.dtype == torch.int8:
        lo, hi, offset = -(1 << (bits - 1)), (1 << (bits - 1)) - 1, 1 << (bits - 1)
    elif q.dtype == torch.uint8:
        lo, hi, offset = 0, (1 << bits) - 1, 0
    else:
        raise TypeError(f"codes must be int8 (signed) or uint8 (unsigned), got {q.dtype}")
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(
            f"{q.dtype} codes must lie in [{lo}, {hi}] for {bits} bits, got [{int(q.min())}, {int(q.max())}]"
        )
    u = q.to(torch.int32) + offset
    if packed_dim == 0:
        u = u.t()
    rows, cols = u.shape
    pad = -cols % factor
    if pad:
        u = F.pad(u, (0, pad))
    shifts = torch.arange(factor, device=u.device, dtype=torch.int32) * bits
    packed = (u.reshape(rows, (cols + pad) // factor, factor) << shifts).sum(dim=-1, dtype=torch.int32)
    return packed.t().contiguous() if packed_dim == 0 else packed


def unpack_int32(packed: Tensor, bits: int, size: int, packed_dim: int = 1, signed: bool = True) -> Tensor:
    """Inverse of :func:`pack_int32`: ``size`` entries along ``packed_dim``; int8 if ``signed`` else uint8."""
    factor = _check_bits(bits)
    if packed.dtype != torch.int32 or packed.ndim != 2:
        raise ValueError(
            f"expected a 2-D int32 packed tensor, got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    if packed_dim not in (0, 1):
        raise ValueError(f"packed_dim must be 0 or 1, got {packed_dim}")
    p = packed.t() if packed_dim == 0 else packed
    if not (p.shape[1] - 1) * factor < size <= p.shape[1] * factor:
        raise ValueError(
            f"size {size} does not match {p.shape[1]} packed int32 words of {factor} values each"
        )
    shifts = torch.arange(factor, device=p.device, dtype=torch.int32) * bits
    fields = (p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    fields = fields.reshape(p.shape[0], p.shape[1] * factor)[:, :size]
    out = (fields - (1 << (bits - 1))).to(torch.int8) if signed else fields.to(torch.uint8)
    return out.t().contiguous() if packed_dim == 0 else out


def pack_int4(q: Tensor, packed_dim: int = 1) -> Tensor:
    """INT4 codes ``[rows, cols]`` -> int32 ``[rows, ceil(cols/8)]`` (or along rows for ``packed_dim=0``)."""
    return pack_int32(q, 4, packed_dim)


def unpack_int4(packed: Tensor, cols: int, packed_dim: int = 1, signed: bool = True) -> Tensor:
    """int32 ``[rows, ceil(cols/8)]`` -> INT4 codes ``[rows, cols]`` (int8 in [-8, 7], or uint8 in [0, 15])."""
    return unpack_int32(packed, 4, cols, packed_dim, signed)
