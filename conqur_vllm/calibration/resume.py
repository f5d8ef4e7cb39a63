"""Crash-safe calibration state: learned rotations and per-layer weights, keyed by a fingerprint.

Lives next to the output folder (``.<name>.calib-state``) and is removed once the checkpoint is written.
Every file is written to a temporary name and renamed, so a killed run leaves only complete files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from conqur_vllm.quant import QuantizedTensor
from conqur_vllm.rotation.rotations import Rotations


class ResumeError(ValueError):
    """The saved state cannot be resumed."""


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class CalibrationState:
    """Per-run state directory. ``resume=False`` discards any previous state."""

    def __init__(self, out_dir: str | Path, fingerprint: str, resume: bool) -> None:
        out_dir = Path(out_dir).absolute()
        self.root = out_dir.parent / f".{out_dir.name}.calib-state"
        self.fingerprint = fingerprint
        marker = self.root / "fingerprint.json"
        if resume and marker.is_file():
            saved = json.loads(marker.read_text())["fingerprint"]
            if saved != fingerprint:
                raise ResumeError(
                    f"the saved state in {self.root} is from a run with other inputs or options ({saved} != "
                    f"{fingerprint}); re-run without --resume to start over"
                )
        else:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root.mkdir(parents=True)
            marker.write_text(json.dumps({"fingerprint": fingerprint}))

    # rotations ---------------------------------------------------------------------------------------------
    def save_rotations(self, rot: Rotations, report: dict | None) -> None:
        _atomic_save({"r1": rot.r1, "r2": rot.r2, "r3": rot.r3, "r4": rot.r4, "r4_block": rot.r4_block,
                      "report": report}, self.root / "rotations.pt")

    def load_rotations(self) -> tuple[Rotations, dict | None] | None:
        path = self.root / "rotations.pt"
        if not path.is_file():
            return None
        d = torch.load(path, weights_only=False)
        return Rotations(d["r1"], d["r2"], d["r3"], d["r4"], d["r4_block"]), d["report"]

    # layers ------------------------------------------------------------------------------------------------
    def save_layer(self, index: int, qweights: dict[str, QuantizedTensor], hidden: list | None,
                   reference: list | None = None) -> None:
        """The layer's codes, then (one atomic file) the index of the last finished layer with the hidden states
        leaving it (and the full-precision stream, for asymmetric GPTQ), so a kill between the writes never
        pairs an index with another layer's hidden states."""
        _atomic_save({k: tuple(qt) for k, qt in qweights.items()}, self.root / f"layer{index:04d}.pt")
        _atomic_save({"last_layer": index, "hidden": hidden, "reference": reference}, self.root / "progress.pt")

    def load_layers(self) -> tuple[int, dict[str, QuantizedTensor], list | None, list | None]:
        """(first layer still to do, weights of the layers done, hidden states entering that layer, the
        full-precision stream entering it or None)."""
        progress_path = self.root / "progress.pt"
        if not progress_path.is_file():
            return 0, {}, None, None
        progress = torch.load(progress_path)
        last = progress["last_layer"]
        done: dict[str, QuantizedTensor] = {}
        for i in range(last + 1):
            saved = torch.load(self.root / f"layer{i:04d}.pt", weights_only=False)
            done.update({k: QuantizedTensor(*v) for k, v in saved.items()})
        return last + 1, done, progress["hidden"], progress.get("reference")

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
