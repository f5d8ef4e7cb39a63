"""Online rotations as a custom op, so compiled graphs keep them as one opaque node.

``conqur::hadamard_transform(x, block)`` is ``x @ H`` over the last dim with H the orthonormal Hadamard matrix
of that size (``block == 0``) or the block-diagonal one with blocks of ``block``; the result has x's dtype.
Its all-device implementation is :func:`conqur_vllm.hadamard.hadamard_transform` (one small GEMM per Kronecker
factor, as the calibrator's simulated model computes it): on CPUs a few GEMMs are far cheaper than the
butterflies' log2(n) rounds of small ops. CUDA registers the Triton butterfly kernel (``cuda.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from conqur_vllm.hadamard import hadamard_transform as kronecker_hadamard_transform


@torch.library.custom_op("conqur::hadamard_transform", mutates_args=())
def hadamard_transform(x: Tensor, block: int) -> Tensor:
    """``x @ H`` by Kronecker-factor GEMMs (``block`` 0: the full Hadamard); never aliases ``x``."""
    y = kronecker_hadamard_transform(x, block or None)
    return y.clone() if y.data_ptr() == x.data_ptr() else y


@hadamard_transform.register_fake
def _(x: Tensor, block: int) -> Tensor:
    return x.new_empty(x.shape)
