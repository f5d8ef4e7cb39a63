"""Served vs reference parity of one checkpoint, next to the reference's own sensitivity to float precision.

    .venv/bin/python benchmarks/parity.py --checkpoint out/smollm2-conqur-w4a4kv4 --server-dtype bfloat16

Rows: the reference forward (``conqur_vllm.reference``, fake quantization) in float32 and float64,
and vLLM's OpenAI server (exact integer GEMMs) in ``--server-dtype``; all with an unquantized KV cache. For
each: perplexity over ``--windows`` x ``--seq-len`` Wikipedia tokens (prompt logprobs for the server) and the
share of positions whose argmax equals the float32 reference's. Then greedy generation: for ``--prompts``
paragraphs, ``--max-tokens`` server tokens, scored by teacher forcing against the float32 reference (share of
served tokens that are the reference's argmax given the same prefix) and by identical prefix length.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import UTC, datetime

import torch

from conqur_vllm import assets
from conqur_vllm.eval.perplexity import tokenize_windows
from conqur_vllm.fake_quant import KVQuant
from conqur_vllm.reference import load_reference_model
from conqur_vllm.serving import RunningServer


def _served(ckpt: str, dtype: str, windows: torch.Tensor, prompts: list[list[int]], max_tokens: int) -> dict:
    args = ["--enforce-eager", "--max-model-len", "2048", "--kv-cache-dtype", "auto", "--dtype", dtype]
    with RunningServer(ckpt, args, log_path="/dev/null") as server:
        model = json.loads(server.get_text("/v1/models"))["data"][0]["id"]
        logprobs = []
        for ids in windows.tolist():
            out = server.post("/v1/completions", {"model": model, "prompt": ids, "max_tokens": 1,
                                                   "temperature": 0, "prompt_logprobs": 1})
            logprobs.append(out["choices"][0]["prompt_logprobs"])
        greedy = []
        for ids in prompts:
            out = server.post("/v1/completions", {
                "model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "logprobs": 0,
                "return_tokens_as_token_ids": True, "ignore_eos": True})
            greedy.append([int(t.split(":")[1]) for t in out["choices"][0]["logprobs"]["tokens"]])
    return {"prompt_logprobs": logprobs, "greedy": greedy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--server-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    text = assets.evaluation_text()
    windows = tokenize_windows(tok, text, args.seq_len, max_windows=args.windows)
    paragraphs = [p for p in text.split("\n\n") if len(p) > 200][: args.prompts]
    prompts = [tok(p[:300], add_special_tokens=False).input_ids for p in paragraphs]
    served = _served(args.checkpoint, args.server_dtype, windows, prompts, args.max_tokens)

    targets = windows[:, 1:]
    rows: dict[str, dict] = {}
    ref32 = None
    for name, dtype in (("reference float32", torch.float32), ("reference float64", torch.float64)):
        model, _ = load_reference_model(args.checkpoint, dtype=dtype, kv_override=KVQuant(bits=None))
        with torch.no_grad():
            logp = torch.cat([model(w[None], use_cache=False).logits[0, :-1].double().log_softmax(-1)[None]
                              for w in windows])
        if ref32 is None:
            ref32, ref_model = logp.argmax(-1), model
        nll = -logp.gather(-1, targets[..., None]).mean().item()
        rows[name] = {"ppl": math.exp(nll), "argmax_agree_vs_fp32_ref": (logp.argmax(-1) == ref32).double().mean().item()}
        if name != "reference float32":
            del model
    nll, agree, count = 0.0, 0, 0
    for w, plps in zip(windows.tolist(), served["prompt_logprobs"]):
        for pos in range(1, len(w)):
            nll -= plps[pos][str(w[pos])]["logprob"]
            top = next(int(k) for k, v in plps[pos].items() if v["rank"] == 1)
            agree += top == int(ref32.view(-1)[count])
            count += 1
    rows[f"vLLM server {args.server_dtype}"] = {"ppl": math.exp(nll / count), "argmax_agree_vs_fp32_ref": agree / count}

    forced = total = prefix = 0
    for ids, gen in zip(prompts, served["greedy"]):
        with torch.no_grad():
            argmax = ref_model(torch.tensor([ids + gen]), use_cache=False).logits[0, len(ids) - 1:-1].argmax(-1)
        matches = [a == b for a, b in zip(gen, argmax.tolist())]
        forced += sum(matches)
        total += len(matches)
        prefix += matches.index(False) if False in matches else len(matches)
    greedy = {"teacher_forced_agreement": forced / total, "identical_prefix_share": prefix / total, "tokens": total}

    base = rows["reference float32"]["ppl"]
    print(f"\n{'':<26} {'ppl':>9} {'vs fp32 ref':>12} {'argmax = fp32 ref':>18}")
    for name, r in rows.items():
        print(f"{name:<26} {r['ppl']:9.3f} {100 * (r['ppl'] / base - 1):+11.2f}% {r['argmax_agree_vs_fp32_ref']:18.3f}")
    print(f"greedy ({len(prompts)} prompts x {args.max_tokens} tokens): {json.dumps(greedy)}")
    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "tokens": int(targets.numel())}
    print(json.dumps({"meta": meta, "rows": rows, "greedy": greedy}))


if __name__ == "__main__":
    main()
