"""A ``conqur_checkpoint_info`` Prometheus metric next to vLLM's own on ``/metrics``.

Published into prometheus-client's default registry (the one vLLM's API server exposes) when vLLM builds the
quantization config; a repeated call updates the same metric.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Info

from conqur_vllm.config import ConqurQuantConfig

_info: Info | None = None


def kernel_path() -> str:
    """Which integer-GEMM path this process would run."""
    import torch

    from conqur_vllm.kernels import backend_from_env, cuda, preferred_backend

    on_cuda = torch.cuda.is_available()
    backend = backend_from_env()
    if backend == "auto":
        backend = preferred_backend(on_cuda)
    if on_cuda:
        return "cuda-triton-int4-int8mma" if backend == "int4" and cuda.TRITON_AVAILABLE else f"cuda-{backend}"
    return f"cpu-int8-{backend}"


def publish_checkpoint_info(ckpt: ConqurQuantConfig, kv_cache_dtype: str) -> None:
    global _info
    if _info is None:
        _info = Info("conqur_checkpoint", "conqur-vllm checkpoint being served", registry=REGISTRY)
    _info.info({
        "method": ckpt.method,
        "weight_bits": str(ckpt.weights.num_bits),
        "activation_bits": str(ckpt.activations.num_bits),
        "kv_bits": str(ckpt.kv_cache.num_bits),
        "group_size": str(ckpt.weights.group_size or "channel"),
        "online_transforms": ",".join(t.site for t in ckpt.online_transforms) or "none",
        "kernel_path": kernel_path(),
        "kv_cache_dtype": kv_cache_dtype,
    })
