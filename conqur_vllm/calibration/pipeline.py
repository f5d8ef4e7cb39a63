"""From a Hugging Face folder to a rotated, weight-quantized, fake-quant-wrapped model (one direction).

HF model -> adapter -> fold norms + initial rotations -> (ConQuR: learn R1/R2 online) -> smoothing scales,
activation and key shifts, activation clips -> weights (GPTQ/RTN) -> embedding and LM head (weight-only).
The result is what the checkpoint stores and what the evaluation harness measures.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from conqur_vllm import fake_quant
from conqur_vllm.calibration.act_clip import (
    ClipChoice,
    InputClips,
    choose_activation_clip,
    choose_input_clips,
    install_input_clips,
)
from conqur_vllm.calibration.act_shift import InputShifts, install_input_shifts, measure_input_shifts
from conqur_vllm.calibration.kv_shift import KeyShifts, install_key_shifts, measure_key_shifts
from conqur_vllm.calibration.layerwise import module_device, quantize_weights
from conqur_vllm.calibration.learn_rotations import LearnReport, learn_rotations
from conqur_vllm.calibration.options import CalibrationOptions
from conqur_vllm.calibration.smooth import SMOOTH_SITES_OF, SmoothScales, smooth_model
from conqur_vllm.calibration.vocab import quantize_vocab
from conqur_vllm.models.adapters import get_adapter
from conqur_vllm.quant import QuantizedTensor, QuantSpec, activation_spec, kv_spec
from conqur_vllm.rotation.rotations import (
    Rotations,
    apply_rotations,
    down_transform,
    head_dim_of,
    quarot_rotations,
)

SHIFT_SEQUENCES = 2  # calibration sequences whose mean inputs become the activation shifts


class CalibrationError(ValueError):
    """Calibration cannot run with these inputs; the message says how to fix them."""


@dataclass
class CalibrationResult:
    model: nn.Module
    tokenizer: object
    rotations: Rotations
    qweights: dict[str, QuantizedTensor]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    learn_report: LearnReport | None = None
    options: CalibrationOptions | None = None  # as used: ``a_clip="auto"`` resolved to the chosen ratio
    clip_choice: ClipChoice | None = None
    input_shifts: InputShifts | None = None
    key_shifts: KeyShifts | None = None
    smoothing: SmoothScales | None = None
    input_clips: InputClips | None = None


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """Load a local HF causal LM and its tokenizer, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise CalibrationError(f"{model_dir} has no config.json: pass a Hugging Face model folder")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    get_adapter(model.config)  # fail at once for unsupported families
    return model, tokenizer


