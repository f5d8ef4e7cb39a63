"""Real SmolLM2, calibrated with ConQuR, served by real vLLM over real HTTP on loopback.

Parity: the server's prompt-logprob perplexity is close to the project's reference forward of the same
checkpoint (both with an unquantized KV cache, so the setting is the same).
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
from conqur_vllm.eval.perplexity import perplexity, tokenize_windows
from conqur_vllm.fake_quant import KVQuant
from conqur_vllm.reference import load_reference_model
from conqur_vllm.serving import RunningServer

pytestmark = pytest.mark.slow

PARITY_WINDOWS, PARITY_LEN = 4, 256


@pytest.fixture(scope="module")
def smollm2_checkpoint(tmp_path_factory):
    opts = CalibrationOptions(method="conqur", weight_quantizer="gptq", samples=8, seq_len=256,
                              conqur=ConqurOptions(steps=2, batch_size=4))
    return calibrate(None, tmp_path_factory.mktemp("ckpt") / "smollm2-conqur", opts, progress=False)


@pytest.fixture(scope="module")
def server(smollm2_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "vllm.log"
    # unquantized KV cache on both sides (this CPU has no fp8 KV cache), so the KV setting is the same
    args = ["--enforce-eager", "--max-model-len", "1024", "--kv-cache-dtype", "auto"]
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


def test_prompt_logprob_perplexity_matches_reference(server, smollm2_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    windows = tokenize_windows(tok, assets.evaluation_text(), PARITY_LEN, max_windows=PARITY_WINDOWS)
    model = _model(server)
    nll, count = 0.0, 0
    for ids in windows.tolist():
        out = server.post("/v1/completions", {"model": model, "prompt": ids, "max_tokens": 1,
                                               "temperature": 0, "prompt_logprobs": 0})
        plps = out["choices"][0]["prompt_logprobs"]
        for pos in range(1, len(ids)):
            entry = plps[pos][str(ids[pos])]
            nll -= entry["logprob"]
            count += 1
    served = math.exp(nll / count)
    ref_model, _ = load_reference_model(smollm2_checkpoint, kv_override=KVQuant(bits=None))
    with torch.no_grad():
        reference = perplexity(lambda x: ref_model(x, use_cache=False).logits, windows, progress=False)
    # The server computes in bf16 with exact integer GEMMs, the reference in float32 fake-quant: rare INT4
    # rounding flips of the per-token activation codes compound over 30 layers (measured: 1.04% on these 1k
    # tokens). The test bounds that at 3%; a missing transform or a wrong scale moves it by far more.
    assert abs(served / reference - 1) < 0.03, (served, reference)
