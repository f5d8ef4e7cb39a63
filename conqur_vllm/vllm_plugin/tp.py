"""Tensor-parallel helpers: the per-token maximum (or minimum and maximum) of a row split across ranks.

A row-parallel linear (o_proj, down_proj) sees one shard of each token's input. Per-token quantization must use
the extremes over the whole row, as with one device, so the local ones are all-reduced with MAX over vLLM's
tensor-parallel group. ``conqur::tp_all_reduce_max`` wraps the collective as an opaque custom op (``[M, 1]``
floats per call) so compiled graphs keep it as one node.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


@torch.library.custom_op("conqur::tp_all_reduce_max", mutates_args=())
def tp_all_reduce_max(x: Tensor) -> Tensor:
    """Elementwise maximum of ``x`` over the tensor-parallel ranks."""
    from vllm.distributed import get_tp_group

    out = x.clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=get_tp_group().device_group)
    return out


@tp_all_reduce_max.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


def row_absmax(x: Tensor, sharded: bool) -> Tensor | None:
    """Per-row ``max |x|`` over the full row (float32 ``[M, 1]``) when ``x`` is a shard of it, else None."""
    if not sharded:
        return None
    return torch.ops.conqur.tp_all_reduce_max(x.abs().amax(dim=-1, keepdim=True).to(torch.float32))


def row_range(x: Tensor, sharded: bool) -> tuple[Tensor | None, Tensor | None]:
    """Per-row minimum and maximum over the full row (float32 ``[M, 1]`` each) when ``x`` is a shard of it,
    else ``(None, None)``; one all-reduce of the maxima and the negated minima."""
    if not sharded:
        return None, None
    local = torch.cat([x.amax(dim=-1, keepdim=True), -x.amin(dim=-1, keepdim=True)], dim=-1).to(torch.float32)
    both = torch.ops.conqur.tp_all_reduce_max(local)
    return -both[:, 1:], both[:, :1]
