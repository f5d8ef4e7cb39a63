"""``smooth``: per-channel scales fused into the norms and weights, chosen by the quantized output error."""

from __future__ import annotations

import json

import torch

from conqur_vllm import fake_quant
from conqur_vllm.calibration import pipeline
from conqur_vllm.calibration.export import export_checkpoint
from conqur_vllm.calibration.options import CalibrationOptions, ConqurOptions
from conqur_vllm.calibration.run import calibrate
from conqur_vllm.calibration.smooth import fuse_smoothing, smooth_model
from conqur_vllm.checkpoint import read_checkpoint_tensors
from conqur_vllm.models.adapters import get_adapter
from conqur_vllm.quant import QuantSpec
from conqur_vllm.reference import load_reference_model
from conqur_vllm.rotation.rotations import apply_rotations, down_transform, quarot_rotations
from tests.conftest import synthetic_text
from tests.tiny_models import tiny_model

FAST = {"samples": 8, "seq_len": 64, "conqur": ConqurOptions(steps=2, batch_size=4)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def _rotated_tiny(seed: int = 0):
    model = tiny_model("llama", seed=seed)  # float64
    adapter = get_adapter(model.config)
    rot = quarot_rotations(model.config, seed=seed)
    apply_rotations(model, adapter, rot)
    return model, adapter, down_transform(model.config, rot)


def _ids(seed: int = 0, n: int = 2, length: int = 48) -> torch.Tensor:
    return torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def test_fused_scales_keep_the_function_at_every_site():
    model, adapter, h4 = _rotated_tiny()
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    unscaled_v = adapter.decoder_layers(model)[0].get_submodule(adapter.v_proj).weight.detach().clone()
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention: o scales are per KV channel
    kv_channels = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    for layer in adapter.decoder_layers(model):
        for site, n in (("qkv", cfg.hidden_size), ("gate_up", cfg.hidden_size), ("o", kv_channels),
                        ("down", cfg.intermediate_size)):
            fuse_smoothing(layer, adapter, site, torch.exp(0.7 * torch.randn(n, generator=g, dtype=torch.float64)),
                           h4)
    layer = adapter.decoder_layers(model)[0]
    assert _rel(layer.get_submodule(adapter.attn_norm).weight, torch.ones(model.config.hidden_size)) > 0.3
    assert _rel(layer.get_submodule(adapter.v_proj).weight, unscaled_v) > 0.3
    with torch.no_grad():
        after = model(ids).logits
    assert before.abs().mean() > 0 and _rel(after, before) < 1e-10


def _site_quantized_error(model, adapter, ids, reference, w_spec: QuantSpec, path: str) -> float:
    """Logit error with only the ``path`` linears quantized (4-bit activations, after R4 at down_proj; RTN
    weights)."""
    linears = [layer.get_submodule(path) for layer in adapter.decoder_layers(model)]
    for lin in linears:
        lin.act = fake_quant.ActQuant(bits=4, clip_ratio=0.8, symmetric=False)
        lin.weight_quant = w_spec
    try:
        with torch.no_grad():
            return _rel(model(ids).logits, reference)
    finally:
        for lin in linears:
            lin.act, lin.weight_quant = fake_quant.ActQuant(bits=None), None


def test_chosen_scales_cut_the_quantized_error_where_weight_columns_are_uneven():
    model, adapter, h4 = _rotated_tiny()
    g = torch.Generator().manual_seed(2)
    for layer in adapter.decoder_layers(model):  # a few loud down_proj columns (before R4), as in trained models
        down = layer.get_submodule(adapter.down_proj).linear
        loud = torch.ones(model.config.intermediate_size, dtype=torch.float64)
        loud[torch.randperm(loud.numel(), generator=g)[:24]] = 12.0
        with torch.no_grad():
            down.weight.copy_(((down.weight @ h4.T) * loud) @ h4)
    ids, held_out = _ids(0, 4), _ids(1, 4)
    with torch.no_grad():
        reference = model(held_out).logits
    w_spec = QuantSpec(bits=4, symmetric=True)
    error_before = _site_quantized_error(model, adapter, held_out, reference, w_spec, adapter.down_proj)
    chosen = smooth_model(model, adapter, ids, act_bits=4, act_symmetric=False, w_spec=w_spec, h4=h4,
                          sites=("down",))
    assert set(chosen.alphas) == {"0.down", "1.down"}
    assert all(a is not None for a in chosen.alphas.values())
    assert all(0 < r < 0.9 for r in chosen.error_ratio.values())
    with torch.no_grad():
        assert _rel(model(held_out).logits, reference) < 1e-10  # the function is unchanged
    after = _site_quantized_error(model, adapter, held_out, reference, w_spec, adapter.down_proj)
    assert after < 0.8 * error_before


def test_o_proj_scales_cut_the_quantized_error_where_value_channels_are_uneven():
    model, adapter, h4 = _rotated_tiny()
    cfg = model.config
    head_dim, groups = cfg.hidden_size // cfg.num_attention_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    g = torch.Generator().manual_seed(3)
    for layer in adapter.decoder_layers(model):  # a few loud value channels (as after R2 in trained models)
        v, o = layer.get_submodule(adapter.v_proj).linear, layer.get_submodule(adapter.o_proj).linear
        loud = torch.ones(v.weight.shape[0], dtype=torch.float64)
        loud[torch.randperm(loud.numel(), generator=g)[:4]] = 10.0
        per_query = loud.view(-1, 1, head_dim).expand(-1, groups, head_dim).reshape(-1)
        with torch.no_grad():
            v.weight.mul_(loud[:, None])
            o.weight.div_(per_query)
    ids, held_out = _ids(0, 4), _ids(1, 4)
    with torch.no_grad():
        reference = model(held_out).logits
    w_spec = QuantSpec(bits=4, symmetric=True)
    error_before = _site_quantized_error(model, adapter, held_out, reference, w_spec, adapter.o_proj)
    chosen = smooth_model(model, adapter, ids, act_bits=4, act_symmetric=False, w_spec=w_spec, h4=h4, sites=("o",))
    assert set(chosen.alphas) == {"0.o", "1.o"}
    assert all(a is not None for a in chosen.alphas.values())
    with torch.no_grad():
        assert _rel(model(held_out).logits, reference) < 1e-10  # the function is unchanged
    after = _site_quantized_error(model, adapter, held_out, reference, w_spec, adapter.o_proj)
    assert after < 0.8 * error_before


def test_checkpoint_carries_the_smoothed_norms_and_weights(tiny_llama_dir, text_file, tmp_path):
    opts = CalibrationOptions(calib_text=str(text_file), weight_quantizer="rtn", smooth="all", **FAST)
    model, tok = pipeline.load_model(tiny_llama_dir)
    result = pipeline.calibrate_model(model, tok, opts, text_file.read_text(), progress=False)
    assert set(result.smoothing.alphas) == {f"{li}.{s}" for li in range(2) for s in ("qkv", "gate_up", "o", "down")}
    out = export_checkpoint(result, opts, tmp_path / "ckpt", source_dir=tiny_llama_dir, report={})
    tensors = read_checkpoint_tensors(out)
    for key, alpha in result.smoothing.alphas.items():
        li, site = key.split(".")
        if site in ("o", "down"):
            continue
        norm = tensors[f"model.layers.{li}.{'input_layernorm' if site == 'qkv' else 'post_attention_layernorm'}.weight"]
        assert torch.equal(norm.float(), model.get_submodule(
            f"model.layers.{li}.{'input_layernorm' if site == 'qkv' else 'post_attention_layernorm'}").weight)
        assert (alpha is None) == bool(torch.all(norm == 1))
    ref, _ = load_reference_model(out)
    for m in (model, ref):  # compare the stored function, quantizers off (weights stay quantized)
        fake_quant.set_activation_quant(m, fake_quant.ActQuant(bits=None))
        fake_quant.set_attention(m, get_adapter(m.config), fake_quant.AttentionSim(r3=True))
    ids = tok(synthetic_text(200, seed=3), return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        assert _rel(ref(ids).logits, model(ids).logits) < 1e-4


def test_report_lists_the_choice_and_none_switches_it_off(tiny_llama_dir, text_file, tmp_path):
    out = calibrate(tiny_llama_dir, tmp_path / "down", CalibrationOptions(
        calib_text=str(text_file), weight_quantizer="rtn", **FAST), progress=False)
    report = json.loads((out / "calibration_report.json").read_text())["smoothing"]
    assert set(report["alpha"]) == {"0.down", "1.down"}
    assert all(0 < r <= 1 for r in report["error_ratio"].values())
    model, tok = pipeline.load_model(tiny_llama_dir)
    off = pipeline.calibrate_model(model, tok, CalibrationOptions(calib_text=str(text_file), weight_quantizer="rtn",
                                                                  smooth="none", **FAST),
                                   text_file.read_text(), progress=False)
    assert off.smoothing.alphas == {}


def test_smooth_flag_sets_the_option_and_the_default_follows_the_measurements():
    from conqur_vllm.cli import _options, build_parser

    parse = build_parser().parse_args
    assert _options(parse(["calibrate"])).smooth == "down"
    assert _options(parse(["calibrate", "--weight-quantizer", "rtn", "--method", "quarot"])).smooth == "down"
    assert _options(parse(["calibrate", "--method", "quarot"])).smooth == "none"  # QuaRot + GPTQ
    assert _options(parse(["calibrate", "--a-bits", "8"])).smooth == "none"  # W4A8
    assert _options(parse(["calibrate", "--method", "quarot", "--smooth", "all"])).smooth == "all"
    assert CalibrationOptions(smooth="none").smooth == "none"
