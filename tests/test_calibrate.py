"""Calibration end to end on tiny models: checkpoint contents, reference forward, determinism, resume, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conqur_vllm.calibration import pipeline
from conqur_vllm.calibration.export import export_checkpoint
from conqur_vllm.calibration.options import CalibrationOptions, ConqurOptions
from conqur_vllm.calibration.run import calibrate
from conqur_vllm.checkpoint import read_checkpoint_tensors
from conqur_vllm.config import ConqurQuantConfig
from conqur_vllm.quant import dequantize
from conqur_vllm.reference import dequantize_linear, load_reference_model
from tests.conftest import save_tiny_model_dir, synthetic_text

FAST = {"samples": 8, "seq_len": 64, "conqur": ConqurOptions(steps=2, batch_size=4)}


def _opts(text_file, **kw) -> CalibrationOptions:
    return CalibrationOptions(calib_text=str(text_file), **{**FAST, **kw})


def test_checkpoint_contents_and_report(tiny_llama_dir, text_file, tmp_path):
    out = calibrate(tiny_llama_dir, tmp_path / "ckpt", _opts(text_file), progress=False)
    qcfg = ConqurQuantConfig.from_model_dir(out)
    assert qcfg.method == "conqur" and qcfg.weights.quantizer == "gptq"
    assert {t.site for t in qcfg.online_transforms} == {"down_proj_input", "qk_post_rope"}
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    tensors = read_checkpoint_tensors(out)
    assert tensors["model.layers.0.self_attn.q_proj.weight_packed"].dtype == torch.int32
    assert "model.layers.0.self_attn.q_proj.weight" not in tensors
    # default vocab quantization: INT4 embedding and INT4 LM head, both in groups of 32 columns
    assert qcfg.vocab is not None and (qcfg.vocab.embed_bits, qcfg.vocab.head_bits) == (4, 4)
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" not in tensors
    d = config["hidden_size"]
    assert tensors["model.embed_tokens.weight_packed"].shape[1] == d // 8
    assert tensors["model.embed_tokens.weight_scale"].shape[1] == d // 32
    assert tensors["lm_head.weight_packed"].shape[1] == d // 8 and tensors["lm_head.weight_scale"].shape[1] == d // 32
    report = json.loads((out / "calibration_report.json").read_text())
    obj = report["rotation_objective"]
    assert len(obj["steps"]) == 2 and obj["steps"][-1]["r1_after"] < obj["r1_objective_initial"]
    assert set(report["activation_sqnr_db"]) == {"qkv_input", "o_proj_input", "gate_up_input", "down_proj_input"}
    assert all(5 < v < 40 for v in report["activation_sqnr_db"].values())
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    assert not any(p.name.endswith(".calib-state") for p in tmp_path.iterdir())


@pytest.mark.parametrize("weight_quantizer", ["gptq", "rtn"])
def test_reference_forward_equals_calibrated_model(tiny_llama_dir, text_file, tmp_path, weight_quantizer):
    """The checkpoint stores exactly the calibrated model (weights, embedding and head bit-exact; bf16 only for
    the norms); RTN's default asymmetric weights round-trip through their zero points."""
    opts = _opts(text_file, a_bits=16, kv_bits=16, weight_quantizer=weight_quantizer)
    model, tok = pipeline.load_model(tiny_llama_dir)
    result = pipeline.calibrate_model(model, tok, opts, synthetic_text(), progress=False)
    out = export_checkpoint(result, opts, tmp_path / "ckpt", source_dir=tiny_llama_dir, report={})
    tensors = read_checkpoint_tensors(out)
    assert {"model.embed_tokens", "lm_head"} <= set(result.qweights)
    asym = weight_quantizer == "rtn"
    assert ConqurQuantConfig.from_model_dir(out).weights.symmetric is not asym
    zeros = [n for n in tensors if n.endswith(".weight_zero_point")]
    assert len(zeros) == (7 * model.config.num_hidden_layers if asym else 0)  # decoder linears, not the vocab
    for prefix, qt in result.qweights.items():
        assert torch.equal(dequantize_linear(tensors, prefix, ConqurQuantConfig.from_model_dir(out)),
                           dequantize(qt, torch.float32))
    ref, _ = load_reference_model(out)
    ids = tok(synthetic_text(200, seed=3), return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert float((a - b).norm() / a.norm()) < 1e-4


def test_unquantized_vocab_keeps_plain_embedding_and_head(tiny_llama_dir, text_file, tmp_path):
    opts = _opts(text_file, weight_quantizer="rtn", embed_bits=16, head_bits=16)
    out = calibrate(tiny_llama_dir, tmp_path / "ckpt", opts, progress=False)
    tensors = read_checkpoint_tensors(out)
    assert ConqurQuantConfig.from_model_dir(out).vocab is None
    assert tensors["lm_head.weight"].dtype == torch.bfloat16 and "lm_head.weight_packed" not in tensors
    assert "model.embed_tokens.weight" in tensors


def test_gptq_head_beats_rtn_head_on_its_inputs(tiny_llama_dir, text_file):
    """With GPTQ runs the LM head is quantized against its real inputs: lower output error than RTN's grid."""
    from conqur_vllm.calibration.vocab import quantize_vocab
    from conqur_vllm.models import get_adapter

    model, _ = pipeline.load_model(tiny_llama_dir)
    adapter = get_adapter(model.config)
    g = torch.Generator().manual_seed(0)
    d = model.config.hidden_size
    mix = torch.randn(d, d, generator=g) / d**0.5  # correlated inputs, as real hidden states are
    hidden = [torch.randn(2, 64, d, generator=g) @ mix for _ in range(3)]
    head = model.get_submodule(adapter.lm_head).weight.detach().clone()
    norm = model.get_submodule(adapter.final_norm)
    with torch.no_grad():
        x = torch.cat([norm(h) for h in hidden]).reshape(-1, d)
    errors = {}
    for name, final_hidden in (("gptq", hidden), ("rtn", None)):
        m, _ = pipeline.load_model(tiny_llama_dir)
        opts = _opts(text_file, head_bits=4, embed_bits=16)
        qts = quantize_vocab(m, adapter, opts, final_hidden=final_hidden)
        w = m.get_submodule(adapter.lm_head).weight.detach()
        assert torch.equal(w, dequantize(qts[adapter.lm_head], torch.float32).to(w.dtype))
        errors[name] = float((x @ (w - head).T).norm() / (x @ head.T).norm())
    assert 0 < errors["gptq"] < 0.9 * errors["rtn"], errors


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_other_families_calibrate(family, text_file, tmp_path):
    src = save_tiny_model_dir(tmp_path / family, family)
    out = calibrate(src, tmp_path / "ckpt", _opts(text_file, method="conqur", weight_quantizer="rtn"),
                    progress=False)
    ref, qcfg = load_reference_model(out)
    assert qcfg.method == "conqur"
    with torch.no_grad():
        assert torch.isfinite(ref(torch.randint(3, 300, (1, 16))).logits).all()


def test_learning_is_deterministic(tiny_llama_dir, text_file):
    rots = []
    for _ in range(2):
        model, tok = pipeline.load_model(tiny_llama_dir)
        res = pipeline.calibrate_model(model, tok, _opts(text_file, weight_quantizer="rtn"), synthetic_text(),
                                       progress=False)
        rots.append(res.rotations)
    assert torch.equal(rots[0].r1, rots[1].r1) and torch.equal(rots[0].r2, rots[1].r2)


def test_grid_target_learns_different_orthogonal_rotations(tiny_llama_dir, text_file):
    """``target="grid"`` reaches the learner: other rotations than the corner rule's, still orthogonal."""
    rots = {}
    for target in ("corner", "grid"):
        model, tok = pipeline.load_model(tiny_llama_dir)
        opts = _opts(text_file, weight_quantizer="rtn",
                     conqur=ConqurOptions(steps=2, batch_size=4, target=target))
        res = pipeline.calibrate_model(model, tok, opts, synthetic_text(), progress=False)
        rots[target] = res.rotations
        steps = res.learn_report.steps
        assert len(steps) == 2 and all(0 < s.r1_after < 2 for s in steps)
    r1 = rots["grid"].r1
    eye = torch.eye(r1.shape[0], dtype=torch.float64)
    assert float((r1.T @ r1 - eye).abs().max()) < 1e-10
    assert float((r1 - rots["corner"].r1).abs().max()) > 1e-3
    assert float((rots["grid"].r2 - rots["corner"].r2).abs().max()) > 1e-3


def _heldout_loss_of(model_dir, rotations, opts, windows) -> float:
    """Independent reference: a fresh model with ``rotations`` fused, the run's quantizers and RTN weights."""
    from conqur_vllm import fake_quant
    from conqur_vllm.models.adapters import get_adapter
    from conqur_vllm.rotation.rotations import apply_rotations

    model, _ = pipeline.load_model(model_dir)
    apply_rotations(model, get_adapter(model.config), rotations)
    pipeline.set_quantizers(model, opts, r3=rotations.r3)
    fake_quant.set_weight_fake_quant(model, pipeline.weight_spec(opts), clip_search=False)
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(ids[None]).logits[0, :-1], ids[1:]) for ids in windows]
    return float(sum(losses) / len(losses))


