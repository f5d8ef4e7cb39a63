"""Integer quantizers along the last dimension: symmetric / asymmetric, per row or per group, with clipping.

Conventions (b bits, one scale per group of the last dim):

- symmetric: ``qmax = 2^(b-1) - 1``, ``scale = clip * absmax / qmax``, ``q = clamp(round(x / scale), -qmax-1, qmax)``
  (INT4: codes in [-8, 7], stored as int8).
- asymmetric: the range is widened to include 0 (as GPTQ, QuaRot and compressed-tensors do, so the zero point is
  an exact code), ``scale = clip * (max - min) / (2^b - 1)``, ``zero = clamp(round(-clip * min / scale), 0, 2^b-1)``,
  ``q = clamp(round(x / scale) + zero, 0, 2^b - 1)`` (stored as uint8).
- a group whose range is zero gets scale 1, so nothing divides by zero.

Weights ``[out, in]`` are quantized per output channel (``group_size=None``) or in groups along ``in``;
activations per token (``group_size=None`` on ``[..., hidden]``); the KV cache per token per head
(asymmetric, ``group_size=head_dim``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

DEFAULT_CLIP_GRID: tuple[float, ...] = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))  # 1.0 .. 0.5
DEFAULT_CLIP_NORM = 2.4
CLIP_SEARCH_CHUNK = 1 << 18  # elements per row block of the clip search


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize along the last dim: bit width, symmetry, group size (None = whole row), clip ratio."""

    bits: int
    symmetric: bool = True
    group_size: int | None = None
    clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"QuantSpec.bits must be in 2..8, got {self.bits}")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"QuantSpec.group_size must be positive or None, got {self.group_size}")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ValueError(f"QuantSpec.clip_ratio must be in (0, 1], got {self.clip_ratio}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    @property
    def code_dtype(self) -> torch.dtype:
        """int8 for symmetric codes, uint8 for asymmetric ones (0 .. 2^b-1 fits up to 8 bits)."""
        return torch.int8 if self.symmetric else torch.uint8


class QuantizedTensor(NamedTuple):
    """Integer codes ``q`` (shape of the input), float32 ``scale`` and ``zero`` (None if symmetric) per group.

    ``scale`` and ``zero`` have shape ``[..., n_groups]``; ``x ≈ (q - zero) * scale`` group by group.
    """

    q: Tensor
    scale: Tensor
    zero: Tensor | None
    spec: QuantSpec


def activation_spec(bits: int = 4, clip_ratio: float = 0.9, symmetric: bool = True) -> QuantSpec:
    """Per-token activation quantization (last dim = hidden), symmetric or with a per-token zero point."""
    return QuantSpec(bits=bits, symmetric=symmetric, group_size=None, clip_ratio=clip_ratio)


def kv_spec(
    bits: int = 4, head_dim: int | None = None, clip_ratio: float = 0.95, symmetric: bool = False
) -> QuantSpec:
    """Per-token per-head KV-cache quantization: groups of ``head_dim`` along a flattened ``[..., heads*head_dim]``."""
    return QuantSpec(bits=bits, symmetric=symmetric, group_size=head_dim, clip_ratio=clip_ratio)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _grouped(x: Tensor, spec: QuantSpec) -> Tensor:
    """View ``[..., n]`` as ``[..., n_groups, group_size]``."""
    if x.ndim == 0:
        raise ValueError("cannot quantize a 0-d tensor: pass a tensor with at least one dimension")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}; convert it with .float() first")
    n = x.shape[-1]
    gs = spec.group_size or n
    if n == 0 or n % gs:
        raise ValueError(
            f"last dim {n} is not a multiple of group_size {gs}; choose a group_size that divides it"
        )
    return x.reshape(*x.shape[:-1], n // gs, gs)


def _clip_tensor(clip_ratio: float | Tensor, like: Tensor) -> Tensor | float:
    """A float clip, or a per-group clip tensor ``[..., n_groups]`` reshaped to broadcast over the group."""
    if isinstance(clip_ratio, Tensor):
        if clip_ratio.shape != like.shape[:-1]:
            raise ValueError(
                f"clip_ratio tensor has shape {tuple(clip_ratio.shape)}, expected {tuple(like.shape[:-1])} "
                "(one ratio per group)"
            )
        return clip_ratio.to(device=like.device, dtype=like.dtype).unsqueeze(-1)
    return float(clip_ratio)


def _qparams_grouped(xg: Tensor, spec: QuantSpec, clip: float | Tensor) -> tuple[Tensor, Tensor | None]:
    """Scale and zero ``[..., n_groups, 1]`` in xg's dtype for grouped input ``[..., n_groups, gs]``."""
    if spec.symmetric:
        scale = clip * xg.abs().amax(dim=-1, keepdim=True) / spec.qmax
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None
    lo = xg.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = xg.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = clip * (hi - lo) / spec.qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-clip * lo / scale).clamp(0, spec.qmax)
    return scale, zero


def _codes(xg: Tensor, scale: Tensor, zero: Tensor | None, spec: QuantSpec) -> Tensor:
    q = torch.round(xg / scale)
    if zero is not None:
        q = q + zero
    return q.clamp(spec.qmin, spec.qmax)


