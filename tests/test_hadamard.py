"""Hadamard matrices: construction, orthogonality, the fast transform's convention, and real model sizes."""

from __future__ import annotations

import math

import pytest
import torch

from conqur_vllm import hadamard as hd
from conqur_vllm.hadamard import (
    UnsupportedHadamardSize,
    block_hadamard_matrix,
    fast_hadamard_transform,
    hadamard_factors,
    hadamard_matrix,
    is_supported_size,
    random_hadamard_matrix,
    random_hadamard_signs,
    validate_rotation_size,
)

F64 = torch.float64
SMALL_ORDERS = list(
    range(4, 257, 4)
)  # 52, 92, 100, 116, 156, 172, ... come from the compressed-tensors table
# Orders above that table: Paley I (q = 263), Paley II (q = 137, 461), Kronecker (288 = 12 * 24).
LARGE_ORDERS = {264: "paley1", 276: "paley2", 924: "paley2", 288: "kron"}


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _assert_orthogonal(h: torch.Tensor, tol: float = 1e-12) -> None:
    eye = torch.eye(h.shape[0], dtype=F64)
    assert (h.double() @ h.double().T - eye).abs().max().item() < tol
    assert (h.double().T @ h.double() - eye).abs().max().item() < tol


# -------------------- orders


@pytest.mark.parametrize("m", SMALL_ORDERS + list(LARGE_ORDERS))
def test_every_order_is_hadamard(m: int) -> None:
    assert hd._source(m) is not None, f"order {m} should be buildable"
    h = hd._base_matrix(m)
    assert h.dtype == F64 and h.shape == (m, m)
    assert torch.equal(h.abs(), torch.ones_like(h))
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=F64))
    _assert_orthogonal(hadamard_matrix(m))


def test_sources_for_large_orders() -> None:
    for m, source in LARGE_ORDERS.items():
        assert hd._source(m).startswith(source)
    assert hadamard_factors(1360) == (1360, 1)  # 340 and 680 are not buildable, 1360 = 20 * 68 is


@pytest.mark.parametrize("q", [3, 7, 11, 19, 23, 43, 59, 107, 139])
def test_paley1_construction(q: int) -> None:
    h = hd._paley1(q + 1)
    assert torch.equal(h @ h.T, (q + 1) * torch.eye(q + 1, dtype=F64))
    assert not torch.equal(h, h.T)  # Paley I is not symmetric: the convention tests below rely on it


@pytest.mark.parametrize("q", [5, 13, 17, 29, 37, 53, 73])
def test_paley2_construction(q: int) -> None:
    h = hd._paley2(2 * (q + 1))
    assert torch.equal(h @ h.T, 2 * (q + 1) * torch.eye(2 * (q + 1), dtype=F64))


def test_broken_source_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    bad = hd._paley1(12).clone()
    bad[0, 0] = -bad[0, 0]
    monkeypatch.setattr(hd, "_paley1", lambda m: bad)
    hd._base_matrix.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="not a Hadamard matrix"):
            hd._base_matrix(12)
    finally:
        monkeypatch.undo()
        hd._base_matrix.cache_clear()
    assert torch.equal(hd._base_matrix(12) @ hd._base_matrix(12).T, 12 * torch.eye(12, dtype=F64))


# -------------------- matrices


@pytest.mark.parametrize(
    "n, expected",
    [
        (1, (1, 1)),
        (2, (1, 2)),
        (64, (1, 64)),
        (12, (12, 1)),
        (24, (12, 2)),
        (40, (20, 2)),
        (576, (36, 16)),
        (1536, (12, 128)),
        (11008, (172, 64)),
        (14336, (28, 512)),
        (4864, (76, 64)),
        (29568, (924, 32)),
    ],
)
def test_factors(n: int, expected: tuple[int, int]) -> None:
    assert hadamard_factors(n) == expected
    assert is_supported_size(n)


@pytest.mark.parametrize("n", [1, 2, 4, 12, 24, 40, 44 * 8, 172 * 2, 576])
def test_hadamard_matrix_kronecker_and_orthogonal(n: int) -> None:
    m, p = hadamard_factors(n)
    raw = hadamard_matrix(n, normalized=False)
    assert torch.equal(raw, torch.kron(hd._base_matrix(m), hd._sylvester(p)))
    assert torch.equal(raw.abs(), torch.ones_like(raw))
    h = hadamard_matrix(n)
    assert h.dtype == F64
    assert torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(n)), rtol=0, atol=1e-15)
    _assert_orthogonal(h)
    assert hadamard_matrix(n, dtype=torch.float32).dtype == torch.float32


