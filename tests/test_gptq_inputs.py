"""What GPTQ's Hessians see: activations unquantized, the served model's inputs, or those inputs aimed at the
full-precision model's outputs (asymmetric calibration)."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch

from conqur_vllm import fake_quant
from conqur_vllm.calibration import pipeline
from conqur_vllm.calibration.layerwise import (
    SublayerReplay,
    _layer_forward,
    capture_layer_inputs,
    quantize_weights,
)
from conqur_vllm.calibration.options import CalibrationOptions, ConqurOptions
from conqur_vllm.calibration.resume import CalibrationState
from conqur_vllm.gptq import CrossAccumulator, HessianAccumulator, fp_target_weight, gptq_quantize
from conqur_vllm.models.adapters import get_adapter
from conqur_vllm.quant import QuantSpec, dequantize
from tests.tiny_models import tiny_model

FAST = {"samples": 8, "seq_len": 64, "conqur": ConqurOptions(steps=2, batch_size=4)}


def _paired_inputs(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference inputs with correlated features and offsets, and a quantized-model version of them (a
    per-token rounding error plus a systematic distortion a weight can partly undo)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5 + torch.eye(d, dtype=torch.float64)
    x_ref = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 0.3
    distortion = torch.eye(d, dtype=torch.float64) + 0.1 * torch.randn(d, d, generator=g, dtype=torch.float64)
    x = x_ref @ distortion + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x_ref, x


def test_cross_moments_stream_like_the_float64_reference() -> None:
    x_ref, x = _paired_inputs(3000, 40)
    acc = CrossAccumulator(40)
    for a, b in zip(x_ref.split([1000, 7, 1993]), x.split([1000, 7, 1993]), strict=True):
        acc.add_pair(a.float().view(1, -1, 40), b.float().view(1, -1, 40))
    cross = 2.0 / 3000 * x_ref.T @ x
    hessian = 2.0 / 3000 * x.T @ x
    assert acc.count == 3000
    assert float((acc.cross - cross).norm() / cross.norm()) < 1e-6
    assert float((acc.hessian - hessian).norm() / hessian.norm()) < 1e-6


def test_fp_target_weight_is_the_least_squares_map() -> None:
    x_ref, x = _paired_inputs(4000, 32, seed=1)
    w = torch.randn(12, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    acc = CrossAccumulator(32)
    acc.add_pair(x_ref, x)
    v = fp_target_weight(w, acc.hessian, acc.cross, damp=0.0)
    reference = torch.linalg.lstsq(x, x_ref @ w.T).solution.T
    assert float((v - reference).norm() / reference.norm()) < 1e-8
    # the ridge term keeps the map near W: heavy damping returns W, and the distance falls with the damping
    distance = [float((fp_target_weight(w, acc.hessian, acc.cross, damp=d) - w).norm()) for d in (0.0, 1.0, 1e6)]
    assert distance[0] > distance[1] > 1e3 * distance[2], distance


def test_gptq_of_the_target_weight_lowers_the_asymmetric_error() -> None:
    """sum ||Q x - W x_ref||^2: GPTQ of W C H^-1 beats GPTQ of W itself (both against the quantized inputs' H)."""
    x_ref, x = _paired_inputs(4096, 64, seed=3)
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    acc = CrossAccumulator(64)
    acc.add_pair(x_ref, x)
    spec = QuantSpec(bits=4, symmetric=True)
    plain = gptq_quantize(w, acc.hessian, spec, clip_search=False)
    aimed = gptq_quantize(fp_target_weight(w, acc.hessian, acc.cross), acc.hessian, spec, clip_search=False)

    def err(qt) -> float:
        return float((x @ dequantize(qt, torch.float64).T - x_ref @ w.T).norm() / (x_ref @ w.T).norm())

    assert err(aimed) < 0.7 * err(plain), (err(aimed), err(plain))


def _calibrated(tiny_llama_dir, text_file, **kw):
    model, tok = pipeline.load_model(tiny_llama_dir)
    opts = CalibrationOptions(calib_text=str(text_file), method="quarot", **{**FAST, **kw})
    result = pipeline.calibrate_model(model, tok, opts, text_file.read_text(), progress=False)
    return model, tok, result


def _output_error(model, fp_model, batches) -> float:
    """Relative error of the fake-quantized model's logits against the full-precision model's."""
    num = den = 0.0
    with torch.no_grad():
        for ids in batches:
            ref = fp_model(ids, use_cache=False).logits.double()
            num += float((model(ids, use_cache=False).logits.double() - ref).pow(2).sum())
            den += float(ref.pow(2).sum())
    return (num / den) ** 0.5


def test_served_inputs_change_the_weights_and_asymmetric_tracks_the_fp_model(tiny_llama_dir, text_file):
    fp_model, tok = pipeline.load_model(tiny_llama_dir)
    opts = CalibrationOptions(calib_text=str(text_file), method="quarot", **FAST)
    batches = pipeline.calibration_batches(tok, text_file.read_text(), opts.samples, opts.seq_len, 4, opts.seed)
    runs = {mode: _calibrated(tiny_llama_dir, text_file, gptq_inputs=mode)
            for mode in ("fp-activations", "quantized", "asymmetric")}
    codes = {mode: torch.cat([qt.q.flatten() for name, qt in sorted(r[2].qweights.items()) if "layers" in name])
             for mode, r in runs.items()}
    assert not torch.equal(codes["fp-activations"], codes["quantized"])
    assert not torch.equal(codes["quantized"], codes["asymmetric"])
    errors = {mode: _output_error(r[0], fp_model, batches) for mode, r in runs.items()}
    # on its calibration data the asymmetric target follows the full-precision model more closely
    assert errors["asymmetric"] < errors["fp-activations"], errors


def _quantizer_wrapped_tiny(tiny_llama_dir, text_file):
    """The tiny Llama rotated (QuaRot) and wrapped in its quantizers, with two calibration batches."""
    model, tok = pipeline.load_model(tiny_llama_dir)
    opts = CalibrationOptions(calib_text=str(text_file), method="quarot", a_clip=0.9, **FAST)
    adapter = get_adapter(model.config)
    pipeline.apply_rotations(model, adapter, pipeline.initial_rotations(model, opts))
    pipeline.set_quantizers(model, opts, r3=True)
    return model, adapter, opts, pipeline.calibration_batches(tok, text_file.read_text(), 8, 64, 4, 0)


def test_quantized_inputs_are_read_one_group_after_another(tiny_llama_dir, text_file):
    """o_proj's Hessian comes from the attention outputs of the already-quantized q/k/v weights (as it will be
    fed when served), not from those of the full-precision ones."""
    from conqur_vllm.calibration import layerwise

    model, adapter, opts, batches = _quantizer_wrapped_tiny(tiny_llama_dir, text_file)
    o_proj = adapter.input_groups[1][0]
    layer0 = adapter.decoder_layers(model)[0]

    def o_proj_hessian() -> torch.Tensor:
        acc = HessianAccumulator(fake_quant.quant_linears(layer0, adapter)[o_proj].linear.in_features)
        fake_quant.quant_linears(layer0, adapter)[o_proj].input_observer = acc.add
        hidden, kwargs = layerwise.capture_layer_inputs(model, adapter, batches, torch.device("cpu"))
        with torch.no_grad():
            for h in hidden:
                layer0(h, **kwargs)
        fake_quant.quant_linears(layer0, adapter)[o_proj].input_observer = None
        return acc.hessian

    before = o_proj_hessian()  # full-precision q/k/v
    recorded = {}
    original = layerwise.quantize_group

    def spy(layer, adapter_, group, *args, **kw):
        if layer is layer0 and group[0] == o_proj:
            recorded["h"] = kw["moments"].hessian.clone()
        return original(layer, adapter_, group, *args, **kw)

    layerwise.quantize_group = spy
    try:
        quantize_weights(model, adapter, pipeline.weight_spec(opts), calib_batches=batches, inputs="quantized",
                         progress=False)
    finally:
        layerwise.quantize_group = original
    after = o_proj_hessian()  # quantized q/k/v (o_proj's own weights do not change its inputs)
    assert float((recorded["h"] - after).norm() / after.norm()) < 1e-6
    assert float((recorded["h"] - before).norm() / before.norm()) > 1e-3


def test_layerwise_leaves_the_quantizers_on_and_reports_both_streams(tiny_llama_dir, text_file):
    model, tok = pipeline.load_model(tiny_llama_dir)
    opts = CalibrationOptions(calib_text=str(text_file), method="quarot", a_clip=0.9, **FAST)
    adapter = get_adapter(model.config)
    pipeline.apply_rotations(model, adapter, pipeline.initial_rotations(model, opts))
    pipeline.set_quantizers(model, opts, r3=True)
    before = {m: m.act for m in model.modules() if isinstance(m, fake_quant.QuantLinear)}
    batches = pipeline.calibration_batches(tok, text_file.read_text(), 8, 64, 4, 0)
    seen = []
    quantize_weights(model, adapter, pipeline.weight_spec(opts), calib_batches=batches, inputs="asymmetric",
                     progress=False, on_layer=lambda i, q, r, h, ref: seen.append((i, len(h), len(ref), r)))
    assert [s[:3] for s in seen] == [(i, 2, 2, ) for i in range(len(seen))]
    assert all(0 < s[3].output_rel_error < 1 for s in seen)
    assert all(m.act is act for m, act in before.items())


def test_resume_state_keeps_the_reference_stream(tmp_path) -> None:
    state = CalibrationState(tmp_path / "out", "abcd", resume=False)
    hidden, reference = [torch.randn(2, 4, 8)], [torch.randn(2, 4, 8)]
    state.save_layer(0, {}, hidden, reference)
    start, _, h, r = CalibrationState(tmp_path / "out", "abcd", resume=True).load_layers()
    assert start == 1 and torch.equal(h[0], hidden[0]) and torch.equal(r[0], reference[0])


def test_resuming_asymmetric_without_the_reference_stream_is_refused(tiny_llama_dir):
    model, _ = pipeline.load_model(tiny_llama_dir)
    adapter = get_adapter(model.config)
    with pytest.raises(ValueError, match="resume_reference"):
        quantize_weights(model, adapter, QuantSpec(bits=4), calib_batches=[torch.ones(1, 8, dtype=torch.long)],
                         inputs="asymmetric", resume_hidden=[torch.zeros(1, 8, 64)], progress=False)


def test_cli_flag_reaches_the_options(tmp_path):
    from conqur_vllm.cli import _options, build_parser

    args = build_parser().parse_args(["calibrate", "-o", str(tmp_path / "o"), "--gptq-inputs", "asymmetric",
                                      "--gptq-damp", "0.2"])
    assert _options(args).gptq_inputs == "asymmetric" and _options(args).gptq_damp == 0.2
    negative = subprocess.run([sys.executable, "-m", "conqur_vllm.cli", "calibrate", "-o", str(tmp_path / "o"),
                               "--gptq-damp", "-1"], check=False, capture_output=True, text=True)
    assert negative.returncode != 0 and "Traceback" not in negative.stderr and "--gptq-damp" in negative.stderr
    bad = subprocess.run([sys.executable, "-m", "conqur_vllm.cli", "calibrate", "-o", str(tmp_path / "o"),
                          "--gptq-inputs", "fp"], check=False, capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'fp'" in bad.stderr


@pytest.mark.parametrize("inputs", ["fp-activations", "asymmetric"])
def test_gptq_damping_option_reaches_every_decoder_sweep_and_changes_the_codes(tiny_llama_dir, text_file,
                                                                               monkeypatch, inputs):
    from conqur_vllm.calibration import layerwise

    seen: list[float] = []
    original = layerwise.gptq_quantize

    def spy(w, h, spec, **kw):
        seen.append(kw["damp"])
        return original(w, h, spec, **kw)

    monkeypatch.setattr(layerwise, "gptq_quantize", spy)
    damped = _calibrated(tiny_llama_dir, text_file, gptq_inputs=inputs, gptq_damp=0.5)[2]
    n_groups = len(seen)
    assert n_groups > 0 and seen == [0.5] * n_groups
    seen.clear()
    default = _calibrated(tiny_llama_dir, text_file, gptq_inputs=inputs)[2]
    assert seen == [CalibrationOptions().gptq_damp] * n_groups
    codes = [torch.cat([qt.q.flatten() for name, qt in sorted(r.qweights.items()) if "layers" in name])
             for r in (damped, default)]
    assert not torch.equal(*codes)


def _quantized_tiny(family: str):
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    fake_quant.install(model, adapter, act=fake_quant.ActQuant(bits=4, clip_ratio=0.85),
                       attention=fake_quant.AttentionSim(r3=True, kv=fake_quant.KVQuant(bits=4)))
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, model.config.vocab_size, (2, 16), generator=g) for _ in range(3)]
    return model, adapter, ids


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("sublayer", ["attention", "mlp"])
def test_sublayer_replay_reproduces_the_quantized_layer_bit_for_bit(family, sublayer):
    model, adapter, ids = _quantized_tiny(family)
    hidden, kwargs = capture_layer_inputs(model, adapter, ids, torch.device("cpu"))
    layer = adapter.decoder_layers(model)[0]
    replay = getattr(SublayerReplay, sublayer)(layer, adapter)

    def forwards(replaying: bool) -> list[torch.Tensor]:
        outs = []
        with torch.no_grad(), replay.replaying() if replaying else replay.recording():
            for b, h in enumerate(hidden):
                replay.batch = b
                outs.append(_layer_forward(layer, h, kwargs))
        return outs

    full = forwards(replaying=False)
    assert len(replay.raw) == len(hidden)
    assert all(torch.equal(a, b) for a, b in zip(full, forwards(replaying=True), strict=True))
    with torch.no_grad():  # a new writer weight (as after its GPTQ) reaches the replayed output
        replay.writer.linear.weight.mul_(0.5)
    replay.raw.clear()
    fresh = forwards(replaying=False)
    assert not torch.equal(fresh[0], full[0])
    assert all(torch.equal(a, b) for a, b in zip(fresh, forwards(replaying=True), strict=True))
    assert "forward" not in vars(replay.sublayer)  # the module's own forward is back