def _window_order(tokenizer, text: str, samples: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``seq_len`` windows of ``text`` and their seeded order (the first ``samples`` calibrate)."""
    from conqur_vllm.eval.perplexity import tokenize_windows

    windows = tokenize_windows(tokenizer, text, seq_len)
    if windows.shape[0] < samples:
        raise CalibrationError(
            f"the calibration text has only {windows.shape[0]} windows of {seq_len} tokens but {samples} samples "
            "were asked for; lower --samples or --seq-len, or pass a longer --calib-text"
        )
    return windows, torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))


def calibration_batches(tokenizer, text: str, samples: int, seq_len: int, batch_size: int,
                        seed: int) -> list[torch.Tensor]:
    """``samples`` windows of ``seq_len`` tokens (seeded choice among all windows), grouped in batches."""
    windows, order = _window_order(tokenizer, text, samples, seq_len, seed)
    chosen = windows[order[:samples].sort().values]
    return list(chosen.split(batch_size))


def heldout_windows(tokenizer, text: str, opts: CalibrationOptions) -> torch.Tensor:
    """``opts.conqur.select_windows`` windows of the calibration text that no calibration batch contains."""
    n = opts.conqur.select_windows
    windows, order = _window_order(tokenizer, text, opts.samples, opts.seq_len, opts.seed)
    if windows.shape[0] < opts.samples + n:
        raise CalibrationError(
            f"the calibration text has {windows.shape[0]} windows of {opts.seq_len} tokens: too few for "
            f"{opts.samples} samples plus {n} held-out windows; lower --samples or pass a longer --calib-text"
        )
    return windows[order[opts.samples:opts.samples + n].sort().values]


def weight_spec(opts: CalibrationOptions) -> QuantSpec | None:
    return None if opts.w_bits >= 16 else QuantSpec(bits=opts.w_bits, symmetric=bool(opts.weight_symmetric),
                                                          group_size=opts.group_size)


def target_specs(opts: CalibrationOptions) -> dict[str, QuantSpec | None]:
    """The activation (R1) and value (R2) quantizers whose grids ``target="grid"`` aims the rotations at."""
    act = None if opts.a_bits >= 16 else activation_spec(opts.a_bits, opts.a_clip, opts.a_symmetric)
    value = None if opts.kv_bits >= 16 else kv_spec(opts.kv_bits, clip_ratio=opts.kv_clip)  # one head's row
    return {"act_spec": act, "value_spec": value}


def _shift_sequences(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    """The calibration sequences the shift, smoothing and clip stages read, where ``model`` runs."""
    return batches[0][:SHIFT_SEQUENCES].to(module_device(model))


def set_smoothing(model: nn.Module, opts: CalibrationOptions, batches: list[torch.Tensor],
                  rot: Rotations) -> SmoothScales:
    """Choose and fuse the smoothing scales on the rotated ``model`` (the sequences of the activation shifts),
    as ``smooth`` says (none for unquantized activations)."""
    if opts.smooth == "none" or opts.a_bits >= 16:
        return SmoothScales()
    return smooth_model(model, get_adapter(model.config), _shift_sequences(model, batches),
                        act_bits=opts.a_bits, act_symmetric=opts.a_symmetric, w_spec=weight_spec(opts),
                        h4=down_transform(model.config, rot), r4_block=rot.r4_block,
                        sites=SMOOTH_SITES_OF[opts.smooth])


def set_input_shifts(model: nn.Module, opts: CalibrationOptions, batches: list[torch.Tensor]) -> InputShifts:
    """Measure the activation shifts on the rotated ``model`` (the first two calibration sequences: by the
    sampling error of a mean, ~1k tokens are enough to estimate it to well under 1% of the input energy) and
    install them, as ``a_shift`` says (none for unquantized activations or ``a_shift`` off)."""
    shifts = InputShifts()
    if opts.a_shift and opts.a_bits < 16:
        shifts = measure_input_shifts(model, get_adapter(model.config), _shift_sequences(model, batches))
    install_input_shifts(model, shifts.shifts)
    return shifts


def set_key_shifts(model: nn.Module, opts: CalibrationOptions, batches: list[torch.Tensor]) -> KeyShifts:
    """Measure the key shifts on the rotated ``model`` (the same sequences as the activation shifts) and install
    them, as ``kv_shift`` says (none for a 16-bit KV cache)."""
    adapter = get_adapter(model.config)
    shifts = KeyShifts()
    if opts.kv_shift and opts.kv_bits < 16:
        shifts = measure_key_shifts(model, adapter, _shift_sequences(model, batches))
    install_key_shifts(model, adapter, shifts.shifts)
    return shifts


def resolve_activation_clip(model: nn.Module, opts: CalibrationOptions,
                            batches: list[torch.Tensor]) -> tuple[CalibrationOptions, ClipChoice | None]:
    """Options with ``a_clip="auto"`` replaced by the ratio chosen on the rotated ``model`` (first calibration
    batch); other options come back unchanged. Unquantized activations take 1.0 (the ratio is unused)."""
    if opts.a_clip != "auto":
        return opts, None
    if opts.a_bits >= 16:
        return opts.model_copy(update={"a_clip": 1.0}), None
    choice = choose_activation_clip(model, batches[0].to(module_device(model)), opts.a_bits,
                                    symmetric=opts.a_symmetric)
    return opts.model_copy(update={"a_clip": choice.clip}), choice


def set_input_clips(model: nn.Module, opts: CalibrationOptions, batches: list[torch.Tensor]) -> InputClips:
    """Choose and install the per-layer, per-input-group clip ratios on the quantizer-wrapped ``model`` (the
    sequences of the activation shifts), as ``layer_clips`` says (none for unquantized activations); ``opts``
    with ``a_clip`` resolved."""
    if not opts.layer_clips or opts.a_bits >= 16:
        return InputClips({}, {})
    adapter = get_adapter(model.config)
    clips = choose_input_clips(model, adapter, _shift_sequences(model, batches), opts.a_bits, opts.a_symmetric,
                               default=float(opts.a_clip))
    install_input_clips(model, adapter, clips.clips)
    return clips


def set_learner_quantizers(model: nn.Module, opts: CalibrationOptions, batches: list[torch.Tensor],
                           r3: bool) -> CalibrationOptions:
    """Switch on the quantizers of the learner's scratch model; returns the options it runs with. The clip is
    chosen only when the learner reads activation codes (quantized forward, grid targets or held-out
    selection); the full-precision forward switches activation quantization off, so its ratio is unused there."""
    c = opts.conqur
    if c.quantized_forward or c.target == "grid" or c.select == "heldout":
        opts = resolve_activation_clip(model, opts, batches)[0]
    elif opts.a_clip == "auto":
        opts = opts.model_copy(update={"a_clip": 1.0})  # unused: activations stay in full precision
    set_quantizers(model, opts, r3=r3)
    return opts


def learn_conqur_rotations(model: nn.Module, tokenizer, rot: Rotations, opts: CalibrationOptions,
                           batches: list[torch.Tensor], calib_text: str, *, progress: bool = True,
                           on_step=None) -> tuple[Rotations, LearnReport]:
    """ConQuR's online learning on ``model`` (a scratch copy with ``rot`` applied; it ends with the result fused)."""
    learn_opts = set_learner_quantizers(model, opts, batches, r3=rot.r3)
    heldout = heldout_windows(tokenizer, calib_text, opts) if opts.conqur.select == "heldout" else None
    return learn_rotations(model, get_adapter(model.config), rot, batches, opts.conqur,
                           weight_spec=weight_spec(opts), **target_specs(learn_opts), heldout=heldout,
                           seed=opts.seed, progress=progress, on_step=on_step)


def initial_rotations(model: nn.Module, opts: CalibrationOptions) -> Rotations:
    if opts.method == "none":
        return Rotations(r1=None, r2=None, r3=False, r4=False)
    return quarot_rotations(model.config, seed=opts.seed, r4_block=opts.r4_block)


def set_quantizers(model: nn.Module, opts: CalibrationOptions, r3: bool) -> None:
    """Switch on activation and KV fake-quant as the options say (``a_clip`` resolved to a ratio)."""
    if opts.a_clip == "auto":
        raise CalibrationError("a_clip='auto' is chosen on the rotated model: call resolve_activation_clip first")
    adapter = get_adapter(model.config)
    act_bits = None if opts.a_bits >= 16 else opts.a_bits
    kv_bits = None if opts.kv_bits >= 16 else opts.kv_bits
    fake_quant.set_activation_quant(model, fake_quant.ActQuant(bits=act_bits, clip_ratio=opts.a_clip,
                                                               symmetric=opts.a_symmetric))
    kv = fake_quant.KVQuant(bits=kv_bits, symmetric=False, clip_ratio=opts.kv_clip,
                            group_size=head_dim_of(model.config))
    fake_quant.set_attention(model, adapter, fake_quant.AttentionSim(r3=r3, kv=kv))


def calibrate_model(model: nn.Module, tokenizer, opts: CalibrationOptions, calib_text: str, *,
                    progress: bool = True, on_layer=None, on_step=None) -> CalibrationResult:
    """Rotate (learning the rotations for ConQuR), switch on the quantizers and quantize the weights, in place.

    Learned rotations are fused into the original weights in one float64 step (not as the running product of
    the online updates), exactly as a resumed checkpoint run does.
    """
    adapter = get_adapter(model.config)
    times: dict[str, float] = {}
    needs_data = (opts.method == "conqur" or (opts.w_bits < 16 and opts.weight_quantizer == "gptq")
                  or ((opts.a_clip == "auto" or opts.a_shift or opts.layer_clips) and opts.a_bits < 16)
                  or (opts.kv_shift and opts.kv_bits < 16) or (opts.smooth != "none" and opts.a_bits < 16))
    batches = (calibration_batches(tokenizer, calib_text, opts.samples, opts.seq_len, opts.conqur.batch_size,
                                   opts.seed) if needs_data else [])
    rot = initial_rotations(model, opts)
    report = None
    if opts.method == "conqur":
        t0 = time.perf_counter()
        scratch = copy.deepcopy(model)
        apply_rotations(scratch, adapter, rot)
        rot, report = learn_conqur_rotations(scratch, tokenizer, rot, opts, batches, calib_text,
                                             progress=progress, on_step=on_step)
        del scratch
        times["learn_rotations"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    apply_rotations(model, adapter, rot)
    smoothing = set_smoothing(model, opts, batches, rot)
    shifts = set_input_shifts(model, opts, batches)
    key_shifts = set_key_shifts(model, opts, batches)
    opts, clip_choice = resolve_activation_clip(model, opts, batches)
    set_quantizers(model, opts, r3=rot.r3)
    input_clips = set_input_clips(model, opts, batches)
    times["rotate"] = time.perf_counter() - t0
    qweights: dict[str, QuantizedTensor] = {}
    spec = weight_spec(opts)
    if spec is not None:
        t0 = time.perf_counter()
        last_hidden: list = []

        def keep_hidden(li, qts, report, hidden, reference):
            last_hidden[:] = hidden or []
            if on_layer is not None:
                on_layer(li, qts, report, hidden, reference)

        qweights = quantize_weights(model, adapter, spec, method=opts.weight_quantizer, calib_batches=batches,
                                    clip_search=opts.clip_search, inputs=opts.gptq_inputs,
                                    target_damp=opts.gptq_target_damp,
                                    residual_target=opts.gptq_residual_target, damp=opts.gptq_damp, device=opts.device,
                                    progress=progress, on_layer=keep_hidden)
        qweights.update(quantize_vocab(model, adapter, opts, final_hidden=last_hidden))
        times["quantize_weights"] = time.perf_counter() - t0
    return CalibrationResult(model, tokenizer, rot, qweights, times, report, opts, clip_choice, shifts, key_shifts,
                             smoothing, input_clips)
