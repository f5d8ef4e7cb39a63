"""vLLM names that moved between releases (0.26 .. 0.32), resolved once."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def attention_layer_type() -> type:
    """vLLM's decoder ``Attention`` layer class."""
    try:
        from vllm.model_executor.layers.attention import Attention
    except ImportError:  # vLLM releases before the attention package moved
        from vllm.attention.layer import Attention
    return Attention


def register_weight_loader_v2(cls: type[T]) -> type[T]:
    """Mark a linear method as using ``weight_loader_v2`` (vLLM parameter classes handle fused/TP loading)."""
    try:
        from vllm.model_executor.layers.linear import register_weight_loader_v2_supported_method
    except ImportError:
        from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED

        if cls.__name__ not in WEIGHT_LOADER_V2_SUPPORTED:
            WEIGHT_LOADER_V2_SUPPORTED.append(cls.__name__)
        return cls
    return register_weight_loader_v2_supported_method(cls)
