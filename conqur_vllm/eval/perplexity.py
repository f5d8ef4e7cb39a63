"""Perplexity of a causal LM over non-overlapping token windows."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
_CHUNK_TOKENS = 1024  # positions per float32 log-softmax chunk; bounds memory at chunk * vocab floats


def tokenize_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Tokenize ``text`` without special tokens (no BOS) and cut it into ``[n, seq_len]`` consecutive windows.

    The tail shorter than ``seq_len`` is dropped; ``max_windows`` keeps only the first windows.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n <= 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {seq_len}; "
                         f"use a longer text or a shorter seq_len")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _window_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed NLL of ``ids[:, 1:]`` under ``logits[:, :-1]``, log-softmax in float32 chunks."""
    targets = ids[:, 1:]
    total = 0.0
    for start in range(0, targets.shape[1], _CHUNK_TOKENS):
        stop = min(start + _CHUNK_TOKENS, targets.shape[1])
        logp = logits[:, start:stop].float().log_softmax(dim=-1)
        total -= logp.gather(-1, targets[:, start:stop, None].to(logp.device)).double().sum().item()
    return total


@torch.no_grad()
def perplexity(model_forward: LogitsFn, windows: torch.Tensor, batch_size: int = 1, progress: bool = True,
               device: torch.device | str | None = None) -> float:
    """exp(mean NLL) over every predicted token of ``windows`` (``seq_len - 1`` per window).

    ``model_forward`` maps ``[b, seq_len]`` token ids to ``[b, seq_len, vocab]`` logits, e.g.
    ``lambda ids: model(ids).logits`` for a Hugging Face causal LM. Windows go to ``device`` when given.
    """
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must be a non-empty [n, seq_len] tensor, got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    nll, count = 0.0, 0
    starts = range(0, windows.shape[0], batch_size)
    for start in tqdm(starts, desc="perplexity", unit="batch", disable=not progress):
        ids = windows[start : start + batch_size]
        if device is not None:
            ids = ids.to(device)
        logits = model_forward(ids)
        if logits.shape[:2] != ids.shape:
            raise ValueError(f"model_forward returned logits of shape {tuple(logits.shape)} for ids of shape "
                             f"{tuple(ids.shape)}; it must return [batch, seq_len, vocab] logits")
        nll += _window_nll(logits, ids)
        count += ids.shape[0] * (ids.shape[1] - 1)
    return math.exp(nll / count)
