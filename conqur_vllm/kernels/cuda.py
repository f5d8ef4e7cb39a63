"""Triton kernels as the CUDA implementations of the ``conqur::*`` custom ops.

On CUDA tensors these ops run Triton kernels; on every other device they run the exact reference code:

- ``conqur::quantize_per_token``, ``conqur::int_scaled_mm`` (int8 weights), ``conqur::hadamard_transform``
  (defined in ``reference.py`` / ``transforms.py``);
- ``conqur::hadamard_quantize_per_token(x, block, bits, clip_ratio) -> (q, scale)``: ``quantize_per_token`` of
  the float32 ``fast_hadamard_transform(x, block or None)``, fused into one pass on CUDA;
- ``conqur::quantize_per_token_centered`` (``reference.py``) and
  ``conqur::hadamard_quantize_per_token_centered(x, block, bits, clip_ratio) -> (c, scale)``: the same with
  centered asymmetric codes, one Triton pass each on CUDA;
- ``conqur::int4_scaled_mm(a_q, a_scale, b_packed, b_scale, bias, out_dtype)``: ``int_scaled_mm`` with the
  weights packed INT4 ``[N, K/8]`` int32 (compressed-tensors layout), unpacked in-kernel on CUDA.

Shapes or dtypes the kernels do not handle fall back to the reference code on the same device. Importing this
module needs neither CUDA nor Triton; without Triton nothing is registered for CUDA.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from torch import Tensor

from conqur_vllm.formats import unpack_int4
from conqur_vllm.hadamard import fast_hadamard_transform
from conqur_vllm.kernels import reference, transforms

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
_FLOAT_IO = (torch.float16, torch.bfloat16, torch.float32)


def reference_fn(op: object) -> Callable:
    """The Python function a ``torch.library.custom_op`` was defined with (its all-device reference)."""
    return op._init_fn  # type: ignore[attr-defined]


@torch.library.custom_op("conqur::hadamard_quantize_per_token", mutates_args=())
def hadamard_quantize_per_token(x: Tensor, block: int, bits: int, clip_ratio: float) -> tuple[Tensor, Tensor]:
    """int8 codes ``[M, K]`` and float32 scales ``[M, 1]`` of the rotated 2-D ``x`` (rotation in float32)."""
    y = fast_hadamard_transform(x.to(torch.float32), block or None)
    return reference_fn(reference.quantize_per_token)(y, bits, clip_ratio)


@hadamard_quantize_per_token.register_fake
def _(x: Tensor, block: int, bits: int, clip_ratio: float) -> tuple[Tensor, Tensor]:
    return reference.codes_and_scales_like(x)


@torch.library.custom_op("conqur::hadamard_quantize_per_token_centered", mutates_args=())
def hadamard_quantize_per_token_centered(x: Tensor, block: int, bits: int, clip_ratio: float) -> tuple[Tensor, Tensor]:
    """Centered asymmetric int8 codes ``[M, K]`` and float32 scales ``[M, 1]`` of the rotated 2-D ``x``."""
    y = fast_hadamard_transform(x.to(torch.float32), block or None)
    return reference_fn(reference.quantize_per_token_centered)(y, bits, clip_ratio)


@hadamard_quantize_per_token_centered.register_fake
def _(x: Tensor, block: int, bits: int, clip_ratio: float) -> tuple[Tensor, Tensor]:
    return reference.codes_and_scales_like(x)


@torch.library.custom_op("conqur::int4_scaled_mm", mutates_args=())
def int4_scaled_mm(
    a_q: Tensor, a_scale: Tensor, b_packed: Tensor, b_scale: Tensor, bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """``conqur::int_scaled_mm`` with INT4 weights packed 8 per int32 along K."""
    b_q = unpack_int4(b_packed, a_q.shape[1])
    return reference_fn(reference.int_scaled_mm)(a_q, a_scale, b_q, b_scale, bias, out_dtype)


@int4_scaled_mm.register_fake
def _(a_q: Tensor, a_scale: Tensor, b_packed: Tensor, b_scale: Tensor, bias: Tensor | None,
      out_dtype: torch.dtype) -> Tensor:
    return a_q.new_empty((a_q.shape[0], b_packed.shape[0]), dtype=out_dtype)


def _triton_ok(x: Tensor) -> bool:
    return TRITON_AVAILABLE and x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 0)


def _quantize_cuda(
    x: Tensor, bits: int, clip_ratio: float, absmax: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    from conqur_vllm.kernels import triton_quant

    if _triton_ok(x) and x.dim() == 2 and 2 <= bits <= 8 and triton_quant.row_plan(x.shape[1], None, False):
        return triton_quant.quantize_per_token(x, bits, clip_ratio, absmax)
    return reference_fn(reference.quantize_per_token)(x, bits, clip_ratio, absmax)


def _hadamard_quantize_cuda(x: Tensor, block: int, bits: int, clip_ratio: float) -> tuple[Tensor, Tensor]:
    from conqur_vllm.kernels import triton_quant

    if _triton_ok(x) and x.dim() == 2 and 2 <= bits <= 8 and triton_quant.supports(x.shape[1], block or None):
        return triton_quant.hadamard_quantize(x, block or None, bits, clip_ratio)
    return reference_fn(hadamard_quantize_per_token)(x, block, bits, clip_ratio)


def _centered_ok(x: Tensor, bits: int) -> bool:
    return _triton_ok(x) and x.dim() == 2 and 2 <= bits <= reference.MAX_CENTERED_BITS


def _quantize_centered_cuda(
    x: Tensor, bits: int, clip_ratio: float, row_min: Tensor | None = None, row_max: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    from conqur_vllm.kernels import triton_quant

    if (_centered_ok(x, bits) and (row_min is None) == (row_max is None)
            and triton_quant.row_plan(x.shape[1], None, False)):
        return triton_quant.quantize_per_token_centered(x, bits, clip_ratio, row_min, row_max)
    return reference_fn(reference.quantize_per_token_centered)(x, bits, clip_ratio, row_min, row_max)


def _hadamard_quantize_centered_cuda(x: Tensor, block: int, bits: int, clip_ratio: float) -> tuple[Tensor, Tensor]:
    from conqur_vllm.kernels import triton_quant

    if _centered_ok(x, bits) and triton_quant.supports(x.shape[1], block or None):
        return triton_quant.hadamard_quantize_centered(x, block or None, bits, clip_ratio)
    return reference_fn(hadamard_quantize_per_token_centered)(x, block, bits, clip_ratio)


def _hadamard_cuda(x: Tensor, block: int) -> Tensor:
    from conqur_vllm.kernels import triton_quant

    n = x.shape[-1] if x.dim() else 0
    if _triton_ok(x) and x.dtype in _FLOAT_IO and triton_quant.supports(n, block or None):
        return triton_quant.hadamard_transform(x, block or None)
    return reference_fn(transforms.hadamard_transform)(x, block)


def _mm_ok(a_q: Tensor, b_scale: Tensor, out_dtype: torch.dtype) -> bool:
    from conqur_vllm.kernels import triton_gemm

    return (_triton_ok(a_q) and out_dtype in _FLOAT_IO and b_scale.dim() == 2
            and triton_gemm.supports(a_q.shape[1], b_scale.shape[1]))


def _int_scaled_mm_cuda(a_q: Tensor, a_scale: Tensor, b_q: Tensor, b_scale: Tensor, bias: Tensor | None,
                        out_dtype: torch.dtype) -> Tensor:
    from conqur_vllm.kernels import triton_gemm

    if _mm_ok(a_q, b_scale, out_dtype):
        return triton_gemm.scaled_mm(a_q, a_scale, b_q, b_scale, bias, out_dtype, packed=False)
    return reference_fn(reference.int_scaled_mm)(a_q, a_scale, b_q, b_scale, bias, out_dtype)


def _int4_scaled_mm_cuda(a_q: Tensor, a_scale: Tensor, b_packed: Tensor, b_scale: Tensor, bias: Tensor | None,
                         out_dtype: torch.dtype) -> Tensor:
    from conqur_vllm.kernels import triton_gemm

    if _mm_ok(a_q, b_scale, out_dtype) and a_q.shape[1] % 8 == 0:
        return triton_gemm.scaled_mm(a_q, a_scale, b_packed, b_scale, bias, out_dtype, packed=True)
    return reference_fn(int4_scaled_mm)(a_q, a_scale, b_packed, b_scale, bias, out_dtype)


CUDA_KERNELS: dict[str, Callable] = {
    "conqur::quantize_per_token": _quantize_cuda,
    "conqur::hadamard_quantize_per_token": _hadamard_quantize_cuda,
    "conqur::quantize_per_token_centered": _quantize_centered_cuda,
    "conqur::hadamard_quantize_per_token_centered": _hadamard_quantize_centered_cuda,
    "conqur::hadamard_transform": _hadamard_cuda,
    "conqur::int_scaled_mm": _int_scaled_mm_cuda,
    "conqur::int4_scaled_mm": _int4_scaled_mm_cuda,
}
"""Op name -> CUDA implementation (registered below when Triton is installed)."""

if TRITON_AVAILABLE:
    for _name, _fn in CUDA_KERNELS.items():
        torch.library.register_kernel(_name, "cuda", _fn)
