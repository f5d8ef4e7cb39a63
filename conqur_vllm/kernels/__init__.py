"""Integer W4A4 kernels behind custom-op names (``torch.ops.conqur.*``) and the backend choice.

Importing this package registers ``conqur::quantize_per_token`` (and its asymmetric forms
``conqur::quantize_per_token_asym`` and ``conqur::quantize_per_token_centered``), ``conqur::int_scaled_mm``,
``conqur::hadamard_transform``, the fused ``conqur::hadamard_quantize_per_token[_centered]``,
``conqur::int4_scaled_mm`` and (CPU) ``conqur::onednn_int_scaled_mm``.

Backends of :func:`make_int_gemm` (resident bytes per weight in brackets):

- ``reference`` [1]: ``conqur::int_scaled_mm`` on int8 codes (exact integer accumulation; any device).
- ``onednn`` [1]: oneDNN s8 x s8 GEMM held by vLLM's CPU extension; fastest from ~32 rows on.
- ``hybrid`` [2]: oneDNN, plus the codes for the reference GEMM on calls with fewer than 16 rows (decode).
- ``int4`` [0.5]: ``conqur::int4_scaled_mm`` on INT4 codes packed 8 per int32 (compressed-tensors layout):
  the Triton kernel (unpacked in-kernel, INT8 MMA) on CUDA, the exact reference elsewhere.
- ``auto``: ``hybrid`` on CPU when oneDNN is there and the weights are 4-bit (symmetric codes in [-8, 7] or
  centered asymmetric ones in [-15, 15]); ``int4`` on CUDA when Triton is installed and the weights are symmetric
  INT4 with K a multiple of 8; else ``reference`` (on CUDA the Triton GEMM on int8 codes; logged once).

The ``CONQUR_INT_GEMM`` environment variable picks the backend of the vLLM plugin (default ``auto``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from conqur_vllm.formats import pack_int4
from conqur_vllm.kernels import cuda, onednn, reference, transforms  # noqa: F401  (registers the ops)
from conqur_vllm.kernels.onednn import OneDNNIntGemm, onednn_available
from conqur_vllm.kernels.reference import ReferenceIntGemm, int_matmul

logger = logging.getLogger(__name__)
_FALLBACK_LOGGED: list[bool] = []  # the CUDA fallback is logged once per process

Backend = Literal["auto", "hybrid", "int4", "onednn", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "hybrid", "int4", "onednn", "reference")
BACKEND_ENV = "CONQUR_INT_GEMM"

IntGemm = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def backend_from_env() -> Backend:
    """The backend named by ``CONQUR_INT_GEMM`` (``auto`` when unset); a bad value is a one-line error."""
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r} is not a backend; use one of {', '.join(BACKENDS)}")
    return value  # type: ignore[return-value]


class PackedInt4Gemm:
    """``conqur::int4_scaled_mm`` over INT4 codes packed ``[N, K/8]`` int32 (resident: 0.5 byte per weight)."""

    b_q = None

    def __init__(self, b_q: Tensor, b_scale: Tensor, out_dtype: torch.dtype) -> None:
        self.b_packed = pack_int4(b_q)
        self.b_scale = b_scale.to(torch.float32)
        self.out_dtype = out_dtype
        self.name = "int4-triton" if b_q.is_cuda and cuda.TRITON_AVAILABLE else "int4-reference"
        if self.name == "int4-triton":  # split-K accumulators for decode, allocated before any graph capture
            from conqur_vllm.kernels import triton_gemm

            n, k = b_q.shape
            triton_gemm.reserve_workspace(triton_gemm.workspace_size(n, k, b_q.device), b_q.device)

    def __call__(self, a_q: Tensor, a_scale: Tensor, bias: Tensor | None) -> Tensor:
        return torch.ops.conqur.int4_scaled_mm(a_q, a_scale, self.b_packed, self.b_scale, bias, self.out_dtype)


def preferred_backend(on_cuda: bool) -> Backend:
    """What ``auto`` picks for INT4 weights on this platform (weights that do not fit fall back to ``reference``)."""
    if on_cuda:
        return "int4" if cuda.TRITON_AVAILABLE else "reference"
    return "hybrid" if onednn_available() else "reference"


def make_int_gemm(b_q: Tensor, b_scale: Tensor, out_dtype: torch.dtype, backend: Backend = "auto") -> IntGemm:
    """A callable ``(a_q, a_scale, bias) -> out`` for weights ``b_q`` (int8 ``[N, K]``) and scales ``[N, G]``.

    The returned object has ``name`` (the backend used) and ``b_q`` (the int8 codes it keeps, or None).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown integer GEMM backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    lo, hi = (int(v) for v in torch.aminmax(b_q)) if b_q.numel() else (0, 0)
    four_bit = max(-lo, hi) <= onednn.MAX_WEIGHT_CODE  # symmetric or centered asymmetric INT4
    signed_int4 = lo >= -8 and hi <= 7
    usable = b_q.device.type == "cpu" and four_bit and onednn_available()
    packable = signed_int4 and b_q.shape[1] % 8 == 0
    if backend in ("onednn", "hybrid") and not usable:
        raise ValueError(f"the {backend} backend needs INT4 weights on CPU and vLLM's CPU extension; "
                         "use backend 'auto' or 'reference'")
    if backend == "int4" and not packable:
        raise ValueError("the int4 backend needs signed INT4 weight codes (symmetric weights) and an input size "
                         "divisible by 8; use backend 'auto' or 'reference'")
    if backend == "auto":
        preferred = preferred_backend(b_q.is_cuda)
        backend = preferred if {"hybrid": usable, "int4": packable}.get(preferred, True) else "reference"
        if b_q.is_cuda and backend == "reference" and not _FALLBACK_LOGGED:
            _FALLBACK_LOGGED.append(True)
            if preferred == "reference":
                logger.warning("conqur: Triton is not installed, so CUDA linears use the reference integer GEMM (slow)")
            else:  # conqur::int_scaled_mm runs the same Triton GEMM on int8 codes
                logger.info("conqur: weights are not symmetric INT4 with K %% 8 == 0 (e.g. asymmetric weights), so "
                            "CUDA linears keep int8 codes (1 byte per weight) for the Triton GEMM")
    if backend == "onednn":
        return OneDNNIntGemm(b_q, b_scale, out_dtype)
    if backend == "hybrid":
        return OneDNNIntGemm(b_q, b_scale, out_dtype, keep_codes=True)
    if backend == "int4":
        return PackedInt4Gemm(b_q, b_scale, out_dtype)
    return ReferenceIntGemm(b_q, b_scale, out_dtype)


__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "IntGemm",
    "OneDNNIntGemm",
    "PackedInt4Gemm",
    "ReferenceIntGemm",
    "backend_from_env",
    "int_matmul",
    "make_int_gemm",
    "onednn_available",
    "preferred_backend",
]