@pytest.mark.parametrize("inputs", ["asymmetric", "quantized"])
def test_replayed_sublayers_give_the_codes_of_full_recomputation(inputs, monkeypatch):
    def run() -> dict:
        model, adapter, ids = _quantized_tiny("llama")
        return quantize_weights(model, adapter, QuantSpec(bits=4, group_size=None), calib_batches=ids,
                                inputs=inputs, progress=False)

    replayed = run()
    monkeypatch.setattr(SublayerReplay, "replaying", lambda self: contextlib.nullcontext())  # recompute them
    recomputed = run()
    assert replayed.keys() == recomputed.keys() and len(replayed) == 14
    for name, qt in replayed.items():
        assert torch.equal(qt.q, recomputed[name].q) and torch.equal(qt.scale, recomputed[name].scale), name


def test_cross_moments_keep_the_residual_error_moment() -> None:
    x_ref, x = _paired_inputs(3000, 40, seed=5)
    e = torch.randn(3000, 24, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    acc = CrossAccumulator(40)
    for a, b, c in zip(x_ref.split([1000, 7, 1993]), x.split([1000, 7, 1993]), e.split([1000, 7, 1993]),
                       strict=True):
        acc.add_pair(a.float().view(1, -1, 40), b.float().view(1, -1, 40), c.float().view(1, -1, 24))
    expected = 2.0 / 3000 * e.T @ x
    assert acc.residual.shape == (24, 40)
    assert float((acc.residual - expected).norm() / expected.norm()) < 1e-6
    with pytest.raises(ValueError, match="every batch or with none"):
        acc.add_pair(x_ref[:5], x[:5])
    plain = CrossAccumulator(40)
    plain.add_pair(x_ref[:5], x[:5])
    with pytest.raises(ValueError, match="every batch or with none"):
        plain.add_pair(x_ref[5:9], x[5:9], e[5:9])


def test_residual_target_weight_is_the_least_squares_map_onto_output_plus_error() -> None:
    x_ref, x = _paired_inputs(4000, 32, seed=7)
    w = torch.randn(12, 32, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    e = 0.3 * torch.randn(4000, 12, generator=torch.Generator().manual_seed(9), dtype=torch.float64) + x @ (
        0.05 * torch.randn(32, 12, generator=torch.Generator().manual_seed(10), dtype=torch.float64))
    acc = CrossAccumulator(32)
    acc.add_pair(x_ref, x, e)
    v = fp_target_weight(w, acc.hessian, acc.cross, damp=0.0, residual=acc.residual)
    reference = torch.linalg.lstsq(x, x_ref @ w.T + e).solution.T
    assert float((v - reference).norm() / reference.norm()) < 1e-8
    without = fp_target_weight(w, acc.hessian, acc.cross, damp=0.0)
    assert float((v - without).norm() / without.norm()) > 1e-2


def test_writers_aim_at_the_residual_error_of_the_quantized_stream(tiny_llama_dir, text_file):
    """Layer 0: both streams enter equal, so o_proj's error moment is zero; down_proj's is the moment of the
    error the quantized attention left in the residual, against down_proj's quantized-stream inputs."""
    import copy

    from conqur_vllm.calibration import layerwise

    model, adapter, opts, batches = _quantizer_wrapped_tiny(tiny_llama_dir, text_file)
    layer0 = adapter.decoder_layers(model)[0]
    fp_layer0 = copy.deepcopy(layer0)
    recorded = {}
    original = layerwise.quantize_group

    def spy(layer, adapter_, group, *args, **kw):
        if layer is layer0:
            residual = kw["moments"].residual
            recorded[group[0]] = None if residual is None else residual.clone()
        return original(layer, adapter_, group, *args, **kw)

    layerwise.quantize_group = spy
    try:
        quantize_weights(model, adapter, pipeline.weight_spec(opts), calib_batches=batches, inputs="asymmetric",
                         residual_target=True, progress=False)
    finally:
        layerwise.quantize_group = original
    readers = [g[0] for g in adapter.input_groups if g[0] not in (adapter.o_proj, adapter.down_proj)]
    assert all(recorded[p] is None for p in readers)
    assert float(recorded[adapter.o_proj].abs().max()) == 0.0

    hidden, kwargs = layerwise.capture_layer_inputs(model, adapter, batches, torch.device("cpu"))
    for m in fp_layer0.modules():
        if isinstance(m, fake_quant.QuantLinear):
            m.act = fake_quant.ActQuant(bits=None)
    fp_attention = fp_layer0.get_submodule(adapter.attention)
    fp_attention.conqur_attention = fake_quant.AttentionSim(r3=fp_attention.conqur_attention.r3)
    mids: dict[str, list[torch.Tensor]] = {"fp": [], "q": []}
    inputs: list[torch.Tensor] = []
    down = fake_quant.quant_linears(layer0, adapter)[adapter.down_proj]
    down.input_observer = inputs.append
    handles = [lay.get_submodule(adapter.mlp_norm).register_forward_pre_hook(
        lambda _m, args, key=key: mids[key].append(args[0].detach())) for lay, key in ((fp_layer0, "fp"), (layer0, "q"))]
    try:
        with torch.no_grad():
            for h in hidden:
                fp_layer0(h, **kwargs)
                layer0(h, **kwargs)
    finally:
        down.input_observer = None
        for handle in handles:
            handle.remove()
    e = torch.cat([(f - q).reshape(-1, f.shape[-1]) for f, q in zip(mids["fp"], mids["q"], strict=True)]).double()
    x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs]).double()
    expected = 2.0 / x.shape[0] * e.T @ x
    got = recorded[adapter.down_proj]
    assert float(expected.norm()) > 0
    assert float((got - expected).norm() / expected.norm()) < 1e-5


