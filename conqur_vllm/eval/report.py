"""``conqur eval``: perplexity (and zero-shot accuracy) of a model folder or a conqur checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from conqur_vllm import assets
from conqur_vllm.checkpoint import is_conqur_checkpoint
from conqur_vllm.eval.perplexity import perplexity, tokenize_windows


def load_for_eval(path: str | Path):
    """The reference forward of a conqur checkpoint, or the full-precision model of a plain HF folder."""
    from transformers import AutoTokenizer

    if is_conqur_checkpoint(path):
        from conqur_vllm.reference import load_reference_model

        model, _ = load_reference_model(path)
        return model, AutoTokenizer.from_pretrained(path)
    from conqur_vllm.calibration.pipeline import load_model

    return load_model(path)


def evaluate_path(path: str | Path, *, seq_len: int = 512, windows: int = 40, tasks: str = "",
                  limit: int | None = None) -> dict:
    t0 = time.perf_counter()
    model, tokenizer = load_for_eval(path)
    ids = tokenize_windows(tokenizer, assets.evaluation_text(), seq_len, max_windows=windows)
    with torch.no_grad():
        ppl = perplexity(lambda x: model(x, use_cache=False).logits, ids)
    result = {"model": str(path), "text": "exllamav2 wiki (held out)", "seq_len": seq_len,
              "windows": int(ids.shape[0]), "perplexity": ppl}
    if tasks:
        from conqur_vllm.eval.zeroshot import evaluate_model

        result["zeroshot"] = evaluate_model(model, tokenizer, [t for t in tasks.split(",") if t], limit=limit)
    result["seconds"] = time.perf_counter() - t0
    return result
