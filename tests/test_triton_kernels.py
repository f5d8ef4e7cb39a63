"""Triton W4A4 kernels (fused Hadamard + quantization, integer GEMM) under the Triton interpreter on CPU.

The kernel modules are (re)loaded with ``TRITON_INTERPRET=1`` so their ``@triton.jit`` functions run as
NumPy programs; the GPU run of the same checks is ``benchmarks/check_kernels_gpu.py`` (``gpu`` marker).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("triton")

from conqur_vllm.formats import pack_int4
from conqur_vllm.hadamard import fast_hadamard_transform
from conqur_vllm.kernels import cuda, reference

ROOT = Path(__file__).resolve().parents[1]


def _load_interpreted(name: str) -> ModuleType:
    """A private copy of module ``name`` loaded with TRITON_INTERPRET=1 (read when ``triton.jit`` decorates).

    The copy lives under another module name, so the compiled kernels of ``name`` stay as they are.
    """
    spec = importlib.util.find_spec(name)
    alias = f"{name}__interpreted"
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(alias, spec.origin))
    sys.modules[alias] = module
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        module.__spec__.loader.exec_module(module)
        return module
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


tq = _load_interpreted("conqur_vllm.kernels.triton_quant")
tg = _load_interpreted("conqur_vllm.kernels.triton_gemm")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _activations(m: int, k: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = _gen(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g).add(0.1) * 4
    x[:, 3] += 12.0  # an outlier channel, as rotations are meant to spread
    return x.to(dtype)


def _codes(shape: tuple[int, int], lo: int, hi: int, seed: int) -> torch.Tensor:
    q = torch.randint(lo, hi + 1, shape, generator=_gen(seed), dtype=torch.int8)
    q.view(-1)[:2] = torch.tensor([lo, hi], dtype=torch.int8)  # both extremes always present
    return q


def test_kernels_run_in_the_interpreter():
    assert type(tq._hadamard_quant_kernel).__name__ == "InterpretedFunction"
    assert type(tg._int_gemm_kernel).__name__ == "InterpretedFunction"


# -------------------- fused Hadamard + per-token quantization


@pytest.mark.parametrize(("m", "k", "block", "bits", "clip", "dtype"), [
    (1, 64, None, 4, 1.0, torch.float32),
    (5, 128, None, 4, 0.9, torch.bfloat16),
    (32, 128, 32, 8, 0.95, torch.float32),
    (5, 64, 16, 4, 0.85, torch.float16),
])
def test_hadamard_quantize_bit_exact_power_of_two(m, k, block, bits, clip, dtype):
    x = _activations(m, k, seed=k + m, dtype=dtype)
    q, scale = tq.hadamard_quantize(x, block, bits, clip)
    ref_q, ref_scale = reference.quantize_per_token(fast_hadamard_transform(x.float(), block), bits, clip)
    assert q.dtype == torch.int8 and q.shape == (m, k) and scale.shape == (m, 1)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q, ref_q)
    qmax = (1 << (bits - 1)) - 1
    assert int(q.max()) <= qmax and int(q.min()) >= -qmax - 1 and q.abs().max() >= qmax - 1


def test_quantize_rounds_ties_to_even_and_clamps():
    s = 0.25
    halves = [7.0, 0.5, 1.5, 2.5, -0.5, -2.5, -3.5, 6.5, -7.0, 3.0, 0.0, -1.5, 4.5, 5.5, -4.5, 1.0]
    row = torch.tensor(halves) * s
    x = torch.stack([row, -row, torch.zeros_like(row)])
    q, scale = tq.quantize_per_token(x, 4, 1.0)
    expected = torch.tensor([7, 0, 2, 2, 0, -2, -4, 6, -7, 3, 0, -2, 4, 6, -4, 1], dtype=torch.int8)
    assert torch.equal(q, torch.stack([expected, -expected, torch.zeros_like(expected)]))
    assert torch.equal(scale, torch.tensor([[s], [s], [1.0]]))
    ref_q, _ = reference.quantize_per_token(x, 4, 1.0)
    assert torch.equal(q, ref_q)
    big = tq.quantize_per_token(x, 4, 0.5)[0]  # clipped: x / scale reaches +-14
    assert torch.equal(big, reference.quantize_per_token(x, 4, 0.5)[0]) and int(big.min()) == -8


@pytest.mark.parametrize(("m", "k", "bits"), [(5, 100, 4), (3, 64, 8)])
def test_plain_quantize_matches_reference_with_and_without_absmax(m, k, bits):
    x = _activations(m, k, seed=7 * k)
    assert all(torch.equal(a, b) for a, b in zip(tq.quantize_per_token(x, bits, 0.9),
                                                 reference.quantize_per_token(x, bits, 0.9), strict=True))
    absmax = x.abs().amax(dim=1, keepdim=True) * torch.linspace(1.0, 2.0, m)[:, None]
    q, scale = tq.quantize_per_token(x, bits, 0.9, absmax)
    ref_q, ref_scale = reference.quantize_per_token(x, bits, 0.9, absmax)
    assert torch.equal(scale, ref_scale) and torch.equal(q, ref_q)


def _centered_reference(x: torch.Tensor, block: int | None, bits: int, clip: float, row_min=None, row_max=None):
    y = x.float() if block is False else fast_hadamard_transform(x.float(), block)
    return reference.quantize_per_token_centered(y, bits, clip, row_min, row_max)


@pytest.mark.parametrize(("m", "k", "block", "bits", "clip", "dtype"), [
    (1, 64, None, 4, 1.0, torch.float32),
    (5, 128, None, 4, 0.8, torch.bfloat16),
    (32, 128, 32, 7, 0.95, torch.float32),
    (5, 64, 16, 4, 0.85, torch.float16),
])
def test_centered_hadamard_quantize_bit_exact(m, k, block, bits, clip, dtype):
    x = _activations(m, k, seed=k + 3 * m, dtype=dtype) + 1.5  # an offset: the zero points are not all 0
    c, scale = tq.hadamard_quantize_centered(x, block, bits, clip)
    ref_c, ref_scale = _centered_reference(x, block, bits, clip)
    assert c.dtype == torch.int8 and c.shape == (m, k) and scale.shape == (m, 1)
    assert torch.equal(scale, ref_scale) and torch.equal(c, ref_c)
    q, s, zero = reference.quantize_per_token_asym(fast_hadamard_transform(x.float(), block), bits, clip)
    assert torch.equal(c.float(), q.float() - zero) and torch.equal(s, scale)
    assert int(c.abs().max()) <= (1 << bits) - 1 and bool((zero != -(1 << (bits - 1))).any())


@pytest.mark.parametrize(("m", "k", "bits"), [(5, 100, 4), (3, 64, 6)])
def test_centered_plain_quantize_matches_reference_with_and_without_row_range(m, k, bits):
    x = _activations(m, k, seed=11 * k) - 2.0
    assert all(torch.equal(a, b) for a, b in zip(tq.quantize_per_token_centered(x, bits, 0.9),
                                                 _centered_reference(x, False, bits, 0.9), strict=True))
    widen = torch.linspace(1.0, 2.0, m)[:, None]
    row_min, row_max = x.amin(1, keepdim=True) * widen, x.amax(1, keepdim=True) * widen
    c, scale = tq.quantize_per_token_centered(x, bits, 0.9, row_min, row_max)
    ref_c, ref_scale = _centered_reference(x, False, bits, 0.9, row_min, row_max)
    assert torch.equal(scale, ref_scale) and torch.equal(c, ref_c)
    assert not torch.equal(scale, tq.quantize_per_token_centered(x, bits, 0.9)[1])
    with pytest.raises(ValueError, match="both row_min and row_max"):
        tq.quantize_per_token_centered(x, bits, 0.9, row_min)
    with pytest.raises(ValueError, match="2..7 bits"):
        tq.quantize_per_token_centered(x, 8, 0.9)


def test_centered_codes_rounding_and_degenerate_rows():
    s = 0.25  # row range [-0.5, 3.25]: 15 steps of 0.25, zero point 2
    row = torch.tensor([-0.5, 3.25, 0.125, 0.375, -0.125, 1.0, 2.875, 0.0])
    x = torch.stack([row, torch.zeros_like(row), torch.full_like(row, 2.0)])
    c, scale = tq.quantize_per_token_centered(x, 4, 1.0)
    assert torch.equal(c[0], torch.tensor([-2, 13, 0, 2, 0, 4, 12, 0], dtype=torch.int8))  # ties to even
    assert torch.equal(scale[:2], torch.tensor([[s], [1.0]])) and torch.equal(c[1], torch.zeros_like(c[1]))
    assert torch.equal(c[2], torch.full_like(c[2], 15))  # all-positive row: range widened to 0, code 15
    ref_c, ref_scale = reference.quantize_per_token_centered(x, 4, 1.0)
    assert torch.equal(c, ref_c) and torch.equal(scale, ref_scale)


@pytest.mark.parametrize(("m", "k", "block"), [(4, 192, None), (3, 384, 192)])
def test_centered_dense_factor_within_one_code_at_ties(m, k, block):
    x = _activations(m, k, seed=k + 1) + 0.7
    c, scale = tq.hadamard_quantize_centered(x, block, 4, 0.8)
    ref_c, ref_scale = _centered_reference(x, block, 4, 0.8)
    assert torch.allclose(scale, ref_scale, rtol=1e-6, atol=0)
    assert (c.to(torch.int32) - ref_c).abs().max() <= 1 and (c != ref_c).float().mean() < 0.01


@pytest.mark.parametrize("precision", tq.PRECISIONS)
@pytest.mark.parametrize(("m", "k", "block"), [(4, 192, None), (3, 384, 192)])
def test_dense_factor_matches_float64_up_to_ties(m, k, block, precision):
    x = _activations(m, k, seed=k)
    plan = tq.row_plan(k, block)
    assert plan.m == 12 and plan.m_pad == 16
    y64 = fast_hadamard_transform(x.double(), block)
    q, scale = tq.hadamard_quantize(x, block, 4, 0.9, precision=precision)
    scale64 = 0.9 * y64.abs().amax(dim=1, keepdim=True) / 7
    assert torch.allclose(scale.double(), scale64, rtol=1e-6, atol=0)
    v64 = (y64 / scale64).clamp(-8, 7)
    ref = torch.round(v64).to(torch.int8)
    near_tie = ((v64 - v64.floor()) - 0.5).abs() < 1e-4
    assert ((q != ref) <= near_tie).all()  # float32 vs float64 can only disagree at a rounding tie
    assert (q.to(torch.int32) - ref).abs().max() <= 1
    y = tq.hadamard_transform(x, block, precision=precision)
    assert torch.allclose(y.double(), y64, rtol=0, atol=1e-5 * float(y64.abs().max()))
    with pytest.raises(ValueError, match="precision 'tf32' is not one of ieee, tf32x3"):
        tq.hadamard_quantize(x, block, precision="tf32")


def test_hadamard_transform_kernel_is_the_butterfly():
    x = _activations(6, 256, seed=3)
    assert torch.equal(tq.hadamard_transform(x), fast_hadamard_transform(x))
    x3 = x.reshape(2, 3, 256)
    assert torch.equal(tq.hadamard_transform(x3, 64), fast_hadamard_transform(x3, 64))
    xb = x.to(torch.bfloat16)
    yb, ref = tq.hadamard_transform(xb), fast_hadamard_transform(xb.float())
    assert yb.dtype == torch.bfloat16 and ((yb.float() - ref).abs() <= ref.abs() * 2.0**-7).all()


def test_row_plan_support():
    assert tq.row_plan(4096, None) == tq.RowPlan(1, 1, 4096, 1, 1, 4096, True)
    assert tq.row_plan(14336, None).m == 28 and tq.row_plan(14336, None).m_pad == 32
    assert tq.row_plan(14336, 128) == tq.RowPlan(112, 1, 128, 128, 1, 128, True)
    assert not tq.supports(96)  # 12 x 8: the dense factor needs p >= 16
    assert not tq.supports(1000) and not tq.supports(128, 48) and not tq.supports(1 << 16)
    assert tq.row_plan(100, None, rotate=False).p_pad == 128
    with pytest.raises(ValueError, match="does not handle"):
        tq.hadamard_quantize(torch.randn(2, 96))
    with pytest.raises(ValueError, match="2-D"):
        tq.quantize_per_token(torch.randn(2, 3, 4))


# -------------------- integer GEMM


@pytest.mark.parametrize(("m", "k", "n"), [(1, 64, 32), (1, 128, 48), (5, 64, 48), (5, 128, 32),
                                           (32, 64, 32), (32, 128, 48)])
def test_int_mm_accumulators_bit_exact(m, k, n):
    a = _codes((m, k), -8, 7, seed=m * k)
    w = _codes((n, k), -8, 7, seed=n * k + 1)
    ref = a.to(torch.int32) @ w.to(torch.int32).t()
    assert torch.equal(tg.int_mm(a, pack_int4(w)), ref)
    assert torch.equal(tg.int_mm(a, w, packed=False), ref)
    a8 = _codes((m, k), -128, 127, seed=m * k + 2)  # W4A8: full-range activations, same kernel
    assert torch.equal(tg.int_mm(a8, pack_int4(w)), a8.to(torch.int32) @ w.to(torch.int32).t())


@pytest.mark.parametrize("config", [tg.DECODE, tg.MID, tg.PREFILL])
def test_every_tile_config_gives_the_same_accumulators(config):
    a, w = _codes((20, 256), -8, 7, seed=11), _codes((40, 256), -8, 7, seed=12)
    out = tg.int_mm(a, pack_int4(w), config=config)
    assert torch.equal(out, a.to(torch.int32) @ w.to(torch.int32).t())


@pytest.mark.parametrize(("m", "k", "n", "split"), [(1, 256, 48, 2), (5, 512, 96, 4), (16, 256, 40, 8),
                                                    (3, 96, 32, 3)])
def test_split_k_is_exact(m, k, n, split):
    a, w = _codes((m, k), -8, 7, seed=m + split), _codes((n, k), -8, 7, seed=n + split)
    cfg = tg.TileConfig(16, 32, 32, 4, 2, split_k=split)
    assert tg.split_k_for(m, n, k, cfg, 1, a.device) == min(split, k // 32) > 1
    assert torch.equal(tg.int_mm(a, pack_int4(w), config=cfg), a.to(torch.int32) @ w.to(torch.int32).t())
    g = _gen(split)
    a_scale, w_scale, bias = torch.rand(m, 1, generator=g) + 0.1, torch.rand(n, 1, generator=g) + 0.1, torch.randn(n)
    out = tg.scaled_mm(a, a_scale, pack_int4(w), w_scale, bias, torch.float32, config=cfg)
    assert torch.equal(out, reference.int_scaled_mm(a, a_scale, w, w_scale, bias, torch.float32))
    assert tg.workspace_size(n, k, a.device) == 0  # no automatic split off CUDA
    assert tg.split_k_for(m, n, k, cfg, 2, a.device) == 1  # group scales never split


def _epilogue64(a, a_scale, w, w_scale, bias):
    """float64 ``a_scale * sum_g w_scale_g * acc_g + bias`` and the magnitude of its terms."""
    groups = w_scale.shape[1]
    acc = torch.stack([ag.double() @ wg.double().t()
                       for ag, wg in zip(a.chunk(groups, 1), w.chunk(groups, 1), strict=True)])
    terms = acc * w_scale.double().t()[:, None, :]
    out, mag = terms.sum(0) * a_scale.double(), terms.abs().sum(0) * a_scale.double()
    if bias is not None:
        out, mag = out + bias.double(), mag + bias.double().abs()
    return out, mag


@pytest.mark.parametrize(("m", "k", "n", "groups", "with_bias", "a_bits"), [
    (1, 64, 32, 1, True, 4), (5, 128, 48, 4, True, 4), (32, 128, 48, 2, False, 4), (5, 128, 32, 1, True, 8),
])
def test_scaled_mm_epilogue(m, k, n, groups, with_bias, a_bits):
    g = _gen(100 + m + groups)
    hi = (1 << (a_bits - 1)) - 1
    a, w = _codes((m, k), -hi - 1, hi, seed=m + k), _codes((n, k), -8, 7, seed=n + k)
    a_scale = torch.rand(m, 1, generator=g) * 0.1 + 0.01
    w_scale = torch.rand(n, groups, generator=g) * 0.02 + 0.001
    bias = torch.randn(n, generator=g) if with_bias else None
    out32 = tg.scaled_mm(a, a_scale, pack_int4(w), w_scale, bias, torch.float32)
    assert torch.equal(out32, reference.int_scaled_mm(a, a_scale, w, w_scale, bias, torch.float32))
    ref64, mag = _epilogue64(a, a_scale, w, w_scale, bias)
    for dtype in (torch.bfloat16, torch.float16):
        out = tg.scaled_mm(a, a_scale, pack_int4(w), w_scale, bias, dtype)
        ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
        assert out.dtype == dtype
        assert ((out.double() - ref64).abs() <= ulp * ref64.abs() + 1e-6 * mag + 1e-7).all()
    out8 = tg.scaled_mm(a, a_scale, w, w_scale, bias, torch.bfloat16, packed=False)
    assert torch.equal(out8, tg.scaled_mm(a, a_scale, pack_int4(w), w_scale, bias, torch.bfloat16))


def test_gemm_configs_and_validation():
    assert (tg.config_for(1), tg.config_for(16), tg.config_for(17), tg.config_for(256)) == (
        tg.DECODE, tg.DECODE, tg.MID, tg.PREFILL)
    assert tg._fit_block_k(tg.DECODE, 64).block_k == 64 and tg._fit_block_k(tg.PREFILL, 384).block_k == 128
    assert tg.supports(128, 4) and not tg.supports(96, 2) and not tg.supports(100)
    a = torch.zeros(2, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="packed INT4"):
        tg.int_mm(a, torch.zeros(4, 64, dtype=torch.int8))
    with pytest.raises(ValueError, match="multiple of 32"):
        tg.scaled_mm(a, torch.ones(2, 1), torch.zeros(4, 8, dtype=torch.int32), torch.ones(4, 4))


# -------------------- op registration


def test_ops_have_cuda_kernels_and_exact_references():
    for name in cuda.CUDA_KERNELS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name
    x = _activations(3, 384, seed=5)
    q, scale = torch.ops.conqur.hadamard_quantize_per_token(x, 128, 4, 0.9)
    ref = reference.quantize_per_token(fast_hadamard_transform(x, 128), 4, 0.9)
    assert torch.equal(q, ref[0]) and torch.equal(scale, ref[1])
    a, w = _codes((3, 64), -8, 7, seed=1), _codes((16, 64), -8, 7, seed=2)
    a_scale, w_scale, bias = torch.rand(3, 1) + 0.5, torch.rand(16, 2) + 0.5, torch.randn(16)
    out = torch.ops.conqur.int4_scaled_mm(a, a_scale, pack_int4(w), w_scale, bias, torch.float32)
    assert torch.equal(out, reference.int_scaled_mm(a, a_scale, w, w_scale, bias, torch.float32))
    c, c_scale = torch.ops.conqur.hadamard_quantize_per_token_centered(x, 128, 4, 0.8)
    ref = reference.quantize_per_token_centered(fast_hadamard_transform(x, 128), 4, 0.8)
    assert torch.equal(c, ref[0]) and torch.equal(c_scale, ref[1])
    for op, args in ((torch.ops.conqur.hadamard_quantize_per_token.default, (x, 128, 4, 0.9)),
                     (torch.ops.conqur.hadamard_quantize_per_token_centered.default, (x, 128, 4, 0.8)),
                     (torch.ops.conqur.quantize_per_token_centered.default, (x, 4, 0.8)),
                     (torch.ops.conqur.int4_scaled_mm.default,
                      (a, a_scale, pack_int4(w), w_scale, bias, torch.bfloat16))):
        assert all(v == "SUCCESS" for v in torch.library.opcheck(op, args).values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_kernels_on_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "check_kernels_gpu.py"), "--quick"],
                          check=False, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
