"""Activation and KV quantizer variants on one calibrated model, evaluated side by side (selection text).

The model is calibrated once (``--method``, ``--quantizer``, ``--seed``, CalibrationOptions overrides in
``--calib``; embedding and LM head unquantized), then each variant changes only what runs at evaluation time:

- ``base``: the model as calibrated;
- ``asym``: asymmetric per-token activation codes at every decoder linear input, the clip ratio re-chosen for
  that grid by the calibrator's rule (``choose_activation_clip``, here on the weight- and KV-quantized model);
- ``kshift``: each layer's mean key (after RoPE and R3) subtracted before the KV quantizer (``set_key_shifts``);
- ``asym+kshift``: both.

GPTQ saw the calibrated quantizers' inputs, so a variant measures what the change gives without re-running the
weight quantization (the full calibration with a variant as an option gives at least as much). W4A4KV4 SmolLM2,
exllamav2's *technical* text (16 x 512 tokens), which selects options and is never reported as accuracy.

    .venv/bin/python benchmarks/quantizer_variants.py --method conqur --seed 0 \\
        --calib '{"a_symmetric": true, "kv_shift": false}' --variants base,asym,kshift,asym+kshift
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch

from conqur_vllm import assets, fake_quant
from conqur_vllm.calibration import pipeline
from conqur_vllm.calibration.act_clip import choose_activation_clip
from conqur_vllm.calibration.kv_shift import install_key_shifts
from conqur_vllm.calibration.options import CalibrationOptions
from conqur_vllm.eval.perplexity import perplexity, tokenize_windows
from conqur_vllm.models.adapters import get_adapter

VARIANTS = ("base", "asym", "kshift", "asym+kshift")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=("conqur", "quarot"), default="conqur")
    ap.add_argument("--quantizer", choices=("gptq", "rtn"), default="gptq")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib", default="{}", help="JSON overrides of CalibrationOptions")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--windows", type=int, default=16)
    args = ap.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    fp_model, tokenizer = pipeline.load_model(assets.smollm2_dir())
    windows = tokenize_windows(tokenizer, assets.load_text("technical"), 512, max_windows=args.windows)
    calib_text = assets.calibration_text()
    opts = CalibrationOptions(seed=args.seed, method=args.method, weight_quantizer=args.quantizer, embed_bits=16,
                              head_bits=16, **json.loads(args.calib))
    model = copy.deepcopy(fp_model)
    t0 = time.perf_counter()
    result = pipeline.calibrate_model(model, tokenizer, opts, calib_text, progress=False)
    used = result.options
    print(f"calibrated in {time.perf_counter() - t0:.0f} s, a_clip {used.a_clip}, "
          f"symmetric {used.a_symmetric}", file=sys.stderr)
    adapter = get_adapter(model.config)
    batches = pipeline.calibration_batches(tokenizer, calib_text, opts.samples, opts.seq_len, opts.conqur.batch_size,
                                           opts.seed)
    base_act = fake_quant.ActQuant(bits=used.a_bits, clip_ratio=used.a_clip, symmetric=used.a_symmetric)
    base_shifts = {} if result.key_shifts is None else dict(result.key_shifts.shifts)
    measured_shifts = (base_shifts if base_shifts else
                       pipeline.set_key_shifts(model, used.model_copy(update={"kv_shift": True}), batches).shifts)
    for variant in variants:
        parts = set(variant.split("+"))
        install_key_shifts(model, adapter, measured_shifts if "kshift" in parts else base_shifts)
        act = base_act
        if "asym" in parts:  # chosen on the quantized model (weights, KV), every input probed in full precision
            clip = choose_activation_clip(model, batches[0], used.a_bits, symmetric=False).clip
            act = fake_quant.ActQuant(bits=used.a_bits, clip_ratio=clip, symmetric=False)
        fake_quant.set_activation_quant(model, act)
        with torch.no_grad():
            ppl = perplexity(lambda ids: model(ids, use_cache=False).logits, windows, progress=False)
        print(json.dumps({"method": args.method, "quantizer": args.quantizer, "seed": args.seed, "calib": args.calib,
                          "variant": variant, "a_clip": act.clip_ratio, "symmetric": act.symmetric,
                          "ppl": round(ppl, 3)}), flush=True)
    install_key_shifts(model, adapter, base_shifts)


if __name__ == "__main__":
    main()