def test_residual_targets_bring_the_quantized_stream_closer_to_full_precision(tiny_llama_dir, text_file):
    """Each layer's output on the quantized stream is compared with the full-precision stream's (what
    ``LayerReport.output_rel_error`` reports): with residual targets the writers cancel part of the error
    accumulated before them (down_proj already that of the first layer's attention), so it is lower after every
    layer, and the logits follow the full-precision model more closely."""
    fp_model, tok = pipeline.load_model(tiny_llama_dir)
    opts = CalibrationOptions(calib_text=str(text_file), method="quarot", a_clip=0.9, **FAST)
    assert opts.gptq_residual_target  # the default with asymmetric inputs
    batches = pipeline.calibration_batches(tok, text_file.read_text(), opts.samples, opts.seq_len, 4, opts.seed)
    errors, models = {}, {}
    for on in (True, False):
        model, _ = pipeline.load_model(tiny_llama_dir)
        adapter = get_adapter(model.config)
        pipeline.apply_rotations(model, adapter, pipeline.initial_rotations(model, opts))
        pipeline.set_quantizers(model, opts, r3=True)
        reports: list = []
        quantize_weights(model, adapter, pipeline.weight_spec(opts), calib_batches=batches, inputs="asymmetric",
                         residual_target=on, progress=False,
                         on_layer=lambda i, q, r, h, ref, into=reports: into.append(r))
        errors[on], models[on] = [r.output_rel_error for r in reports], model
    assert len(errors[True]) >= 2
    assert all(a < b for a, b in zip(errors[True], errors[False], strict=True)), errors
    logits = {on: _output_error(m, fp_model, batches) for on, m in models.items()}
    assert logits[True] < logits[False], logits


def test_residual_target_option_needs_asymmetric_inputs(tmp_path):
    from conqur_vllm.cli import _options, build_parser

    assert not CalibrationOptions(gptq_inputs="quantized").gptq_residual_target
    with pytest.raises(ValueError, match="needs gptq_inputs='asymmetric'"):
        CalibrationOptions(gptq_inputs="fp-activations", gptq_residual_target=True)
    args = build_parser().parse_args(["calibrate", "-o", str(tmp_path / "o"), "--no-gptq-residual-target"])
    assert _options(args).gptq_residual_target is False
    bad = subprocess.run([sys.executable, "-m", "conqur_vllm.cli", "calibrate", "-o", str(tmp_path / "o"),
                          "--gptq-inputs", "quantized", "--gptq-residual-target"],
                         check=False, capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "gptq_residual_target" in bad.stderr
