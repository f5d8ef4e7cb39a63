"""Quantization quality per site: activation SQNR at the inputs of each kind of decoder linear."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from conqur_vllm import fake_quant
from conqur_vllm.models.adapters import ModelAdapter
from conqur_vllm.quant import sqnr_db

SITE_OF = {"q_proj": "qkv_input", "k_proj": None, "v_proj": None, "o_proj": "o_proj_input",
           "gate_proj": "gate_up_input", "up_proj": None, "down_proj": "down_proj_input"}


def activation_sqnr(model: nn.Module, adapter: ModelAdapter, ids: torch.Tensor) -> dict[str, float]:
    """Mean over layers of the activation quantizer's SQNR (dB) at each input site, on one batch."""
    totals: dict[str, list[float]] = defaultdict(list)
    handles = []
    for layer in adapter.decoder_layers(model):
        for path, qlin in fake_quant.quant_linears(layer, adapter).items():
            site = SITE_OF.get(path.rsplit(".", 1)[-1])
            if site is None:
                continue

            def hook(module, args, _site=site):
                bits = getattr(module.act, "bits", None)
                if bits is None or bits >= 16:
                    return
                x = args[0]
                q = module.transform_input(x)  # online transform, shift, quantizer
                if module.online:
                    x = fake_quant.hadamard_transform(x, module.online_block)
                totals[_site].append(sqnr_db(x, q))
            handles.append(qlin.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {site: sum(v) / len(v) for site, v in totals.items()}
