"""ConQuR's options one at a time against the QuaRot baseline and the default, side by side in one run.

Each variant changes one :class:`~conqur_vllm.calibration.options.ConqurOptions` field from ``--base`` (default: no
override, i.e. the calibrator's defaults; the last variant combines two removals). Options
are chosen on the *technical* text (never on the Wikipedia text the accuracy tables report), W4A4KV4 SmolLM2,
decoder linears only (embedding and LM head unquantized, as in the accuracy tables).

    .venv/bin/python benchmarks/ablations.py --quantizer gptq --seeds 0 --json benchmarks/results/ablations.json

The table pairs each seed's gap with QuaRot's gap for the same seed; ``--include`` adds rows of earlier runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import build

from conqur_vllm import assets
from conqur_vllm.calibration import pipeline
from conqur_vllm.eval.perplexity import perplexity, tokenize_windows

# variant -> ConqurOptions overrides (None = the QuaRot baseline with the same weight quantizer)
VARIANTS: dict[str, dict | None] = {
    "quarot": None,
    "default": {},
    "no-learned-r2": {"learn_r2": False},
    "no-weight-rows": {"weight_mu": 0.0},
    "fp-forward": {"quantized_forward": False},
    "quantized-forward": {"quantized_forward": True},
    "ema": {"accumulate": "ema"},
    "alternations-1": {"alternations": 1},
    "massive-x4": {"massive_token_weight": 4.0},
    "steps-4": {"steps": 4},
    "steps-16": {"steps": 16},
    "no-r2-no-rows": {"learn_r2": False, "weight_mu": 0.0},
    "grid-target": {"target": "grid"},
    "grid-alternations-1": {"target": "grid", "alternations": 1},
    "select-heldout": {"select": "heldout"},
    "select-heldout-steps-4": {"select": "heldout", "steps": 4},
    "center": {"center": True},
    "no-center": {"center": False},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--quantizer", choices=("gptq", "rtn"), default="gptq")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--windows", type=int, default=16, help="512-token windows of the selection text")
    ap.add_argument("--eval-text", default="technical", help="selection text (not the reported wiki text)")
    ap.add_argument("--base", default="{}", help="JSON ConqurOptions the variants start from")
    ap.add_argument("--calib", default="{}",
                    help="JSON CalibrationOptions overrides for every variant, QuaRot included (e.g. a_clip)")
    ap.add_argument("--include", default="",
                    help="comma-separated JSON files of earlier runs (same text) whose rows join the table")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    base = json.loads(args.base)
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if args.eval_text in ("wiki", "c4"):
        raise SystemExit(f"{args.eval_text} is the reported or the calibration text; choose options on another")
    seeds = [int(s) for s in args.seeds.split(",")]
    fp_model, tokenizer = pipeline.load_model(assets.smollm2_dir())
    windows = tokenize_windows(tokenizer, assets.load_text(args.eval_text), 512, max_windows=args.windows)
    calib_text = assets.calibration_text()

    def ppl(model) -> float:
        with torch.no_grad():
            return perplexity(lambda ids: model(ids, use_cache=False).logits, windows, progress=False)

    results = [{"variant": "fp", "seed": 0, "ppl": ppl(fp_model)}]
    print(json.dumps(results[0]), file=sys.stderr, flush=True)
    for variant in variants:
        overrides = VARIANTS[variant]
        row = f"{'quarot' if overrides is None else 'conqur'}-{args.quantizer}"
        for seed in seeds:
            t0 = time.perf_counter()
            model, extra = build(fp_model, tokenizer, row, seed, {**base, **(overrides or {})}, calib_text,
                                 vocab_bits=(16, 16), calib_overrides=json.loads(args.calib))
            entry = {"variant": variant, "seed": seed, "ppl": ppl(model), **extra,
                     "seconds": time.perf_counter() - t0}
            results.append(entry)
            print(json.dumps(entry), file=sys.stderr, flush=True)
            del model
    earlier = [r for path in filter(None, args.include.split(","))
               for r in json.loads(Path(path).read_text())["results"] if r["variant"] != "fp"]
    print_table(results + earlier)
    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "eval_text": args.eval_text, "base": base, "calib": json.loads(args.calib),
            "tokens": int(windows.numel()), "quantizer": args.quantizer}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\n{meta}")


def print_table(results: list[dict]) -> None:
    """Mean ppl per variant, its gap to FP over QuaRot's, and the same ratio paired by seed (QuaRot's perplexity
    moves by several points with its Hadamard seed, so the per-seed ratio is the sharper comparison)."""
    by: dict[str, dict[int, float]] = {}
    for r in results:
        by.setdefault(r["variant"], {})[r["seed"]] = r["ppl"]
    fp = by["fp"][0]
    quarot = by.get("quarot", {})
    base = statistics.mean(quarot.values()) - fp if quarot else None
    print(f"\n{'variant':<16} {'seeds':>7} {'ppl (mean)':>11} {'gap/FP':>8} {'gap / QuaRot gap':>17} "
          f"{'paired by seed (mean ± sd)':>27}  per seed")
    for variant, per_seed in by.items():
        vals = list(per_seed.values())
        mean = statistics.mean(vals)
        ratio = f"{(mean - fp) / base:17.3f}" if base and variant != "fp" else f"{'':>17}"
        paired = [(p - fp) / (quarot[s] - fp) for s, p in sorted(per_seed.items()) if s in quarot]
        cell = (f"{statistics.mean(paired):8.3f} ± {statistics.stdev(paired) if len(paired) > 1 else 0.0:5.3f}"
                f" (n={len(paired)})") if paired and variant != "fp" else ""
        seeds = ",".join(str(s) for s in sorted(per_seed))
        detail = " / ".join(f"{per_seed[s]:.2f}" for s in sorted(per_seed))
        print(f"{variant:<16} {seeds:>7} {mean:11.2f} {mean - fp:8.2f} {ratio} {cell:>27}  {detail}")


if __name__ == "__main__":
    main()