def _select_run(model_dir, text_file, text, select: str, steps: int = 3, **kw):
    model, tok = pipeline.load_model(model_dir)
    opts = _opts(text_file, weight_quantizer="rtn", a_clip=0.8,
                 conqur=ConqurOptions(steps=steps, batch_size=4, select=select, select_windows=2), **kw)
    return pipeline.calibrate_model(model, tok, opts, text, progress=False), tok


def test_heldout_selection_keeps_the_best_scored_update(tiny_llama_dir, text_file):
    """``select="heldout"``: every update is scored on calibration windows no batch contains, the start's score
    equals an independent evaluation, and the rotations kept are the learning path's best-scored update."""
    text = synthetic_text()
    run, tok = _select_run(tiny_llama_dir, text_file, text, "heldout")
    opts, report = run.options, run.learn_report
    windows = pipeline.heldout_windows(tok, text, opts)
    batches = torch.cat(pipeline.calibration_batches(tok, text, opts.samples, opts.seq_len, 4, opts.seed))
    assert windows.shape == (2, opts.seq_len)
    assert not any(torch.equal(w, b) for w in windows for b in batches)
    losses = [report.heldout_initial] + [s.heldout_loss for s in report.steps]
    assert len(set(losses)) == len(losses)  # the rotations change what the quantizers see
    assert report.selected_step == losses.index(min(losses)) - 1
    start = pipeline.initial_rotations(run.model, opts)
    reference = _heldout_loss_of(tiny_llama_dir, start, opts, windows)
    assert abs(report.heldout_initial - reference) / reference < 1e-4
    # the learning path is the unscored one; the kept rotations are its update number selected_step
    if report.selected_step == -1:
        expected = start.r1
    else:
        expected = _select_run(tiny_llama_dir, text_file, text, "last", steps=report.selected_step + 1)[0].rotations.r1
    assert float((run.rotations.r1 - expected).norm() / expected.norm()) < 1e-12


