"""bf16 SmolLM2 vs the ConQuR W4A4 checkpoint on the same vLLM, same prompts, same machine, in one run.

    .venv/bin/python benchmarks/serving.py --checkpoint out/smollm2-conqur-w4a4kv4 --prompts 32 --max-tokens 64

Prints output tok/s, TTFT and TPOT p50/p99 and weight bytes; writes JSON and a PNG bar plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from safetensors import safe_open

from conqur_vllm import assets
from conqur_vllm.loadtest import run_load
from conqur_vllm.serving import RunningServer


def weight_bytes(model_dir: Path) -> dict[str, int]:
    """Bytes of all tensors, of the decoder-layer linear weights, and of the embedding + LM head, as stored."""
    total = linear = vocab = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not iterable)
                sl = st.get_slice(key)
                n = 1
                for d in sl.get_shape():
                    n *= d
                size = n * {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8, "I8": 1, "U8": 1}[sl.get_dtype()]
                total += size
                if ".layers." in key and ("_proj.weight" in key):
                    linear += size
                if "embed_tokens." in key or key.startswith("lm_head."):
                    vocab += size
    return {"total": total, "decoder_linears": linear, "embedding_and_head": vocab}


def print_memory(checkpoint: Path) -> None:
    """Stored weight bytes of the bf16 source and the checkpoint, by part, with ratios (no server needed)."""
    src, ckpt = weight_bytes(assets.smollm2_dir()), weight_bytes(checkpoint)
    print(f"{'part':<20} {'bf16 MiB':>9} {'ckpt MiB':>9} {'ratio':>6}")
    for part in src:
        print(f"{part:<20} {src[part] / 2**20:9.1f} {ckpt[part] / 2**20:9.1f} {ckpt[part] / src[part]:6.3f}")
    print("(the bf16 source ties its LM head to the embedding, stored once; a rotated checkpoint stores both)")


def bench(model_dir: Path, plain: bool, prompts: list[str], max_tokens: int, concurrency: int, log: Path,
          dtype: str = "bfloat16", compiled: bool = False) -> dict:
    args = [] if compiled else ["--enforce-eager"]
    args += ["--max-model-len", "2048", "--max-num-seqs", str(max(concurrency, 8)), "--dtype", dtype]
    with RunningServer(model_dir, args, log_path=log, plain_model=plain) as server:
        asyncio.run(run_load(server.url, str(model_dir), prompts[:4], 8, 4))  # warm-up
        return asyncio.run(run_load(server.url, str(model_dir), prompts, max_tokens, concurrency))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--memory-only", action="store_true", help="print the stored weight memory table and exit")
    ap.add_argument("--fp32-baseline", action="store_true",
                    help="also serve the plain model in float32 (CPUs without bf16 units run bf16 slowly)")
    ap.add_argument("--compiled", action="store_true",
                    help="serve every model with vLLM's torch.compile graphs instead of --enforce-eager")
    args = ap.parse_args()
    if args.memory_only:
        print_memory(Path(args.checkpoint))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = assets.evaluation_text().split("\n\n")
    prompts = [p[:400] for p in text if len(p) > 200][: args.prompts]
    rows = {}
    runs = [("bf16", assets.smollm2_dir(), True, "bfloat16"), ("conqur-w4a4", Path(args.checkpoint), False, "bfloat16")]
    if args.fp32_baseline:
        runs.insert(1, ("fp32", assets.smollm2_dir(), True, "float32"))
    for name, path, plain, dtype in runs:
        rows[name] = {**bench(path, plain, prompts, args.max_tokens, args.concurrency, out / f"server-{name}.log",
                              dtype, args.compiled),
                      "weight_bytes": {k: v * (2 if dtype == "float32" else 1)  # bf16 files held as float32
                                       for k, v in weight_bytes(path).items()}}
        print(json.dumps({name: rows[name]}), file=sys.stderr, flush=True)
    base, q = rows["bf16"], rows["conqur-w4a4"]
    print(f"\n{'':<14} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'weights MB':>11}")
    for name, r in rows.items():
        print(f"{name:<14} {r['output_tok_per_s']:8.1f} {r['ttft_p50_ms']:9.1f} {r['ttft_p99_ms']:9.1f} "
              f"{r['tpot_p50_ms']:9.1f} {r['tpot_p99_ms']:9.1f} {r['weight_bytes']['total'] / 2**20:11.1f}")
    ratios = {"throughput": q["output_tok_per_s"] / base["output_tok_per_s"],
              "weights_total": q["weight_bytes"]["total"] / base["weight_bytes"]["total"],
              "weights_decoder_linears": q["weight_bytes"]["decoder_linears"] / base["weight_bytes"]["decoder_linears"]}
    print(f"ratios W4A4/bf16: {json.dumps({k: round(v, 3) for k, v in ratios.items()})}")
    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
    (out / "serving.json").write_text(json.dumps({"meta": meta, "rows": rows, "ratios": ratios}, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
        names = list(rows)
        for ax, key, label in zip(axes, ("output_tok_per_s", "ttft_p50_ms", "tpot_p50_ms"),
                                  ("output tok/s", "TTFT p50 (ms)", "TPOT p50 (ms)")):
            ax.bar(names, [rows[n][key] for n in names], color=["#888", "#bbb", "#2a7"][-len(names):])
            ax.set_title(label)
        fig.tight_layout()
        fig.savefig(out / "serving.png", dpi=110)
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)


if __name__ == "__main__":
    main()
