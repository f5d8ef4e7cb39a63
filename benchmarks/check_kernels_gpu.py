"""Check the compiled Triton kernels on a CUDA GPU against exact references, over all benchmark shapes.

Inputs are random and never all zero; every output is poisoned first (NaN, or an impossible integer) so an
unwritten element fails. Checks:

- integer GEMM: int32 accumulators bit-exact against ``torch._int_mm`` / exact float32 products (packed INT4
  and int8 weights, INT4 and full int8 activations);
- scaled GEMM: bf16 output within half a bf16 ulp (plus float32 slack) of the reference epilogue computed
  from the exact accumulators, per-channel and per-group (128) scales, with bias; fp32 output likewise; and
  the asymmetric-weight path (unpacked int8 codes ``q - zero`` in [-15, 15]);
- fused Hadamard + quantization: codes and scales bit-exact against the reference for power-of-two sizes and
  diagonal blocks; for ``m x 2^k`` sizes (14336 = 28 x 512), codes may differ only at float32 rounding ties;
- the ``torch.ops.conqur.*`` ops dispatch to the Triton kernels on CUDA.

    python benchmarks/check_kernels_gpu.py [--quick]

Exits 1 on any failure; writes ``check_kernels.json`` to ``$OUT`` when set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels import GEMM_SHAPES, HADAMARD_SIZES, M_VALUES, require_cuda

from conqur_vllm.formats import pack_int4
from conqur_vllm.hadamard import fast_hadamard_transform
from conqur_vllm.kernels import reference, triton_gemm, triton_quant
from conqur_vllm.kernels.cuda import reference_fn

QUICK_SHAPES = [(256, 512), (384, 1024), (96, 768)]
QUICK_M = [1, 7, 16, 100, 300]
QUICK_HADAMARD = [512, 768, 1024]
INT32_POISON = -(2**31)
RESULTS: list[dict] = []


def record(name: str, ok: bool, **info: object) -> None:
    RESULTS.append({"check": name, "ok": bool(ok), **info})
    if not ok:
        print(f"FAIL {name} {info}", flush=True)


def exact_int_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``a @ w.T``: cuBLAS int8 GEMM when it applies, else float32 products below 2^24."""
    if a.shape[0] > 16:
        return torch._int_mm(a, w.t())
    return (a.float() @ w.float().t()).to(torch.int32)  # |sum| <= 128 * 8 * K < 2^24 for K <= 16384


