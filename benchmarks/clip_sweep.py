"""Perplexity against the activation clip ratio, and the ratio ``a_clip="auto"`` picks, side by side.

W16A4KV4 SmolLM2 (weights unquantized, so only the activation quantizer moves), QuaRot and ConQuR rotations
(the ConQuR learner of GPTQ runs), perplexity on the selection text (exllamav2 technical, 16 x 512 tokens).
The ``auto`` column is the calibrator's rule (least relative quantization error on one calibration batch).

    .venv/bin/python benchmarks/clip_sweep.py --seeds 0 --clips 1.0,0.9,0.8,0.75,0.7
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from conqur_vllm import assets, fake_quant
from conqur_vllm.calibration import pipeline
from conqur_vllm.calibration.options import CalibrationOptions
from conqur_vllm.eval.perplexity import perplexity, tokenize_windows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--methods", default="quarot,conqur")
    ap.add_argument("--clips", default="1.0,0.9,0.8,0.75,0.7")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    clips = [float(c) for c in args.clips.split(",")]
    fp_model, tokenizer = pipeline.load_model(assets.smollm2_dir())
    windows = tokenize_windows(tokenizer, assets.load_text("technical"), 512, max_windows=args.windows)
    calib = assets.calibration_text()
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for method in args.methods.split(","):
            model = copy.deepcopy(fp_model)
            opts = CalibrationOptions(method=method, w_bits=16, seed=seed)
            auto = pipeline.calibrate_model(model, tokenizer, opts, calib, progress=False).options.a_clip
            row = {"method": method, "seed": seed, "auto": auto, "ppl": {}}
            for clip in clips:
                fake_quant.set_activation_quant(model, fake_quant.ActQuant(bits=4, clip_ratio=clip))
                with torch.no_grad():
                    row["ppl"][clip] = perplexity(lambda ids, m=model: m(ids, use_cache=False).logits, windows,
                                                  progress=False)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"\n{'method':<8} {'seed':>4} {'auto':>5} " + " ".join(f"{'clip ' + str(c):>10}" for c in clips))
    for r in rows:
        print(f"{r['method']:<8} {r['seed']:>4} {r['auto']:>5} " + " ".join(f"{r['ppl'][c]:10.2f}" for c in clips))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
