"""Hadamard matrices of order n = m * 2^k and a fast Hadamard transform.

H_n = H_m ⊗ H_{2^k}: H_{2^k} by Sylvester's construction, H_m by Paley I (m = q + 1, q prime ≡ 3 mod 4),
Paley II (m = 2(q + 1), q prime ≡ 1 mod 4), the table of known matrices shipped with ``compressed-tensors``
(every multiple of 4 up to 256), or a Kronecker product of two of those. Every H_m is checked to satisfy
H_m H_mᵀ = m I before use. ``fast_hadamard_transform(x)`` equals ``x @ hadamard_matrix(n)``.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import operator
from functools import cache, lru_cache
from pathlib import Path

import torch

__all__ = [
    "UnsupportedHadamardSize",
    "block_hadamard_matrix",
    "fast_hadamard_transform",
    "hadamard_factors",
    "hadamard_matrix",
    "is_supported_size",
    "random_hadamard_matrix",
    "random_hadamard_signs",
    "validate_rotation_size",
]

MAX_ORDER = 4096
"""Largest non-power-of-two factor m that is built (H_m is applied as a dense m x m matmul)."""

_TABLE_RELPATH = ("transform", "utils", "hadamards.safetensors")


class UnsupportedHadamardSize(ValueError):
    """No Hadamard matrix of the requested size can be built; the message names the size and a fix."""


# -------------------- sources


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, math.isqrt(q) + 1))


@lru_cache(maxsize=1)
def _table_path() -> Path | None:
    spec = importlib.util.find_spec("compressed_tensors")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*_TABLE_RELPATH)
    return path if path.is_file() else None


@lru_cache(maxsize=1)
def _table_orders() -> frozenset[int]:
    path = _table_path()
    if path is None:
        return frozenset()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return frozenset(int(k) for k in f.keys() if k.isdigit())  # noqa: SIM118 (safe_open is not iterable)


@cache
def _source(m: int) -> str | None:
    """How H_m is built ("sylvester", "paley1", "paley2", "table", "kron:a") or None if it is not."""
    if m < 1 or m > MAX_ORDER:
        return None
    if m & (m - 1) == 0:
        return "sylvester"
    if m % 4:
        return None
    if _is_prime(m - 1):  # m - 1 ≡ 3 mod 4 since 4 | m
        return "paley1"
    if _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "paley2"
    if m in _table_orders():
        return "table"
    for a in range(12, math.isqrt(m) + 1, 4):
        if m % a == 0 and (m // a) % 4 == 0 and _source(a) and _source(m // a):
            return f"kron:{a}"
    return None


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[a, b] = χ(a - b) over the prime field GF(q), χ the quadratic character."""
    chi = -torch.ones(q, dtype=torch.float64)
    chi[torch.arange(1, q) ** 2 % q] = 1.0
    chi[0] = 0.0
    idx = torch.arange(q)
    return chi[(idx[:, None] - idx[None, :]) % q]


def _paley1(m: int) -> torch.Tensor:
    q = m - 1
    s = torch.zeros(m, m, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(m, dtype=torch.float64) + s


def _paley2(m: int) -> torch.Tensor:
    q = m // 2 - 1
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = _jacobsthal(q)
    zero_block = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    sign_block = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, sign_block) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero_block)


def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.kron(h2, h)
    return h


@cache
def _base_matrix(m: int) -> torch.Tensor:
    """The ±1 matrix H_m (float64, CPU, shared: never modify it in place)."""
    source = _source(m)
    if source is None:
        raise UnsupportedHadamardSize(f"{m} is not a known Hadamard order; check is_supported_size() first")
    if source == "sylvester":
        h = _sylvester(m)
    elif source == "paley1":
        h = _paley1(m)
    elif source == "paley2":
        h = _paley2(m)
    elif source == "table":
        from safetensors import safe_open

        with safe_open(str(_table_path()), framework="pt") as f:
            h = f.get_tensor(str(m)).to(torch.float64)
    else:
        a = int(source.split(":")[1])
        h = torch.kron(_base_matrix(a), _base_matrix(m // a))
    if (
        h.shape != (m, m)
        or not torch.equal(h.abs(), torch.ones_like(h))
        or not torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64))
    ):
        raise RuntimeError(f"H_{m} from {source} is not a Hadamard matrix; the {source} source is broken")
    return h