def test_sylvester_is_the_natural_order() -> None:
    p = 16
    bits = torch.tensor([[(a & b).bit_count() for b in range(p)] for a in range(p)])
    assert torch.equal(hd._sylvester(p), (-1.0) ** bits.to(F64))


def test_cached_matrix_is_not_shared_with_callers() -> None:
    h = hadamard_matrix(12, normalized=False)
    h.zero_()
    assert torch.equal(hadamard_matrix(12, normalized=False).abs(), torch.ones(12, 12, dtype=F64))


# -------------------- fast transform


@pytest.mark.parametrize("n", [1, 2, 8, 12, 20, 24, 28 * 4, 44 * 8, 172 * 2, 576, 1536])
def test_fast_equals_dense_float64(n: int) -> None:
    x = _rand(2, 3, n, seed=n)
    dense = x @ hadamard_matrix(n)
    fast = fast_hadamard_transform(x)
    assert fast.shape == x.shape and fast.dtype == F64
    assert _rel(fast, dense) < 1e-12
    # x @ H, not x @ H.T: for non-symmetric H the two differ.
    if not torch.equal(hadamard_matrix(n), hadamard_matrix(n).T):
        assert _rel(x @ hadamard_matrix(n).T, dense) > 1e-3


def test_fast_equals_dense_float32_and_bf16() -> None:
    n = 1536
    x = _rand(5, n, seed=1)
    dense = x @ hadamard_matrix(n)
    f32 = fast_hadamard_transform(x.float())
    assert f32.dtype == torch.float32 and _rel(f32, dense) < 5e-6
    bf = fast_hadamard_transform(x.bfloat16())
    assert bf.dtype == torch.bfloat16 and _rel(bf, dense) < 2e-2
    f16 = fast_hadamard_transform(x.half())
    assert f16.dtype == torch.float16 and _rel(f16, dense) < 2e-3


def test_fast_non_contiguous_input() -> None:
    big = _rand(6, 4, 48, seed=7)
    x = big.transpose(0, 1)[..., 8:32]  # (4, 6, 24), strided in every dim
    assert not x.is_contiguous()
    assert _rel(fast_hadamard_transform(x), x @ hadamard_matrix(24)) < 1e-12


def test_fast_empty_batch() -> None:
    x = torch.empty(0, 24, dtype=F64)
    assert fast_hadamard_transform(x).shape == (0, 24)


