"""``a_shift``: each quantized linear input quantized around its calibration mean, from measurement to checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conqur_vllm import fake_quant
from conqur_vllm.calibration import pipeline
from conqur_vllm.calibration.act_shift import SHIFTED_GROUPS, measure_input_shifts
from conqur_vllm.calibration.options import CalibrationOptions, ConqurOptions
from conqur_vllm.calibration.run import calibrate
from conqur_vllm.checkpoint import read_checkpoint_tensors
from conqur_vllm.config import CheckpointConfigError, ConqurQuantConfig
from conqur_vllm.models.adapters import get_adapter
from conqur_vllm.quant import activation_spec, fake_quantize
from conqur_vllm.reference import load_reference_model
from conqur_vllm.rotation.rotations import apply_rotations

FAST = {"samples": 8, "seq_len": 64, "conqur": ConqurOptions(steps=2, batch_size=4)}
SHIFTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_shifts_are_the_mean_inputs_of_the_shifted_linears(tiny_llama_dir, text_file):
    model, tokenizer = pipeline.load_model(tiny_llama_dir)
    opts = CalibrationOptions(method="quarot", calib_text=str(text_file), **FAST)
    apply_rotations(model, get_adapter(model.config), pipeline.initial_rotations(model, opts))
    ids = pipeline.calibration_batches(tokenizer, text_file.read_text(), 4, 64, 4, seed=0)[0]
    measured = measure_input_shifts(model, get_adapter(model.config), ids)

    # independent reference: every linear's input (after R4), recorded with activations in full precision
    seen: dict[str, list[torch.Tensor]] = {}
    for name, m in model.named_modules():
        if isinstance(m, fake_quant.QuantLinear):
            m.input_observer = lambda x, name=name: seen.setdefault(name, []).append(x.reshape(-1, x.shape[-1]))
    with torch.no_grad():
        model.get_decoder()(ids, use_cache=False)
    assert {n.rsplit(".", 1)[-1] for n in measured.shifts} == set(SHIFTED)
    assert not any(n.endswith("down_proj") for n in measured.shifts)
    for name, shift in measured.shifts.items():
        expected = torch.cat(seen[name]).double().mean(0)
        assert expected.norm() > 0 and _rel(shift, expected) < 1e-6
        energy = torch.cat(seen[name]).double().pow(2).sum(-1).mean()
        assert abs(measured.energy_share[name] - float(expected.pow(2).sum() / energy)) < 1e-6
    q = "model.layers.0.self_attn.q_proj"
    assert torch.equal(measured.shifts[q], measured.shifts[q.replace("q_proj", "v_proj")])
    assert all(m.input_shift is None for m in model.modules() if isinstance(m, fake_quant.QuantLinear))


def test_shifted_quantizer_keeps_the_function_and_cuts_the_error():
    g = torch.Generator().manual_seed(0)
    k, n = 128, 64
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
    offset = 4 * torch.randn(k, generator=g)
    x = torch.randn(32, k, generator=g) + offset
    exact = x @ lin.weight.T

    unshifted = fake_quant.QuantLinear(lin, fake_quant.ActQuant(bits=4, clip_ratio=0.9))
    shifted = fake_quant.QuantLinear(lin, fake_quant.ActQuant(bits=4, clip_ratio=0.9))
    shifted.input_shift = x.mean(0)
    with torch.no_grad():
        out = shifted(x)
        mu = x.mean(0)
        expected = (fake_quantize(x - mu, activation_spec(4, 0.9)) + mu) @ lin.weight.T
        assert _rel(out, expected) < 1e-6
        assert _rel(out, exact) < 0.5 * _rel(unshifted(x), exact)  # the common component no longer costs range
        shifted.act = fake_quant.ActQuant(bits=None)
        assert _rel(shifted(x), exact) < 1e-6  # without quantization the shift is the identity


def _calibrate(tmp_path, text_file, model_dir, name: str, **kw):
    opts = CalibrationOptions(calib_text=str(text_file), weight_quantizer="rtn", **{**FAST, **kw})
    return calibrate(model_dir, tmp_path / name, opts, progress=False)


def test_checkpoint_stores_shifts_that_the_reference_and_config_use(tiny_llama_dir, text_file, tmp_path):
    out = _calibrate(tmp_path, text_file, tiny_llama_dir, "shifted")
    qcfg = ConqurQuantConfig.from_model_dir(out)
    assert qcfg.activations.shifted_inputs == SHIFTED_GROUPS
    tensors = read_checkpoint_tensors(out)
    names = {n.rsplit(".", 2)[-2] for n in tensors if n.endswith(".input_shift")}
    assert names == set(SHIFTED)
    q = tensors["model.layers.1.self_attn.q_proj.input_shift"]
    assert q.dtype == torch.float32 and q.norm() > 0
    assert torch.equal(q, tensors["model.layers.1.self_attn.k_proj.input_shift"])
    report = json.loads((out / "calibration_report.json").read_text())["activation_shift"]
    assert report["groups"] == list(SHIFTED_GROUPS)
    assert all(0 < v < 1 for v in report["mean_energy_share"].values())

    ref, _ = load_reference_model(out)
    ref_shifts = {n: m.input_shift for n, m in ref.named_modules() if isinstance(m, fake_quant.QuantLinear)}
    for name, shift in ref_shifts.items():
        stored = tensors.get(f"{name}.input_shift")
        assert (shift is None) == (stored is None) and (stored is None or torch.equal(shift, stored))

    off = _calibrate(tmp_path, text_file, tiny_llama_dir, "unshifted", a_shift=False)
    assert ConqurQuantConfig.from_model_dir(off).activations.shifted_inputs == ()
    assert not any(n.endswith(".input_shift") for n in read_checkpoint_tensors(off))


def test_config_names_the_shifted_linears_and_rejects_unknown_groups():
    qcfg = ConqurQuantConfig.from_dict({"quant_method": "conqur", "activations": {"shifted_inputs": ["qkv", "gate_up"]}})
    assert qcfg.has_input_shift("model.layers.3.self_attn.qkv_proj")
    assert qcfg.has_input_shift("model.layers.3.mlp.up_proj")
    assert not qcfg.has_input_shift("model.layers.3.self_attn.o_proj")
    assert not qcfg.has_input_shift("model.layers.3.mlp.down_proj")
    weight_only = {"quant_method": "conqur", "activations": {"num_bits": 16, "shifted_inputs": ["qkv"]}}
    assert not ConqurQuantConfig.from_dict(weight_only).has_input_shift("model.layers.0.self_attn.qkv_proj")
    with pytest.raises(CheckpointConfigError) as err:
        ConqurQuantConfig.from_dict({"quant_method": "conqur", "activations": {"shifted_inputs": ["lm_head"]}})
    assert "shifted_inputs" in str(err.value) and "\n" not in str(err.value)


def test_shift_flag_sets_the_option():
    from conqur_vllm.cli import _options, build_parser

    assert _options(build_parser().parse_args(["calibrate"])).a_shift is True
    assert _options(build_parser().parse_args(["calibrate", "--no-a-shift"])).a_shift is False


def test_learner_centers_residual_vectors_when_inputs_are_shifted(tiny_llama_dir):
    from conqur_vllm.calibration.learn_rotations import _SiteRecorder
    from conqur_vllm.rotation.rotations import head_dim_of

    assert CalibrationOptions().conqur.center is True
    assert CalibrationOptions(a_shift=False).conqur.center is False
    assert CalibrationOptions(a_bits=16).conqur.center is False
    assert CalibrationOptions(conqur=ConqurOptions(center=False)).conqur.center is False

    model, _ = pipeline.load_model(tiny_llama_dir)
    adapter = get_adapter(model.config)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    kv = model.config.num_key_value_heads
    plain = _SiteRecorder(model, adapter, kv, head_dim_of(model.config), max_vectors=10**6)
    with torch.no_grad():
        model.get_decoder()(ids, use_cache=False)
    plain.remove()
    centered = _SiteRecorder(model, adapter, kv, head_dim_of(model.config), max_vectors=10**6, center=True)
    with torch.no_grad():
        model.get_decoder()(ids, use_cache=False)
    centered.remove()
    assert len(plain.residual) == len(centered.residual) > 0
    for x, c in zip(plain.residual, centered.residual, strict=True):
        u = x / x.norm(dim=-1, keepdim=True)
        assert _rel(c, u - u.mean(0)) < 1e-6 and u.mean(0).norm() > 1e-3
