"""CPU integer GEMM through vLLM's oneDNN int8 matmul (s8 x s8 -> s32 accumulation, float epilogue).

``conqur::onednn_int_scaled_mm(a_q, a_scale, handles, n, bias, out_dtype, b_q, b_scale, small_m)`` has the
contract of ``conqur::int_scaled_mm`` (see ``reference.py``) but takes the weights as oneDNN handlers created by
:class:`OneDNNIntGemm`: one handler per scale group, each holding its int8 ``[K/G, N]`` weight slice and its
per-channel scales. The epilogue ``a_scale * b_scale * acc`` runs inside oneDNN; groups are summed in float32.

oneDNN's s8 GEMM has a fixed cost per call that dominates for a few rows (measured on AVX2: ~1.5 ms for
1 x 576 x 1536, where the reference GEMM takes ~0.3 ms; oneDNN wins from ~32 rows on). When the int8 codes
``b_q`` are passed as well, calls with fewer than ``small_m`` rows use the exact reference GEMM on them.

Resident memory: the int8 weights held by oneDNN (1 byte per weight) plus float32 scales, and another byte per
weight when the codes are kept for the few-rows path.

Only 4-bit weights go through oneDNN, symmetric codes or the centered codes ``q - zero`` of asymmetric ones
(|w| <= 15): without VNNI, oneDNN's s8 x s8 kernels add pairs of u8 x s8 products in int16 with saturation, which
full-range 8-bit weights can overflow, while 2 x 255 x 15 < 2^15 keeps every intermediate exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from conqur_vllm.kernels.reference import int_scaled_mm_impl

MAX_WEIGHT_CODE = 15
"""Largest |weight code| this path accepts (INT4, symmetric or centered asymmetric)."""

SMALL_M = 16
"""Row count below which the reference GEMM is faster than oneDNN (when the codes are kept)."""


def onednn_available() -> bool:
    """True when vLLM's CPU extension with oneDNN int8 matmul is loaded (vLLM CPU builds on x86/Arm)."""
    try:
        from vllm import _custom_ops  # noqa: F401  (loads the platform's kernels)
    except Exception:  # noqa: BLE001 - any import problem means the path is unavailable
        return False
    return hasattr(torch.ops._C, "create_onednn_scaled_mm_handler") and hasattr(torch.ops._C, "onednn_scaled_mm")


class OneDNNIntGemm:
    """oneDNN handlers for int8 codes ``b_q [N, K]`` (values in [-15, 15]) with float32 scales ``b_scale [N, G]``.

    ``keep_codes``: also keep ``b_q`` (1 byte per weight) and send calls with fewer than ``SMALL_M`` rows to
    the reference GEMM.
    """

    def __init__(self, b_q: Tensor, b_scale: Tensor, out_dtype: torch.dtype, keep_codes: bool = False) -> None:
        from vllm import _custom_ops as ops

        if b_q.dtype != torch.int8 or b_q.dim() != 2 or b_q.device.type != "cpu":
            raise ValueError(f"OneDNNIntGemm needs 2-D int8 CPU weights, got {b_q.dtype} {tuple(b_q.shape)} "
                             f"on {b_q.device}")
        n, k = b_q.shape
        groups = b_scale.shape[-1]
        if b_scale.shape != (n, groups) or k % groups:
            raise ValueError(f"weight scale shape {tuple(b_scale.shape)} does not fit weights {(n, k)}")
        if b_q.numel() and int(b_q.abs().max()) > MAX_WEIGHT_CODE:
            raise ValueError(f"oneDNN path takes INT4 weight codes (|w| <= {MAX_WEIGHT_CODE}); use the reference "
                             "kernel for 8-bit weights")
        gs = k // groups
        handler_dtype = out_dtype if groups == 1 else torch.float32
        # oneDNN copies the weights but keeps a pointer to the scales: they must stay alive with the handlers.
        self._scales = [b_scale[:, g].to(torch.float32).contiguous().clone() for g in range(groups)]
        self._handlers = [
            ops.create_onednn_scaled_mm(
                b_q[:, g * gs:(g + 1) * gs].contiguous().t(),  # [K/G, N] view of a contiguous [N, K/G]
                self._scales[g],
                handler_dtype,
                True,  # dynamic (per-token) activation scales
                False,  # symmetric activations: no zero point
                32,
            )
            for g in range(groups)
        ]
        self.handles = torch.stack([h.handler_tensor.reshape(()) for h in self._handlers])
        self.n = n
        self.out_dtype = out_dtype
        self.b_q = b_q if keep_codes else None
        self.b_scale = b_scale.to(torch.float32) if keep_codes else None
        self.small_m = SMALL_M if keep_codes else 0
        self.name = "onednn+reference" if keep_codes else "onednn"

    def __call__(self, a_q: Tensor, a_scale: Tensor, bias: Tensor | None) -> Tensor:
        return torch.ops.conqur.onednn_int_scaled_mm(
            a_q, a_scale, self.handles, self.n, bias, self.out_dtype, self.b_q, self.b_scale, self.small_m
        )


@torch.library.custom_op("conqur::onednn_int_scaled_mm", mutates_args=(), device_types="cpu")
def onednn_int_scaled_mm(
    a_q: Tensor,
    a_scale: Tensor,
    handles: Tensor,
    n: int,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    b_q: Tensor | None = None,
    b_scale: Tensor | None = None,
    small_m: int = 0,
) -> Tensor:
    """``a_scale * sum_g b_scale_g * (a_q_g @ b_q_g.T) + bias`` with the weights behind ``handles``."""
    m, k = a_q.shape
    groups = handles.numel()
    if m == 0:
        return a_q.new_empty((0, n), dtype=out_dtype)
    if b_q is not None and b_scale is not None and m < small_m:
        return int_scaled_mm_impl(a_q, a_scale, b_q, b_scale, bias, out_dtype)
    a_scale = a_scale.to(torch.float32).contiguous()
    if groups == 1:
        out = torch.empty((m, n), dtype=out_dtype)
        b = None if bias is None else bias.to(out_dtype)
        torch.ops._C.onednn_scaled_mm(out, a_q.contiguous(), a_scale, None, None, b, handles[0])
        return out
    a_groups = a_q.reshape(m, groups, k // groups).transpose(0, 1).contiguous()
    acc = torch.zeros((m, n), dtype=torch.float32)
    part = torch.empty((m, n), dtype=torch.float32)
    for g in range(groups):
        torch.ops._C.onednn_scaled_mm(part, a_groups[g], a_scale, None, None, None, handles[g])
        acc += part
    if bias is not None:
        acc += bias.to(torch.float32)
    return acc.to(out_dtype)


@onednn_int_scaled_mm.register_fake
def _(a_q: Tensor, a_scale: Tensor, handles: Tensor, n: int, bias: Tensor | None, out_dtype: torch.dtype,
      b_q: Tensor | None = None, b_scale: Tensor | None = None, small_m: int = 0) -> Tensor:
    return a_q.new_empty((a_q.shape[0], n), dtype=out_dtype)
