"""Perplexity along ConQuR's online path: the rotations after chosen updates, each fused into a fresh model.

For every seed, the learner runs once (``--calib``/``--conqur`` overrides as in ``accuracy.py``); the rotations
after the updates named by ``--steps`` (0 = the randomized-Hadamard start, i.e. QuaRot; k = after update k) are
fused into the full-precision model, which is quantized as the options say and evaluated on the selection text
(never the reported text) and on held-out calibration windows (those ``select=heldout`` scores on). The default
is the activation-side proxy W16A4KV4 with the clip fixed at the ratio ``auto`` picks on SmolLM2 (0.75).

    .venv/bin/python benchmarks/online_path.py --seeds 0,1,2 --steps 0,1,2,4,8 --json benchmarks/results/online-path.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from conqur_vllm import assets
from conqur_vllm.calibration import pipeline
from conqur_vllm.calibration.layerwise import quantize_weights
from conqur_vllm.calibration.learn_rotations import learn_rotations
from conqur_vllm.calibration.options import CalibrationOptions, ConqurOptions
from conqur_vllm.eval.perplexity import perplexity, tokenize_windows
from conqur_vllm.models.adapters import get_adapter
from conqur_vllm.rotation.rotations import Rotations, apply_rotations


def path_rotations(fp_model, tokenizer, opts: CalibrationOptions, calib_text: str,
                   steps: list[int]) -> dict[int, Rotations]:
    """The start's rotations (key 0) and those after each update k in ``steps`` (key k)."""
    batches = pipeline.calibration_batches(tokenizer, calib_text, opts.samples, opts.seq_len,
                                           opts.conqur.batch_size, opts.seed)
    start = pipeline.initial_rotations(fp_model, opts)
    scratch = copy.deepcopy(fp_model)
    apply_rotations(scratch, get_adapter(scratch.config), start)
    learn_opts = pipeline.set_learner_quantizers(scratch, opts, batches, r3=start.r3)
    kept = {0: start}

    def keep(step: int, rot: Rotations) -> None:
        if step + 1 in steps:
            kept[step + 1] = Rotations(r1=rot.r1.clone(), r2=rot.r2.clone(), r3=rot.r3, r4=rot.r4,
                                       r4_block=rot.r4_block)

    learn_rotations(scratch, get_adapter(scratch.config), start, batches, opts.conqur,
                    weight_spec=pipeline.weight_spec(opts), **pipeline.target_specs(learn_opts), seed=opts.seed,
                    progress=False, on_rotations=keep)
    return kept


def evaluate(fp_model, tokenizer, rot: Rotations, opts: CalibrationOptions, calib_text: str,
             windows: dict[str, torch.Tensor]) -> dict[str, float]:
    """Perplexity of each window set for the model with ``rot`` fused and the options' quantizers."""
    model = copy.deepcopy(fp_model)
    adapter = get_adapter(model.config)
    apply_rotations(model, adapter, rot)
    batches = pipeline.calibration_batches(tokenizer, calib_text, opts.samples, opts.seq_len,
                                           opts.conqur.batch_size, opts.seed)
    used, _ = pipeline.resolve_activation_clip(model, opts, batches)
    pipeline.set_quantizers(model, used, r3=rot.r3)
    spec = pipeline.weight_spec(used)
    if spec is not None:
        quantize_weights(model, adapter, spec, method=used.weight_quantizer, calib_batches=batches,
                         clip_search=used.clip_search, progress=False)
    with torch.no_grad():
        return {name: perplexity(lambda ids: model(ids, use_cache=False).logits, w, progress=False)
                for name, w in windows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", default="0,1,2,4,8", help="updates after which to evaluate (0: the start)")
    ap.add_argument("--windows", type=int, default=16, help="512-token windows of the selection text")
    ap.add_argument("--heldout-windows", type=int, default=8, help="held-out calibration windows")
    ap.add_argument("--eval-text", default="technical")
    ap.add_argument("--calib", default='{"w_bits": 16, "a_clip": 0.75}', help="JSON CalibrationOptions overrides")
    ap.add_argument("--conqur", default="{}", help="JSON ConqurOptions overrides")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.eval_text in ("wiki", "c4"):
        raise SystemExit(f"{args.eval_text} is the reported or the calibration text; use another")
    steps = sorted({int(s) for s in args.steps.split(",")})
    fp_model, tokenizer = pipeline.load_model(assets.smollm2_dir())
    calib_text = assets.calibration_text()
    sel = tokenize_windows(tokenizer, assets.load_text(args.eval_text), 512, max_windows=args.windows)
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        opts = CalibrationOptions(seed=seed, embed_bits=16, head_bits=16, **json.loads(args.calib),
                                  conqur=ConqurOptions(**json.loads(args.conqur), select_windows=args.heldout_windows))
        held = pipeline.heldout_windows(tokenizer, calib_text, opts)
        for step, rot in sorted(path_rotations(fp_model, tokenizer, opts, calib_text, steps).items()):
            ppl = evaluate(fp_model, tokenizer, rot, opts, calib_text, {"selection": sel, "heldout": held})
            entry = {"seed": seed, "step": step, "ppl": ppl["selection"], "heldout_loss": math.log(ppl["heldout"])}
            results.append(entry)
            print(json.dumps(entry), file=sys.stderr, flush=True)
    print_table(results, steps)
    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "eval_text": args.eval_text, "calib": json.loads(args.calib), "conqur": json.loads(args.conqur)}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))


def print_table(results: list[dict], steps: list[int]) -> None:
    """Selection-text perplexity per seed and update, the held-out loss's pick, and the mean per update."""
    seeds = sorted({r["seed"] for r in results})
    at = {(r["seed"], r["step"]): r for r in results}
    print(f"\n{'seed':>4} " + " ".join(f"{'start' if s == 0 else f'after {s}':>9}" for s in steps)
          + f" {'held-out pick':>15}")
    for seed in seeds:
        row = [at[(seed, s)] for s in steps]
        pick = min(row, key=lambda r: r["heldout_loss"])
        print(f"{seed:>4} " + " ".join(f"{r['ppl']:9.2f}" for r in row) + f" {pick['ppl']:8.2f} ({pick['step']})")
    print(f"{'mean':>4} " + " ".join(f"{statistics.mean(at[(s_, s)]['ppl'] for s_ in seeds):9.2f}" for s in steps))


if __name__ == "__main__":
    main()
