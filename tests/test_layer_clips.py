"""``layer_clips``: one activation clip ratio per layer and input group, from calibration to the served linear."""

from __future__ import annotations

import json

import pytest
import torch

from conqur_vllm import fake_quant
from conqur_vllm.calibration import pipeline
from conqur_vllm.calibration.act_clip import ACT_CLIP_GRID, choose_input_clips
from conqur_vllm.calibration.options import CalibrationOptions, ConqurOptions
from conqur_vllm.calibration.run import calibrate
from conqur_vllm.config import CheckpointConfigError, ConqurQuantConfig
from conqur_vllm.models.adapters import get_adapter
from conqur_vllm.quant import activation_spec, quantize
from conqur_vllm.reference import load_reference_model
from conqur_vllm.rotation.rotations import apply_rotations
from tests.conftest import synthetic_text

FAST = {"samples": 8, "seq_len": 64, "conqur": ConqurOptions(steps=2, batch_size=4)}
GROUPS = ("qkv", "o_proj", "gate_up", "down_proj")


def _rotated_quarot_model(model_dir, text_file):
    model, tokenizer = pipeline.load_model(model_dir)
    opts = CalibrationOptions(method="quarot", calib_text=str(text_file), **FAST)
    apply_rotations(model, get_adapter(model.config), pipeline.initial_rotations(model, opts))
    ids = pipeline.calibration_batches(tokenizer, text_file.read_text(), 4, 64, 4, seed=0)[0][:2]
    return model, ids


def test_each_group_gets_the_ratio_with_least_output_error(tiny_llama_dir, text_file):
    model, ids = _rotated_quarot_model(tiny_llama_dir, text_file)
    adapter = get_adapter(model.config)
    acts = {m: m.act for m in model.modules() if isinstance(m, fake_quant.QuantLinear)}
    clips = choose_input_clips(model, adapter, ids, bits=4, symmetric=False, default=0.9)
    assert all(m.act is a for m, a in acts.items())  # quantizers restored
    assert set(clips.clips) == {f"{li}.{g}" for li in range(2) for g in GROUPS}
    assert all(c in ACT_CLIP_GRID for c in clips.clips.values())
    assert all(0 < r <= 1 for r in clips.error_ratio.values())  # 0.9 is on the grid: never worse than it

    # independent reference for layer 1's gate/up inputs (no online transform, no shift): hook the module input
    layer = adapter.decoder_layers(model)[1]
    seen: list[torch.Tensor] = []
    handle = layer.get_submodule(adapter.gate_proj).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).double()))
    with torch.no_grad():
        model.get_decoder()(ids, use_cache=False)
    handle.remove()
    x = seen[0]
    w = torch.cat([layer.get_submodule(p).linear.weight.detach().double() for p in adapter.mlp_readers])
    errors = []
    for clip in ACT_CLIP_GRID:
        qt = quantize(x.float(), activation_spec(4, clip, symmetric=False))
        deq = (qt.q.double() - qt.zero.double()) * qt.scale.double()
        errors.append(float(((deq - x) @ w.T).pow(2).sum()))
    assert len({round(e, 6) for e in errors}) > 1
    assert clips.clips["1.gate_up"] == ACT_CLIP_GRID[min(range(len(errors)), key=errors.__getitem__)]


def test_config_maps_vllm_and_hf_prefixes_to_their_ratio():
    cfg = ConqurQuantConfig.from_dict({"quant_method": "conqur", "activations": {
        "clip_ratio": 0.8, "input_clip_ratios": {"3.gate_up": 0.85, "0.down_proj": 0.7, "12.qkv": 0.95}}})
    assert cfg.clip_ratio_for("model.layers.3.mlp.gate_up_proj") == 0.85  # vLLM's merged linear
    assert cfg.clip_ratio_for("model.layers.3.mlp.up_proj") == 0.85  # Hugging Face's
    assert cfg.clip_ratio_for("model.layers.12.self_attn.qkv_proj") == 0.95
    assert cfg.clip_ratio_for("model.layers.2.self_attn.v_proj") == 0.8  # not listed: the model-wide one
    assert cfg.clip_ratio_for("model.layers.0.mlp.down_proj") == 0.7
    assert cfg.clip_ratio_for("lm_head") == 0.8
    assert ConqurQuantConfig.from_dict(cfg.to_dict()) == cfg
    for bad, match in (({"x.qkv": 0.8}, "not '<layer>.<group>'"), ({"1.mlp": 0.8}, "not '<layer>.<group>'"),
                       ({"1.qkv": 1.5}, r"is 1.5, not in \(0, 1\]")):
        with pytest.raises(CheckpointConfigError, match=match):
            ConqurQuantConfig.from_dict({"quant_method": "conqur", "activations": {"input_clip_ratios": bad}})


def test_checkpoint_lists_the_ratios_and_the_reference_loader_uses_them(tiny_llama_dir, text_file, tmp_path):
    opts = CalibrationOptions(calib_text=str(text_file), weight_quantizer="rtn", **FAST)
    assert opts.layer_clips  # the default with a_clip auto
    out = calibrate(tiny_llama_dir, tmp_path / "ckpt", opts, progress=False)
    qcfg = ConqurQuantConfig.from_model_dir(out)
    ratios = qcfg.activations.input_clip_ratios
    assert set(ratios) == {f"{li}.{g}" for li in range(2) for g in GROUPS}
    report = json.loads((out / "calibration_report.json").read_text())["input_clips"]
    assert report["clip"] == ratios
    ref, _ = load_reference_model(out)
    adapter = get_adapter(ref.config)
    for li, layer in enumerate(adapter.decoder_layers(ref)):
        for path in adapter.linears:
            group = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up",
                     "up_proj": "gate_up"}.get(path.rsplit(".", 1)[-1], path.rsplit(".", 1)[-1])
            assert layer.get_submodule(path).act.clip_ratio == ratios[f"{li}.{group}"]

    # the reference model computes what the calibrated model computed, quantizers on
    model, tok = pipeline.load_model(tiny_llama_dir)
    result = pipeline.calibrate_model(model, tok, opts, text_file.read_text(), progress=False)
    assert result.input_clips.clips == ratios
    ids = tok(synthetic_text(200, seed=3), return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        got, want = ref(ids).logits.double(), model(ids).logits.double()
    assert float((got - want).norm() / want.norm()) < 2e-2


def test_off_when_the_ratio_is_fixed_or_asked(tiny_llama_dir, text_file, tmp_path):
    from conqur_vllm.cli import _options, build_parser

    parse = build_parser().parse_args
    assert _options(parse(["calibrate"])).layer_clips is True
    assert _options(parse(["calibrate", "--a-clip", "0.8"])).layer_clips is False
    assert _options(parse(["calibrate", "--no-layer-clips"])).layer_clips is False
    assert _options(parse(["calibrate", "--a-clip", "0.8", "--layer-clips"])).layer_clips is True
    assert _options(parse(["calibrate", "--method", "quarot"])).layer_clips is False  # QuaRot + GPTQ: measured worse
    assert _options(parse(["calibrate", "--method", "quarot", "--weight-quantizer", "rtn"])).layer_clips is True
    assert _options(parse(["calibrate", "--method", "quarot", "--layer-clips"])).layer_clips is True
    out = calibrate(tiny_llama_dir, tmp_path / "off", CalibrationOptions(
        calib_text=str(text_file), weight_quantizer="rtn", layer_clips=False, **FAST), progress=False)
    assert ConqurQuantConfig.from_model_dir(out).activations.input_clip_ratios == {}
