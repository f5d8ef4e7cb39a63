"""vLLM plugin serving conqur checkpoints (``quant_method: "conqur"`` in config.json).

``register()`` is the ``vllm.general_plugins`` entry point: vLLM calls it in the API process, the engine core
and every worker. It is idempotent and cheap: importing :mod:`conqur_vllm.vllm_plugin.quant_config` registers
the ``conqur`` quantization method (and the ``conqur::*`` custom ops). A checkpoint is then served with no
extra flag: ``vllm.LLM(model=path)``.
"""

from __future__ import annotations

from typing import Any

_registered = False


def register() -> None:
    """Register the ``conqur`` quantization method with vLLM (safe to call any number of times)."""
    global _registered
    if _registered:
        return
    from conqur_vllm.vllm_plugin import quant_config  # noqa: F401  (@register_quantization_config)

    _registered = True


def default_kv_cache_dtype(
    quant_config: Any, platform: Any = None, requested: str | None = None, model_dtype: str | None = None
) -> str:
    """See :func:`conqur_vllm.vllm_plugin.kv_dtype.default_kv_cache_dtype`."""
    from conqur_vllm.vllm_plugin.kv_dtype import default_kv_cache_dtype as choose

    return choose(quant_config, platform, requested, model_dtype)


__all__ = ["default_kv_cache_dtype", "register"]
