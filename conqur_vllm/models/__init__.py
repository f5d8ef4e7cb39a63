"""Per-architecture module maps, declared as data."""

from conqur_vllm.models.adapters import (
    ADAPTERS,
    ModelAdapter,
    UnsupportedArchitecture,
    get_adapter,
)

__all__ = ["ADAPTERS", "ModelAdapter", "UnsupportedArchitecture", "get_adapter"]
