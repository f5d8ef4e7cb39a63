"""Real SmolLM2, calibrated with ConQuR, served by real vLLM over real HTTP on loopback.

Parity: the server's prompt-logprob perplexity is compared with the project's reference forward of the same
checkpoint (both with an unquantized KV cache on every CPU: the W4A4 server is given its model dtype as the cache
dtype, which opts out of the fp8 default of AVX-512 machines, and the W4A8 checkpoint keeps 16-bit KV), and its
greedy tokens with the
reference's argmax. With INT4 activations the model is chaotic at the rounding level: a code flipped by the last
bit of a float changes downstream codes, so even the reference run in float64 instead of float32 moves the
perplexity by 2% on these 2k tokens and picks a different argmax at 39% of the positions (`benchmarks/parity.py`,
results in benchmarks/RESULTS.md). The tight checks (1% perplexity, >= 90% greedy agreement) therefore run on a
W4A8 checkpoint, whose float64 reference moves by 0.26%; the W4A4 product default gets a looser bound that still
catches a missing transform or a wrong scale.
"""

from __future__ import annotations

import json
import math
import urllib.request

import pytest
import torch

from conqur_vllm import assets
from conqur_vllm.calibration.options import CalibrationOptions, ConqurOptions
from conqur_vllm.calibration.run import calibrate
from conqur_vllm.config import ConqurQuantConfig
from conqur_vllm.eval.perplexity import perplexity, tokenize_windows
from conqur_vllm.fake_quant import KVQuant
from conqur_vllm.reference import load_reference_model
from conqur_vllm.serving import RunningServer

pytestmark = pytest.mark.slow

PARITY_WINDOWS, PARITY_LEN = 8, 256
GREEDY_PROMPTS, GREEDY_TOKENS = 32, 16


@pytest.fixture(scope="module")
def smollm2_checkpoint(tmp_path_factory):
    opts = CalibrationOptions(method="conqur", weight_quantizer="gptq", samples=8, seq_len=256,
                              conqur=ConqurOptions(steps=2, batch_size=4))
    return calibrate(None, tmp_path_factory.mktemp("ckpt") / "smollm2-conqur", opts, progress=False)


@pytest.fixture(scope="module")
def smollm2_w4a8_checkpoint(tmp_path_factory):
    # 16-bit KV: a float32 server has no unquantized cache dtype to opt out of an fp8 default with
    opts = CalibrationOptions(method="conqur", weight_quantizer="rtn", a_bits=8, kv_bits=16, samples=8, seq_len=256,
                              conqur=ConqurOptions(steps=2, batch_size=4))
    return calibrate(None, tmp_path_factory.mktemp("ckpt") / "smollm2-conqur-w4a8", opts, progress=False)


