"""Where the CPU time of a served W4A4 model goes, next to the float32 model, in one run.

    .venv/bin/python benchmarks/profile_cpu.py --checkpoint OUT [--prompts 32 --max-tokens 64]

Runs vLLM in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, eager) on the prompts of ``benchmarks/serving.py``
for the float32 base model and for the checkpoint in each of ``--dtypes``, each generation under
``torch.profiler``, and prints for each the operators with
the most self CPU time and the shares of a few groups (the project's custom ops, integer / float GEMMs,
attention, everything else). Writes ``profile-cpu.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GROUPS: dict[str, tuple[str, ...]] = {
    "activation quantization (conqur::quantize_per_token)": ("conqur::quantize_per_token",),
    "R4 Hadamard (conqur::hadamard_transform)": ("conqur::hadamard_transform",),
    "integer GEMM (oneDNN s8 / reference)": ("onednn_scaled_mm", "conqur::int_scaled_mm", "conqur::int4_scaled_mm",
                                             "_int_mm", "conqur::onednn_int_scaled_mm"),
    "float GEMM (oneDNN / aten::addmm / mm / linear)": ("_C::onednn_mm", "aten::addmm", "aten::mm", "aten::linear",
                                                        "aten::matmul"),
    "attention": ("attention", "paged", "flash", "sdpa", "scaled_dot_product"),
}


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS.items():
        if any(k.lower() in low for k in keys):
            return group
    return "other"


def profile_model(model: str, prompts: list[str], max_tokens: int, dtype: str) -> dict:
    """Generate ``prompts`` once to warm up, then once under the profiler; op self-times and group shares."""
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, enforce_eager=True, dtype=dtype, max_model_len=512, seed=0,
              max_num_seqs=len(prompts))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], params, use_tqdm=False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    ops = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()]
    total = sum(t for _, t, _ in ops)
    groups: dict[str, float] = {}
    for name, secs, _ in ops:
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + secs
    del llm
    top = sorted(ops, key=lambda o: -o[1])[:15]
    return {"model": model, "dtype": dtype, "wall_s": wall, "tokens": tokens, "tok_per_s": tokens / wall, "self_cpu_s": total,
            "groups": {g: {"s": s, "share": s / total} for g, s in sorted(groups.items(), key=lambda g: -g[1])},
            "top_ops": [{"op": n, "self_s": s, "calls": c, "share": s / total} for n, s, c in top]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a conqur checkpoint directory")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtypes", default="bfloat16,float32",
                        help="activation dtypes to serve the checkpoint in (default: bfloat16,float32)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from conqur_vllm import assets
    from conqur_vllm.vllm_plugin import register

    register()
    paragraphs = assets.evaluation_text().split("\n\n")
    prompts = [p[:400] for p in paragraphs if len(p) > 200][: args.prompts]  # as benchmarks/serving.py
    labels = ["float32 SmolLM2"] + [f"ConQuR W4A4, {d} activations" for d in args.dtypes.split(",")]
    runs = [profile_model(str(assets.smollm2_dir()), prompts, args.max_tokens, "float32")]
    runs += [profile_model(args.checkpoint, prompts, args.max_tokens, d) for d in args.dtypes.split(",")]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "profile-cpu.json").write_text(json.dumps(runs, indent=1))
    for label, run in zip(labels, runs, strict=True):
        print(f"\n{label}: {run['tok_per_s']:.1f} output tok/s ({run['tokens']} tokens in {run['wall_s']:.1f} s), "
              f"{run['self_cpu_s']:.1f} s of profiled CPU time")
        print("| group | self CPU s | share |\n|---|---|---|")
        for group, v in run["groups"].items():
            print(f"| {group} | {v['s']:.2f} | {v['share']:.0%} |")
        print("| top op | self CPU s | calls | share |\n|---|---|---|---|")
        for op in run["top_ops"][:10]:
            print(f"| {op['op']} | {op['self_s']:.2f} | {op['calls']} | {op['share']:.0%} |")


if __name__ == "__main__":
    main()
