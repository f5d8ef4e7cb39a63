"""Perplexity windows and math, and the offline zero-shot task configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from conqur_vllm.eval import perplexity as ppl_mod
from conqur_vllm.eval import zeroshot
from conqur_vllm.eval.perplexity import perplexity, tokenize_windows


class _CountingTokenizer:
    """Maps each character to its code point; records whether special tokens were requested."""

    def __init__(self) -> None:
        self.kwargs: dict = {}

    def __call__(self, text: str, **kwargs):
        self.kwargs = kwargs
        return {"input_ids": [ord(c) for c in text]}


def _tiny_llama(vocab: int = 512):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def test_windows_are_consecutive_without_special_tokens() -> None:
    tok = _CountingTokenizer()
    text = "".join(chr(65 + i % 26) for i in range(1000))
    w = tokenize_windows(tok, text, seq_len=64)
    assert tok.kwargs.get("add_special_tokens") is False
    assert w.shape == (15, 64) and w.dtype == torch.long
    assert w.flatten().tolist() == [ord(c) for c in text[: 15 * 64]]
    assert tokenize_windows(tok, text, seq_len=64, max_windows=4).shape == (4, 64)
    with pytest.raises(ValueError, match="fewer than one window of 2048"):
        tokenize_windows(tok, text, seq_len=2048)


def test_perplexity_matches_hf_loss_and_is_batch_invariant(monkeypatch: pytest.MonkeyPatch) -> None:
    vocab = 512
    model = _tiny_llama(vocab)
    windows = torch.randint(0, vocab, (5, 48), generator=torch.Generator().manual_seed(1))
    fwd = lambda ids: model(ids).logits
    p1 = perplexity(fwd, windows, batch_size=1, progress=False)
    assert math.isfinite(p1) and vocab / 4 < p1 < vocab * 4
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    assert p1 == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-4)
    assert perplexity(fwd, windows, batch_size=2, progress=False) == pytest.approx(p1, rel=1e-5)
    monkeypatch.setattr(ppl_mod, "_CHUNK_TOKENS", 7)
    assert perplexity(fwd, windows, batch_size=5, progress=False) == pytest.approx(p1, rel=1e-5)


def test_perplexity_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="must return \\[batch, seq_len, vocab\\]"):
        perplexity(lambda ids: torch.zeros(ids.shape[0], 3, 10), torch.zeros(2, 8, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="non-empty"):
        perplexity(lambda ids: ids, torch.zeros(0, 8, dtype=torch.long), progress=False)


EXPECTED_DOCS = {"piqa": 1838, "arc_easy": 570, "arc_challenge": 299, "hellaswag": 10042, "winogrande": 1267,
                 "lambada_openai": 5153, "boolq": 3270}


def test_task_configs_load_in_lm_eval(tmp_path: Path) -> None:
    names = zeroshot.write_task_configs(tmp_path)
    assert names == [f"conqur_{t}" for t in zeroshot.TASKS]
    for name in names:
        cfg = yaml.safe_load((tmp_path / f"{name}.yaml").read_text())
        include = Path(cfg["include"])
        assert include.is_absolute() and include.is_file()
        assert include.is_relative_to(zeroshot.lm_eval_tasks_dir())
    lines = (tmp_path / "lambada_openai_test.jsonl").read_text().splitlines()
    assert len(lines) == 5153 and json.loads(lines[0])["text"].endswith(" signs")

    loaded = zeroshot.task_manager(tmp_path).load(names)["tasks"]
    assert sorted(loaded) == sorted(names)
    for short, count in EXPECTED_DOCS.items():
        task = loaded[f"conqur_{short}"]
        docs = list(task.eval_docs)
        assert len(docs) == count, short
        if task.config.output_type == "multiple_choice":
            target, choices = task.doc_to_target(docs[0]), task.doc_to_choice(docs[0])
            assert len(choices) >= 2 and (isinstance(target, str) or 0 <= target < len(choices)), short
    boolq = loaded["conqur_boolq"]
    assert {boolq.doc_to_target(d) for d in list(boolq.eval_docs)[:50]} == {0, 1}


def test_unknown_task_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown zero-shot task"):
        zeroshot.write_task_configs(tmp_path, ["piqa", "mmlu"])


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conqur_vllm.assets import smollm2_dir

    path = smollm2_dir()
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.slow
def test_smollm2_perplexity_is_sane(smollm2) -> None:
    from conqur_vllm.assets import evaluation_text

    tok, model = smollm2
    windows = tokenize_windows(tok, evaluation_text(), seq_len=512, max_windows=8)
    assert windows.shape == (8, 512) and windows[0, 0].item() != tok.bos_token_id
    value = perplexity(lambda ids: model(ids).logits, windows, batch_size=2, progress=False)
    assert 5 < value < 40


@pytest.mark.slow
def test_run_zeroshot_reports_the_quarot_metrics(smollm2) -> None:
    tok, _ = smollm2
    tiny = _tiny_llama(vocab=len(tok))
    scores = zeroshot.run_zeroshot(zeroshot.hf_lm(tiny, tok, batch_size=8), limit=2)
    assert set(scores) == set(zeroshot.QUAROT_TASKS)
    single = zeroshot.evaluate_model(tiny, tok, ["piqa"], limit=2)
    assert single["piqa"] == scores["piqa"] and single["average"]["value"] == scores["piqa"]["value"]
    for task, row in scores.items():
        assert row["metric"] == ("acc_norm" if task in ("arc_easy", "arc_challenge", "hellaswag") else "acc")
        assert row["n"] == 2 and 0.0 <= row["value"] <= 1.0
