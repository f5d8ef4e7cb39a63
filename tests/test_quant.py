"""Integer quantizers: ranges, error bounds, grouping, asymmetry, clip search, fake-quant consistency."""

from __future__ import annotations

import math

import pytest
import torch

from conqur_vllm.quant import (
    QuantSpec,
    compute_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_per_token,
    kv_spec,
    mse_clip_search,
    quantize,
    quantize_codes,
    quantize_weight_rtn,
    sqnr_db,
)

SPECS = [
    QuantSpec(4),
    QuantSpec(4, group_size=16),
    QuantSpec(4, symmetric=False),
    QuantSpec(4, symmetric=False, group_size=16),
    QuantSpec(8),
    QuantSpec(8, symmetric=False, group_size=32),
    QuantSpec(3, group_size=8),
]


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    x[..., 3] *= 20.0  # an outlier channel, as in real activations
    return x.to(dtype)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_codes_in_range_and_dtype(spec: QuantSpec) -> None:
    qt = quantize(_rand(6, 64), spec)
    assert qt.q.dtype == (torch.int8 if spec.symmetric else torch.uint8)
    assert int(qt.q.min()) >= spec.qmin and int(qt.q.max()) <= spec.qmax
    if spec.symmetric:
        assert spec.qmin == -(2 ** (spec.bits - 1)) and spec.qmax == 2 ** (spec.bits - 1) - 1
        assert qt.zero is None
    else:
        assert spec.qmin == 0 and spec.qmax == 2**spec.bits - 1
        assert int(qt.zero.min()) >= 0 and int(qt.zero.max()) <= spec.qmax
    # clip=1 and symmetric: the largest magnitude in each group reaches qmax exactly
    if spec.symmetric:
        assert int(qt.q.abs().amax()) == spec.qmax


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_round_trip_error_at_most_half_a_step(spec: QuantSpec) -> None:
    x = _rand(5, 3, 64, seed=1)
    qt = quantize(x, spec)
    gs = spec.group_size or x.shape[-1]
    assert qt.scale.shape == (5, 3, 64 // gs) and qt.scale.dtype == torch.float32
    err = (x - dequantize(qt, torch.float64)).abs()
    step = qt.scale.to(torch.float64).repeat_interleave(gs, dim=-1)
    assert torch.all(err <= step / 2 * (1 + 1e-6)), float((err / step).max())
    # and the error is not trivially zero: it has the size of a rounding error
    assert float((err / step).mean()) > 0.1


def test_per_group_scales_match_group_absmax() -> None:
    x = _rand(4, 48, seed=2)
    qt = quantize(x, QuantSpec(4, group_size=12))
    ref = x.reshape(4, 4, 12).abs().amax(-1) / 7
    assert torch.allclose(qt.scale.double(), ref, rtol=1e-6)
    # grouping is along the last dim only: each group is quantized as an independent row
    row = quantize(x.reshape(16, 12), QuantSpec(4))
    assert torch.equal(row.q.reshape(4, 48), qt.q)


def test_asymmetric_matches_float64_reference() -> None:
    x = _rand(8, 32, seed=3) + 0.7  # shifted: asymmetric ranges
    spec = QuantSpec(4, symmetric=False, clip_ratio=0.9)
    qt = quantize(x, spec)
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    scale = 0.9 * (hi - lo) / 15
    zero = torch.round(-0.9 * lo / scale).clamp(0, 15)
    q = (torch.round(x / scale) + zero).clamp(0, 15)
    assert qt.scale.shape == (8, 1) and qt.zero.shape == (8, 1)
    assert torch.allclose(qt.scale.double(), scale, rtol=1e-6)
    assert torch.equal(qt.zero.double(), zero)
    assert (qt.q.double() != q).float().mean() < 0.01  # float32 scale may flip a rare tie
    ref = (q - zero) * scale
    assert torch.allclose(dequantize(qt, torch.float64), ref, rtol=0, atol=float(scale.max()) * 1.01)
    assert torch.allclose(fake_quantize(x, spec), ref, rtol=1e-9, atol=1e-12)


def test_asymmetric_beats_symmetric_on_one_sided_data() -> None:
    x = _rand(16, 64, seed=4).abs() + 0.1
    sym = sqnr_db(x, fake_quantize(x, QuantSpec(4)))
    asym = sqnr_db(x, fake_quantize(x, QuantSpec(4, symmetric=False)))
    assert asym > sym + 3.0


def test_zero_range_group_is_exact_and_finite() -> None:
    x = _rand(3, 32, seed=5)
    x[1] = 0.0  # a zero row among non-zero rows: scale falls back to 1
    for spec in (QuantSpec(4), QuantSpec(4, symmetric=False)):
        qt = quantize(x, spec)
        assert torch.isfinite(qt.scale).all() and float(qt.scale[1, 0]) == 1.0
        assert torch.equal(dequantize(qt, torch.float64)[1], x[1])
        assert torch.isfinite(fake_quantize(x, spec)).all()


@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(4, symmetric=False, group_size=16)], ids=str)
def test_fake_quantize_equals_dequantize_of_quantize(spec: QuantSpec) -> None:
    x = _rand(7, 64, seed=6, dtype=torch.float32)
    assert torch.allclose(fake_quantize(x, spec), dequantize(quantize(x, spec)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_fake_quantize_is_idempotent(spec: QuantSpec) -> None:
    x = _rand(9, 64, seed=7)
    once = fake_quantize(x, spec)
    twice = fake_quantize(once, spec)
    assert torch.allclose(twice, once, rtol=1e-9, atol=0)
    assert torch.equal(quantize(once, spec).q, quantize(x, spec).q)


def test_bf16_input_computed_in_float32() -> None:
    x = _rand(4, 128, seed=8, dtype=torch.bfloat16)
    y = fake_quantize(x, QuantSpec(4, group_size=32))
    assert y.dtype == torch.bfloat16
    ref = fake_quantize(x.float(), QuantSpec(4, group_size=32)).to(torch.bfloat16)
    assert torch.equal(y, ref)
    qt = quantize(x, QuantSpec(4, group_size=32))
    assert qt.scale.dtype == torch.float32
    assert torch.equal(dequantize(qt, torch.bfloat16), ref)
    assert 10.0 < sqnr_db(x, y) < 30.0  # INT4, groups of 32, one outlier channel: ~14 dB


def test_clip_ratio_shrinks_scale() -> None:
    x = _rand(4, 64, seed=9)
    s1, _ = compute_qparams(x, QuantSpec(4))
    s9, _ = compute_qparams(x, QuantSpec(4, clip_ratio=0.9))
    assert torch.allclose(s9, 0.9 * s1, rtol=1e-6)
    # clipping saturates the outlier: its code becomes the range end
    q = quantize(x, QuantSpec(4, clip_ratio=0.5)).q
    assert set(q[:, 3].tolist()) <= {-8, 7}


@pytest.mark.parametrize(
    "spec", [QuantSpec(4), QuantSpec(4, group_size=16), QuantSpec(4, symmetric=False)], ids=str
)
def test_clip_search_never_worse_than_no_clip(spec: QuantSpec) -> None:
    w = _rand(32, 128, seed=10)
    for norm in (2.0, 2.4):
        clip = mse_clip_search(w, spec, norm=norm)
        gs = spec.group_size or 128
        assert clip.shape == (32, 128 // gs) and float(clip.min()) >= 0.5 and float(clip.max()) <= 1.0
        e_search = (w - fake_quantize(w, spec, clip)).abs().pow(norm).reshape(32, -1, gs).sum(-1)
        e_none = (w - fake_quantize(w, spec)).abs().pow(norm).reshape(32, -1, gs).sum(-1)
        assert torch.all(e_search <= e_none * (1 + 1e-9))
        assert float(e_search.sum()) < float(e_none.sum())  # Gaussian weights do benefit from clipping
        assert float(clip.min()) < 1.0


@pytest.mark.parametrize("spec", [QuantSpec(4, group_size=16), QuantSpec(4, symmetric=False)], ids=str)
def test_clip_search_in_row_blocks_equals_whole_matrix(spec: QuantSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    w = _rand(37, 64, seed=13, dtype=torch.float32)
    whole = mse_clip_search(w, spec)
    monkeypatch.setattr("conqur_vllm.quant.CLIP_SEARCH_CHUNK", 5 * 64)  # blocks of 5 rows, last one short
    blocked = mse_clip_search(w, spec)
    assert blocked.shape == whole.shape and torch.equal(blocked, whole)
    assert float(whole.min()) < 1.0  # the search did clip somewhere


def test_quantize_weight_rtn_uses_clip_search() -> None:
    w = _rand(16, 64, seed=11)
    spec = QuantSpec(4, group_size=32)
    searched = quantize_weight_rtn(w, spec, clip_search=True)
    plain = quantize_weight_rtn(w, spec, clip_search=False)
    assert torch.equal(plain.q, quantize(w, spec).q)
    assert sqnr_db(w, dequantize(searched, torch.float64)) > sqnr_db(w, dequantize(plain, torch.float64))
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight_rtn(w[0], spec)


def test_per_token_activation_and_kv_specs() -> None:
    x = _rand(2, 5, 64, seed=12, dtype=torch.float32)
    y = fake_quantize_per_token(x, bits=4, clip_ratio=0.9)
    # per token: each token's quantization depends only on that token
    assert torch.equal(y[1, 2], fake_quantize_per_token(x[1, 2:3], 4, 0.9)[0])
    step = 0.9 * x.abs().amax(-1, keepdim=True) / 7
    assert torch.allclose((y / step).round(), y / step, atol=1e-4)
    kv = fake_quantize(x, kv_spec(4, head_dim=16))
    heads = fake_quantize(x.reshape(2, 5, 4, 16), kv_spec(4, head_dim=None)).reshape(2, 5, 64)
    assert torch.allclose(kv, heads, rtol=1e-6, atol=0)
    assert sqnr_db(x, kv) > sqnr_db(x, fake_quantize(x, kv_spec(4, head_dim=None)))


def test_quantize_codes_matches_quantize() -> None:
    x = _rand(6, 32, seed=13, dtype=torch.float32)
    spec = QuantSpec(4, symmetric=False, group_size=8)
    qt = quantize(x, spec)
    scale = qt.scale.repeat_interleave(8, -1)
    zero = qt.zero.repeat_interleave(8, -1)
    assert torch.equal(quantize_codes(x, scale, zero, spec), qt.q)


def test_sqnr_db() -> None:
    x = _rand(100, seed=14)
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, 0.9 * x) == pytest.approx(20.0, abs=1e-9)
    with pytest.raises(ValueError, match="all zeros"):
        sqnr_db(torch.zeros(3), torch.ones(3))


def test_bad_input_errors() -> None:
    with pytest.raises(ValueError, match="group_size"):
        quantize(_rand(2, 30), QuantSpec(4, group_size=8))
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(1)
    with pytest.raises(ValueError, match="clip_ratio"):
        QuantSpec(4, clip_ratio=0.0)
    with pytest.raises(TypeError, match="floating"):
        quantize(torch.ones(2, 8, dtype=torch.int32), QuantSpec(4))
    with pytest.raises(ValueError, match="one ratio per group"):
        quantize(_rand(2, 16), QuantSpec(4, group_size=8), torch.ones(2))