def test_fast_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="floating-point"):
        fast_hadamard_transform(torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(UnsupportedHadamardSize, match="260"):
        fast_hadamard_transform(_rand(2, 260))
    with pytest.raises(UnsupportedHadamardSize, match="does not divide"):
        fast_hadamard_transform(_rand(2, 96), block=64)


# -------------------- block / random


@pytest.mark.parametrize("n, block", [(96, 32), (96, 12), (1024, 128), (2752, 1376)])
def test_block_hadamard(n: int, block: int) -> None:
    b = block_hadamard_matrix(n, block)
    hb = hadamard_matrix(block)
    for i in range(0, n, block):
        assert torch.equal(b[i : i + block, i : i + block], hb)
    mask = torch.kron(torch.eye(n // block, dtype=F64), torch.ones(block, block, dtype=F64))
    assert torch.count_nonzero(b * (1 - mask)) == 0
    x = _rand(3, n, seed=block)
    assert _rel(fast_hadamard_transform(x, block=block), x @ b) < 1e-12
    if n <= 1024:
        _assert_orthogonal(b)


def test_block_rejects_non_divisor() -> None:
    with pytest.raises(UnsupportedHadamardSize, match="does not divide"):
        block_hadamard_matrix(96, 40)


def test_random_hadamard() -> None:
    n = 576
    r = random_hadamard_matrix(n, seed=3)
    _assert_orthogonal(r)
    assert torch.equal(r, random_hadamard_matrix(n, seed=3))
    assert not torch.equal(r, random_hadamard_matrix(n, seed=4))
    s = random_hadamard_signs(n, 3)
    assert set(s.tolist()) == {-1.0, 1.0}
    assert torch.equal(r, torch.diag(s) @ hadamard_matrix(n))
    x = _rand(4, n, seed=5)
    assert _rel(fast_hadamard_transform(x * s), x @ r) < 1e-12
    assert random_hadamard_matrix(n, seed=3, dtype=torch.float32).dtype == torch.float32


# -------------------- errors


@pytest.mark.parametrize("n", [3, 6, 11, 86, 260, 520, 50257, 4 * 257])
def test_unsupported_sizes(n: int) -> None:
    assert not is_supported_size(n)
    with pytest.raises(UnsupportedHadamardSize, match=rf"size {n} = ") as e:
        hadamard_factors(n)
    assert "\n" not in str(e.value) and "block=" in str(e.value)
    with pytest.raises(UnsupportedHadamardSize, match=str(n)):
        hadamard_matrix(n)


def test_error_message_names_the_fix() -> None:
    with pytest.raises(UnsupportedHadamardSize) as e:
        hadamard_factors(4672)  # no order 73 * 2^j is buildable up to 73 * 64
    msg = str(e.value)
    assert "4672 = 73 * 64" in msg and "73 * 2^j" in msg and "block=" in msg
    block = int(msg.rsplit("block=", 1)[1])
    assert 4672 % block == 0 and is_supported_size(block) and block >= 64


def test_invalid_sizes() -> None:
    for bad in (0, -4):
        with pytest.raises(UnsupportedHadamardSize, match="positive integer"):
            hadamard_factors(bad)
    with pytest.raises(TypeError, match="must be an int"):
        hadamard_factors(12.0)  # type: ignore[arg-type]


def test_validate_rotation_size() -> None:
    validate_rotation_size(11008, "intermediate_size")
    with pytest.raises(UnsupportedHadamardSize, match=r"^intermediate_size = 520 .*size 520 = 65 \* 8"):
        validate_rotation_size(520, "intermediate_size")


# -------------------- model sizes

MODELS = {  # name: (hidden_size, intermediate_size, head_dim)
    "SmolLM2-135M": (576, 1536, 64),
    "Llama-2-7B": (4096, 11008, 128),
    "Llama-2-13B": (5120, 13824, 128),
    "Llama-2-70B": (8192, 28672, 128),
    "Llama-3-8B": (4096, 14336, 128),
    "Llama-3-70B": (8192, 28672, 128),
    "Mistral-7B": (4096, 14336, 128),
    "Qwen2.5-0.5B": (896, 4864, 64),
    "Qwen2.5-1.5B": (1536, 8960, 128),
    "Qwen2.5-3B": (2048, 11008, 128),
    "Qwen2.5-7B": (3584, 18944, 128),
    "Qwen2.5-14B": (5120, 13824, 128),
    "Qwen2.5-32B": (5120, 27648, 128),
    "Qwen2.5-72B": (8192, 29568, 128),
}
# Expected m for each size (None = rejected). Every size of the list above is supported.
EXPECTED_M = {
    64: 1,
    128: 1,
    576: 36,
    896: 28,
    1536: 12,
    2048: 1,
    3584: 28,
    4096: 1,
    4864: 76,
    5120: 20,
    8192: 1,
    8960: 140,
    11008: 172,
    13824: 108,
    14336: 28,
    18944: 148,
    27648: 108,
    28672: 28,
    29568: 924,
}
MODEL_SIZES = sorted({n for dims in MODELS.values() for n in dims})


def test_expected_table_covers_models() -> None:
    assert set(EXPECTED_M) == set(MODEL_SIZES)


@pytest.mark.parametrize("n", MODEL_SIZES)
def test_model_sizes(n: int) -> None:
    m = EXPECTED_M[n]
    if m is None:
        assert not is_supported_size(n)
        with pytest.raises(UnsupportedHadamardSize, match=str(n)):
            hadamard_factors(n)
        return
    assert hadamard_factors(n) == (m, n // m)
    validate_rotation_size(n, "size")
    x = _rand(3, n, seed=n)
    y = fast_hadamard_transform(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
    assert _rel(y, x) > 0.5  # it did rotate
    if n <= 4096:
        assert _rel(y, x @ hadamard_matrix(n)) < 1e-12


# -------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_on_cuda() -> None:
    for n, dtype, tol in [(11008, torch.float32, 1e-5), (14336, torch.bfloat16, 2e-2), (576, F64, 1e-12)]:
        x = _rand(8, n, seed=n, dtype=dtype)
        y = fast_hadamard_transform(x.cuda())
        assert y.is_cuda and y.dtype == dtype
        assert _rel(y.cpu(), fast_hadamard_transform(x.double())) < tol
