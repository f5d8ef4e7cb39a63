"""How `conqur calibrate` (ConQuR + GPTQ) grows with calibration samples and with decoder layers.

Each point is a separate `conqur calibrate` process (so its peak RSS is its own) on the embedded SmolLM2; the
layer points use SmolLM2 truncated to its first L decoder layers. Every sample is seen once by the rotation
learner (steps = samples / batch size). Prints per-stage seconds, peak RSS and seconds per sample / per layer.

    .venv/bin/python benchmarks/calibration_cost.py --samples 8,16,32 --layers 10,20 --json benchmarks/results/cost.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from conqur_vllm import assets

BATCH = 4  # ConqurOptions.batch_size default


def truncated_model(src: Path, layers: int, dst: Path) -> Path:
    """SmolLM2 with only its first ``layers`` decoder layers (config edited, other files linked)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f.resolve())
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def run_point(model_dir: Path | None, samples: int, work: Path) -> dict:
    out = work / f"ckpt-{samples}-{model_dir.name if model_dir else 'full'}"
    cmd = [sys.executable, "-m", "conqur_vllm.cli", "calibrate", *([str(model_dir)] if model_dir else []),
           "-o", str(out), "--samples", str(samples), "--steps", str(max(1, samples // BATCH))]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / "calibration_report.json").read_text())
    shutil.rmtree(out)
    stages = report["stage_seconds"]
    return {"samples": samples, "stages": stages, "total": stages.get("total"), "peak_rss_mb": report["peak_rss_mb"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", default="8,16,32")
    ap.add_argument("--layers", default="10,20", help="truncated depths, run at the default 32 samples")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    src = assets.smollm2_dir()
    n_layers = json.loads((Path(src) / "config.json").read_text())["num_hidden_layers"]
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for s in [int(x) for x in args.samples.split(",")]:
            p = {"layers": n_layers, **run_point(None, s, work)}
            points.append(p)
            print(json.dumps(p), file=sys.stderr, flush=True)
        for n in [int(x) for x in args.layers.split(",") if x]:
            p = {"layers": n, **run_point(truncated_model(Path(src), n, work / f"L{n}"), 32, work)}
            points.append(p)
            print(json.dumps(p), file=sys.stderr, flush=True)
    stage_names = sorted({k for p in points for k in p["stages"]} - {"total"})
    print(f"\n{'layers':>6} {'samples':>7} " + " ".join(f"{k[:16]:>16}" for k in stage_names)
          + f" {'total s':>8} {'s/sample':>8} {'s/layer':>8} {'peak MiB':>9}")
    for p in points:
        cells = " ".join(f"{p['stages'].get(k, 0.0):16.1f}" for k in stage_names)
        print(f"{p['layers']:>6} {p['samples']:>7} {cells} {p['total']:8.1f} {p['total'] / p['samples']:8.2f} "
              f"{p['total'] / p['layers']:8.2f} {p['peak_rss_mb']:9.0f}")
    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "points": points}, indent=2))
    print(f"\n{meta}")


if __name__ == "__main__":
    main()