def check_gemm(m: int, n: int, k: int) -> None:
    tag = {"M": m, "N": n, "K": k}
    a4 = torch.randint(-8, 8, (m, k), dtype=torch.int8, device="cuda")
    a8 = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
    w = torch.randint(-8, 8, (n, k), dtype=torch.int8, device="cuda")
    wp = pack_int4(w)
    for a_name, a in (("a4", a4), ("a8", a8)):
        ref = exact_int_mm(a, w)
        for packed, b in ((True, wp), (False, w)):
            out = torch.full((m, n), INT32_POISON, dtype=torch.int32, device="cuda")
            triton_gemm.int_mm(a, b, packed=packed, out=out)
            record("int_mm", torch.equal(out, ref), act=a_name, packed=packed, **tag)
    a_scale = torch.rand(m, 1, device="cuda") * 0.05 + 0.01
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    for groups in (1, k // 128):
        w_scale = torch.rand(n, groups, device="cuda") * 0.01 + 1e-3
        ref32 = reference_fn(reference.int_scaled_mm)(a4, a_scale, w, w_scale, bias, torch.float32)
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
        triton_gemm.scaled_mm(a4, a_scale, wp, w_scale, bias, torch.bfloat16, out=out)
        err = (out.float() - ref32).abs()
        tol = ref32.abs() * 2.0**-8 * (1 + 1e-4) + 1e-6 * float(ref32.abs().max())
        rel = float((out.float() - ref32).norm() / ref32.norm())
        exact = float((out == ref32.bfloat16()).float().mean())
        record("scaled_mm_bf16", not out.isnan().any() and bool((err <= tol).all()), groups=groups,
               rel_err=rel, max_err=float(err.max()), exact_bf16=exact, **tag)
        out32 = torch.full((m, n), float("nan"), dtype=torch.float32, device="cuda")
        triton_gemm.scaled_mm(a4, a_scale, wp, w_scale, bias, torch.float32, out=out32)
        rel32 = float((out32 - ref32).norm() / ref32.norm())
        record("scaled_mm_fp32", not out32.isnan().any() and rel32 < 1e-6, groups=groups, rel_err=rel32,
               **tag)
    # asymmetric weights as served: centered int8 codes q - zero in [-15, 15], unpacked, centered activations
    w15 = torch.randint(-15, 16, (n, k), dtype=torch.int8, device="cuda")
    a15 = torch.randint(-15, 16, (m, k), dtype=torch.int8, device="cuda")
    w_scale = torch.rand(n, 1, device="cuda") * 0.01 + 1e-3
    ref32 = reference_fn(reference.int_scaled_mm)(a15, a_scale, w15, w_scale, bias, torch.float32)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    triton_gemm.scaled_mm(a15, a_scale, w15, w_scale, bias, torch.bfloat16, packed=False, out=out)
    err = (out.float() - ref32).abs()
    tol = ref32.abs() * 2.0**-8 * (1 + 1e-4) + 1e-6 * float(ref32.abs().max())
    record("scaled_mm_bf16_int8_weights", not out.isnan().any() and bool((err <= tol).all()),
           rel_err=float((out.float() - ref32).norm() / ref32.norm()), max_err=float(err.max()), **tag)


def _near_tie(y: torch.Tensor, scale: torch.Tensor, tol: float = 1e-3) -> torch.Tensor:
    v = (y.double() / scale.double()).clamp(-8, 7)
    return ((v - v.floor()) - 0.5).abs() < tol


def dense_codes_ok(q: torch.Tensor, s: torch.Tensor, ref_q: torch.Tensor, ref_s: torch.Tensor,
                   y: torch.Tensor) -> bool:
    """Codes after a dense Hadamard factor: scales within 1e-6, codes off by one at most, and only at ties."""
    return (float(((s - ref_s).abs() / ref_s).max()) < 1e-6 and bool(((q != ref_q) <= _near_tie(y, ref_s)).all())
            and int((q.int() - ref_q.int()).abs().max()) <= 1)


def check_quant(m: int, k: int) -> None:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * (torch.rand(m, 1, device="cuda") * 4 + 0.1)
    x[:, 1] += 20  # an outlier channel
    blocks = [None, 128] if k % 128 == 0 else [None]
    for block in blocks:
        if not triton_quant.supports(k, block):
            record("hadamard_quantize_supported", False, M=m, K=k, block=block)
            continue
        y = fast_hadamard_transform(x.float(), block)
        ref_q, ref_s = reference_fn(reference.quantize_per_token)(y, 4, 0.9)
        q = torch.full((m, k), 127, dtype=torch.int8, device="cuda")
        s = torch.full((m, 1), float("nan"), device="cuda")
        triton_quant.hadamard_quantize(x, block, 4, 0.9, out=(q, s))
        plan = triton_quant.row_plan(k, block)
        diff = q != ref_q
        if plan.m == 1:
            ok = torch.equal(q, ref_q) and torch.equal(s, ref_s)
        else:
            ok = dense_codes_ok(q, s, ref_q, ref_s, y)
        detail = []
        if not ok:  # what the mismatching codes looked like: rotation, scale and y / scale of each
            yk = triton_quant.hadamard_transform(x.float(), block)
            for r, c in diff.nonzero()[:4].tolist():
                detail.append({"row": r, "col": c, "q": int(q[r, c]), "ref_q": int(ref_q[r, c]),
                               "y_ref": float(y[r, c]), "y_kernel": float(yk[r, c]),
                               "scale": float(s[r, 0]), "ref_scale": float(ref_s[r, 0]),
                               "v": float(y[r, c].double() / ref_s[r, 0].double())})
        record("hadamard_quantize", ok, M=m, K=k, block=block, dense_m=plan.m,
               code_mismatches=int(diff.sum()), detail=detail)
        if plan.m > 1:  # the non-default dense precision meets the same criterion
            other = next(p for p in triton_quant.PRECISIONS if p != triton_quant.DENSE_PRECISION)
            q2 = torch.full((m, k), 127, dtype=torch.int8, device="cuda")
            s2 = torch.full((m, 1), float("nan"), device="cuda")
            triton_quant.hadamard_quantize(x, block, 4, 0.9, out=(q2, s2), precision=other)
            record(f"hadamard_quantize_{other}", dense_codes_ok(q2, s2, ref_q, ref_s, y), M=m, K=k, block=block,
                   code_mismatches=int((q2 != ref_q).sum()))
        yk = torch.full_like(x, float("nan"))
        yk.copy_(triton_quant.hadamard_transform(x, block))
        yr = fast_hadamard_transform(x, block)
        same = torch.equal(yk, yr) if plan.m == 1 else float((yk.float() - yr.float()).abs().max()) <= float(
            yr.float().abs().max()) * 2.0**-7
        record("hadamard_transform", same and not yk.isnan().any(), M=m, K=k, block=block)
    check_centered(x + 1.5, k)
    q = torch.full((m, k), 127, dtype=torch.int8, device="cuda")
    s = torch.full((m, 1), float("nan"), device="cuda")
    triton_quant.quantize_per_token(x, 8, 1.0, out=(q, s))
    ref_q, ref_s = reference_fn(reference.quantize_per_token)(x, 8, 1.0)
    record("quantize_per_token", torch.equal(q, ref_q) and torch.equal(s, ref_s), M=m, K=k,
           code_mismatches=int((q != ref_q).sum()), scale_mismatches=int((s != ref_s).sum()))


def check_centered(x: torch.Tensor, k: int) -> None:
    """Centered asymmetric codes (plain, and fused with the full-row Hadamard) against the reference op."""
    m = x.shape[0]
    ref = reference_fn(reference.quantize_per_token_centered)(x.float(), 4, 0.8)
    got = triton_quant.quantize_per_token_centered(x, 4, 0.8)
    record("quantize_per_token_centered", torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), M=m, K=k,
           code_mismatches=int((got[0] != ref[0]).sum()))
    if not triton_quant.supports(k):
        return
    y = fast_hadamard_transform(x.float())
    ref = reference_fn(reference.quantize_per_token_centered)(y, 4, 0.8)
    c, s = triton_quant.hadamard_quantize_centered(x, None, 4, 0.8)
    if triton_quant.row_plan(k, None).m == 1:
        ok = torch.equal(c, ref[0]) and torch.equal(s, ref[1])
    else:  # a dense factor: scales within 1e-6, codes within one step at under 1% of positions
        ok = (float(((s - ref[1]).abs() / ref[1]).max()) < 1e-6
              and int((c.int() - ref[0].int()).abs().max()) <= 1 and float((c != ref[0]).float().mean()) < 0.01)
    record("hadamard_quantize_centered", ok, M=m, K=k, code_mismatches=int((c != ref[0]).sum()))


