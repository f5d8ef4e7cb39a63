"""``a_clip="auto"``: the activation clip ratio chosen on calibration data, from the CLI to the checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conqur_vllm import fake_quant
from conqur_vllm.calibration import pipeline
from conqur_vllm.calibration.act_clip import ACT_CLIP_GRID, choose_activation_clip
from conqur_vllm.calibration.options import CalibrationOptions, ConqurOptions
from conqur_vllm.calibration.run import calibrate
from conqur_vllm.config import LINEAR_INPUT_GROUP, ConqurQuantConfig
from conqur_vllm.models.adapters import get_adapter
from conqur_vllm.quant import activation_spec, quantize
from conqur_vllm.rotation.rotations import apply_rotations

FAST = {"samples": 8, "seq_len": 64, "conqur": ConqurOptions(steps=2, batch_size=4)}


def _rotated_quarot_model(model_dir, text_file):
    model, tokenizer = pipeline.load_model(model_dir)
    opts = CalibrationOptions(method="quarot", calib_text=str(text_file), **FAST)
    apply_rotations(model, get_adapter(model.config), pipeline.initial_rotations(model, opts))
    ids = pipeline.calibration_batches(tokenizer, text_file.read_text(), 4, 64, 4, seed=0)[0]
    return model, ids


@pytest.mark.parametrize("symmetric", [True, False])
def test_auto_clip_is_the_grid_ratio_with_least_error(tiny_llama_dir, text_file, symmetric: bool):
    model, ids = _rotated_quarot_model(tiny_llama_dir, text_file)
    linears = [m for m in model.modules() if isinstance(m, fake_quant.QuantLinear)]
    acts = [m.act for m in linears]
    choice = choose_activation_clip(model, ids, bits=4, symmetric=symmetric)
    assert all(m.act is a for m, a in zip(linears, acts, strict=True))  # quantizers restored

    # independent reference: record every linear's input (after R4) and quantize it with the integer quantizer
    seen: list[torch.Tensor] = []
    for m in linears:
        m.input_observer = lambda x: seen.append(x.detach().reshape(-1, x.shape[-1]).double())
    with torch.no_grad():
        model.get_decoder()(ids, use_cache=False)
    assert len(seen) == len(linears) and all(x.abs().amax() > 0 for x in seen)
    expected = []
    for clip in ACT_CLIP_GRID:
        total = 0.0
        for x in seen:
            qt = quantize(x.float(), activation_spec(4, clip, symmetric))
            zero = 0 if symmetric else qt.zero.double()
            deq = (qt.q.double() - zero) * qt.scale.double()
            total += float(((deq - x).pow(2).sum(-1) / x.pow(2).sum(-1)).mean())
        expected.append(total)
    got = [choice.errors[c] for c in ACT_CLIP_GRID]
    assert max(abs(g - e) / e for g, e in zip(got, expected, strict=True)) < 1e-4
    assert choice.clip == ACT_CLIP_GRID[min(range(len(expected)), key=expected.__getitem__)]
    assert len({round(e, 6) for e in expected}) > 1  # the grid ratios do differ


def test_auto_clip_goes_into_checkpoint_and_report(tiny_llama_dir, text_file, tmp_path):
    opts = CalibrationOptions(method="quarot", weight_quantizer="rtn", a_clip="auto", calib_text=str(text_file),
                              **FAST)
    out = calibrate(tiny_llama_dir, tmp_path / "ckpt", opts, progress=False)
    report = json.loads((out / "calibration_report.json").read_text())
    chosen = report["activation_clip"]["chosen"]
    assert chosen in ACT_CLIP_GRID
    errors = report["activation_clip"]["relative_error_by_clip"]
    assert errors[str(chosen)] == min(errors.values()) and len(errors) == len(ACT_CLIP_GRID)
    assert ConqurQuantConfig.from_model_dir(out).activations.clip_ratio == chosen
    assert report["options"]["a_clip"] == "auto"
    # the in-memory API resolves the same ratio and runs its activation quantizers with it
    model, tokenizer = pipeline.load_model(tiny_llama_dir)
    result = pipeline.calibrate_model(model, tokenizer, opts, text_file.read_text(), progress=False)
    assert result.options.a_clip == chosen and result.clip_choice.clip == chosen
    # with per-layer ratios (the default) each linear runs its group's ratio; without them, the model-wide one
    adapter = get_adapter(model.config)
    for li, layer in enumerate(adapter.decoder_layers(model)):
        for path in adapter.linears:
            key = f"{li}.{LINEAR_INPUT_GROUP[path.rsplit('.', 1)[-1]]}"
            assert layer.get_submodule(path).act.clip_ratio == result.input_clips.clips[key]
    model, tokenizer = pipeline.load_model(tiny_llama_dir)
    one = pipeline.calibrate_model(model, tokenizer, opts.model_copy(update={"layer_clips": False}),
                                   text_file.read_text(), progress=False)
    assert one.input_clips.clips == {}
    acts = {m.act.clip_ratio for m in model.modules() if isinstance(m, fake_quant.QuantLinear)}
    assert acts == {chosen}


def test_fixed_clip_is_kept():
    opts = CalibrationOptions(a_clip=0.85)
    assert pipeline.resolve_activation_clip(None, opts, []) == (opts, None)
    resolved, choice = pipeline.resolve_activation_clip(None, CalibrationOptions(a_clip="auto", a_bits=16), [])
    assert resolved.a_clip == 1.0 and choice is None


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--a-clip", "1.5", "'1.5' is not a clip ratio: pass a number in (0, 1] or auto"),
    ("--a-clip", "0", "'0' is not a clip ratio"),
    ("--a-clip", "wide", "'wide' is not a clip ratio"),
    ("--kv-clip", "auto", "'auto' is not a clip ratio: pass a number in (0, 1]"),
])
def test_clip_flags_reject_bad_values_in_one_line(tmp_path, flag, value, message):
    proc = subprocess.run([sys.executable, "-m", "conqur_vllm.cli", "calibrate", "-o", str(tmp_path / "y"),
                           flag, value], check=False, capture_output=True, text=True)
    assert proc.returncode == 2
    assert message in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "y").exists()


def test_clip_flags_set_options():
    from conqur_vllm.cli import _options, build_parser

    opts = _options(build_parser().parse_args(["calibrate", "--a-clip", "auto", "--kv-clip", "0.9"]))
    assert (opts.a_clip, opts.kv_clip) == ("auto", 0.9)
    opts = _options(build_parser().parse_args(["calibrate", "--a-clip", "0.8"]))
    assert opts.a_clip == 0.8
