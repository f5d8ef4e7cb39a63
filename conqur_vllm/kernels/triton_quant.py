"""Fused online Hadamard rotation + per-token quantization (symmetric or centered asymmetric) in one Triton pass.

One program handles one row (token) of ``n`` values, held in registers as a ``[G, m, p]`` tile: ``G`` diagonal
blocks (1 for the full transform), each ``H_m ⊗ H_p`` with ``p`` a power of two and ``m`` the dense factor
from :func:`conqur_vllm.hadamard.hadamard_factors` (1, 12, 20, 28, ...). Padded tile positions are masked.

- ``H_p``: in-register Walsh–Hadamard butterflies in constant geometry (``y[i] = x[2i] + x[2i+1]``,
  ``y[i + p/2] = x[2i] - x[2i+1]``, ``log2 p`` times). Every stage adds and subtracts the same float32 values
  as :func:`~conqur_vllm.hadamard.fast_hadamard_transform`, so for ``m == 1`` the rotation is bit-identical.
- ``H_m`` (``m > 1``): a dense float32 ``tl.dot`` (precision :data:`DENSE_PRECISION`) of the ±1 matrix ``H_mᵀ``
  (zero-padded to a power of two) with the ``[m, p]`` tile; needs ``p >= 16`` and ``m <= MAX_DENSE``. Its
  summation order differs from the reference matmul, so values may differ by float32 rounding.
- then ``* 1/sqrt(block)``, the row absmax, ``scale = clip * absmax / qmax`` and
  ``q = clamp(round_half_even(y / scale), -qmax-1, qmax)`` with correctly rounded divisions (on GPUs: one
  reciprocal per row and two FMA residual corrections per value, checked bit-exact there): the rule of
  ``conqur::quantize_per_token`` applied to the float32 rotated row.
- asymmetric instead: the row minimum and maximum (widened to include 0), ``scale = clip * (max - min) /
  (2^b - 1)``, ``zero = round(-clip * min / scale)`` and the centered codes ``clamp(round(y / scale) + zero, 0,
  2^b - 1) - zero``: the rule of ``conqur::quantize_per_token_centered``, read by the same GEMM as symmetric
  codes (``y ~ scale * code``).

Outputs: int8 codes ``[M, n]`` (one code per byte, not packed: the GEMM reads int8 activations) and float32
scales ``[M, 1]``. The same kernel without rotation is a plain per-token quantizer, and without quantization a
Hadamard transform.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from conqur_vllm.hadamard import hadamard_factors, hadamard_matrix
from conqur_vllm.kernels.reference import MAX_CENTERED_BITS

MAX_DENSE = 64
"""Largest dense Hadamard factor m applied in-kernel."""
MAX_TILE = 32768
"""Largest padded row tile (elements) one program holds."""
DENSE_PRECISION = "tf32x3"
"""``tl.dot`` input precision of the dense ``H_m`` factor: ``ieee`` (float32 FMAs) or ``tf32x3`` (three TF32
tensor-core products: ``H_m`` is exact in TF32 and the rotated rows keep about 22 bits)."""
PRECISIONS = ("ieee", "tf32x3")


@dataclass(frozen=True)
class RowPlan:
    """How a row of ``n`` values maps onto the ``[g_pad, m_pad, p_pad]`` tile."""

    groups: int
    m: int
    p: int
    g_pad: int
    m_pad: int
    p_pad: int
    rotate: bool

    @property
    def log2_p(self) -> int:
        return self.p.bit_length() - 1 if self.rotate else 0

    @property
    def tile(self) -> int:
        return self.g_pad * self.m_pad * self.p_pad


def _pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def row_plan(n: int, block: int | None, rotate: bool = True) -> RowPlan | None:
    """The tile for rows of ``n`` values (Hadamard blocks of ``block``, None = n), or None if unsupported."""
    if n < 1:
        return None
    if not rotate:
        plan = RowPlan(1, 1, n, 1, 1, _pow2(n), False)
    else:
        size = n if block is None else block
        if size < 1 or n % size:
            return None
        try:
            m, p = hadamard_factors(size)
        except ValueError:
            return None
        if m > MAX_DENSE or (m > 1 and p < 16):
            return None
        plan = RowPlan(n // size, m, p, _pow2(n // size), 1 if m == 1 else _pow2(max(m, 16)), p, True)
    return plan if plan.tile <= MAX_TILE else None


def supports(n: int, block: int | None = None) -> bool:
    """Whether the fused kernel handles a Hadamard rotation of rows of ``n`` with blocks of ``block``."""
    return row_plan(n, block) is not None


@lru_cache(maxsize=32)
def _dense_ht(m: int, m_pad: int, device: torch.device) -> Tensor:
    """±1 ``H_mᵀ`` as float32, zero-padded to ``[m_pad, m_pad]``."""
    h = torch.zeros(m_pad, m_pad, dtype=torch.float32)
    h[:m, :m] = hadamard_matrix(m, normalized=False, dtype=torch.float32).t()
    return h.to(device)


def _num_warps(tile: int) -> int:
    return 1 if tile <= 256 else 2 if tile <= 1024 else 4 if tile <= 4096 else 8 if tile <= 16384 else 16


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min_combine(a, b):
    return tl.minimum(a, b)


@triton.jit
def _divide(y, scale, FMA_DIVIDE: tl.constexpr):
    """``y / scale`` correctly rounded (on GPUs: one reciprocal per row and two FMA residual corrections)."""
    if FMA_DIVIDE:
        r = tl.div_rn(1.0, scale)
        v = y * r
        v = tl.fma(tl.fma(-v, scale, y), r, v)
        v = tl.fma(tl.fma(-v, scale, y), r, v)
    else:
        v = tl.div_rn(y, scale)
    return v


@triton.jit
def _round_half_even(v):
    r = tl.floor(v)
    d = v - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)


@triton.jit
def _butterflies(y, G: tl.constexpr, MP: tl.constexpr, P: tl.constexpr, LOG2_P: tl.constexpr):
    for _ in tl.static_range(LOG2_P):
        a, b = tl.split(tl.reshape(y, (G, MP, P // 2, 2)))
        y = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (G, MP, P))
    return y


@triton.jit
def _hadamard_quant_kernel(
    x_ptr, q_ptr, scale_ptr, y_ptr, absmax_ptr, lo_ptr, ht_ptr,
    stride_xm, stride_qm, stride_ym,
    n_groups, m_size, p_size, inv_sqrt, clip_ratio, qmax,
    G: tl.constexpr, MP: tl.constexpr, P: tl.constexpr, LOG2_P: tl.constexpr,
    ROTATE: tl.constexpr, DENSE: tl.constexpr, QUANTIZE: tl.constexpr, HAS_ABSMAX: tl.constexpr,
    ASYM: tl.constexpr, PRECISION: tl.constexpr, FMA_DIVIDE: tl.constexpr,
):
    """One row. ``qmax``: the largest symmetric code, or the asymmetric grid's step count ``2^b - 1``; with
    ``HAS_ABSMAX`` the row's absmax (symmetric) or maximum (asymmetric, with its minimum at ``lo_ptr``) is read
    instead of reduced (tensor-parallel shards of a row)."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, G)[:, None, None]
    a = tl.arange(0, MP)[None, :, None]
    b = tl.arange(0, P)[None, None, :]
    offs = g * (m_size * p_size) + a * p_size + b
    mask = (g < n_groups) & (a < m_size) & (b < p_size)
    y = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    if ROTATE:
        y = _butterflies(y, G, MP, P, LOG2_P)
        if DENSE:
            hr = tl.arange(0, MP)
            ht = tl.load(ht_ptr + hr[:, None] * MP + hr[None, :])
            if G == 1:
                y = tl.reshape(tl.dot(ht, tl.reshape(y, (MP, P)), input_precision=PRECISION), (1, MP, P))
            else:
                y = tl.dot(tl.broadcast_to(ht[None, :, :], (G, MP, MP)), y, input_precision=PRECISION)
        y = y * inv_sqrt
    if QUANTIZE and ASYM:  # padded positions hold 0, which the widened range contains anyway
        if HAS_ABSMAX:
            lo = tl.load(lo_ptr + row)
            hi = tl.load(absmax_ptr + row)
        else:
            lo = tl.reduce(tl.reduce(tl.reduce(y, 2, _min_combine), 1, _min_combine), 0, _min_combine)
            hi = tl.reduce(tl.reduce(tl.reduce(y, 2, _max_combine), 1, _max_combine), 0, _max_combine)
        lo = tl.minimum(lo, 0.0)
        hi = tl.maximum(hi, 0.0)
        scale = tl.div_rn((hi - lo) * clip_ratio, qmax)
        scale = tl.where(scale > 0.0, scale, 1.0)
        zero = tl.minimum(tl.maximum(_round_half_even(tl.div_rn(lo * -clip_ratio, scale)), 0.0), qmax)
        v = _round_half_even(_divide(y, scale, FMA_DIVIDE)) + zero
        v = tl.minimum(tl.maximum(v, 0.0), qmax) - zero
        tl.store(q_ptr + row * stride_qm + offs, v.to(tl.int8), mask=mask)
        tl.store(scale_ptr + row, scale)
    elif QUANTIZE:
        if HAS_ABSMAX:
            amax = tl.load(absmax_ptr + row)
        else:
            amax = tl.reduce(tl.abs(y), 2, _max_combine)
            amax = tl.reduce(tl.reduce(amax, 1, _max_combine), 0, _max_combine)
        scale = tl.div_rn(amax * clip_ratio, qmax)
        scale = tl.where(scale > 0.0, scale, 1.0)
        v = tl.minimum(tl.maximum(_divide(y, scale, FMA_DIVIDE), -qmax - 1.0), qmax)
        tl.store(q_ptr + row * stride_qm + offs, _round_half_even(v).to(tl.int8), mask=mask)
        tl.store(scale_ptr + row, scale)
    else:
        tl.store(y_ptr + row * stride_ym + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def interpreted(kernel: object) -> bool:
    """Whether ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (no inline PTX or FMA divisions there)."""
    return type(kernel).__name__ == "InterpretedFunction"


def _launch(
    x: Tensor, plan: RowPlan, *, bits: int = 4, clip_ratio: float = 1.0, absmax: Tensor | None = None,
    quantize: bool = True, out: tuple[Tensor, Tensor] | None = None, precision: str | None = None,
    num_warps: int | None = None, asymmetric: bool = False, row_min: Tensor | None = None,
) -> tuple[Tensor, Tensor] | Tensor:
    """``absmax`` overrides the row absmax (symmetric) or, with ``row_min``, the row maximum (asymmetric)."""
    precision = precision or DENSE_PRECISION
    if precision not in PRECISIONS:
        raise ValueError(f"dense Hadamard precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    rows = x.shape[0]
    dense = plan.rotate and plan.m > 1
    ht = _dense_ht(plan.m, plan.m_pad, x.device) if dense else x
    if quantize:
        q, scale = out if out is not None else (
            torch.empty(x.shape, dtype=torch.int8, device=x.device),
            torch.empty((rows, 1), dtype=torch.float32, device=x.device),
        )
        if (q.shape != x.shape or q.dtype != torch.int8 or q.stride(-1) != 1 or scale.numel() != rows
                or not scale.is_contiguous()):
            raise ValueError(f"out must be int8 codes {tuple(x.shape)} (unit last stride) and {rows} "
                             "contiguous float32 scales")
        y = q
        amax = absmax.reshape(rows).to(torch.float32).contiguous() if absmax is not None else scale
        lo = row_min.reshape(rows).to(torch.float32).contiguous() if row_min is not None else scale
    else:
        y = torch.empty_like(x)
        q, scale, amax, lo = y, y, y, y
    if rows:
        _hadamard_quant_kernel[(rows,)](
            x, q, scale, y, amax, lo, ht,
            x.stride(0), q.stride(0), y.stride(0),
            plan.groups, plan.m, plan.p, 1.0 / math.sqrt(plan.m * plan.p), float(clip_ratio),
            float((1 << bits) - 1 if asymmetric else (1 << (bits - 1)) - 1),
            G=plan.g_pad, MP=plan.m_pad, P=plan.p_pad, LOG2_P=plan.log2_p,
            ROTATE=plan.rotate, DENSE=dense, QUANTIZE=quantize, HAS_ABSMAX=absmax is not None,
            ASYM=asymmetric, PRECISION=precision, FMA_DIVIDE=not interpreted(_hadamard_quant_kernel), num_warps=num_warps or _num_warps(plan.tile),
        )
    return (q, scale) if quantize else y


def _rows(x: Tensor) -> Tensor:
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"expected a 2-D floating tensor [M, K], got {x.dtype} {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def _plan_or_raise(n: int, block: int | None, rotate: bool) -> RowPlan:
    plan = row_plan(n, block, rotate)
    if plan is None:
        raise ValueError(f"the Triton kernel does not handle rows of {n} with Hadamard block {block} "
                         f"(rotate={rotate}); check supports() and use the reference op")
    return plan


def hadamard_quantize(
    x: Tensor, block: int | None = None, bits: int = 4, clip_ratio: float = 1.0,
    out: tuple[Tensor, Tensor] | None = None, precision: str | None = None, num_warps: int | None = None,
) -> tuple[Tensor, Tensor]:
    """int8 codes ``[M, K]`` and float32 scales ``[M, 1]`` of ``fast_hadamard_transform(x.float(), block)``.

    ``out`` (codes, scales) receives the result instead of new tensors; ``precision`` overrides
    :data:`DENSE_PRECISION` and ``num_warps`` the warps per row (for tuning).
    """
    x = _rows(x)
    return _launch(x, _plan_or_raise(x.shape[1], block, True), bits=bits, clip_ratio=clip_ratio, out=out,
                   precision=precision, num_warps=num_warps)


def quantize_per_token(
    x: Tensor, bits: int = 4, clip_ratio: float = 1.0, absmax: Tensor | None = None,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """``conqur::quantize_per_token`` without rotation (``absmax`` [M, 1] overrides the row maxima)."""
    x = _rows(x)
    return _launch(x, _plan_or_raise(x.shape[1], None, False), bits=bits, clip_ratio=clip_ratio,
                   absmax=absmax, out=out)


def hadamard_transform(x: Tensor, block: int | None = None, precision: str | None = None) -> Tensor:
    """``fast_hadamard_transform(x, block)`` over the last dim (float32 arithmetic, x's dtype out)."""
    if not x.is_floating_point() or x.dim() == 0:
        raise ValueError(f"expected a floating tensor with at least one dim, got {x.dtype} {tuple(x.shape)}")
    n = x.shape[-1]
    rows = _rows(x.reshape(-1, n))
    return _launch(rows, _plan_or_raise(n, block, True), quantize=False, precision=precision).reshape(x.shape)


def _centered_bits(bits: int) -> int:
    if not 2 <= bits <= MAX_CENTERED_BITS:
        raise ValueError(f"centered asymmetric codes need 2..{MAX_CENTERED_BITS} bits to fit int8, got {bits}")
    return bits


def hadamard_quantize_centered(
    x: Tensor, block: int | None = None, bits: int = 4, clip_ratio: float = 1.0,
    out: tuple[Tensor, Tensor] | None = None, precision: str | None = None, num_warps: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Centered asymmetric int8 codes ``[M, K]`` and float32 scales ``[M, 1]`` of the rotated rows
    (``conqur::quantize_per_token_centered`` of ``fast_hadamard_transform(x.float(), block)``)."""
    x = _rows(x)
    return _launch(x, _plan_or_raise(x.shape[1], block, True), bits=_centered_bits(bits), clip_ratio=clip_ratio,
                   out=out, precision=precision, num_warps=num_warps, asymmetric=True)


def quantize_per_token_centered(
    x: Tensor, bits: int = 4, clip_ratio: float = 1.0, row_min: Tensor | None = None,
    row_max: Tensor | None = None, out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """``conqur::quantize_per_token_centered`` (``row_min`` and ``row_max`` [M, 1] override the row extremes)."""
    if (row_min is None) != (row_max is None):
        raise ValueError("pass both row_min and row_max, or neither")
    x = _rows(x)
    return _launch(x, _plan_or_raise(x.shape[1], None, False), bits=_centered_bits(bits), clip_ratio=clip_ratio,
                   absmax=row_max, row_min=row_min, out=out, asymmetric=True)