def compute_qparams(
    x: Tensor, spec: QuantSpec, clip_ratio: float | Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Float32 ``scale`` and ``zero`` (None if symmetric), each ``[..., n_groups]``.

    ``clip_ratio`` overrides ``spec.clip_ratio``; a tensor gives one ratio per group (e.g. from ``mse_clip_search``).
    """
    xg = _grouped(x, spec).to(torch.float32)
    scale, zero = _qparams_grouped(
        xg, spec, _clip_tensor(spec.clip_ratio if clip_ratio is None else clip_ratio, xg)
    )
    return scale.squeeze(-1), None if zero is None else zero.squeeze(-1)


def quantize_codes(x: Tensor, scale: Tensor, zero: Tensor | None, spec: QuantSpec) -> Tensor:
    """Integer codes (in ``spec.code_dtype``) of ``x`` for scales/zeros that broadcast against it elementwise."""
    dt = _compute_dtype(x)
    z = None if zero is None else zero.to(dt)
    return _codes(x.to(dt), scale.to(dt), z, spec).to(spec.code_dtype)


def quantize(x: Tensor, spec: QuantSpec, clip_ratio: float | Tensor | None = None) -> QuantizedTensor:
    """Quantize along the last dim; codes are computed against the stored float32 scale."""
    scale, zero = compute_qparams(x, spec, clip_ratio)
    dt = _compute_dtype(x)
    xg = _grouped(x, spec).to(dt)
    z = None if zero is None else zero.unsqueeze(-1).to(dt)
    q = _codes(xg, scale.unsqueeze(-1).to(dt), z, spec).to(spec.code_dtype).reshape(x.shape)
    return QuantizedTensor(q, scale, None if zero is None else zero.to(torch.uint8), spec)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(q - zero) * scale`` group by group, returned in ``dtype``."""
    dt = torch.float64 if dtype == torch.float64 else torch.float32
    qg = _grouped(
        qt.q.to(dt), QuantSpec(qt.spec.bits, qt.spec.symmetric, qt.q.shape[-1] // qt.scale.shape[-1])
    )
    if qt.zero is not None:
        qg = qg - qt.zero.to(dt).unsqueeze(-1)
    return (qg * qt.scale.to(dt).unsqueeze(-1)).reshape(qt.q.shape).to(dtype)


def fake_quantize(x: Tensor, spec: QuantSpec, clip_ratio: float | Tensor | None = None) -> Tensor:
    """Quantize-dequantize in x's dtype (computed in float32 for 16-bit inputs, float64 for float64)."""
    dt = _compute_dtype(x)
    xg = _grouped(x, spec).to(dt)
    scale, zero = _qparams_grouped(
        xg, spec, _clip_tensor(spec.clip_ratio if clip_ratio is None else clip_ratio, xg)
    )
    q = _codes(xg, scale, zero, spec)
    if zero is not None:
        q = q - zero
    return (q * scale).reshape(x.shape).to(x.dtype)


def fake_quantize_per_token(x: Tensor, bits: int = 4, clip_ratio: float = 0.9) -> Tensor:
    """Dynamic symmetric per-token fake quantization of activations ``[..., hidden]``."""
    return fake_quantize(x, activation_spec(bits, clip_ratio))


def mse_clip_search(
    w: Tensor,
    spec: QuantSpec,
    grid: Sequence[float] = DEFAULT_CLIP_GRID,
    norm: float = DEFAULT_CLIP_NORM,
) -> Tensor:
    """Per-group clip ratio ``[..., n_groups]`` from ``grid`` minimizing ``sum |w - fq(w)|^norm`` over each group.

    Ties keep the earlier grid entry, so with 1.0 first the result is never worse than no clipping.
    """
    if len(grid) == 0 or any(not 0.0 < float(c) <= 1.0 for c in grid):
        raise ValueError(f"clip grid must be non-empty with ratios in (0, 1], got {tuple(grid)}")
    if norm <= 0:
        raise ValueError(f"norm must be positive, got {norm}")
    if w.ndim >= 2:  # cache-sized row blocks: same result, much faster on big matrices
        rows = max(1, CLIP_SEARCH_CHUNK // max(1, w[0].numel()))
        if w.shape[0] > rows:
            return torch.cat([mse_clip_search(block, spec, grid, norm) for block in w.split(rows)])
    wg = _grouped(w, spec).to(_compute_dtype(w))
    best_err = torch.full(wg.shape[:-1], math.inf, dtype=wg.dtype, device=wg.device)
    best_clip = torch.ones(wg.shape[:-1], dtype=torch.float32, device=wg.device)
    for c in grid:
        scale, zero = _qparams_grouped(wg, spec, float(c))
        q = _codes(wg, scale, zero, spec)
        deq = (q - zero if zero is not None else q) * scale
        err = (wg - deq).abs().pow(norm).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_clip = torch.where(better, torch.full_like(best_clip, float(c)), best_clip)
    return best_clip


def quantize_weight_rtn(w: Tensor, spec: QuantSpec, clip_search: bool = True) -> QuantizedTensor:
    """Round-to-nearest weight quantization of ``[out, in]``; ``clip_search`` replaces ``spec.clip_ratio``."""
    if w.ndim != 2:
        raise ValueError(f"weights must be 2-D [out, in], got shape {tuple(w.shape)}")
    clip = mse_clip_search(w, spec) if clip_search else None
    return quantize(w, spec, clip)


def sqnr_db(ref: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|ref|^2 / |ref - approx|^2)`` in dB (inf if exact)."""
    if ref.shape != approx.shape:
        raise ValueError(f"sqnr_db: shapes differ, {tuple(ref.shape)} vs {tuple(approx.shape)}")
    r = ref.detach().to(torch.float64)
    signal = float(r.pow(2).sum())
    if signal == 0.0:
        raise ValueError("sqnr_db: the reference is all zeros, SQNR is undefined; pass a non-zero reference")
    noise = float((r - approx.detach().to(torch.float64)).pow(2).sum())
    return math.inf if noise == 0.0 else 10.0 * math.log10(signal / noise)
