"""``calibrate()``: the Python API behind ``conqur calibrate`` (one function, one options object)."""

from __future__ import annotations

import ctypes
import gc
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from conqur_vllm import __version__, assets
from conqur_vllm.calibration import pipeline
from conqur_vllm.calibration.export import export_checkpoint
from conqur_vllm.calibration.layerwise import quantize_weights
from conqur_vllm.calibration.metrics import activation_sqnr
from conqur_vllm.calibration.options import CalibrationOptions
from conqur_vllm.calibration.progress import ProgressMetrics
from conqur_vllm.calibration.resume import CalibrationState
from conqur_vllm.calibration.vocab import quantize_vocab
from conqur_vllm.models.adapters import get_adapter
from conqur_vllm.quant import dequantize
from conqur_vllm.rotation.rotations import apply_rotations


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_memory() -> None:
    """Free dead tensors and hand glibc's cached pages back, so a later stage's peak starts from what is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def calibration_text(name_or_path: str) -> str:
    """A named exllamav2 text (``c4``, ``wiki``...) or the contents of a local text file."""
    path = Path(name_or_path)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    return assets.load_text(name_or_path)


def calibrate(model_dir: str | Path | None, out_dir: str | Path, options: CalibrationOptions | None = None, *,
              progress: bool = True, resume: bool = False, metrics_port: int | None = None) -> Path:
    """Calibrate ``model_dir`` (None: the embedded SmolLM2-135M-Instruct) and write a checkpoint to ``out_dir``."""
    opts = options or CalibrationOptions()
    t_start = time.perf_counter()
    source = Path(model_dir) if model_dir is not None else assets.smollm2_dir()
    text = calibration_text(opts.calib_text)
    state = CalibrationState(out_dir, opts.fingerprint(str(source.resolve())), resume)
    torch.manual_seed(opts.seed)
    model, tokenizer = pipeline.load_model(source)
    adapter = get_adapter(model.config)
    n_layers = len(adapter.decoder_layers(model))
    metrics = ProgressMetrics(metrics_port, total_layers=n_layers)
    times: dict[str, float] = {}
    try:
        batches = pipeline.calibration_batches(tokenizer, text, opts.samples, opts.seq_len,
                                               opts.conqur.batch_size, opts.seed)
        saved = state.load_rotations()
        learn_report = None
        if saved is not None:
            rot, learn_report = saved
        else:
            rot = pipeline.initial_rotations(model, opts)
            if opts.method == "conqur":
                metrics.set_stage("learn_rotations")
                t0 = time.perf_counter()
                apply_rotations(model, adapter, rot)
                release_memory()
                rot, report = pipeline.learn_conqur_rotations(model, tokenizer, rot, opts, batches, text,
                                                              progress=progress, on_step=metrics.on_step)
                learn_report = report.to_dict()
                times["learn_rotations"] = time.perf_counter() - t0
                del model
                release_memory()
                model, tokenizer = pipeline.load_model(source)  # fuse the final rotations into fresh weights
            state.save_rotations(rot, learn_report)
        apply_rotations(model, adapter, rot)
        release_memory()
        smoothing = pipeline.set_smoothing(model, opts, batches, rot)  # before any resumed layer, as shifts
        shifts = pipeline.set_input_shifts(model, opts, batches)  # before any resumed layer: same as a full run
        key_shifts = pipeline.set_key_shifts(model, opts, batches)
        used, clip_choice = pipeline.resolve_activation_clip(model, opts, batches)  # a_clip "auto" -> a ratio
        pipeline.set_quantizers(model, used, r3=rot.r3)
        input_clips = pipeline.set_input_clips(model, used, batches)  # before any resumed layer, as shifts

        metrics.set_stage("quantize_weights")
        t0 = time.perf_counter()
        start, done, hidden, reference = state.load_layers()
        layers = adapter.decoder_layers(model)
        for name, qt in done.items():
            lin = model.get_submodule(name).linear
            with torch.no_grad():
                lin.weight.copy_(dequantize(qt, torch.float64).to(lin.weight.dtype))

        final_hidden = [hidden]  # the last finished layer's outputs: the LM head's GPTQ inputs

        def on_layer(index, qts, report, hidden_states, reference_states):
            state.save_layer(index, qts, hidden_states, reference_states)
            metrics.on_layer(index)
            final_hidden[0] = hidden_states

        qweights = dict(done)
        if start < len(layers):
            qweights.update(quantize_weights(
                model, adapter, pipeline.weight_spec(opts), method=opts.weight_quantizer, calib_batches=batches,
                clip_search=opts.clip_search, inputs=opts.gptq_inputs, target_damp=opts.gptq_target_damp,
                residual_target=opts.gptq_residual_target,
                damp=opts.gptq_damp, device=opts.device, progress=progress,
                on_layer=on_layer, start_layer=start, resume_hidden=hidden, resume_reference=reference))
        qweights.update(quantize_vocab(model, adapter, opts, final_hidden=final_hidden[0]))
        times["quantize_weights"] = time.perf_counter() - t0

        metrics.set_stage("export")
        result = pipeline.CalibrationResult(model, tokenizer, rot, qweights, options=used, clip_choice=clip_choice,
                                            input_shifts=shifts, key_shifts=key_shifts, smoothing=smoothing,
                                            input_clips=input_clips)
        sqnr = activation_sqnr(model, adapter, batches[0][:1])
        times["total"] = time.perf_counter() - t_start
        report = {
            "options": opts.model_dump(),
            "source_model": str(source),
            "rotation_objective": learn_report,
            "activation_sqnr_db": sqnr,
            "activation_clip": clip_choice.to_dict() if clip_choice else {"chosen": used.a_clip},
            "input_clips": input_clips.report(),
            "activation_shift": shifts.report(),
            "key_shift": key_shifts.report(),
            "smoothing": smoothing.report(),
            "stage_seconds": times,
            "samples_used": opts.samples,
            "tokens_used": opts.samples * opts.seq_len,
            "peak_rss_mb": peak_rss_mb(),
            "versions": {"conqur_vllm": __version__, "torch": torch.__version__,
                         "python": sys.version.split()[0], "platform": platform.platform()},
        }
        path = export_checkpoint(result, used, out_dir, source_dir=source, report=report)
        state.remove()
        if progress:
            print(f"wrote {path} in {times['total']:.1f}s, peak RSS {peak_rss_mb():.0f} MiB", file=sys.stderr)
        return path
    finally:
        metrics.close()