def check_dispatch() -> None:
    from conqur_vllm.kernels import cuda  # noqa: F401  (registers the CUDA kernels)

    a = torch.randint(-8, 8, (5, 256), dtype=torch.int8, device="cuda")
    w = torch.randint(-8, 8, (64, 256), dtype=torch.int8, device="cuda")
    a_s, w_s = torch.rand(5, 1, device="cuda") + 0.1, torch.rand(64, 2, device="cuda") + 0.1
    direct = triton_gemm.scaled_mm(a, a_s, pack_int4(w), w_s, None, torch.bfloat16)
    via_op = torch.ops.conqur.int4_scaled_mm(a, a_s, pack_int4(w), w_s, None, torch.bfloat16)
    via_int8 = torch.ops.conqur.int_scaled_mm(a, a_s, w, w_s, None, torch.bfloat16)
    record("dispatch_int4_scaled_mm", torch.equal(direct, via_op) and torch.equal(direct, via_int8))
    a1 = torch.randint(-8, 8, (3, 4096), dtype=torch.int8, device="cuda")
    w1 = torch.randint(-8, 8, (512, 4096), dtype=torch.int8, device="cuda")
    for split in (1, 2, 4, 16):  # every split gives the same exact accumulators
        cfg = triton_gemm.TileConfig(16, 32, 128, 4, 4, split_k=split)
        got = triton_gemm.int_mm(a1, pack_int4(w1), config=cfg)
        record("split_k_exact", torch.equal(got, exact_int_mm(a1, w1)), split=split,
               used=triton_gemm.split_k_for(3, 512, 4096, cfg, 1, a1.device))
    x = torch.randn(5, 1024, device="cuda", dtype=torch.bfloat16)
    fused = torch.ops.conqur.hadamard_quantize_per_token(x, 0, 4, 0.9)
    record("dispatch_hadamard_quantize", all(torch.equal(u, v) for u, v in
                                             zip(fused, triton_quant.hadamard_quantize(x, None, 4, 0.9),
                                                 strict=True)))


def guarded(check: Callable[..., None], *args: int) -> None:
    """Run one check; an exception is recorded as a failure so the remaining checks still run."""
    try:
        check(*args)
    except Exception as e:  # noqa: BLE001 - reported in the results, the script still exits 1
        record(check.__name__, False, args=list(args), error=f"{type(e).__name__}: {e}"[:500])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes only (seconds)")
    args = parser.parse_args()
    require_cuda("checked")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    shapes, ms, sizes = ((QUICK_SHAPES, QUICK_M, QUICK_HADAMARD) if args.quick
                         else (GEMM_SHAPES, M_VALUES, HADAMARD_SIZES))
    for n, k in shapes:
        for m in ms:
            guarded(check_gemm, m, n, k)
            torch.cuda.empty_cache()
    for k in sizes:
        for m in ms:
            guarded(check_quant, m, k)
    guarded(check_dispatch)
    torch.cuda.synchronize()
    failed = [r for r in RESULTS if not r["ok"]]
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "check_kernels.json").write_text(json.dumps(RESULTS, indent=1))
    worst = max((r.get("rel_err", 0.0) for r in RESULTS if r["check"] == "scaled_mm_bf16"), default=0.0)
    print(f"{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed on {torch.cuda.get_device_name(0)}; "
          f"worst bf16 GEMM rel err {worst:.2e}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
