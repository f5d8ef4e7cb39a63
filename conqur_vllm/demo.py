"""``conqur demo``: calibrate the embedded SmolLM2 with ConQuR, compare perplexities, serve it, ask it."""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

from conqur_vllm import assets
from conqur_vllm.calibration import pipeline
from conqur_vllm.calibration.options import CalibrationOptions
from conqur_vllm.calibration.run import calibrate
from conqur_vllm.eval.perplexity import perplexity, tokenize_windows
from conqur_vllm.reference import load_reference_model

DEMO_WINDOWS = 20
DEMO_SEQ_LEN = 512


def _ppl(model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        return perplexity(lambda ids: model(ids, use_cache=False).logits, windows, progress=False)


def run_demo(out_dir: str | Path, serve: bool = True) -> dict[str, float]:
    """Print FP / QuaRot / ConQuR perplexity (W4A4KV4, GPTQ) on held-out Wikipedia text, then serve and chat."""
    t0 = time.perf_counter()
    source = assets.smollm2_dir()
    fp_model, tokenizer = pipeline.load_model(source)
    windows = tokenize_windows(tokenizer, assets.evaluation_text(), DEMO_SEQ_LEN, max_windows=DEMO_WINDOWS)
    print(f"[demo] SmolLM2-135M-Instruct at {source}; evaluation: {windows.shape[0]} x {DEMO_SEQ_LEN} tokens "
          "of held-out Wikipedia text", file=sys.stderr)
    results = {"FP (bf16 weights, float32 compute)": _ppl(fp_model, windows)}

    quarot = copy.deepcopy(fp_model)
    pipeline.calibrate_model(quarot, tokenizer, CalibrationOptions(method="quarot"), assets.calibration_text())
    results["QuaRot W4A4KV4 GPTQ"] = _ppl(quarot, windows)
    del quarot

    ckpt = calibrate(None, out_dir, CalibrationOptions(method="conqur"))
    conqur_model, _ = load_reference_model(ckpt)
    results["ConQuR W4A4KV4 GPTQ (checkpoint)"] = _ppl(conqur_model, windows)
    del conqur_model

    fp = results["FP (bf16 weights, float32 compute)"]
    print(f"\n{'model':<40} {'wiki ppl@512':>12} {'gap to FP':>10}")
    for name, ppl in results.items():
        print(f"{name:<40} {ppl:12.2f} {ppl - fp:10.2f}")
    print("(SmolLM2 ships as a Q4_1 GGUF: its weights already sit on a 4-bit grid in blocks of 32)")
    print(f"[demo] checkpoint: {ckpt} ({time.perf_counter() - t0:.0f}s so far)", file=sys.stderr)
    if serve:
        from conqur_vllm.serving import chat_once

        answer = chat_once(ckpt, "What is the capital of France? Answer in one sentence.")
        print(f"\n[vLLM, ConQuR W4A4 checkpoint] user: What is the capital of France?\n  assistant: {answer}")
    return results
