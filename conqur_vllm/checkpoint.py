"""Checkpoint I/O: compressed-tensors-style tensors, sharded safetensors, config.json, atomic writes.

Quantized linears are stored as ``{prefix}.weight_packed`` (int32, codes packed along the input dim),
``{prefix}.weight_scale`` (float32 ``[out, n_groups]``), ``{prefix}.weight_shape`` (int64 ``[out, in]``),
``{prefix}.weight_zero_point`` for asymmetric weights (compressed-tensors convention: signed zero points
``zero - 2^(b-1)`` packed along the output dim) and ``{prefix}.bias`` when there is one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from conqur_vllm.config import QUANT_METHOD, ConqurQuantConfig
from conqur_vllm.formats import pack_int32
from conqur_vllm.quant import QuantizedTensor

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
SOURCE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
)


def quantized_linear_tensors(
    prefix: str, qt: QuantizedTensor, bias: Tensor | None = None
) -> dict[str, Tensor]:
    """The checkpoint tensors of one quantized linear layer with weight codes ``qt`` of shape ``[out, in]``."""
    if qt.q.ndim != 2:
        raise ValueError(f"{prefix}: quantized weight must be 2-D [out, in], got shape {tuple(qt.q.shape)}")
    out_features, in_features = qt.q.shape
    bits = qt.spec.bits
    tensors = {
        f"{prefix}.weight_packed": pack_int32(qt.q, bits, packed_dim=1),
        f"{prefix}.weight_scale": qt.scale.to(torch.float32).contiguous(),
        f"{prefix}.weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if qt.zero is not None:
        signed_zero = (qt.zero.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
        tensors[f"{prefix}.weight_zero_point"] = pack_int32(signed_zero, bits, packed_dim=0)
    if bias is not None:
        if bias.shape != (out_features,):
            raise ValueError(f"{prefix}: bias has shape {tuple(bias.shape)}, expected ({out_features},)")
        tensors[f"{prefix}.bias"] = bias.detach()
    return tensors


def is_conqur_checkpoint(path: str | Path) -> bool:
    """True if ``path/config.json`` declares a conqur quantization_config."""
    config = Path(path) / CONFIG_FILE
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(data, dict) and (data.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD
    )


def _plan_shards(tensors: Mapping[str, Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Group names in order into shards of at most ``max_shard_bytes`` (a larger tensor gets its own shard)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _prepare(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached contiguous CPU tensors that share no storage (safetensors refuses shared storage)."""
    if not tensors:
        raise ValueError("no tensors to write: pass a non-empty dict of name -> tensor")
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, Tensor):
            raise TypeError(
                f"tensors must map str -> torch.Tensor, got {type(name).__name__} -> {type(t).__name__}"
            )
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _write_tensors(tmp: Path, tensors: dict[str, Tensor], max_shard_bytes: int) -> None:
    shards = _plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(tensors, str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _check_extra_name(name: str) -> None:
    reserved = name in (CONFIG_FILE, INDEX_FILE) or name.endswith(".safetensors")
    if not name or reserved or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(
            f"extra file name {name!r} is reserved or escapes the checkpoint; use a plain relative name"
        )


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if overwrite or is_conqur_checkpoint(out_dir) or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    raise FileExistsError(
        f"{out_dir} exists and is not a conqur checkpoint; choose another out_dir or pass overwrite=True"
    )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def write_checkpoint(
    out_dir: str | Path,
    tensors: Mapping[str, Tensor],
    hf_config: Mapping,
    quant_config: ConqurQuantConfig,
    *,
    source_dir: str | Path | None = None,
    extra_files: Mapping[str, str | bytes] | None = None,
    max_shard_bytes: int = 2**30,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint atomically: everything goes to a sibling temp dir that is renamed into place at the end.

    An existing ``out_dir`` is replaced only if it is a conqur checkpoint or empty, or if ``overwrite``.
    Tokenizer and generation files are copied from ``source_dir`` when present there.
    """
    out_dir = Path(out_dir).absolute()
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if not isinstance(quant_config, ConqurQuantConfig):
        raise TypeError(f"quant_config must be a ConqurQuantConfig, got {type(quant_config).__name__}")
    source = None if source_dir is None else Path(source_dir)
    if source is not None and not source.is_dir():
        raise FileNotFoundError(
            f"source_dir {source} is not a directory; pass the original model folder or None"
        )
    extra = dict(extra_files or {})
    for name in extra:
        _check_extra_name(name)
    _check_target(out_dir, overwrite)
    prepared = _prepare(tensors)
    config = dict(hf_config)
    config["quantization_config"] = quant_config.to_dict()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        _write_tensors(tmp, prepared, max_shard_bytes)
        if source is not None:
            for fname in SOURCE_FILES:
                if (source / fname).is_file():
                    shutil.copy2(source / fname, tmp / fname)
        for name, content in extra.items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        _fsync_tree(tmp)
        os.chmod(tmp, 0o755)
        _check_target(out_dir, overwrite)  # the target may have appeared while we were writing
        if out_dir.exists() or out_dir.is_symlink():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                os.replace(old, out_dir)
                raise
            _remove(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_checkpoint_tensors(model_dir: str | Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint (single ``model.safetensors`` or sharded with an index), on CPU."""
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        tensors: dict[str, Tensor] = {}
        for fname in sorted(set(weight_map.values())):
            tensors.update(load_file(str(model_dir / fname), device="cpu"))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ValueError(
                f"{index_path} lists {len(missing)} tensors missing from the shards (e.g. {missing[0]}); "
                "the checkpoint is incomplete, write it again"
            )
        return tensors
    if (model_dir / SINGLE_FILE).is_file():
        return load_file(str(model_dir / SINGLE_FILE), device="cpu")
    raise FileNotFoundError(
        f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}; pass a checkpoint folder"
    )


def load_quant_config(model_dir: str | Path) -> ConqurQuantConfig:
    """The checkpoint's validated quantization_config."""
    return ConqurQuantConfig.from_model_dir(model_dir)
