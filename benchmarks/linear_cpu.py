"""CPU time of one served W4A4 linear (the plugin's ``ConqurLinearMethod.apply``): symmetric vs asymmetric codes.

SmolLM2 shapes (q/k/v 960 x 576, gate/up 3072 x 576, down 576 x 1536 with R4), float32 activations, the default
CPU backend; median of repeated calls after warm-up, on random weights and inputs (the time does not depend on
the values).

    .venv/bin/python benchmarks/linear_cpu.py
"""

from __future__ import annotations

import statistics
import time
from unittest import mock

import torch
from torch import nn

from conqur_vllm.checkpoint import quantized_linear_tensors
from conqur_vllm.config import ConqurQuantConfig
from conqur_vllm.quant import QuantSpec, quantize_weight_rtn

SHAPES = {"qkv_proj": (960, 576), "gate_up_proj": (3072, 576), "down_proj": (576, 1536)}


def build(prefix: str, n: int, k: int, symmetric: bool):
    from conqur_vllm.vllm_plugin.linear_method import ConqurLinearMethod
    from conqur_vllm.vllm_plugin.quant_config import ConqurConfig

    transforms = [{"site": "down_proj_input", "size": k}] if prefix.endswith("down_proj") else []
    cfg = ConqurConfig(ConqurQuantConfig.from_dict({"quant_method": "conqur", "activations": {"symmetric": symmetric},
                                                    "online_transforms": transforms}))
    method = ConqurLinearMethod(cfg, prefix)
    qt = quantize_weight_rtn(torch.randn(n, k) / k**0.5, QuantSpec(4), clip_search=False)
    tensors = quantized_linear_tensors("layer", qt, None)
    layer = nn.Module()
    method.create_weights(layer, k, [n], k, n, torch.float32, weight_loader=lambda p, t: p.data.copy_(t))
    for name in ("weight_packed", "weight_scale", "weight_shape"):
        getattr(layer, name).data.copy_(tensors[f"layer.{name}"])
    method.process_weights_after_loading(layer)
    return method, layer


def median_us(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def main() -> None:
    from vllm.model_executor import parameter

    print(f"{'linear':<14} {'M':>5} {'symmetric us':>13} {'asymmetric us':>14} {'ratio':>6}")
    with mock.patch.object(parameter, "get_tensor_model_parallel_rank", lambda: 0), \
            mock.patch.object(parameter, "get_tensor_model_parallel_world_size", lambda: 1), torch.no_grad():
        for name, (n, k) in SHAPES.items():
            prefix = f"model.layers.0.{'mlp' if 'proj' in name and name != 'qkv_proj' else 'self_attn'}.{name}"
            sym, asym = build(prefix, n, k, True), build(prefix, n, k, False)
            for m in (1, 16, 512):
                x = torch.randn(m, k)
                reps = 50 if m < 512 else 10
                t_sym = median_us(lambda s=sym, x=x: s[0].apply(s[1], x), reps)
                t_asym = median_us(lambda a=asym, x=x: a[0].apply(a[1], x), reps)
                print(f"{name:<14} {m:>5} {t_sym:13.1f} {t_asym:14.1f} {t_asym / t_sym:6.2f}")


if __name__ == "__main__":
    main()
