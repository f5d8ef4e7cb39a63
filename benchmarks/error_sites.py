"""Where W16A4KV4 loses: activation / KV quantization switched on at one site type at a time.

Builds the QuaRot (or ConQuR) model with full-precision weights, then measures perplexity with 4-bit
activations at only the q/k/v inputs, only the o_proj input, only the gate/up inputs, only the down_proj input
(after R4), or only the KV cache (after R3), next to all of them and FP. Optionally also with an online
Hadamard on the o_proj input (``--o-online``; not part of the served format). Selection text by default.

    .venv/bin/python benchmarks/error_sites.py --method quarot --seed 0 --o-online
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from datetime import UTC, datetime

import torch

from conqur_vllm import assets, fake_quant
from conqur_vllm.calibration import pipeline
from conqur_vllm.calibration.options import CalibrationOptions
from conqur_vllm.eval.perplexity import perplexity, tokenize_windows
from conqur_vllm.hadamard import hadamard_transform
from conqur_vllm.models.adapters import get_adapter
from conqur_vllm.rotation.rotations import head_dim_of


def only_sites(model, adapter, linear_paths: tuple[str, ...], kv: bool, a_clip: float, kv_clip: float) -> None:
    """4-bit activations only at ``linear_paths``, 4-bit KV only if ``kv``."""
    head_dim = head_dim_of(model.config)
    for layer in adapter.decoder_layers(model):
        for path in adapter.linears:
            layer.get_submodule(path).act = fake_quant.ActQuant(bits=4 if path in linear_paths else None,
                                                                clip_ratio=a_clip)
        attention = layer.get_submodule(adapter.attention)
        attention.conqur_attention = fake_quant.AttentionSim(
            r3=attention.conqur_attention.r3,
            kv=fake_quant.KVQuant(bits=4 if kv else None, group_size=head_dim, clip_ratio=kv_clip))


def o_proj_online_hadamard(model, adapter) -> None:
    """Rotate every o_proj input by a d x d Hadamard online (weights fused with it: same function)."""
    h = hadamard_transform(torch.eye(model.config.hidden_size, dtype=torch.float64))
    for layer in adapter.decoder_layers(model):
        qlin = layer.get_submodule(adapter.o_proj)
        with torch.no_grad():
            qlin.linear.weight.copy_((qlin.linear.weight.double() @ h).to(qlin.linear.weight.dtype))
        qlin.online, qlin.online_block = True, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=("quarot", "conqur"), default="quarot")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-text", default="technical")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--o-online", action="store_true", help="also measure an online Hadamard on the o_proj input")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    fp_model, tokenizer = pipeline.load_model(assets.smollm2_dir())
    windows = tokenize_windows(tokenizer, assets.load_text(args.eval_text), 512, max_windows=args.windows)
    adapter = get_adapter(fp_model.config)

    def ppl(model) -> float:
        with torch.no_grad():
            return perplexity(lambda ids: model(ids, use_cache=False).logits, windows, progress=False)

    opts = CalibrationOptions(method=args.method, w_bits=16, seed=args.seed, embed_bits=16, head_bits=16)
    model = copy.deepcopy(fp_model)
    opts = pipeline.calibrate_model(model, tokenizer, opts, assets.calibration_text(), progress=False).options
    rows = {"fp": ppl(fp_model), "all sites (W16A4KV4)": ppl(model)}
    sites = {"q/k/v inputs": (adapter.attn_readers, False), "o_proj input": ((adapter.o_proj,), False),
             "gate/up inputs": (adapter.mlp_readers, False), "down_proj input": ((adapter.down_proj,), False),
             "KV cache": ((), True)}
    for name, (paths, kv) in sites.items():
        probe = copy.deepcopy(model)
        only_sites(probe, adapter, paths, kv, opts.a_clip, opts.kv_clip)
        rows[f"only {name}"] = ppl(probe)
        print(json.dumps({name: rows[f"only {name}"]}), file=sys.stderr, flush=True)
    if args.o_online:
        o_proj_online_hadamard(model, adapter)
        rows["all sites + online Hadamard on o_proj input"] = ppl(model)
        only_sites(model, adapter, (adapter.o_proj,), False, opts.a_clip, opts.kv_clip)
        rows["only o_proj input, online Hadamard"] = ppl(model)
    fp = rows["fp"]
    print(f"\n{'configuration':<46} {'ppl':>8} {'gap to FP':>10}")
    for name, value in rows.items():
        print(f"{name:<46} {value:8.2f} {value - fp:10.2f}")
    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "eval_text": args.eval_text, "tokens": int(windows.numel())}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"\n{meta}")


if __name__ == "__main__":
    main()
