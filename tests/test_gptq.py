"""GPTQ: streamed Hessians and the error-feedback column sweep."""

from __future__ import annotations

import pytest
import torch

from conqur_vllm.gptq import HessianAccumulator, gptq_quantize, gptq_rows
from conqur_vllm.quant import QuantSpec, dequantize, quantize_weight_rtn


def _correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5 + torch.eye(d, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streamed_hessian_equals_float64_reference(dtype: torch.dtype) -> None:
    x = _correlated_inputs(3000, 48)
    acc = HessianAccumulator(48)
    for chunk in x.split([1000, 7, 1993]):
        acc.add(chunk.to(dtype).view(1, -1, 48))  # [batch, tokens, features] like a layer input
    reference = 2.0 / x.shape[0] * x.T @ x
    rel = float((acc.hessian - reference).norm() / reference.norm())
    assert acc.hessian.dtype == torch.float64 and acc.count == 3000
    assert rel < (1e-6 if dtype == torch.float32 else 1e-12), rel


def test_identity_hessian_reduces_to_rtn() -> None:
    """With H = I there is no correlation to exploit: GPTQ's codes are exactly RTN's."""
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    spec = QuantSpec(bits=4, symmetric=True)
    gptq = gptq_quantize(w, torch.eye(64, dtype=torch.float64), spec, clip_search=False, damp=0.0)
    rtn = quantize_weight_rtn(w, spec, clip_search=False)
    assert torch.equal(gptq.q, rtn.q) and torch.allclose(gptq.scale, rtn.scale)


@pytest.mark.parametrize("group_size", [None, 16])
def test_gptq_lowers_output_error_below_rtn(group_size: int | None) -> None:
    x = _correlated_inputs(4096, 64, seed=2)
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    acc = HessianAccumulator(64)
    acc.add(x)
    spec = QuantSpec(bits=4, symmetric=True, group_size=group_size)
    gptq = gptq_quantize(w, acc.hessian, spec, clip_search=False)
    rtn = quantize_weight_rtn(w, spec, clip_search=False)
    assert int(gptq.q.min()) >= spec.qmin and int(gptq.q.max()) <= spec.qmax

    def out_err(qt) -> float:
        return float((x @ (w - dequantize(qt, torch.float64)).T).norm() / (x @ w.T).norm())

    assert out_err(gptq) < 0.8 * out_err(rtn), (out_err(gptq), out_err(rtn))


def test_gptq_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="GPTQ needs"):
        gptq_quantize(torch.randn(4, 8), torch.eye(6), QuantSpec(bits=4))


def test_gptq_in_row_blocks_matches_whole_matrix():
    """Rows are independent under one Hessian: blocks give the same grid and (up to float32 rounding) codes."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(50, 32, generator=g)
    x = torch.randn(400, 32, generator=g) @ torch.randn(32, 32, generator=g)
    acc = HessianAccumulator(32)
    acc.add(x)
    spec = QuantSpec(4, group_size=16)
    whole = gptq_quantize(w, acc.hessian, spec)
    blocked = gptq_rows(w, acc.hessian, spec, clip_search=True, rows=16)
    assert torch.equal(blocked.scale, whole.scale)
    assert float((blocked.q != whole.q).float().mean()) < 0.01
