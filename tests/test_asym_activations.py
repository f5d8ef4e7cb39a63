"""Asymmetric per-token activations (``a_symmetric=False``, the default): from the options to the checkpoint."""

from __future__ import annotations

import torch

from conqur_vllm import fake_quant
from conqur_vllm.calibration import pipeline
from conqur_vllm.calibration.options import CalibrationOptions, ConqurOptions
from conqur_vllm.calibration.run import calibrate
from conqur_vllm.config import ConqurQuantConfig
from conqur_vllm.reference import load_reference_model

FAST = {"samples": 8, "seq_len": 64, "conqur": ConqurOptions(steps=2, batch_size=4), "weight_quantizer": "rtn"}


def _act_symmetry(model: torch.nn.Module) -> set[bool]:
    return {m.act.symmetric for m in model.modules() if isinstance(m, fake_quant.QuantLinear)}


def test_checkpoint_config_calibrated_model_and_reference_agree(tiny_llama_dir, text_file, tmp_path):
    assert CalibrationOptions().a_symmetric is False
    for symmetric in (False, True):
        opts = CalibrationOptions(calib_text=str(text_file), a_symmetric=symmetric, **FAST)
        out = calibrate(tiny_llama_dir, tmp_path / f"sym-{symmetric}", opts, progress=False)
        assert ConqurQuantConfig.from_model_dir(out).activations.symmetric is symmetric
        ref, _ = load_reference_model(out)
        assert _act_symmetry(ref) == {symmetric}
        model, tokenizer = pipeline.load_model(tiny_llama_dir)
        result = pipeline.calibrate_model(model, tokenizer, opts, text_file.read_text(), progress=False)
        assert _act_symmetry(result.model) == {symmetric}


def test_asymmetric_codes_change_the_quantized_forward(tiny_llama_dir, text_file, tmp_path):
    """The same calibrated weights run with symmetric activation codes give measurably different logits."""
    out = calibrate(tiny_llama_dir, tmp_path / "asym", CalibrationOptions(calib_text=str(text_file), **FAST),
                    progress=False)
    ref, qcfg = load_reference_model(out)
    ids = torch.randint(5, ref.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        asym = ref(ids).logits
        fake_quant.set_activation_quant(ref, fake_quant.ActQuant(bits=4, clip_ratio=qcfg.activations.clip_ratio))
        sym = ref(ids).logits
    assert float((asym - sym).norm() / asym.norm()) > 1e-3


def test_symmetric_flag_sets_the_option():
    from conqur_vllm.cli import _options, build_parser

    assert _options(build_parser().parse_args(["calibrate"])).a_symmetric is False
    assert _options(build_parser().parse_args(["calibrate", "--a-symmetric"])).a_symmetric is True
