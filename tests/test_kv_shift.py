"""Key shifts (``kv_shift``): the mean key subtracted before the KV quantizer, from measurement to the served hook."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from conqur_vllm import fake_quant
from conqur_vllm.calibration import pipeline
from conqur_vllm.calibration.kv_shift import attention_modules, measure_key_shifts
from conqur_vllm.calibration.options import CalibrationOptions, ConqurOptions
from conqur_vllm.calibration.run import calibrate
from conqur_vllm.checkpoint import read_checkpoint_tensors
from conqur_vllm.config import ConqurQuantConfig
from conqur_vllm.hadamard import hadamard_transform
from conqur_vllm.models.adapters import get_adapter
from conqur_vllm.reference import load_reference_model
from conqur_vllm.rotation.rotations import apply_rotations, head_dim_of

FAST = {"samples": 8, "seq_len": 64, "conqur": ConqurOptions(steps=2, batch_size=4), "weight_quantizer": "rtn"}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


class _Attention(nn.Module):
    def __init__(self, kv: fake_quant.KVQuant) -> None:
        super().__init__()
        self.conqur_attention = fake_quant.AttentionSim(kv=kv)
        self.is_causal, self.training = True, False


def _attend(module: nn.Module, q, k, v) -> torch.Tensor:
    return fake_quant._conqur_attention(module, q, k, v, None, dropout=0.0, scaling=0.125, is_causal=True)[0]


def test_key_shift_is_exact_for_attention_and_cuts_the_kv_error():
    g = torch.Generator().manual_seed(0)
    offset = 6 * torch.randn(2, 64, generator=g)  # a large common key component per KV head
    q, v = torch.randn(1, 2, 48, 64, generator=g), torch.randn(1, 2, 48, 64, generator=g)
    k = torch.randn(1, 2, 48, 64, generator=g) + offset[None, :, None, :]
    exact = _attend(_Attention(fake_quant.KVQuant(bits=None)), q, k, v)
    shifted = _Attention(fake_quant.KVQuant(bits=None))
    shifted.conqur_key_shift = offset + torch.randn(2, 64, generator=g)  # any constant: softmax ignores it
    assert _rel(_attend(shifted, q, k, v), exact) < 1e-5
    plain = _Attention(fake_quant.KVQuant(bits=4))
    centered = _Attention(fake_quant.KVQuant(bits=4))
    centered.conqur_key_shift = k.mean(dim=(0, 2))
    err_plain, err_centered = _rel(_attend(plain, q, k, v), exact), _rel(_attend(centered, q, k, v), exact)
    assert err_centered < 0.5 * err_plain, (err_centered, err_plain)


def test_measured_shifts_are_the_mean_post_rope_rotated_keys(tiny_llama_dir, text_file):
    model, tokenizer = pipeline.load_model(tiny_llama_dir)
    adapter = get_adapter(model.config)
    opts = CalibrationOptions(method="quarot", calib_text=str(text_file), **FAST)
    rot = pipeline.initial_rotations(model, opts)
    apply_rotations(model, adapter, rot)
    assert rot.r3
    fake_quant.set_attention(model, adapter, fake_quant.AttentionSim(r3=True))
    ids = pipeline.calibration_batches(tokenizer, text_file.read_text(), 4, 64, 4, seed=0)[0][:2]
    measured = measure_key_shifts(model, adapter, ids)

    # independent reference: k_proj outputs -> per-head RoPE (transformers' own) -> Hadamard, then the mean
    outputs: dict[int, torch.Tensor] = {}
    hooks = [layer.get_submodule(adapter.k_proj).register_forward_hook(
        lambda m, i, o, li=li: outputs.__setitem__(li, o.detach())) for li, layer in
        enumerate(adapter.decoder_layers(model))]
    with torch.no_grad():
        model.get_decoder()(ids, use_cache=False)
    for h in hooks:
        h.remove()
    d = head_dim_of(model.config)
    pos = torch.arange(ids.shape[1])[None]
    cos, sin = model.model.rotary_emb(outputs[0], pos)
    for li, name in enumerate(attention_modules(model, adapter)):
        k = outputs[li].view(ids.shape[0], ids.shape[1], -1, d).transpose(1, 2)
        _, k_rope = apply_rotary_pos_emb(k, k, cos, sin)
        expected = hadamard_transform(k_rope.double()).mean(dim=(0, 2))
        assert expected.abs().max() > 0 and _rel(measured.shifts[name], expected) < 1e-5
        share = float(expected.pow(2).sum() / hadamard_transform(k_rope.double()).pow(2).sum(dim=(1, 3)).mean())
        assert abs(measured.energy_share[name] - share) < 1e-5
    assert all(getattr(a, "conqur_key_shift", None) is None for a in attention_modules(model, adapter).values())


def test_checkpoint_config_and_reference_carry_the_shifts(tiny_llama_dir, text_file, tmp_path):
    opts = CalibrationOptions(calib_text=str(text_file), **FAST)
    assert opts.kv_shift is True
    out = calibrate(tiny_llama_dir, tmp_path / "shifted", opts, progress=False)
    assert ConqurQuantConfig.from_model_dir(out).kv_cache.key_shift is True
    tensors = read_checkpoint_tensors(out)
    ref, _ = load_reference_model(out)
    adapter = get_adapter(ref.config)
    for name, attn in attention_modules(ref, adapter).items():
        stored = tensors[f"{name}.attn.k_shift"]
        assert stored.dtype == torch.float32 and stored.abs().max() > 0
        assert torch.equal(attn.conqur_key_shift.reshape(-1), stored)
    # the in-memory result has the same shifts installed
    model, tokenizer = pipeline.load_model(tiny_llama_dir)
    result = pipeline.calibrate_model(model, tokenizer, opts, text_file.read_text(), progress=False)
    for name, attn in attention_modules(model, adapter).items():
        assert torch.equal(attn.conqur_key_shift.reshape(-1), tensors[f"{name}.attn.k_shift"])
    assert set(result.key_shifts.report()["mean_energy_share"]) == set(attention_modules(model, adapter))

    for name, kw in (("off", {"kv_shift": False}), ("kv16", {"kv_bits": 16})):
        plain = calibrate(tiny_llama_dir, tmp_path / name, CalibrationOptions(calib_text=str(text_file), **FAST, **kw),
                          progress=False)
        assert ConqurQuantConfig.from_model_dir(plain).kv_cache.key_shift is False
        assert not any(n.endswith(".k_shift") for n in read_checkpoint_tensors(plain))


def test_kv_shift_flag_sets_the_option():
    from conqur_vllm.cli import _options, build_parser

    assert _options(build_parser().parse_args(["calibrate"])).kv_shift is True
    assert _options(build_parser().parse_args(["calibrate", "--no-kv-shift"])).kv_shift is False


class _FakeAttention(nn.Module):
    """Stands in for vLLM's Attention: its attributes, the forward signature; returns what it receives."""

    def __init__(self, kv_heads: int, head_size: int) -> None:
        super().__init__()
        from vllm.model_executor.layers.attention.attention import set_default_quant_scales

        self.num_heads, self.num_kv_heads, self.head_size, self.kv_cache_dtype = 2 * kv_heads, kv_heads, head_size, "auto"
        set_default_quant_scales(self, register_buffer=True)

    def forward(self, query, key, value, output_shape=None):
        return query, key, value


