"""Speed of the Triton W4A4 GEMM and the fused Hadamard + quantization kernel on one CUDA GPU, in one run.

For every (N, K) in GEMM_SHAPES and M in M_VALUES: median time of the W4A4 kernel (packed INT4 weights, bf16
out), of the same GEMM on unpacked int8 weights (the asymmetric-weight path), of bf16 ``F.linear`` (cuBLAS)
and of ``torch._int_mm`` (int8 W8A8, M padded to 32 when M <= 16); TOPS,
bytes moved per second, speedups, and the fraction of the device roofline
``max(2MNK / int8_peak, bytes / hbm_bw)`` reached, with both ceilings measured here (a large device-to-device
copy, an 8192³ ``torch._int_mm``). The fused Hadamard + INT4 quantization (symmetric codes, and the centered
asymmetric codes of the default checkpoints) is timed for K in HADAMARD_SIZES
against the copy bandwidth and the unfused torch path. ``--sweep`` also times alternative tile configs.

Times are medians over CUDA-graph replays of many calls that cycle through enough input copies to exceed
twice the L2 cache. Writes ``kernels.json`` and ``kernels.md`` to ``--out`` (default ``$OUT`` or
``benchmarks/results``) and prints the table last.

    python benchmarks/kernels.py [--quick] [--no-sweep | --sweep-only] [--quant-sweep]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GEMM_SHAPES: list[tuple[int, int]] = [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336), (8192, 8192)]
M_VALUES: list[int] = [1, 16, 128, 1024, 4096, 8192]
HADAMARD_SIZES: list[int] = [4096, 8192, 14336]
QUICK_SHAPES: list[tuple[int, int]] = [(4096, 4096), (4096, 14336)]
QUICK_M: list[int] = [1, 16, 1024]


def require_cuda(what: str = "timed") -> None:
    """Exit with a message when no CUDA device is visible."""
    if not torch.cuda.is_available():
        sys.exit(f"no CUDA device: the Triton kernels are {what} on a GPU only "
                 "(on CPU, run tests/test_triton_kernels.py, which uses the Triton interpreter)")


def bench(fns: list[Callable[[], object]], target_ms: float = 20.0, trials: int = 9) -> float:
    """Median milliseconds per call, from CUDA-graph replays of calls cycling through ``fns``."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for fn in fns:
        fn()
    end.record()
    end.synchronize()
    per_call = max(start.elapsed_time(end) / len(fns), 1e-3)
    inner = max(len(fns), min(2000, math.ceil(target_ms / per_call / len(fns)) * len(fns)))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(inner):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    del graph
    return statistics.median(times)


