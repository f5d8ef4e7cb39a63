"""Shared fixtures: tiny model folders with a real (small, trained-here) tokenizer and a text file."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = [
    "the", "model", "quantization", "rotation", "corner", "hadamard", "weight", "token", "layer", "value", "key",
    "query", "cache", "river", "mountain", "city", "music", "science", "history", "language", "people", "water",
    "light", "energy", "number", "time", "world", "house", "school", "garden", "market", "story", "paper",
    "engine", "signal", "field",
]


def synthetic_text(n_words: int = 20000, seed: int = 0) -> str:
    rng = random.Random(seed)
    sentences, words = [], 0
    while words < n_words:
        k = rng.randint(5, 14)
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        words += k
    return " ".join(sentences)


def save_tiny_model_dir(path: Path, family: str = "llama", **kw) -> Path:
    """A tiny random model plus a byte-level BPE tokenizer trained on synthetic text, saved as an HF folder."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from tests.tiny_models import tiny_model

    kw.setdefault("vocab", 384)
    model = tiny_model(family, dtype=torch.float32, **kw)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([synthetic_text(3000, seed=1)], vocab_size=kw["vocab"] - 3, min_frequency=1,
                            special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(synthetic_text())
    return path