@lru_cache(maxsize=64)
def _base_matrix_as(m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _base_matrix(m).to(dtype=dtype, device=device)


# -------------------- sizes


def _check_n(n: int) -> int:
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"Hadamard size must be an int, got {type(n).__name__}; pass int(n)") from None
    if n < 1:
        raise UnsupportedHadamardSize(f"Hadamard size must be a positive integer, got {n}")
    return n


def _supported_summary() -> str:
    small = [m for m in range(12, 257, 8) if _source(m)]
    if len(small) == len(range(12, 257, 8)):
        listed = "1, 12, 20, 28, ..., 244, 252 (every 4*odd up to 256)"
    else:
        listed = ", ".join(map(str, [1, *small]))
    return f"m in {{{listed}}} or a Paley order q+1 / 2(q+1) with q prime, m <= {MAX_ORDER}"


def _largest_supported_block(n: int) -> int:
    divisors = {d for i in range(1, math.isqrt(n) + 1) if n % i == 0 for d in (i, n // i)}
    return max(d for d in divisors if _factor(d) is not None)


@lru_cache(maxsize=4096)
def _factor(n: int) -> tuple[int, int] | None:
    two = (n & -n).bit_length() - 1
    odd = n >> two
    for j in range(two + 1):
        m = odd << j
        if _source(m) is not None and (m == 1 or m & (m - 1)):
            return m, n // m
    return None


def hadamard_factors(n: int) -> tuple[int, int]:
    """(m, p) with n = m * p, p the largest power of two for which H_m is available (so m is smallest)."""
    n = _check_n(n)
    found = _factor(n)
    if found is not None:
        return found
    two = (n & -n).bit_length() - 1
    odd = n >> two
    if two < 2:
        why = "Hadamard orders above 2 are multiples of 4"
    else:
        why = f"{odd} * 2^j is not a known Hadamard order for any 2 <= j <= {two}"
    raise UnsupportedHadamardSize(
        f"no Hadamard matrix of size {n} = {odd} * {1 << two} is available: {why} "
        f"(supported: n = m*2^k with {_supported_summary()}); "
        f"use a supported size or a block-diagonal Hadamard with block={_largest_supported_block(n)}"
    )


def is_supported_size(n: int) -> bool:
    """Whether hadamard_matrix(n) can be built."""
    return _factor(_check_n(n)) is not None


def validate_rotation_size(n: int, what: str) -> None:
    """Raise UnsupportedHadamardSize naming ``what`` (e.g. "intermediate_size") if n is unsupported."""
    try:
        hadamard_factors(n)
    except UnsupportedHadamardSize as e:
        raise UnsupportedHadamardSize(f"{what} = {n} cannot be Hadamard-rotated: {e}") from None


# -------------------- matrices


def hadamard_matrix(
    n: int,
    *,
    normalized: bool = True,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """H_n = H_m ⊗ H_p with entries ±1, divided by sqrt(n) (orthogonal) when ``normalized``."""
    m, p = hadamard_factors(n)
    h = torch.kron(_base_matrix(m), _sylvester(p))
    if normalized:
        h = h / math.sqrt(n)
    return h.to(dtype=dtype, device=device)


def random_hadamard_signs(n: int, seed: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The ±1 vector s of ``random_hadamard_matrix(n, seed)`` (drawn on CPU from torch.Generator(seed))."""
    n = _check_n(n)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return (torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64) * 2 - 1).to(dtype)


def random_hadamard_matrix(
    n: int, seed: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """diag(s) @ H_n / sqrt(n) with s = random_hadamard_signs(n, seed); orthogonal, deterministic per seed.

    ``x @ random_hadamard_matrix(n, seed) == fast_hadamard_transform(x * s)``.
    """
    h = random_hadamard_signs(n, seed)[:, None] * hadamard_matrix(n)
    return h.to(dtype=dtype, device=device)


def _check_block(n: int, block: int) -> int:
    block = _check_n(block)
    if n % block:
        raise UnsupportedHadamardSize(
            f"Hadamard block {block} does not divide size {n}; pick a divisor of {n}"
        )
    return block


def block_hadamard_matrix(
    n: int, block: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """Block-diagonal matrix of n / block copies of the normalized H_block."""
    n = _check_n(n)
    block = _check_block(n, block)
    h = torch.kron(torch.eye(n // block, dtype=torch.float64), hadamard_matrix(block))
    return h.to(dtype=dtype, device=device)


# -------------------- transform


def fast_hadamard_transform(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """``x @ H`` over the last dim, H = hadamard_matrix(n) or block_hadamard_matrix(n, block).

    Walsh–Hadamard butterflies over the 2^k factor and a dense m x m matmul; float64/float32 are computed in
    their own dtype, other floating dtypes in float32; the result has x's dtype and device.
    """
    if not torch.is_floating_point(x):
        raise TypeError(
            f"fast_hadamard_transform needs a floating-point tensor, got {x.dtype}; cast with x.float()"
        )
    if x.dim() == 0:
        raise ValueError(
            "fast_hadamard_transform needs at least one dimension, got a scalar; pass x.reshape(1)"
        )
    n = x.shape[-1]
    size = n if block is None else _check_block(n, block)
    m, p = hadamard_factors(size)
    work = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    batch = x.numel() // size
    y = x.to(work).reshape(batch, m, p)
    h = 1
    while h < p:
        y = y.view(batch, m, p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).view(batch, m, p)
        h *= 2
    if m > 1:
        y = torch.matmul(_base_matrix_as(m, work, y.device).T, y)
    y = y * (1.0 / math.sqrt(size))
    return y.reshape(x.shape).to(x.dtype)


@functools.lru_cache(maxsize=32)
def _sylvester_as(p: int, scale: float, dtype: torch.dtype, device: str) -> torch.Tensor:
    return (_sylvester(p) * scale).to(dtype=dtype, device=device)


KRON_CHUNK = 1024
"""Largest Sylvester factor applied as one dense GEMM by :func:`hadamard_transform`."""


def hadamard_transform(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """``x @ H`` like :func:`fast_hadamard_transform`, computed as H = H_m ⊗ H_a ⊗ H_b: one small dense GEMM per
    Kronecker factor (b <= ``KRON_CHUNK``), far fewer FLOPs than a dense n x n GEMM and faster on CPUs than
    the butterflies. Falls back to the butterflies where a factor would exceed ``KRON_CHUNK``."""
    if not torch.is_floating_point(x):
        return fast_hadamard_transform(x, block)  # raises the clear error
    n = x.shape[-1]
    size = n if block is None else _check_block(n, block)
    m, p = hadamard_factors(size)
    b = min(p, KRON_CHUNK)
    a = p // b
    if a > KRON_CHUNK:
        return fast_hadamard_transform(x, block)
    work = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    device = str(x.device)
    y = torch.matmul(x.to(work).reshape(-1, m, a, b), _sylvester_as(b, 1.0 / math.sqrt(size), work, device))
    if a > 1:
        y = torch.matmul(_sylvester_as(a, 1.0, work, device), y)
    y = y.reshape(-1, m, p)
    if m > 1:
        y = torch.matmul(_base_matrix_as(m, work, y.device).T, y)
    return y.reshape(x.shape).to(x.dtype)
