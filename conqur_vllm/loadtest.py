"""A bounded async load-test client for an OpenAI-compatible server: throughput, TTFT, per-token latency."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass

import aiohttp


@dataclass
class RequestResult:
    ttft: float  # seconds to the first streamed token
    latency: float  # seconds to the last byte
    output_tokens: int

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def _one(session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int
               ) -> RequestResult:
    payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
               "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with session.post(url + "/v1/completions", json=payload) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if ttft is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - t0
    return RequestResult(ttft if ttft is not None else latency, latency, tokens)


async def run_load(url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
    """Send every prompt (at most ``concurrency`` in flight) and summarize."""
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def bounded(p: str) -> RequestResult:
            async with sem:
                return await _one(session, url, model, p, max_tokens)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(p) for p in prompts))
        wall = time.perf_counter() - t0
    ttfts = [r.ttft for r in results]
    tpots = [r.tpot for r in results if r.tpot is not None]
    out_tokens = sum(r.output_tokens for r in results)
    return {
        "requests": len(results), "concurrency": concurrency, "max_tokens": max_tokens, "wall_s": wall,
        "output_tokens": out_tokens, "output_tok_per_s": out_tokens / wall,
        "ttft_p50_ms": 1e3 * percentile(ttfts, 50), "ttft_p99_ms": 1e3 * percentile(ttfts, 99),
        "tpot_p50_ms": 1e3 * percentile(tpots, 50), "tpot_p99_ms": 1e3 * percentile(tpots, 99),
        "latency_mean_s": statistics.mean(r.latency for r in results),
    }


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Load-test an OpenAI-compatible completions endpoint")
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    prompts = [f"Write a short story about a robot number {i} who learns to paint." for i in range(args.prompts)]
    print(json.dumps(asyncio.run(run_load(args.url, args.model, prompts, args.max_tokens, args.concurrency)),
                     indent=2))


if __name__ == "__main__":
    main()