def test_heldout_scores_use_the_rotated_basis_throughout(tiny_llama_dir, text_file):
    """Unquantized, every rotation gives the same function: each update's held-out loss equals the plain model's
    (the scoring forward undoes the rotations it has not fused into the embedding and head yet)."""
    text = synthetic_text()
    bits = {"w_bits": 16, "a_bits": 16, "kv_bits": 16, "embed_bits": 16, "head_bits": 16}
    run, tok = _select_run(tiny_llama_dir, text_file, text, "heldout", **bits)
    model, _ = pipeline.load_model(tiny_llama_dir)
    with torch.no_grad():
        plain = [torch.nn.functional.cross_entropy(model(ids[None]).logits[0, :-1], ids[1:])
                 for ids in pipeline.heldout_windows(tok, text, run.options)]
    reference = float(sum(plain) / len(plain))
    losses = [run.learn_report.heldout_initial] + [s.heldout_loss for s in run.learn_report.steps]
    assert all(abs(v - reference) / reference < 1e-4 for v in losses)
    assert run.learn_report.steps[-1].r1_after < run.learn_report.r1_initial - 1e-3  # the rotations did move


def test_bad_inputs_give_one_line_errors(tiny_llama_dir, text_file, tmp_path):
    with pytest.raises(pipeline.CalibrationError, match="lower --samples"):
        calibrate(tiny_llama_dir, tmp_path / "x", _opts(text_file, samples=100000), progress=False)
    with pytest.raises(pipeline.CalibrationError, match="no config.json"):
        pipeline.load_model(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "conqur_vllm.cli", "calibrate", str(tmp_path / "nope"),
                           "-o", str(tmp_path / "y"), "--calib-text", str(text_file)],
                          check=False, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no config.json" in proc.stderr
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize(("value", "message"), [
    ('{"alternations": 0}', "--conqur alternations: Input should be greater than or equal to 1"),
    ('{"target": "cube"}', "--conqur target:"),
    ('{"no_such_knob": 1}', "--conqur no_such_knob: Extra inputs are not permitted"),
    ("[1]", "must be a JSON object"),
    ("{alternations: 1}", "not valid JSON"),
])
def test_conqur_flag_rejects_bad_options_in_one_line(tiny_llama_dir, text_file, tmp_path, value, message):
    proc = subprocess.run([sys.executable, "-m", "conqur_vllm.cli", "calibrate", str(tiny_llama_dir),
                           "-o", str(tmp_path / "y"), "--calib-text", str(text_file), "--conqur", value],
                          check=False, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr and "--conqur '{" in proc.stderr
    assert not (tmp_path / "y").exists()


def test_contradicting_flags_give_one_line_error(tmp_path, capsys):
    from conqur_vllm.cli import main

    with pytest.raises(SystemExit) as info:
        main(["calibrate", "-o", str(tmp_path / "y"), "--w-bits", "8", "--no-weight-symmetric"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "\n" not in err
    assert "asymmetric weights need w_bits=4" in err and "--weight-symmetric" in err
    assert not (tmp_path / "y").exists()


def test_device_option_is_checked_before_any_work(tmp_path, capsys):
    from conqur_vllm.cli import main

    for bad, message in (("tpu", "use cpu or cuda"), ("cuda:x", "use cpu or cuda")):
        with pytest.raises(ValueError, match=message):
            CalibrationOptions(device=bad)
    assert CalibrationOptions(device="cpu").device == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as info:
            main(["calibrate", "-o", str(tmp_path / "y"), "--device", "cuda"])
        err = capsys.readouterr().err.strip()
        assert info.value.code == 2 and "\n" not in err and "--device: no CUDA device is visible" in err
        assert not (tmp_path / "y").exists()


def test_gptq_inputs_and_layer_keywords_are_captured_on_the_compute_device():
    from conqur_vllm.calibration.layerwise import capture_layer_inputs
    from conqur_vllm.models.adapters import get_adapter
    from tests.tiny_models import tiny_model

    model = tiny_model("llama")  # on the CPU; the "compute device" here is meta
    ids = [torch.randint(1, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))]
    hidden, kwargs = capture_layer_inputs(model, get_adapter(model.config), ids, torch.device("meta"))
    assert len(hidden) == 1 and hidden[0].is_meta and hidden[0].shape == (2, 8, model.config.hidden_size)
    rope = kwargs["position_embeddings"]
    assert isinstance(rope, tuple) and all(t.is_meta for t in rope)
    assert kwargs["use_cache"] is False and next(model.parameters()).device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("weight_quantizer", ["gptq", "rtn"])
def test_cuda_weight_quantization_matches_cpu(tiny_llama_dir, text_file, tmp_path, weight_quantizer):
    outs = {dev: calibrate(tiny_llama_dir, tmp_path / dev, _opts(text_file, device=dev,
                                                                  weight_quantizer=weight_quantizer),
                           progress=False) for dev in ("cpu", "cuda")}
    cpu, cuda = (read_checkpoint_tensors(outs[d]) for d in ("cpu", "cuda"))
    assert cpu.keys() == cuda.keys()
    for name, t in cpu.items():
        assert cuda[name].dtype == t.dtype
        if name.endswith("weight_packed"):  # GPTQ in float64 on either device: codes may flip only at ties
            assert (cuda[name] != t).double().mean() < 0.01, name


def test_weight_symmetry_defaults_by_weight_quantizer():
    assert CalibrationOptions(weight_quantizer="gptq").weight_symmetric is True
    assert CalibrationOptions(weight_quantizer="rtn").weight_symmetric is False
    assert CalibrationOptions(weight_quantizer="rtn", w_bits=8).weight_symmetric is True
    assert CalibrationOptions(weight_quantizer="gptq", weight_symmetric=False).weight_symmetric is False
    with pytest.raises(ValueError, match="asymmetric weights need w_bits=4"):
        CalibrationOptions(w_bits=8, weight_symmetric=False)
    assert pipeline.weight_spec(CalibrationOptions(weight_quantizer="rtn")).symmetric is False


def test_forward_of_the_learner_defaults_by_weight_quantizer():
    assert CalibrationOptions(weight_quantizer="gptq").conqur.quantized_forward is False
    assert CalibrationOptions(weight_quantizer="rtn").conqur.quantized_forward is True
    explicit = CalibrationOptions(weight_quantizer="rtn", conqur=ConqurOptions(quantized_forward=False))
    assert explicit.conqur.quantized_forward is False
    assert CalibrationOptions(**explicit.model_dump()).fingerprint("m") == explicit.fingerprint("m")


def test_conqur_flag_sets_learner_options():
    from conqur_vllm.cli import _options, build_parser

    args = build_parser().parse_args(["calibrate", "--conqur", '{"alternations": 1, "target": "grid"}',
                                      "--steps", "3"])
    conqur = _options(args).conqur
    assert (conqur.alternations, conqur.target, conqur.steps) == (1, "grid", 3)
    default = _options(build_parser().parse_args(["calibrate"])).conqur
    assert default == ConqurOptions(quantized_forward=False, center=True)  # GPTQ + a_shift resolve both


def _cli(src, out, text_file):
    return [sys.executable, "-m", "conqur_vllm.cli", "calibrate", str(src), "-o", str(out), "--method", "conqur",
            "--samples", "8", "--seq-len", "64", "--steps", "2", "--calib-text", str(text_file)]


def test_resume_after_sigkill_equals_uninterrupted(text_file, tmp_path):
    src = save_tiny_model_dir(tmp_path / "deep", "llama", layers=6)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run(_cli(src, ref, text_file), check=True, env=env, capture_output=True)

    out = tmp_path / "out"
    state = tmp_path / ".out.calib-state"
    proc = subprocess.Popen(_cli(src, out, text_file), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (state / "layer0001.pt").exists():
        assert proc.poll() is None, "calibration finished before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing that looks like a checkpoint
    assert (state / "rotations.pt").exists()

    resumed = subprocess.run(_cli(src, out, text_file) + ["--resume"], check=False, env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = read_checkpoint_tensors(ref), read_checkpoint_tensors(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not state.exists()


def test_resume_refuses_other_options(text_file, tmp_path, tiny_llama_dir):
    from conqur_vllm.calibration.resume import CalibrationState, ResumeError

    CalibrationState(tmp_path / "o", "aaaa", resume=False)
    with pytest.raises(ResumeError, match="without --resume"):
        CalibrationState(tmp_path / "o", "bbbb", resume=True)


_RSS_SCRIPT = """
import resource, sys, torch
from conqur_vllm.calibration import pipeline
from conqur_vllm.calibration.options import CalibrationOptions, ConqurOptions
from conqur_vllm.calibration.learn_rotations import learn_rotations
from conqur_vllm.models import get_adapter
from conqur_vllm.rotation.rotations import apply_rotations
steps = int(sys.argv[2])
model, tok = pipeline.load_model(sys.argv[1])
adapter = get_adapter(model.config)
opts = CalibrationOptions(samples=8, seq_len=256, a_clip=0.9, conqur=ConqurOptions(steps=steps, batch_size=8))
rot = pipeline.initial_rotations(model, opts)
apply_rotations(model, adapter, rot)
pipeline.set_quantizers(model, opts, r3=True)
g = torch.Generator().manual_seed(0)
batches = [torch.randint(3, 380, (8, 256), generator=g) for _ in range(steps)]  # a new batch every step
learn_rotations(model, adapter, rot, batches, opts.conqur, weight_spec=pipeline.weight_spec(opts), progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_rotation_learning_memory_does_not_grow_with_samples(tiny_llama_dir):
    """Only a d x d moment per site survives a step: 4x more calibration batches, same peak RSS."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rss = {}
    for steps in (2, 8):
        out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tiny_llama_dir), str(steps)], env=env,
                             capture_output=True, text=True, check=True)
        rss[steps] = int(out.stdout.strip().splitlines()[-1]) / 1024  # MiB
    # storing the vectors would add ~8 MiB per extra batch here (8 x 256 tokens x 5 sites x 128 x 8 bytes)
    assert rss[8] - rss[2] < 16, rss


def _scrape(port: int) -> dict[str, str]:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {line.split(" ")[0]: line.split(" ")[-1] for line in text.splitlines() if line.startswith("conqur_")}


def test_metrics_port_serves_live_progress(tiny_llama_dir, text_file, tmp_path, monkeypatch):
    """During a real calibration the --metrics-port endpoint reports the stage, the objective after each
    ConQuR update, the finished layer and an ETA; the server is gone once the run ends."""
    from conqur_vllm.calibration.progress import ProgressMetrics
    from conqur_vllm.serving import free_port

    port = free_port()
    seen: list[dict[str, str]] = []
    original = ProgressMetrics.on_layer

    def on_layer_and_scrape(self, index, *args):
        original(self, index, *args)
        seen.append(_scrape(port))

    monkeypatch.setattr(ProgressMetrics, "on_layer", on_layer_and_scrape)
    out = calibrate(tiny_llama_dir, tmp_path / "ckpt", _opts(text_file), progress=False, metrics_port=port)
    report = json.loads((out / "calibration_report.json").read_text())
    n_layers = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    assert len(seen) == n_layers
    first, last = seen[0], seen[-1]
    assert first['conqur_calibration_stage_info{stage="quantize_weights"}'] == "1.0"
    assert float(first["conqur_calibration_layer"]) == 0 and float(last["conqur_calibration_layer"]) == n_layers - 1
    assert float(first["conqur_calibration_eta_seconds"]) > 0 and float(last["conqur_calibration_eta_seconds"]) == 0
    final_objective = report["rotation_objective"]["steps"][-1]["r1_after"]
    assert abs(float(last["conqur_calibration_objective"]) - final_objective) < 1e-9
    assert float(last["conqur_calibration_elapsed_seconds"]) > 0
    with pytest.raises(OSError):
        _scrape(port)


def test_recipes_are_valid_options_and_match_the_defaults():
    import pathlib

    import yaml

    recipes = sorted((pathlib.Path(__file__).parents[1] / "calibrate").glob("*.yaml"))
    assert len(recipes) >= 2
    defaults = CalibrationOptions()
    for path in recipes:
        opts = CalibrationOptions(**yaml.safe_load(path.read_text()))
        assert opts == defaults, f"{path.name} differs from the calibrator's defaults"
