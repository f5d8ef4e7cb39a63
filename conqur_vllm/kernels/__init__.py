"""Integer W4A4 kernels behind custom-op names (``torch.ops.conqur.*``) and the backend choice.

Importing this package registers ``conqur::quantize_per_token``, ``conqur::int_scaled_mm``,
``conqur::hadamard_transform`` and (CPU) ``conqur::onednn_int_scaled_mm``. :func:`make_int_gemm` returns the
fastest correct GEMM for a weight: oneDNN on CPU when vLLM's CPU extension is loaded and the weights are INT4,
else the reference op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from conqur_vllm.kernels import onednn, reference, transforms  # noqa: F401  (registers the ops)
from conqur_vllm.kernels.onednn import OneDNNIntGemm, onednn_available
from conqur_vllm.kernels.reference import ReferenceIntGemm, int_matmul

Backend = Literal["auto", "onednn", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "onednn", "reference")


def make_int_gemm(
    b_q: Tensor, b_scale: Tensor, out_dtype: torch.dtype, backend: Backend = "auto"
) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    """A callable ``(a_q, a_scale, bias) -> out`` for weights ``b_q`` (int8 ``[N, K]``) and scales ``[N, G]``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown integer GEMM backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    int4 = b_q.numel() == 0 or int(b_q.abs().max()) <= onednn.MAX_WEIGHT_CODE
    usable = b_q.device.type == "cpu" and int4 and onednn_available()
    if backend == "onednn" and not usable:
        raise ValueError("the oneDNN backend needs INT4 weights on CPU and vLLM's CPU extension; use backend='auto'")
    if backend == "onednn" or (backend == "auto" and usable):
        return OneDNNIntGemm(b_q, b_scale, out_dtype)
    return ReferenceIntGemm(b_q, b_scale, out_dtype)


__all__ = [
    "BACKENDS",
    "OneDNNIntGemm",
    "ReferenceIntGemm",
    "int_matmul",
    "make_int_gemm",
    "onednn_available",
]
