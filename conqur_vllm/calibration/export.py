"""Write a calibrated model as a conqur checkpoint (packed INT4 + config.json contract + report)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import torch

from conqur_vllm import __version__
from conqur_vllm.calibration.options import CalibrationOptions
from conqur_vllm.calibration.pipeline import CalibrationError, CalibrationResult
from conqur_vllm.calibration.vocab import vocab_args
from conqur_vllm.checkpoint import quantized_linear_tensors, write_checkpoint
from conqur_vllm.config import (
    ActivationQuantArgs,
    CalibrationProvenance,
    ConqurQuantConfig,
    KVCacheQuantArgs,
    OnlineTransform,
    WeightQuantArgs,
)
from conqur_vllm.models.adapters import get_adapter
from conqur_vllm.rotation.rotations import head_dim_of

_HF_RUNTIME_KEYS = ("_attn_implementation", "_attn_implementation_autoset", "quantization_config", "dtype")


def quant_config_for(result: CalibrationResult, opts: CalibrationOptions, source: str) -> ConqurQuantConfig:
    cfg = result.model.config
    transforms = []
    if result.rotations.r4:
        transforms.append(OnlineTransform(site="down_proj_input", size=cfg.intermediate_size,
                                          block=result.rotations.r4_block))
    if result.rotations.r3:
        transforms.append(OnlineTransform(site="qk_post_rope", size=head_dim_of(cfg)))
    return ConqurQuantConfig(
        method=opts.method,
        weights=WeightQuantArgs(num_bits=opts.w_bits, symmetric=bool(opts.weight_symmetric),
                                group_size=opts.group_size, quantizer=opts.weight_quantizer,
                                clip_search=opts.clip_search),
        activations=ActivationQuantArgs(num_bits=opts.a_bits, clip_ratio=opts.a_clip, symmetric=opts.a_symmetric,
                                        input_clip_ratios=result.input_clips.clips if result.input_clips else {},
                                        shifted_inputs=result.input_shifts.groups if result.input_shifts else ()),
        kv_cache=KVCacheQuantArgs(num_bits=opts.kv_bits, clip_ratio=opts.kv_clip,
                                  key_shift=bool(result.key_shifts and result.key_shifts.shifts)),
        online_transforms=tuple(transforms),
        vocab=vocab_args(opts, get_adapter(cfg)),
        calibration=CalibrationProvenance(
            method=opts.method, weight_quantizer=opts.weight_quantizer, samples=opts.samples,
            seq_len=opts.seq_len, dataset=opts.calib_text, seed=opts.seed, source_model=source,
            tool_version=__version__, created=datetime.now(UTC).isoformat(timespec="seconds"),
        ),
    )


def checkpoint_tensors(result: CalibrationResult, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Plain tensors in ``dtype`` plus packed INT4 tensors for every quantized decoder linear."""
    tensors: dict[str, torch.Tensor] = {}
    quantized = set(result.qweights)
    for name, t in result.model.state_dict().items():
        name = name.replace(".linear.", ".")
        module, _, leaf = name.rpartition(".")
        if module in quantized and leaf == "weight":
            continue
        tensors[name] = t.detach().to(torch.float32 if leaf == "input_shift" else dtype).contiguous()
    for prefix, qt in result.qweights.items():
        bias = tensors.pop(f"{prefix}.bias", None)
        tensors.update(quantized_linear_tensors(prefix, qt, bias))
    if result.key_shifts is not None:
        tensors.update(result.key_shifts.checkpoint_tensors())
    return tensors


def hf_config_dict(model) -> dict:
    config = model.config.to_dict()
    for key in _HF_RUNTIME_KEYS:
        config.pop(key, None)
    config["tie_word_embeddings"] = False
    config["torch_dtype"] = "bfloat16"
    return config


def export_checkpoint(result: CalibrationResult, opts: CalibrationOptions, out_dir: str | Path, *,
                      source_dir: str | Path | None, report: dict, overwrite: bool = True) -> Path:
    """Write ``out_dir`` atomically (temp dir + rename). ``a_clip="auto"`` takes the ratio the run chose."""
    if opts.a_clip == "auto":
        if result.options is None or result.options.a_clip == "auto":
            raise CalibrationError("a_clip='auto' was not resolved: export a result of calibrate_model")
        opts = result.options
    if opts.w_bits >= 16:
        raise CalibrationError("a checkpoint needs quantized weights: use --w-bits 4 (or 8)")
    get_adapter(result.model.config)
    qcfg = quant_config_for(result, opts, str(source_dir or ""))
    return write_checkpoint(out_dir, checkpoint_tensors(result), hf_config_dict(result.model), qcfg,
                            source_dir=source_dir,
                            extra_files={"calibration_report.json": json.dumps(report, indent=2)},
                            overwrite=overwrite)