def copies_for(bytes_per_set: int) -> int:
    """Input copies needed for the working set to exceed twice the L2 cache (at most 16)."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, min(16, math.ceil(2 * l2 / max(bytes_per_set, 1))))


def _copy_bandwidth(numel: int = 512 * 1024 * 1024) -> float:
    """Bytes read + written per second by a device-to-device copy of ``numel`` float32 (2 GiB)."""
    src = torch.randn(numel, device="cuda")
    dst = torch.empty_like(src)
    return 2 * numel * 4 / (bench([lambda: dst.copy_(src)], target_ms=50, trials=7) * 1e-3)


def _gemm_rate(dtype: torch.dtype, n: int = 8192) -> float:
    """Dense n³ GEMM operations per second through cuBLAS (``torch._int_mm`` for int8)."""
    a = torch.randint(-128, 128, (n, n), device="cuda").to(dtype)
    b = torch.randint(-128, 128, (n, n), device="cuda").to(dtype)
    fn = (lambda: torch._int_mm(a, b.t())) if dtype == torch.int8 else (lambda: a @ b.t())
    return 2 * n**3 / (bench([fn], target_ms=50, trials=7) * 1e-3)


def measure_ceilings() -> dict[str, float]:
    """HBM bandwidth and int8 / bf16 dense GEMM rates, measured on this device."""
    return {"hbm_bytes_per_s": _copy_bandwidth(), "int8_ops_per_s": _gemm_rate(torch.int8),
            "bf16_flops_per_s": _gemm_rate(torch.bfloat16)}


def _weights(n: int, k: int, copies: int, groups: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from conqur_vllm.formats import pack_int4

    out = []
    for _ in range(copies):
        w = torch.randint(-8, 8, (n, k), dtype=torch.int8, device="cuda")
        out.append((pack_int4(w), torch.rand(n, groups, device="cuda") * 0.01 + 1e-3))
    return out


def gemm_row(m: int, n: int, k: int, ceilings: dict[str, float], config=None) -> dict[str, float]:
    """Times and rates of W4A4, bf16 and int8 GEMMs for one shape (the W4A4 result is checked first)."""
    from conqur_vllm.kernels import triton_gemm

    w4_bytes = n * k // 2 + m * k + m * n * 2 + 4 * (m + n)
    ws = _weights(n, k, copies_for(n * k // 2), 1)
    a = torch.randint(-8, 8, (m, k), dtype=torch.int8, device="cuda")
    a_scale = torch.rand(m, 1, device="cuda") + 0.5
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    check = triton_gemm.int_mm(a, ws[0][0], config=config)
    from conqur_vllm.formats import unpack_int4

    w0 = unpack_int4(ws[0][0], k)
    ref = (a.float() @ w0.float().t()) if m <= 16 else torch._int_mm(a, w0.t()).float()
    if not torch.equal(check.float(), ref):
        raise RuntimeError(f"W4A4 int32 result wrong at M={m} N={n} K={k}")
    del w0, ref, check
    w4_ms = bench([lambda wp=wp, s=s: triton_gemm.scaled_mm(a, a_scale, wp, s, bias, torch.bfloat16,
                                                            config=config) for wp, s in ws])
    row = {"M": m, "N": n, "K": k, "w4a4_us": w4_ms * 1e3, "w4a4_bytes": w4_bytes}
    if config is not None:
        return row
    del ws
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(n * k * 2))]
    row["bf16_us"] = bench([lambda w=w: F.linear(x, w) for w in wb]) * 1e3
    del wb
    mp = max(m, 32)
    a8 = torch.randint(-128, 128, (mp, k), dtype=torch.int8, device="cuda")
    w8 = [torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda") for _ in range(copies_for(n * k))]
    row["int_mm_us"] = bench([lambda w=w: torch._int_mm(a8, w.t()) for w in w8]) * 1e3
    del w8
    w15 = [(torch.randint(-15, 16, (n, k), dtype=torch.int8, device="cuda"), torch.rand(n, 1, device="cuda") + 0.5)
           for _ in range(copies_for(n * k))]  # asymmetric weights: centered int8 codes, one byte per weight
    row["int8_weights_us"] = bench([lambda w=w, s=s: triton_gemm.scaled_mm(a, a_scale, w, s, bias, torch.bfloat16,
                                                                          packed=False) for w, s in w15]) * 1e3
    del w15
    ops = 2 * m * n * k
    floor_s = max(ops / ceilings["int8_ops_per_s"], w4_bytes / ceilings["hbm_bytes_per_s"])
    row.update({
        "w4a4_tops": ops / (w4_ms * 1e-3) / 1e12,
        "w4a4_gb_per_s": w4_bytes / (w4_ms * 1e-3) / 1e9,
        "speedup_vs_bf16": row["bf16_us"] / row["w4a4_us"],
        "speedup_vs_int_mm": row["int_mm_us"] / row["w4a4_us"],
        "roofline_us": floor_s * 1e6,
        "roofline_fraction": floor_s * 1e6 / row["w4a4_us"],
    })
    return row


def torch_hadamard_quantize(
    x: torch.Tensor, bits: int, clip_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused reference: ``fast_hadamard_transform`` in float32, then the reference quantizer."""
    from conqur_vllm.hadamard import fast_hadamard_transform
    from conqur_vllm.kernels import reference
    from conqur_vllm.kernels.cuda import reference_fn

    return reference_fn(reference.quantize_per_token)(fast_hadamard_transform(x.float()), bits, clip_ratio)


