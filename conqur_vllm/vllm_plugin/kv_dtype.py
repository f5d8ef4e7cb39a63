"""Which vLLM ``kv_cache_dtype`` serves a checkpoint's ``kv_cache.num_bits`` on a given platform.

- ``num_bits`` 16: ``auto`` (the model dtype).
- CPU: vLLM's CPU attention stores only fp8 (e4m3) as a quantized cache, and only on x86 with AVX-512 or AMX;
  elsewhere the cache stays ``auto``.
- GPU: ``int4_per_token_head`` / ``int8_per_token_head`` when this vLLM knows them, else ``fp8``.

An explicit choice is validated against what the platform offers (the model dtype, e.g. ``bfloat16``, is always
allowed: an unquantized cache); a bad one is a one-line ValueError.
The plugin applies an fp8 default by itself (see ``ConqurConfig.kv_cache_scheme``); a per-token-head default
must be passed to vLLM as ``--kv-cache-dtype``, which ``conqur serve`` does with :func:`default_kv_cache_dtype`.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import torch

from conqur_vllm.config import ConqurQuantConfig

CPU_FP8_DTYPES: tuple[str, ...] = ("fp8", "fp8_e4m3")
MODEL_DTYPES: tuple[str, ...] = ("bfloat16", "float16")
FALLBACK_GPU_DTYPES: tuple[str, ...] = ("auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2")
REFUSED = {
    "fp8_e5m2": "vLLM refuses fp8_e5m2 for checkpoints that bring their own KV-cache method; use 'fp8' (e4m3)",
}


def _vllm_cache_dtypes() -> tuple[str, ...]:
    try:
        from vllm.config.cache import CacheDType
    except ImportError:
        return FALLBACK_GPU_DTYPES
    return tuple(typing.get_args(CacheDType)) or FALLBACK_GPU_DTYPES


def cpu_supports_fp8_kv() -> bool:
    """vLLM's CPU attention needs AVX-512 or AMX for an fp8 KV cache."""
    return bool(torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported())


@dataclass(frozen=True)
class KVPlatform:
    """What a platform's vLLM attention can store: device kind, fp8 support, accepted ``kv_cache_dtype`` values."""

    device: str
    fp8: bool
    dtypes: tuple[str, ...]

    @classmethod
    def cpu(cls, fp8: bool | None = None) -> KVPlatform:
        fp8 = cpu_supports_fp8_kv() if fp8 is None else fp8
        return cls("cpu", fp8, ("auto", *CPU_FP8_DTYPES) if fp8 else ("auto",))

    @classmethod
    def detect(cls, platform: object | None = None) -> KVPlatform:
        """From a vLLM ``Platform`` (default: ``vllm.platforms.current_platform``)."""
        if platform is None:
            from vllm.platforms import current_platform as platform
        if platform.is_cpu():
            return cls.cpu()
        dtypes = _vllm_cache_dtypes()
        return cls(str(getattr(platform, "device_type", "gpu") or "gpu"), "fp8" in dtypes, dtypes)


def _checkpoint(quant_config: object) -> ConqurQuantConfig:
    ckpt = getattr(quant_config, "checkpoint", quant_config)
    if not isinstance(ckpt, ConqurQuantConfig):
        raise TypeError(f"expected a ConqurQuantConfig or ConqurConfig, got {type(quant_config).__name__}")
    return ckpt


def check_kv_cache_dtype(requested: str, platform: KVPlatform, model_dtype: str | None = None) -> str:
    """``requested`` if this platform can store it; otherwise a ValueError naming what it supports.

    The model dtype itself (``model_dtype``, e.g. ``bfloat16``) is always accepted: an unquantized cache, the way
    to opt out of the fp8 default.
    """
    if requested in REFUSED:
        raise ValueError(f"kv_cache_dtype {requested!r}: {REFUSED[requested]}")
    if requested == model_dtype and requested in MODEL_DTYPES:
        return requested
    if requested not in platform.dtypes:
        hint = " (fp8 on CPU needs AVX-512 or AMX)" if platform.device == "cpu" and not platform.fp8 else ""
        raise ValueError(
            f"kv_cache_dtype {requested!r} is not available on {platform.device}{hint}; supported: "
            f"{', '.join(platform.dtypes)} (or omit it to use the checkpoint's default)"
        )
    return requested


def default_kv_cache_dtype(
    quant_config: object,
    platform: KVPlatform | object | None = None,
    requested: str | None = None,
    model_dtype: str | None = None,
) -> str:
    """The ``kv_cache_dtype`` to serve a checkpoint with (``requested`` wins if the platform supports it).

    ``quant_config`` is a :class:`ConqurQuantConfig` or the plugin's ``ConqurConfig``; ``platform`` a
    :class:`KVPlatform`, a vLLM ``Platform``, or None for the current one; ``model_dtype`` the serving dtype
    (``bfloat16``/``float16``), which is accepted as an explicit unquantized cache.
    """
    ckpt = _checkpoint(quant_config)
    plat = platform if isinstance(platform, KVPlatform) else KVPlatform.detect(platform)
    if requested is not None and requested != "auto":
        return check_kv_cache_dtype(requested, plat, model_dtype)
    bits = ckpt.kv_cache.num_bits
    if bits >= 16:
        return "auto"
    if plat.device != "cpu":
        preferred = f"int{bits}_per_token_head"
        if preferred in plat.dtypes:
            return preferred
    return "fp8" if plat.fp8 else "auto"
