"""Calibration stages swap the simulated quantizers for probes; ``quantizers_restored`` must put every one back."""

from __future__ import annotations

import pytest
import torch

from conqur_vllm import fake_quant
from conqur_vllm.models.adapters import get_adapter
from tests.tiny_models import tiny_model


def _wrapped_model():
    model = tiny_model("llama")
    adapter = get_adapter(model.config)
    fake_quant.install(model, adapter, act=fake_quant.ActQuant(bits=4, clip_ratio=0.85),
                       attention=fake_quant.AttentionSim(r3=True, kv=fake_quant.KVQuant(bits=4)))
    linears = [m for m in model.modules() if isinstance(m, fake_quant.QuantLinear)]
    for i, m in enumerate(linears):  # distinct quantizers and shifts, so a mix-up would show
        m.act = fake_quant.ActQuant(bits=4, clip_ratio=0.6 + 0.01 * i)
        m.input_shift = torch.full((m.linear.in_features,), 0.1 * (i + 1))
    attention = [layer.get_submodule(adapter.attention) for layer in adapter.decoder_layers(model)]
    for i, a in enumerate(attention):
        a.conqur_key_shift = torch.full((2, 32), float(i + 1))
    return model, adapter, linears, attention


def test_every_quantizer_shift_and_attention_setting_comes_back_after_an_error():
    model, adapter, linears, attention = _wrapped_model()
    before_acts = [m.act for m in linears]
    before_shifts = [m.input_shift.clone() for m in linears]
    before_attn = [(a.conqur_attention, a.conqur_key_shift.clone()) for a in attention]
    off = fake_quant.ActQuant(bits=None)
    with pytest.raises(RuntimeError, match="probe failed"), fake_quant.quantizers_restored(model, adapter) as saved:
        saved.use(off, [fake_quant.AttentionSim()] * len(attention))
        for m in linears:
            m.input_shift = None
        for a in attention:
            a.conqur_key_shift = None
            a.conqur_key_observer = print
        assert all(m.act is off for m in linears)
        assert all(a.conqur_attention == fake_quant.AttentionSim() for a in attention)
        raise RuntimeError("probe failed")
    assert [m.act for m in linears] == before_acts
    for m, shift in zip(linears, before_shifts, strict=True):
        torch.testing.assert_close(m.input_shift, shift, rtol=0, atol=0)
    for a, (sim, key_shift) in zip(attention, before_attn, strict=True):
        assert a.conqur_attention == sim and a.conqur_key_observer is None
        torch.testing.assert_close(a.conqur_key_shift, key_shift, rtol=0, atol=0)


def test_use_sets_one_quantizer_per_linear_and_leaves_attention_alone_without_an_adapter():
    model, _adapter, linears, attention = _wrapped_model()
    sims = [a.conqur_attention for a in attention]
    with fake_quant.quantizers_restored(model) as saved:
        per_linear = {m: fake_quant.ActQuant(bits=8, clip_ratio=0.5 + 0.01 * i) for i, m in enumerate(linears)}
        saved.use(per_linear)
        assert [m.act for m in linears] == [per_linear[m] for m in linears]
        assert saved.simulations == []
    assert [a.conqur_attention for a in attention] == sims
    assert all(m.act.bits == 4 for m in linears)