def quant_row(m: int, k: int, ceilings: dict[str, float]) -> dict[str, float]:
    """Fused Hadamard + INT4 quantization of bf16 [m, k] against the copy bandwidth and the unfused path."""
    from conqur_vllm.kernels import triton_quant

    xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(m * k * 2))]
    q, s = triton_quant.hadamard_quantize(xs[0], None, 4, 0.9)
    ref_q, ref_s = torch_hadamard_quantize(xs[0], 4, 0.9)
    mismatch = int((q != ref_q).sum())
    fused_ms = bench([lambda x=x: triton_quant.hadamard_quantize(x, None, 4, 0.9) for x in xs])
    unfused_ms = bench([lambda x=x: torch_hadamard_quantize(x, 4, 0.9) for x in xs[:2]])
    centered_ms = bench([lambda x=x: triton_quant.hadamard_quantize_centered(x, None, 4, 0.9) for x in xs])
    nbytes = m * k * 3 + 4 * m
    bw = nbytes / (fused_ms * 1e-3)
    extra = {}
    if triton_quant.row_plan(k, None).m > 1:  # the dense factor's other tl.dot precision
        other = next(p for p in triton_quant.PRECISIONS if p != triton_quant.DENSE_PRECISION)
        q2, s2 = triton_quant.hadamard_quantize(xs[0], None, 4, 0.9, precision=other)
        extra = {"other_precision": other, "other_us": bench(
            [lambda x=x: triton_quant.hadamard_quantize(x, None, 4, 0.9, precision=other) for x in xs]) * 1e3,
                 "other_code_mismatches": int((q2 != ref_q).sum()), "other_scales_equal": bool(torch.equal(s2, ref_s))}
    return {**extra, "M": m, "K": k, "fused_us": fused_ms * 1e3, "centered_us": centered_ms * 1e3,
            "unfused_torch_us": unfused_ms * 1e3,
            "gb_per_s": bw / 1e9, "hbm_fraction": bw / ceilings["hbm_bytes_per_s"],
            "code_mismatches": mismatch, "scales_equal": bool(torch.equal(s, ref_s)),
            "plan": asdict(triton_quant.row_plan(k, None))}


SWEEP = {  # (block_m, block_n, block_k, warps, stages, group_m, split_k); split_k 0 = automatic
    "decode": [(16, 32, 256, 4, 4, 8, 0), (16, 32, 256, 4, 4, 8, 1), (16, 32, 256, 4, 4, 8, 2),
               (16, 16, 256, 4, 4, 8, 0), (16, 16, 256, 2, 4, 8, 0), (16, 32, 256, 4, 6, 8, 0),
               (16, 32, 128, 4, 8, 8, 0), (16, 16, 512, 4, 3, 8, 0), (16, 32, 256, 4, 4, 8, 8),
               (16, 64, 256, 4, 4, 8, 0), (16, 64, 256, 4, 4, 8, 8), (16, 64, 128, 4, 4, 8, 0),
               (16, 128, 128, 4, 4, 8, 0), (16, 128, 256, 4, 3, 8, 0), (16, 32, 512, 4, 3, 8, 0),
               (16, 64, 256, 2, 4, 8, 0)],
    "mid": [(64, 64, 128, 4, 4, 8, 0), (64, 128, 128, 4, 4, 8, 0), (128, 64, 128, 4, 4, 8, 0),
            (128, 128, 128, 4, 4, 8, 0), (64, 256, 128, 4, 3, 8, 0)],
    "prefill": [(128, 128, 128, 8, 4, 8, 0), (128, 128, 128, 4, 4, 8, 0), (128, 256, 128, 8, 3, 8, 0),
                (256, 128, 128, 8, 3, 8, 0), (128, 256, 64, 4, 4, 8, 0), (128, 128, 64, 4, 5, 8, 0),
                (128, 256, 128, 4, 3, 8, 0)],
}
SWEEP_M = {"decode": [1, 16], "mid": [128], "prefill": [1024, 8192]}


def sweep(shapes: list[tuple[int, int]], ceilings: dict[str, float]) -> list[dict]:
    from conqur_vllm.kernels.triton_gemm import TileConfig

    rows = []
    for bucket, cfgs in SWEEP.items():
        for m in SWEEP_M[bucket]:
            for n, k in shapes:
                for cfg in cfgs:
                    tc = TileConfig(*cfg)
                    try:
                        row = gemm_row(m, n, k, ceilings, config=tc)
                    except Exception as e:  # noqa: BLE001 - a config that fails to compile is reported, not fatal
                        row = {"M": m, "N": n, "K": k, "error": f"{type(e).__name__}: {e}"[:200]}
                    rows.append({"bucket": bucket, "config": cfg, **row})
                    print(f"sweep {bucket} M={m} N={n} K={k} {cfg}: {row.get('w4a4_us', row.get('error'))}",
                          flush=True)
    return rows