@pytest.mark.parametrize("r3", [True, False])
def test_served_hook_subtracts_the_shift_after_r3(monkeypatch, r3: bool) -> None:
    import vllm.distributed as dist

    from conqur_vllm.hadamard import hadamard_matrix
    from conqur_vllm.vllm_plugin.kv_cache import ConqurKVCacheMethod
    from conqur_vllm.vllm_plugin.quant_config import ConqurConfig

    transforms = [{"site": "qk_post_rope", "size": 64}] if r3 else []
    cfg = ConqurConfig(ConqurQuantConfig.from_dict({"quant_method": "conqur", "kv_cache": {"key_shift": True},
                                                    "online_transforms": transforms}))
    monkeypatch.setattr(dist, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_tensor_model_parallel_world_size", lambda: 1)
    layer, method = _FakeAttention(2, 64), ConqurKVCacheMethod(cfg)
    method.create_weights(layer)
    shift = torch.randn(128)
    layer.k_shift.weight_loader(layer.k_shift, shift)
    method.process_weights_after_loading(layer)
    method.process_weights_after_loading(layer)  # a reload must not stack a second hook
    q, k, v = torch.randn(5, 4 * 64), torch.randn(5, 2 * 64), torch.randn(5, 2 * 64)
    rq, rk, rv = layer(q, k, v)
    h = hadamard_matrix(64).float() if r3 else torch.eye(64)
    assert torch.allclose(rq, (q.view(-1, 64) @ h).view_as(q), atol=1e-5)
    assert torch.allclose(rk, (k.view(-1, 64) @ h).view_as(k) - shift, atol=1e-5)
    assert torch.equal(rv, v)
    _, kk, _ = layer(query=q, key=k.view(5, 2, 64), value=v)  # keyword and per-head layouts
    assert torch.allclose(kk.reshape(5, -1), rk, atol=1e-6)


@pytest.mark.parametrize(("kv_heads", "tp", "rank", "heads"), [(4, 2, 1, [2, 3]), (2, 4, 3, [1]), (2, 1, 0, [0, 1])])
def test_key_shift_loads_this_ranks_kv_heads(monkeypatch, kv_heads: int, tp: int, rank: int, heads: list[int]):
    import vllm.distributed as dist

    from conqur_vllm.vllm_plugin.kv_cache import _key_shift_loader

    monkeypatch.setattr(dist, "get_tensor_model_parallel_rank", lambda: rank)
    monkeypatch.setattr(dist, "get_tensor_model_parallel_world_size", lambda: tp)
    layer = _FakeAttention(max(kv_heads // tp, 1), 8)
    param = torch.zeros(layer.num_kv_heads * 8)
    full = torch.randn(kv_heads, 8)
    _key_shift_loader(layer)(param, full.reshape(-1))
    assert torch.equal(param.view(-1, 8), full[heads])
