"""Exact integer W4A4 / W4A8 ops as ``torch.library`` custom ops, with fake (meta) implementations.

- ``conqur::quantize_per_token(x, bits, clip_ratio, absmax=None) -> (q, scale)``: dynamic symmetric per-token
  quantization of a 2-D ``[M, K]`` activation: ``scale = clip_ratio * absmax(row) / qmax`` (float32, ``[M, 1]``,
  1 for an all-zero row), ``q = clamp(round(x / scale), -qmax-1, qmax)`` as int8, computed in float32
  (``conqur_vllm.quant``'s rule). ``absmax`` (float32 ``[M, 1]``) overrides the row maxima, e.g. with the
  maxima of the whole row when ``x`` is one tensor-parallel shard of it.
- ``conqur::quantize_per_token_asym(x, bits, clip_ratio, row_min=None, row_max=None) -> (q, scale, zero)``:
  the asymmetric rule of ``conqur_vllm.quant`` (range widened to include 0, ``scale = clip * (max - min) /
  (2^b - 1)``, ``zero = round(-clip * min / scale)``), with codes and zero point shifted by ``-2^(b-1)`` so they
  fit the signed GEMMs: ``x ~ scale * (q - zero)``, ``q`` int8 in ``[-2^(b-1), 2^(b-1) - 1]``, ``zero`` float32
  ``[M, 1]``. ``row_min`` / ``row_max`` override the row extremes (tensor-parallel shards).
- ``conqur::quantize_per_token_centered(x, bits, clip_ratio, row_min=None, row_max=None) -> (c, scale)``: the
  same asymmetric rule with each code minus its row's zero point, ``c = q - zero``, so ``x ~ scale * c`` and the
  symmetric GEMM epilogue applies as it is (no zero-point term). ``c`` spans ``[-(2^b - 1), 2^b - 1]``, which
  fits int8 for ``bits <= 7``: the form the int8 GEMMs (H100 INT8 MMA, oneDNN s8) read for INT4 activations.
- ``conqur::int_scaled_mm(a_q, a_scale, b_q, b_scale, bias, out_dtype)``: ``a_q [M, K]`` int8 codes times
  ``b_q [N, K]`` int8 codes with exact integer accumulation per group of ``K / G`` columns (``b_scale`` is
  ``[N, G]``), then the float epilogue ``out = a_scale * sum_g b_scale[:, g] * acc_g + bias``.

These are the reference implementations, registered for every device. A faster kernel registers for the same
names (``torch.library.register_kernel("conqur::int_scaled_mm", "cuda", fn)``) or is a separate op with the
same contract (``conqur_vllm.kernels.onednn``). Because each op has a fake implementation, ``torch.compile``
traces them as opaque nodes.
"""

from __future__ import annotations

import torch
from torch import Tensor

_FP32_EXACT = 1 << 24
"""Integers of magnitude below 2^24 are exact in float32, so are all partial sums that stay below it."""


def _float32_operand(x: Tensor) -> Tensor:
    """``x`` as read in float32 arithmetic: 16-bit floats stay as they are (their row extremes are exact, and
    dividing by a float32 scale promotes to float32), saving a float32 copy of every activation."""
    return x if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else x.to(torch.float32)


def codes_and_scales_like(x: Tensor) -> tuple[Tensor, Tensor]:
    """Empty int8 codes shaped like the 2-D ``x`` and float32 per-row scales ``[M, 1]``: what the per-token
    quantizers return, for their fake (meta) implementations."""
    return torch.empty_like(x, dtype=torch.int8), torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)


def _check_bits(bits: int) -> int:
    if not 2 <= bits <= 8:
        raise ValueError(f"activation bits must be in 2..8 for integer quantization, got {bits}")
    return (1 << (bits - 1)) - 1


@torch.library.custom_op("conqur::quantize_per_token", mutates_args=())
def quantize_per_token(
    x: Tensor, bits: int, clip_ratio: float, absmax: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """int8 codes ``[M, K]`` and float32 scales ``[M, 1]`` of a 2-D floating-point ``x``."""
    qmax = _check_bits(bits)
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"quantize_per_token expects a 2-D floating tensor, got {x.dtype} {tuple(x.shape)}")
    xf = _float32_operand(x)
    amax = (xf.abs().amax(dim=-1, keepdim=True) if absmax is None else absmax).to(torch.float32)
    # a tensor divisor: CUDA turns division by a Python scalar into a multiplication by its reciprocal
    scale = clip_ratio * amax / torch.full_like(amax, qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / scale).clamp_(-qmax - 1, qmax).to(torch.int8)
    return q, scale