@pytest.fixture(scope="module")
def server(smollm2_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "vllm.log"
    # unquantized KV cache on both sides: the model dtype opts out of the fp8 cache AVX-512 machines default to
    args = ["--enforce-eager", "--max-model-len", "1024", "--kv-cache-dtype", "bfloat16"]
    with RunningServer(smollm2_checkpoint, args, log_path=log) as srv:
        yield srv


def _model(server) -> str:
    return json.loads(server.get_text("/v1/models"))["data"][0]["id"]


def test_completion_and_chat(server):
    model = _model(server)
    out = server.post("/v1/completions", {"model": model, "prompt": "The capital of France is",
                                           "max_tokens": 8, "temperature": 0})
    assert out["choices"][0]["text"].strip()
    chat = server.post("/v1/chat/completions", {"model": model, "max_tokens": 24, "temperature": 0,
                                                "messages": [{"role": "user", "content": "Name a color."}]})
    assert chat["choices"][0]["message"]["content"].strip()
    assert chat["usage"]["prompt_tokens"] > 5  # the chat template wrapped the message


def test_streaming(server):
    payload = json.dumps({"model": _model(server), "prompt": "Once upon a time", "max_tokens": 12,
                          "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request(server.url + "/v1/completions", data=payload,
                                 headers={"Content-Type": "application/json"})
    chunks = []
    with urllib.request.urlopen(req, timeout=120) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data:") and line != "data: [DONE]":
                chunks.append(json.loads(line[5:])["choices"][0]["text"])
    assert len(chunks) >= 4 and "".join(chunks).strip()


def test_metrics_expose_conqur_info(server):
    text = server.get_text("/metrics")
    info = [line for line in text.splitlines() if line.startswith("conqur_checkpoint_info")]
    assert info, "no conqur_checkpoint_info metric"
    assert 'method="conqur"' in info[0] and 'weight_bits="4"' in info[0] and "kernel_path=" in info[0]
    assert "vllm:" in text  # vLLM's own metrics are still there


def _served_perplexity(server, windows: torch.Tensor) -> float:
    model = _model(server)
    nll, count = 0.0, 0
    for ids in windows.tolist():
        out = server.post("/v1/completions", {"model": model, "prompt": ids, "max_tokens": 1,
                                               "temperature": 0, "prompt_logprobs": 0})
        plps = out["choices"][0]["prompt_logprobs"]
        for pos in range(1, len(ids)):
            nll -= plps[pos][str(ids[pos])]["logprob"]
            count += 1
    return math.exp(nll / count)


def _reference_perplexity(checkpoint, windows: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    ref_model, _ = load_reference_model(checkpoint, dtype=dtype, kv_override=KVQuant(bits=None))
    with torch.no_grad():
        return perplexity(lambda x: ref_model(x, use_cache=False).logits.float(), windows, progress=False)


def _windows(checkpoint) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    return tokenize_windows(tok, assets.evaluation_text(), PARITY_LEN, max_windows=PARITY_WINDOWS)


def test_w4a4_prompt_logprob_perplexity_near_reference(server, smollm2_checkpoint):
    """bf16 server vs float32 reference: -0.32% on the default checkpoint (`benchmarks/parity.py`), while the
    float64 reference alone moves 2% (rounding chaos, see the module docstring). 6% bounds that noise."""
    windows = _windows(smollm2_checkpoint)
    served, reference = _served_perplexity(server, windows), _reference_perplexity(smollm2_checkpoint, windows)
    assert abs(served / reference - 1) < 0.06, (served, reference)


@pytest.fixture(scope="module")
def w4a8_server(smollm2_w4a8_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "vllm-w4a8.log"
    args = ["--enforce-eager", "--max-model-len", "1024", "--kv-cache-dtype", "auto", "--dtype", "float32"]
    with RunningServer(smollm2_w4a8_checkpoint, args, log_path=log) as srv:
        yield srv


def test_w4a8_prompt_logprob_perplexity_within_1_percent(w4a8_server, smollm2_w4a8_checkpoint):
    """float32 server (exact integer GEMMs) vs float32 reference (fake quant): measured 0.01% apart. RTN's default
    asymmetric weights: the server reads their zero points (centered codes) as the reference does."""
    assert not ConqurQuantConfig.from_model_dir(smollm2_w4a8_checkpoint).weights.symmetric
    windows = _windows(smollm2_w4a8_checkpoint)
    served = _served_perplexity(w4a8_server, windows)
    reference = _reference_perplexity(smollm2_w4a8_checkpoint, windows)
    assert abs(served / reference - 1) < 0.01, (served, reference)


def test_w4a8_greedy_tokens_are_the_reference_argmax(w4a8_server, smollm2_w4a8_checkpoint):
    """32 prompts x 16 greedy tokens from the server; each token must be the reference's argmax given the same
    prefix for >= 90% of the tokens (teacher forcing on the served text: once a near-tie is broken the other way
    the two texts differ, so position-by-position identity would measure the first flip, not parity)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_w4a8_checkpoint)
    model = _model(w4a8_server)
    ref_model, _ = load_reference_model(smollm2_w4a8_checkpoint, kv_override=KVQuant(bits=None))
    paragraphs = [p for p in assets.evaluation_text().split("\n\n") if len(p) > 200][:GREEDY_PROMPTS]
    agree = total = identical_prefix = 0
    for p in paragraphs:
        ids = tok(p[:300], add_special_tokens=False).input_ids
        out = w4a8_server.post("/v1/completions", {
            "model": model, "prompt": ids, "max_tokens": GREEDY_TOKENS, "temperature": 0, "logprobs": 0,
            "return_tokens_as_token_ids": True, "ignore_eos": True})
        served = [int(t.split(":")[1]) for t in out["choices"][0]["logprobs"]["tokens"]]
        assert len(served) == GREEDY_TOKENS
        with torch.no_grad():
            logits = ref_model(torch.tensor([ids + served]), use_cache=False).logits[0]
        argmax = logits[len(ids) - 1:-1].argmax(-1).tolist()
        matches = [a == b for a, b in zip(served, argmax)]
        agree += sum(matches)
        total += len(matches)
        identical_prefix += matches.index(False) if False in matches else len(matches)
    assert agree / total >= 0.9, f"greedy agreement {agree / total:.3f} (identical prefix {identical_prefix / total:.3f})"
