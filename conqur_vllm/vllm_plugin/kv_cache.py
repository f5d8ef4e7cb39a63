"""KV-cache method of the plugin: R3 (Hadamard on Q and K after RoPE), the key shift, and the KV-cache dtype check.

R3 is a forward pre-hook on vLLM's ``Attention`` layer, which receives Q and K after RoPE and before the KV
cache write: both are rotated per head (last dim = head_dim), so QKᵀ is unchanged and the cached K is the
rotated one the checkpoint was calibrated for. The hook calls ``conqur::hadamard_transform``, an opaque op under
``torch.compile``. With ``kv_cache.key_shift`` the layer also loads ``k_shift`` (float32, this rank's KV heads
of the checkpoint's ``attn.k_shift``) and the same hook subtracts it from K after R3: every score of a query
moves by the same ``q.k_shift``, which the softmax ignores, and the cache stores keys without their common part.
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

__all__ = ["ConqurKVCacheMethod", "default_kv_cache_dtype", "install_qk_hook", "rotate_heads"]


def rotate_heads(x: Tensor, head_size: int, block: int) -> Tensor:
    """``x @ H`` on every head of ``x`` (``[..., heads * head_size]`` or ``[..., heads, head_size]``)."""
    y = torch.ops.conqur.hadamard_transform(x.reshape(-1, head_size), block)
    return y.view(x.shape)


def make_qk_pre_hook(head_size: int, block: int | None,
                     key_shift: Tensor | None = None) -> Callable[..., tuple[tuple, dict]]:
    """A ``forward_pre_hook(with_kwargs=True)`` on ``Attention.forward``: rotates ``query`` and ``key`` per head
    (``block`` None: no R3), then subtracts ``key_shift`` (``[kv_heads * head_size]``) from every key."""

    def transform(name: str, t: Tensor) -> Tensor:
        if block is not None:
            t = rotate_heads(t, head_size, block)
        if name == "key" and key_shift is not None:
            t = (t.reshape(-1, key_shift.numel()) - key_shift.to(t.dtype)).view(t.shape)
        return t

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        args = list(args)
        for i, name in enumerate(("query", "key")):
            if i < len(args):
                if args[i] is not None:
                    args[i] = transform(name, args[i])
            elif kwargs.get(name) is not None:
                kwargs[name] = transform(name, kwargs[name])
        return tuple(args), kwargs

    return hook


def install_qk_hook(layer: nn.Module, transform: OnlineTransform | None, key_shift: Tensor | None = None) -> None:
    """(Re)install the pre-hook for R3 (``transform``) and the key shift on an attention layer; idempotent."""
    head_size = int(layer.head_size)
    if transform is not None and transform.size != head_size:
        raise CheckpointConfigError(
            f"{getattr(layer, 'layer_name', 'attention')}: qk_post_rope transform size {transform.size} != "
            f"head_dim {head_size}; the checkpoint does not belong to this model"
        )
    old = getattr(layer, HOOK_ATTR, None)
    if old is not None:
        old.remove()
        setattr(layer, HOOK_ATTR, None)
    if transform is None and key_shift is None:
        return
    block = None if transform is None else (0 if transform.block_size == head_size else transform.block_size)
    handle = layer.register_forward_pre_hook(make_qk_pre_hook(head_size, block, key_shift), with_kwargs=True)
    setattr(layer, HOOK_ATTR, handle)


def _key_shift_loader(layer: nn.Module) -> Callable[[Tensor, Tensor], None]:
    """Loads this rank's KV heads of the checkpoint's ``[total_kv_heads * head_size]`` key shift (a KV head that
    vLLM replicates over several ranks goes to each of them, as in ``QKVParallelLinear``)."""

    def load(param: Tensor, loaded: Tensor) -> None:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        head_size = int(layer.head_size)
        total, per_rank = loaded.numel() // head_size, param.numel() // head_size
        if total * head_size != loaded.numel() or total < per_rank:
            raise CheckpointConfigError(
                f"{getattr(layer, 'layer_name', 'attention')}: attn.k_shift has {loaded.numel()} values, not a "
                f"multiple of head_dim {head_size} covering {per_rank} KV heads; the checkpoint does not belong "
                "to this model")
        rank, size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        first = rank * per_rank if total >= size else rank // (size // total)
        param.data.copy_(loaded.view(total, head_size)[first:first + per_rank].reshape(-1))

    return load


class ConqurKVCacheMethod(BaseKVCacheMethod):
    """vLLM's KV scale handling plus R3 and a check that the chosen cache dtype exists on this platform."""

    def create_weights(self, layer: nn.Module) -> None:
        dtype = getattr(layer, "kv_cache_dtype", "auto")
        if dtype != "auto":
            check_kv_cache_dtype(dtype, KVPlatform.detect(), DTYPE_NAMES.get(getattr(layer, "dtype", None)))
        super().create_weights(layer)
        if self.quant_config.checkpoint.kv_cache.key_shift:
            shift = nn.Parameter(torch.zeros(int(layer.num_kv_heads) * int(layer.head_size), dtype=torch.float32),
                                 requires_grad=False)
            shift.weight_loader = _key_shift_loader(layer)
            layer.register_parameter("k_shift", shift)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        super().process_weights_after_loading(layer)
        checkpoint = self.quant_config.checkpoint
        key_shift = getattr(layer, "k_shift", None) if checkpoint.kv_cache.key_shift else None
        install_qk_hook(layer, checkpoint.transform("qk_post_rope"), None if key_shift is None else key_shift.data)
        used = getattr(layer, "kv_cache_dtype", "auto")
        best = default_kv_cache_dtype(checkpoint)
        if used == "auto" and checkpoint.kv_cache.num_bits < 16:
            logger.info_once(
                "conqur: checkpoint calibrated for a %d-bit KV cache; serving it in the model dtype (%s)",
                checkpoint.kv_cache.num_bits,
                "pass --kv-cache-dtype " + best if best != "auto" else "no quantized KV cache on this platform",
            )
