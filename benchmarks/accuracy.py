"""Accuracy of FP / no rotation / QuaRot / ConQuR on SmolLM2, side by side in one run.

Perplexity on held-out Wikipedia text (exllamav2's wiki.utf8; calibration uses its C4 text) at the given
sequence lengths, optional zero-shot tasks through lm-eval. Prints a table, writes JSON.

    .venv/bin/python benchmarks/accuracy.py --rows fp,quarot-rtn,conqur-rtn --seeds 0,1,2 --seq-lens 512
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from conqur_vllm import assets
from conqur_vllm.calibration import pipeline
from conqur_vllm.calibration.options import CalibrationOptions, ConqurOptions
from conqur_vllm.calibration.run import peak_rss_mb
from conqur_vllm.eval.perplexity import perplexity, tokenize_windows

# row name -> options (None = the full-precision model)
ROWS: dict[str, dict | None] = {
    "fp": None,
    "none-rtn": {"method": "none", "weight_quantizer": "rtn"},
    "quarot-rtn": {"method": "quarot", "weight_quantizer": "rtn"},
    "quarot-gptq": {"method": "quarot", "weight_quantizer": "gptq"},
    "quarot-w4a16-gptq": {"method": "quarot", "weight_quantizer": "gptq", "a_bits": 16, "kv_bits": 16},
    "quarot-w16a4": {"method": "quarot", "w_bits": 16},
    "conqur-rtn": {"method": "conqur", "weight_quantizer": "rtn"},
    "conqur-gptq": {"method": "conqur", "weight_quantizer": "gptq"},
    "quarot-w4a8-rtn": {"method": "quarot", "weight_quantizer": "rtn", "a_bits": 8},
    "conqur-w4a8-rtn": {"method": "conqur", "weight_quantizer": "rtn", "a_bits": 8},
    "quarot-w4a8-gptq": {"method": "quarot", "weight_quantizer": "gptq", "a_bits": 8},
    "conqur-w4a8-gptq": {"method": "conqur", "weight_quantizer": "gptq", "a_bits": 8},
}


def build(fp_model, tokenizer, row: str, seed: int, conqur_overrides: dict, calib_text: str,
          vocab_bits: tuple[int, int] | None = None, calib_overrides: dict | None = None):
    """The row's calibrated model; ``vocab_bits`` = (embedding, head) bits, None = the calibrator's defaults;
    ``calib_overrides``: CalibrationOptions fields set for every row (e.g. a_clip, samples, seq_len)."""
    spec = ROWS[row]
    if spec is None:
        return fp_model, {}
    model = copy.deepcopy(fp_model)
    vocab = {} if vocab_bits is None else {"embed_bits": vocab_bits[0], "head_bits": vocab_bits[1]}
    opts = CalibrationOptions(seed=seed, conqur=ConqurOptions(**conqur_overrides),
                              **{**(calib_overrides or {}), **spec, **vocab})
    result = pipeline.calibrate_model(model, tokenizer, opts, calib_text, progress=False)
    extra = {**result.stage_seconds, "a_clip": result.options.a_clip}
    if result.learn_report is not None:
        steps = result.learn_report.steps
        extra["r1_objective"] = [result.learn_report.r1_initial, steps[-1].r1_after] if steps else None
    return model, extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="fp,none-rtn,quarot-rtn,quarot-gptq,conqur-rtn,conqur-gptq")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--seq-lens", default="512")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--conqur", default="{}", help='JSON overrides of ConqurOptions, e.g. \'{"steps": 4}\'')
    ap.add_argument("--calib", default="{}",
                    help='JSON overrides of CalibrationOptions for every row, e.g. \'{"a_clip": 0.8}\'')
    ap.add_argument("--tasks", default="", help="zero-shot tasks (piqa,arc_easy,arc_challenge,hellaswag,...)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--eval-text", default="wiki",
                    help="held-out text: wiki (reported numbers) or technical (used to choose options)")
    ap.add_argument("--vocab-bits", default=None,
                    help="EMBED,HEAD bits of the embedding and LM head (default: the calibrator's, 4,4); "
                         "16,16 = decoder linears only")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    vocab_bits = None if args.vocab_bits is None else tuple(int(b) for b in args.vocab_bits.split(","))
    rows = args.rows.split(",")
    for r in rows:
        if r not in ROWS:
            raise SystemExit(f"unknown row {r!r}; choose from {', '.join(ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    overrides = json.loads(args.conqur)
    fp_model, tokenizer = pipeline.load_model(assets.smollm2_dir())
    eval_text, calib_text = assets.load_text(args.eval_text), assets.calibration_text()
    if args.eval_text == "c4":
        raise SystemExit("c4 is the calibration text; evaluate on wiki or technical")
    windows = {L: tokenize_windows(tokenizer, eval_text, L, max_windows=max(1, args.windows * 512 // L))
               for L in seq_lens}
    results: list[dict] = []
    for row in rows:
        for seed in (seeds if ROWS[row] is not None else [0]):
            t0 = time.perf_counter()
            model, extra = build(fp_model, tokenizer, row, seed, overrides, calib_text, vocab_bits,
                                 json.loads(args.calib))
            entry = {"row": row, "seed": seed, **extra}
            with torch.no_grad():
                for L, w in windows.items():
                    entry[f"ppl@{L}"] = perplexity(lambda ids, m=model: m(ids, use_cache=False).logits, w,
                                                   progress=False)
            if args.tasks:
                from conqur_vllm.eval.zeroshot import evaluate_model

                entry["zeroshot"] = evaluate_model(model, tokenizer, args.tasks.split(","), limit=args.limit)
            entry["seconds"] = time.perf_counter() - t0
            results.append(entry)
            print(json.dumps(entry), file=sys.stderr, flush=True)
            if model is not fp_model:
                del model
    print_table(results, seq_lens)
    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "eval_text": args.eval_text, "vocab_bits": vocab_bits or "default",
            "windows_tokens": {L: int(w.numel()) for L, w in windows.items()}, "peak_rss_mb": peak_rss_mb()}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\n{meta}")


def print_table(results: list[dict], seq_lens: list[int]) -> None:
    by_row: dict[str, list[dict]] = {}
    for r in results:
        by_row.setdefault(r["row"], []).append(r)
    fp = {L: by_row["fp"][0][f"ppl@{L}"] for L in seq_lens} if "fp" in by_row else {}
    head = "".join(f" {'ppl@' + str(L):>22} {'gap/FP':>8}" for L in seq_lens)
    zeroshot = any("zeroshot" in r for r in results)
    if zeroshot:
        head += f" {'zero-shot avg':>16}"
    print(f"\n{'row':<20} {'seeds':>5}{head}")
    for row, entries in by_row.items():
        cells = ""
        for L in seq_lens:
            vals = [e[f"ppl@{L}"] for e in entries]
            mean = statistics.mean(vals)
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            gap = f"{mean - fp[L]:8.2f}" if L in fp else f"{'':>8}"
            cells += f" {mean:13.2f} ± {sd:6.2f} {gap}"
        if zeroshot:
            avgs = [e["zeroshot"]["average"]["value"] for e in entries if "zeroshot" in e]
            cells += f" {statistics.mean(avgs):9.4f} ± {statistics.stdev(avgs) if len(avgs) > 1 else 0.0:.3f}"
        print(f"{row:<20} {len(entries):>5}{cells}")
    print("SmolLM2 caveat: its weights come from a Q4_1 GGUF (already on a 4-bit grid, blocks of 32).")


if __name__ == "__main__":
    main()