@quantize_per_token.register_fake
def _(x: Tensor, bits: int, clip_ratio: float, absmax: Tensor | None = None) -> tuple[Tensor, Tensor]:
    return codes_and_scales_like(x)


def _asym_grid(
    x: Tensor, bits: int, clip_ratio: float, row_min: Tensor | None, row_max: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, int]:
    """``x`` as a float32 operand, scales, unsigned zero points ``[M, 1]`` and the top code ``2^b - 1`` of the
    asymmetric rule."""
    top = 2 * (_check_bits(bits) + 1) - 1
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"asymmetric per-token quantization expects a 2-D floating tensor, got {x.dtype} "
                         f"{tuple(x.shape)}")
    xf = _float32_operand(x)
    lo = (xf.amin(dim=-1, keepdim=True) if row_min is None else row_min).to(torch.float32).clamp(max=0)
    hi = (xf.amax(dim=-1, keepdim=True) if row_max is None else row_max).to(torch.float32).clamp(min=0)
    scale = clip_ratio * (hi - lo) / torch.full((1, 1), top, dtype=torch.float32, device=x.device)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-clip_ratio * lo / scale).clamp_(0, top)
    return xf, scale, zero, top


def _quantize_asym(
    x: Tensor, bits: int, clip_ratio: float, row_min: Tensor | None, row_max: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    xf, scale, zero, top = _asym_grid(x, bits, clip_ratio, row_min, row_max)
    half = (top + 1) // 2
    q = (torch.round(xf / scale) + zero).clamp_(0, top) - half
    return q.to(torch.int8), scale, zero - half


@torch.library.custom_op("conqur::quantize_per_token_asym", mutates_args=())
def quantize_per_token_asym(
    x: Tensor, bits: int, clip_ratio: float, row_min: Tensor | None = None, row_max: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Signed int8 codes ``[M, K]``, float32 scales and zero points ``[M, 1]`` of a 2-D floating-point ``x``."""
    return _quantize_asym(x, bits, clip_ratio, row_min, row_max)


@quantize_per_token_asym.register_fake
def _(x: Tensor, bits: int, clip_ratio: float, row_min: Tensor | None = None,
      row_max: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    codes, scales = codes_and_scales_like(x)
    return codes, scales, torch.empty_like(scales)


MAX_CENTERED_BITS = 7
"""Widest activation codes whose centered form ``q - zero`` (up to ``2^b - 1`` in magnitude) fits int8."""


@torch.library.custom_op("conqur::quantize_per_token_centered", mutates_args=())
def quantize_per_token_centered(
    x: Tensor, bits: int, clip_ratio: float, row_min: Tensor | None = None, row_max: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """int8 codes ``q - zero`` ``[M, K]`` and float32 scales ``[M, 1]`` of ``quantize_per_token_asym``."""
    if bits > MAX_CENTERED_BITS:
        raise ValueError(f"centered asymmetric codes of {bits} bits do not fit int8; use quantize_per_token_asym "
                         f"for more than {MAX_CENTERED_BITS} bits")
    xf, scale, zero, top = _asym_grid(x, bits, clip_ratio, row_min, row_max)
    # clamp(round(x / s) + zero, 0, top) - zero, with the zero point moved into the (integer) bounds
    return xf.div(scale).round_().clamp_(-zero, top - zero).to(torch.int8), scale


@quantize_per_token_centered.register_fake
def _(x: Tensor, bits: int, clip_ratio: float, row_min: Tensor | None = None,
      row_max: Tensor | None = None) -> tuple[Tensor, Tensor]:
    return codes_and_scales_like(x)


def _chunk_size(k: int) -> int:
    """Largest K-chunk whose int8 x int8 partial sums are exact in float32 (|a*b| <= 2^14)."""
    return max(1, min(k, _FP32_EXACT // (128 * 128)))


def int_matmul(a_q: Tensor, b_q: Tensor) -> Tensor:
    """Exact ``a_q @ b_q.T`` of int8 ``[M, K]`` and ``[N, K]`` as int32 ``[M, N]``.

    CUDA with int8 tensor-core friendly shapes uses ``torch._int_mm``. Elsewhere the codes are multiplied in
    float32 over K-chunks short enough that every partial sum is an integer below 2^24 (hence exact), and the
    chunk results are summed in int32: bit-identical to int32 accumulation, and far faster than CPU int32 GEMM.
    """
    m, k = a_q.shape
    n = b_q.shape[0]
    if a_q.is_cuda and m > 16 and k % 8 == 0 and n % 8 == 0:
        return torch._int_mm(a_q.contiguous(), b_q.contiguous().t())
    acc = torch.zeros((m, n), dtype=torch.int32, device=a_q.device)
    step = _chunk_size(k)
    for start in range(0, k, step):
        a = a_q[:, start:start + step].to(torch.float32)
        b = b_q[:, start:start + step].to(torch.float32)
        acc += (a @ b.t()).to(torch.int32)
    return acc


def _check_mm_args(a_q: Tensor, a_scale: Tensor, b_q: Tensor, b_scale: Tensor) -> int:
    if a_q.dtype != torch.int8 or b_q.dtype != torch.int8 or a_q.dim() != 2 or b_q.dim() != 2:
        raise ValueError(f"int_scaled_mm expects 2-D int8 codes, got {a_q.dtype} {tuple(a_q.shape)} and "
                         f"{b_q.dtype} {tuple(b_q.shape)}")
    if a_q.shape[1] != b_q.shape[1]:
        raise ValueError(f"int_scaled_mm: K differs, activations {a_q.shape[1]} vs weights {b_q.shape[1]}")
    groups = b_scale.shape[-1]
    if b_scale.shape != (b_q.shape[0], groups) or b_q.shape[1] % groups:
        raise ValueError(f"weight scale shape {tuple(b_scale.shape)} does not fit weights {tuple(b_q.shape)}")
    if a_scale.shape != (a_q.shape[0], 1):
        raise ValueError(f"activation scale shape {tuple(a_scale.shape)}, expected ({a_q.shape[0]}, 1)")
    return groups


def int_scaled_mm_impl(
    a_q: Tensor, a_scale: Tensor, b_q: Tensor, b_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """``a_scale * sum_g b_scale[:, g] * (a_q @ b_q.T)_g + bias`` in ``out_dtype``, accumulating each group exactly."""
    groups = _check_mm_args(a_q, a_scale, b_q, b_scale)
    k = a_q.shape[1]
    gs = k // groups
    b_scale = b_scale.to(torch.float32)
    if groups == 1:
        out = int_matmul(a_q, b_q).to(torch.float32) * b_scale.t()
    else:
        out = torch.zeros((a_q.shape[0], b_q.shape[0]), dtype=torch.float32, device=a_q.device)
        for g in range(groups):
            cols = slice(g * gs, (g + 1) * gs)
            acc = int_matmul(a_q[:, cols], b_q[:, cols])
            out += acc.to(torch.float32) * b_scale[:, g]
    out *= a_scale.to(torch.float32)
    if bias is not None:
        out += bias.to(torch.float32)
    return out.to(out_dtype)


@torch.library.custom_op("conqur::int_scaled_mm", mutates_args=())
def int_scaled_mm(
    a_q: Tensor, a_scale: Tensor, b_q: Tensor, b_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """The registered op over :func:`int_scaled_mm_impl` (the reference for every device)."""
    return int_scaled_mm_impl(a_q, a_scale, b_q, b_scale, bias, out_dtype)


@int_scaled_mm.register_fake
def _(a_q: Tensor, a_scale: Tensor, b_q: Tensor, b_scale: Tensor, bias: Tensor | None,
      out_dtype: torch.dtype) -> Tensor:
    return a_q.new_empty((a_q.shape[0], b_q.shape[0]), dtype=out_dtype)


class ReferenceIntGemm:
    """``conqur::int_scaled_mm`` over int8 codes ``b_q [N, K]`` (resident: 1 byte per weight + float32 scales)."""

    name = "reference"

    def __init__(self, b_q: Tensor, b_scale: Tensor, out_dtype: torch.dtype) -> None:
        self.b_q = b_q
        self.b_scale = b_scale.to(torch.float32)
        self.out_dtype = out_dtype

    def __call__(self, a_q: Tensor, a_scale: Tensor, bias: Tensor | None) -> Tensor:
        return torch.ops.conqur.int_scaled_mm(a_q, a_scale, self.b_q, self.b_scale, bias, self.out_dtype)
