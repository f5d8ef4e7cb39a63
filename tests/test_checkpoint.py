"""Checkpoint I/O: linear tensor layout, sharding, config.json contract, copied files, atomic replacement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import conqur_vllm.checkpoint as ckpt
from conqur_vllm.checkpoint import (
    is_conqur_checkpoint,
    load_quant_config,
    quantized_linear_tensors,
    read_checkpoint_tensors,
    write_checkpoint,
)
from conqur_vllm.config import CalibrationProvenance, ConqurQuantConfig, OnlineTransform, WeightQuantArgs
from conqur_vllm.formats import unpack_int4, unpack_int32
from conqur_vllm.quant import QuantSpec, dequantize, quantize

HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "torch_dtype": "bfloat16",
}


def _quant_config() -> ConqurQuantConfig:
    return ConqurQuantConfig(
        weights=WeightQuantArgs(group_size=32, quantizer="rtn"),
        online_transforms=(OnlineTransform(site="down_proj_input", size=1536, block=768),),
        calibration=CalibrationProvenance(method="conqur", weight_quantizer="rtn", samples=8, seq_len=256),
    )


def _tensors(n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for i in range(n):
        w = torch.randn(24, 64, generator=g, dtype=torch.float64)
        qt = quantize(w, QuantSpec(4, group_size=32))
        out.update(
            quantized_linear_tensors(f"model.layers.{i}.mlp.up_proj", qt, torch.randn(24, generator=g))
        )
    out["model.embed_tokens.weight"] = torch.randn(100, 64, generator=g).to(torch.bfloat16)
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert v.dtype == b[k].dtype and torch.equal(v, b[k]), k


def _source_dir(tmp_path: Path) -> Path:
    src = tmp_path / "hf_model"
    src.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "merges.txt"):
        (src / name).write_text(json.dumps({"file": name}))
    (src / "model.safetensors").write_bytes(b"original weights, never copied")
    return src


@pytest.mark.parametrize("asymmetric", [False, True])
def test_quantized_linear_tensors_layout(asymmetric: bool) -> None:
    w = torch.randn(20, 72, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.3
    spec = QuantSpec(4, symmetric=not asymmetric, group_size=24)
    qt = quantize(w, spec)
    bias = torch.randn(20).to(torch.bfloat16)
    t = quantized_linear_tensors("layer.q_proj", qt, bias)
    expected = {"weight_packed", "weight_scale", "weight_shape", "bias"} | (
        {"weight_zero_point"} if asymmetric else set()
    )
    assert set(t) == {f"layer.q_proj.{k}" for k in expected}
    assert t["layer.q_proj.weight_packed"].dtype == torch.int32 and t["layer.q_proj.weight_packed"].shape == (
        20,
        9,
    )
    assert t["layer.q_proj.weight_scale"].dtype == torch.float32 and t["layer.q_proj.weight_scale"].shape == (
        20,
        3,
    )
    assert (
        t["layer.q_proj.weight_shape"].tolist() == [20, 72]
        and t["layer.q_proj.weight_shape"].dtype == torch.int64
    )
    assert t["layer.q_proj.bias"].dtype == torch.bfloat16
    # decode the stored layout the way a reader would, and recover the dequantized weight
    q = unpack_int4(t["layer.q_proj.weight_packed"], 72).to(torch.float64)
    scale = t["layer.q_proj.weight_scale"].to(torch.float64).repeat_interleave(24, -1)
    if asymmetric:
        zp = unpack_int32(
            t["layer.q_proj.weight_zero_point"], 4, 20, packed_dim=0
        )  # signed, compressed-tensors style
        assert t["layer.q_proj.weight_zero_point"].shape == (3, 3)
        q = q - zp.to(torch.float64).repeat_interleave(24, -1)
    assert torch.allclose(q * scale, dequantize(qt, torch.float64), rtol=1e-12, atol=0)
    rel = float((q * scale - w).norm() / w.norm())
    assert 0.01 < rel < 0.2


def test_single_file_round_trip_and_config(tmp_path: Path) -> None:
    tensors = _tensors()
    out = write_checkpoint(
        tmp_path / "ckpt",
        tensors,
        HF_CONFIG,
        _quant_config(),
        source_dir=_source_dir(tmp_path),
        extra_files={"calibration_report.json": '{"ok": true}', "notes/raw.bin": b"\x00\x01"},
    )
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and "model.safetensors.index.json" not in files
    _assert_same(read_checkpoint_tensors(out), tensors)
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 64 and config["architectures"] == ["LlamaForCausalLM"]
    assert load_quant_config(out) == _quant_config()
    assert (
        ConqurQuantConfig.from_dict(config["quantization_config"]).transform("down_proj_input").block_size
        == 768
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "merges.txt"):
        assert (out / name).read_text() == json.dumps({"file": name})
    assert (out / "model.safetensors").read_bytes() != b"original weights, never copied"
    assert json.loads((out / "calibration_report.json").read_text()) == {"ok": True}
    assert (out / "notes" / "raw.bin").read_bytes() == b"\x00\x01"
    assert not (out / "special_tokens_map.json").exists()  # absent in the source, not invented
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf_model"]  # no temp dirs left


def test_sharded_round_trip_and_index(tmp_path: Path) -> None:
    tensors = _tensors()
    out = write_checkpoint(tmp_path / "ckpt", tensors, HF_CONFIG, _quant_config(), max_shard_bytes=4000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n >= 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    # each shard holds exactly the tensors the index assigns to it, within the limit unless a single tensor
    from safetensors import safe_open

    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            keys = set(f.keys())
            assert f.metadata() == {"format": "pt"}
        assert keys == {k for k, v in index["weight_map"].items() if v == shard}
        size = sum(tensors[k].numel() * tensors[k].element_size() for k in keys)
        assert size <= 4000 or len(keys) == 1
    _assert_same(read_checkpoint_tensors(out), tensors)


def test_replaces_existing_checkpoint(tmp_path: Path) -> None:
    tensors = _tensors(2)
    out = write_checkpoint(tmp_path / "ckpt", tensors, HF_CONFIG, _quant_config(), max_shard_bytes=1000)
    assert (out / "model.safetensors.index.json").exists()
    smaller = {"a.weight": torch.arange(1.0, 5.0)}
    write_checkpoint(out, smaller, HF_CONFIG, _quant_config())
    assert not (out / "model.safetensors.index.json").exists()  # stale shards gone with the old folder
    _assert_same(read_checkpoint_tensors(out), smaller)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_refuses_to_clobber_other_folders(tmp_path: Path) -> None:
    other = tmp_path / "my_project"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a conqur checkpoint.*overwrite=True"):
        write_checkpoint(other, _tensors(1), HF_CONFIG, _quant_config())
    assert (other / "precious.txt").read_text() == "keep me"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(HF_CONFIG))
    with pytest.raises(FileExistsError):
        write_checkpoint(hf, _tensors(1), HF_CONFIG, _quant_config())
    assert not is_conqur_checkpoint(hf) and not is_conqur_checkpoint(other)
    write_checkpoint(other, _tensors(1), HF_CONFIG, _quant_config(), overwrite=True)
    assert is_conqur_checkpoint(other) and not (other / "precious.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    write_checkpoint(empty, _tensors(1), HF_CONFIG, _quant_config())
    assert is_conqur_checkpoint(empty)


@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    out = tmp_path / "ckpt"
    if existing:
        write_checkpoint(out, {"old.weight": torch.ones(3)}, HF_CONFIG, _quant_config())
    real_save = ckpt.save_file
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(out, _tensors(), HF_CONFIG, _quant_config(), max_shard_bytes=2000)
    assert len(calls) == 2  # the failure happened after a shard had been written
    assert sorted(p.name for p in tmp_path.iterdir()) == (["ckpt"] if existing else [])
    if existing:  # the previous checkpoint is untouched
        _assert_same(read_checkpoint_tensors(out), {"old.weight": torch.ones(3)})


def test_failure_at_final_swap_restores_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "ckpt"
    write_checkpoint(out, {"old.weight": torch.ones(3)}, HF_CONFIG, _quant_config())
    real_replace = ckpt.os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # moving the new folder into place fails
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="rename failed"):
        write_checkpoint(out, {"new.weight": torch.zeros(2) + 2}, HF_CONFIG, _quant_config())
    monkeypatch.undo()
    _assert_same(read_checkpoint_tensors(out), {"old.weight": torch.ones(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_shared_storage_and_non_contiguous_tensors(tmp_path: Path) -> None:
    base = torch.arange(1.0, 13.0).reshape(3, 4)
    tensors = {"a": base, "b": base.view(12), "c": base.t()}
    out = write_checkpoint(tmp_path / "ckpt", tensors, HF_CONFIG, _quant_config())
    back = read_checkpoint_tensors(out)
    for k, v in tensors.items():
        assert torch.equal(back[k], v)


def test_bad_input_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        write_checkpoint(tmp_path / "a", {}, HF_CONFIG, _quant_config())
    with pytest.raises(ValueError, match="reserved"):
        write_checkpoint(
            tmp_path / "a", _tensors(1), HF_CONFIG, _quant_config(), extra_files={"config.json": "{}"}
        )
    with pytest.raises(ValueError, match="escapes"):
        write_checkpoint(
            tmp_path / "a", _tensors(1), HF_CONFIG, _quant_config(), extra_files={"../x.txt": "x"}
        )
    with pytest.raises(FileNotFoundError, match="source_dir"):
        write_checkpoint(
            tmp_path / "a", _tensors(1), HF_CONFIG, _quant_config(), source_dir=tmp_path / "missing"
        )
    with pytest.raises(FileNotFoundError, match="neither"):
        read_checkpoint_tensors(tmp_path)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="bias"):
        quantized_linear_tensors("x", quantize(torch.randn(4, 8), QuantSpec(4)), torch.ones(5))