def quant_sweep(ceilings: dict[str, float]) -> list[dict]:
    """Fused Hadamard + INT4 quantization time per warps-per-row setting (M = 1024 and 8192)."""
    from conqur_vllm.kernels import triton_quant

    rows = []
    for k in HADAMARD_SIZES:
        for m in (1024, 8192):
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(m * k * 2))]
            for warps in (2, 4, 8, 16, 32):
                try:
                    us = bench([lambda x=x, w=warps: triton_quant.hadamard_quantize(x, None, 4, 0.9, num_warps=w)
                                for x in xs]) * 1e3
                    row = {"M": m, "K": k, "warps": warps, "fused_us": us,
                           "hbm_fraction": (m * k * 3 + 4 * m) / (us * 1e-6) / ceilings["hbm_bytes_per_s"]}
                except Exception as e:  # noqa: BLE001 - a setting that fails to compile is reported, not fatal
                    row = {"M": m, "K": k, "warps": warps, "error": f"{type(e).__name__}: {e}"[:200]}
                rows.append(row)
                print("quant_sweep", json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    return rows


def _header(*cols: str) -> list[str]:
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def markdown(result: dict) -> str:
    c = result["ceilings"]
    ceilings = (f"Measured ceilings: HBM copy {c['hbm_bytes_per_s'] / 1e12:.2f} TB/s, "
                f"int8 _int_mm {c['int8_ops_per_s'] / 1e12:.0f} TOPS, "
                f"bf16 matmul {c['bf16_flops_per_s'] / 1e12:.0f} TFLOPS.")
    lines = [f"# Kernel benchmark on {result['device']}", "", ceilings, ""]
    lines += _header("M", "N", "K", "W4A4 µs", "TOPS", "GB/s", "bf16 µs", "int_mm µs", "vs bf16", "vs int_mm",
                     "roofline µs", "of roofline", "int8-weight W4A4 µs")
    for r in result["gemm"]:
        lines.append(f"| {r['M']} | {r['N']} | {r['K']} | {r['w4a4_us']:.1f} | {r['w4a4_tops']:.0f} | "
                     f"{r['w4a4_gb_per_s']:.0f} | {r['bf16_us']:.1f} | {r['int_mm_us']:.1f} | "
                     f"{r['speedup_vs_bf16']:.2f}x | {r['speedup_vs_int_mm']:.2f}x | "
                     f"{r['roofline_us']:.1f} | {r['roofline_fraction']:.0%} | {r['int8_weights_us']:.1f} |")
    lines += ["", *_header("M", "K", "fused Hadamard+quant µs", "GB/s", "of HBM copy", "unfused torch µs",
                           "code mismatches", "centered (asymmetric) µs")]
    for r in result["quant"]:
        lines.append(f"| {r['M']} | {r['K']} | {r['fused_us']:.1f} | {r['gb_per_s']:.0f} | "
                     f"{r['hbm_fraction']:.0%} | {r['unfused_torch_us']:.1f} | {r['code_mismatches']} | "
                     f"{r['centered_us']:.1f} |")
    if result.get("sweep"):
        lines += ["", *_header("bucket", "M", "N", "K", "config (BM, BN, BK, warps, stages)", "W4A4 µs")]
        for r in result["sweep"]:
            val = f"{r['w4a4_us']:.1f}" if "w4a4_us" in r else r["error"]
            lines.append(f"| {r['bucket']} | {r['M']} | {r['N']} | {r['K']} | {r['config']} | {val} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes and three M values")
    parser.add_argument("--no-sweep", action="store_true", help="skip the tile-config sweep")
    parser.add_argument("--sweep-only", action="store_true", help="only the tile-config sweep")
    parser.add_argument("--quant-sweep", action="store_true", help="also time warps per row of the fused quantizer")
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    args = parser.parse_args()
    require_cuda()
    import triton

    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.time()
    shapes, ms = (QUICK_SHAPES, QUICK_M) if args.quick else (GEMM_SHAPES, M_VALUES)
    ceilings = measure_ceilings()
    print(f"ceilings: {ceilings}", flush=True)
    gemm = []
    for n, k in [] if args.sweep_only else shapes:
        for m in ms:
            gemm.append(gemm_row(m, n, k, ceilings))
            print("gemm", json.dumps(gemm[-1]), flush=True)
            torch.cuda.empty_cache()
    quant = []
    for k in [] if args.sweep_only else [4096, 14336] if args.quick else HADAMARD_SIZES:
        for m in ms:
            quant.append(quant_row(m, k, ceilings))
            print("quant", json.dumps(quant[-1]), flush=True)
            torch.cuda.empty_cache()
    sweep_rows = [] if args.no_sweep else sweep([(4096, 4096), (28672, 4096), (4096, 14336)], ceilings)
    quant_sweep_rows = quant_sweep(ceilings) if args.quant_sweep else []
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "triton": triton.__version__, "timing": "median of CUDA-graph replays, inputs past 2x L2",
              "ceilings": ceilings, "gemm": gemm, "quant": quant, "sweep": sweep_rows, "quant_sweep": quant_sweep_rows,
              "wall_s": time.time() - t0}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(result, indent=1))
    md = markdown(result) if gemm else ""
    (out / "kernels.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
