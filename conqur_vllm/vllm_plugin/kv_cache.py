"""KV-cache method of the plugin: R3 (Hadamard on Q and K after RoPE) and the KV-cache dtype check.

R3 is a forward pre-hook on vLLM's ``Attention`` layer, which receives Q and K after RoPE and before the KV
cache write: both are rotated per head (last dim = head_dim), so QKᵀ is unchanged and the cached K is the
rotated one the checkpoint was calibrated for. The hook calls ``conqur::hadamard_transform``, an opaque op under
``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from vllm.logger import init_logger
from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod

from conqur_vllm.config import CheckpointConfigError, OnlineTransform
from conqur_vllm.kernels import transforms  # noqa: F401  (registers conqur::hadamard_transform)
from conqur_vllm.vllm_plugin.kv_dtype import KVPlatform, check_kv_cache_dtype, default_kv_cache_dtype

logger = init_logger(__name__)

HOOK_ATTR = "_conqur_r3_hook"
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}

__all__ = ["ConqurKVCacheMethod", "default_kv_cache_dtype", "install_r3_hook", "rotate_heads"]


def rotate_heads(x: Tensor, head_size: int, block: int) -> Tensor:
    """``x @ H`` on every head of ``x`` (``[..., heads * head_size]`` or ``[..., heads, head_size]``)."""
    y = torch.ops.conqur.hadamard_transform(x.reshape(-1, head_size), block)
    return y.view(x.shape)


def make_r3_pre_hook(head_size: int, block: int) -> Callable[..., tuple[tuple, dict]]:
    """A ``forward_pre_hook(with_kwargs=True)`` rotating ``query`` and ``key`` of ``Attention.forward``."""

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        args = list(args)
        for i, name in enumerate(("query", "key")):
            if i < len(args):
                if args[i] is not None:
                    args[i] = rotate_heads(args[i], head_size, block)
            elif kwargs.get(name) is not None:
                kwargs[name] = rotate_heads(kwargs[name], head_size, block)
        return tuple(args), kwargs

    return hook


def install_r3_hook(layer: nn.Module, transform: OnlineTransform) -> None:
    """(Re)install the R3 pre-hook on an attention layer; idempotent."""
    head_size = int(layer.head_size)
    if transform.size != head_size:
        raise CheckpointConfigError(
            f"{getattr(layer, 'layer_name', 'attention')}: qk_post_rope transform size {transform.size} != "
            f"head_dim {head_size}; the checkpoint does not belong to this model"
        )
    old = getattr(layer, HOOK_ATTR, None)
    if old is not None:
        old.remove()
    block = 0 if transform.block_size == head_size else transform.block_size
    handle = layer.register_forward_pre_hook(make_r3_pre_hook(head_size, block), with_kwargs=True)
    setattr(layer, HOOK_ATTR, handle)


class ConqurKVCacheMethod(BaseKVCacheMethod):
    """vLLM's KV scale handling plus R3 and a check that the chosen cache dtype exists on this platform."""

    def create_weights(self, layer: nn.Module) -> None:
        dtype = getattr(layer, "kv_cache_dtype", "auto")
        if dtype != "auto":
            check_kv_cache_dtype(dtype, KVPlatform.detect(), DTYPE_NAMES.get(getattr(layer, "dtype", None)))
        super().create_weights(layer)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        super().process_weights_after_loading(layer)
        checkpoint = self.quant_config.checkpoint
        transform = checkpoint.transform("qk_post_rope")
        if transform is not None:
            install_r3_hook(layer, transform)
        used = getattr(layer, "kv_cache_dtype", "auto")
        best = default_kv_cache_dtype(checkpoint)
        if used == "auto" and checkpoint.kv_cache.num_bits < 16:
            logger.info_once(
                "conqur: checkpoint calibrated for a %d-bit KV cache; serving it in the model dtype (%s)",
                checkpoint.kv_cache.num_bits,
                "pass --kv-cache-dtype " + best if best != "auto" else "no quantized KV cache on this platform",
            )
