"""Key shifts (``kv_shift``): each layer's calibration-mean key, subtracted before the KV-cache quantizer.

A query's attention scores ``q.(k_j - c) = q.k_j - q.c`` move by the same amount for every key ``j``, so the
softmax, and with it the attention output, is unchanged by any constant ``c`` per layer and KV head: the shift
needs no correction anywhere. After RoPE (and R3) some heads' keys share a large common component, on which the
per-token KV quantizer spends its range; with the mean key subtracted it quantizes only what varies. The shift
is measured on the rotated model (post-RoPE, post-R3 keys of the first calibration sequences, activations in
full precision) and stored per layer as ``{attention}.attn.k_shift`` (float32 ``[kv_heads * head_dim]``, the name
of vLLM's attention layer inside the attention block).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from conqur_vllm import fake_quant
from conqur_vllm.calibration.act_shift import MeanRecorder
from conqur_vllm.models.adapters import ModelAdapter

CHECKPOINT_LEAF = "attn.k_shift"


@dataclass
class KeyShifts:
    """Mean key ``[kv_heads, head_dim]`` by attention module name, and the share of the keys' energy it carries."""

    shifts: dict[str, torch.Tensor] = field(default_factory=dict)
    energy_share: dict[str, float] = field(default_factory=dict)

    def report(self) -> dict:
        return {"mean_energy_share": {name: round(v, 4) for name, v in self.energy_share.items()}}

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """``{attention}.attn.k_shift`` float32 ``[kv_heads * head_dim]`` per layer."""
        return {f"{name}.{CHECKPOINT_LEAF}": s.reshape(-1).to(torch.float32).contiguous()
                for name, s in self.shifts.items()}


def measure_key_shifts(model: nn.Module, adapter: ModelAdapter, ids: torch.Tensor) -> KeyShifts:
    """Mean post-RoPE (post-R3) key per layer and KV head on ``ids``, activations and KV in full precision."""
    attentions = attention_modules(model, adapter)
    if any(getattr(a, "conqur_attention", None) is None for a in attentions.values()):
        raise ValueError("measure_key_shifts needs a model whose attention is simulated (apply_rotations)")
    recorders = {n: MeanRecorder() for n in attentions}  # rows: one token's keys of all heads
    with fake_quant.quantizers_restored(model, adapter) as saved, torch.no_grad():
        saved.use(fake_quant.ActQuant(bits=None))
        for n, a in attentions.items():
            a.conqur_attention = fake_quant.AttentionSim(r3=a.conqur_attention.r3)
            a.conqur_key_shift = None
            a.conqur_key_observer = lambda key, rec=recorders[n]: rec(key.transpose(1, 2).flatten(2))
        model.get_decoder()(ids, use_cache=False)
    n_kv = model.config.num_key_value_heads
    return KeyShifts(shifts={n: r.mean().to(torch.float32).view(n_kv, -1) for n, r in recorders.items()},
                     energy_share={n: r.energy_share() for n, r in recorders.items()})


def install_key_shifts(model: nn.Module, adapter: ModelAdapter, shifts: dict[str, torch.Tensor]) -> None:
    """Set each attention module's ``conqur_key_shift`` (``[kv_heads, head_dim]``); unnamed ones get none."""
    for name, attn in attention_modules(model, adapter).items():
        shift = shifts.get(name)
        attn.conqur_key_shift = None if shift is None else shift.to(next(attn.parameters()).device)


def attention_modules(model: nn.Module, adapter: ModelAdapter) -> dict[str, nn.Module]:
    """Every decoder layer's attention module by its name in the model (``model.layers.3.self_attn``)."""
    return {f"{adapter.layers}.{i}.{adapter.attention}": layer.get_submodule(adapter.attention)
            for i, layer in enumerate(adapter.decoder_layers(model))}
