"""ConQuR's rotation rule: align normalized vectors with the corners of the inscribed hypercube.

Row-vector convention (as in :mod:`conqur_vllm.rotation.fuse`): a site's rotated vector is ``z = u R``. The
nearest corner is ``c = sign(z) / sqrt(d)`` (sign(0) = +1) and, for fixed corners, ``min_R sum_i |u_i R - c_i|^2``
over orthogonal R is solved by ``R = U V^T`` from the SVD ``M = sum_i u_i^T c_i = U S V^T`` (orthogonal
Procrustes). :class:`CornerSite` keeps only the d x d float64 accumulator M, never the vectors. The same
alternation works for any target map z -> t(z); :func:`grid_target` puts the targets on the INT-b grid of the
quantizer that will read ``z`` (the corner is its 1-bit special case).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from conqur_vllm.quant import QuantSpec, fake_quantize

Target = Callable[[Tensor], Tensor]


def normalize_rows(x: Tensor, eps: float = 1e-12, dtype: torch.dtype = torch.float64) -> Tensor:
    """u = x / |x| over the last dim, flattened to [n, d] (float64 by default; float32 halves the cost of the
    big products, whose d x d results are still accumulated in float64)."""
    x = x.detach().reshape(-1, x.shape[-1]).to(dtype)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def corners(z: Tensor) -> Tensor:
    """Nearest corners ``sign(z)/sqrt(d)`` (sign(0) = +1) of rotated unit vectors z [n, d]."""
    inv = 1.0 / z.shape[-1] ** 0.5
    return (z >= 0).to(z.dtype).mul_(2.0 * inv).sub_(inv)


def grid_target(spec: QuantSpec) -> Target:
    """Targets on the quantizer's own grid: ``z -> fake_quantize(z, spec)`` (INT-b codes times the row's scale).

    Procrustes towards these minimizes the quantization error the served quantizer makes on ``z R`` for fixed
    codes and scales, instead of the distance to the hypercube's corners (the 1-bit grid).
    """
    return lambda z: fake_quantize(z, spec)


def target_objective(z: Tensor, target: Target, weights: Tensor | None = None) -> float:
    """Mean ``|z - target(z)|^2`` of rotated rows z (optionally weighted)."""
    err = (z - target(z)).pow(2).sum(-1, dtype=torch.float64)
    if weights is None:
        return float(err.mean())
    return float((err * weights).sum() / weights.sum())


def corner_objective(u: Tensor, r: Tensor, weights: Tensor | None = None) -> float:
    """Mean ``|u R - c|^2`` with c the nearest corners (= 2 - 2/sqrt(d) * mean |u R|_1 for unit u)."""
    z = u @ r.to(u.dtype)
    err = (z - corners(z)).pow(2).sum(-1)
    if weights is None:
        return float(err.mean())
    return float((err * weights).sum() / weights.sum())


def _objective_of_rotated(z: Tensor, weights: Tensor | None) -> float:
    """:func:`corner_objective` from ``z = u R`` of unit rows u: ``|z - c|^2 = 2 - 2 |z|_1 / sqrt(d)``."""
    err = 2.0 - z.abs().sum(-1, dtype=torch.float64) * (2.0 / z.shape[-1] ** 0.5)
    if weights is None:
        return float(err.mean())
    return float((err * weights).sum() / weights.sum())


def procrustes(m: Tensor) -> Tensor:
    """The orthogonal R maximizing tr(R^T M): U V^T from the SVD of M (float64; batched over leading dims)."""
    u, _, vh = torch.linalg.svd(m.to(torch.float64))
    return u @ vh


def corner_moment(u: Tensor, r: Tensor, weights: Tensor | None = None, target: Target = corners) -> Tensor:
    """``sum_i w_i u_i^T c_i`` for the targets (default: corners) of ``u R`` (d x d, float64)."""
    c = target(u @ r.to(u.dtype))
    if weights is not None:
        c = c * weights[:, None].to(c.dtype)
    return (u.T @ c).to(torch.float64)


@dataclass
class CornerSite:
    """One rotation site's online state: R, the accumulated moment M and the objective history.

    A stack of independent sites of one size (e.g. every layer's and KV head's R2) is one ``CornerSite`` whose
    ``rotation`` is ``[S, d, d]`` and whose updates take ``u`` as ``[S, n, d]``: batched products and SVDs, the
    same result as S separate sites; the objectives it returns are means over all S sites.
    """

    rotation: Tensor
    accumulate: str = "sum"  # "sum" or "ema"
    decay: float = 0.5
    target: Target = corners  # where rotated vectors should land (corners = the ConQuR rule)
    extra_target: Target = corners  # the same for ``extra_u`` rows
    moment: Tensor | None = None
    history: list[float] = field(default_factory=list)

    def update(self, u: Tensor, *, weights: Tensor | None = None, extra_u: Tensor | None = None,
               extra_scale: float = 0.0, alternations: int = 1) -> tuple[float, float]:
        """Fold one mini-batch of unit vectors (original coordinates) into M and re-solve R.

        ``extra_u`` (e.g. normalized weight rows that R rotates the same way) joins the objective with a total
        weight ``extra_scale``. Returns the batch objective before and after (activations only).
        """
        r = self.rotation
        z = u @ r.to(u.dtype)
        before = self._objective(z, weights)
        batch_moment = None
        for _ in range(alternations):
            c = self.target(z)
            if weights is not None:
                c = c * weights[:, None].to(c.dtype)
            batch_moment = (u.mT @ c).to(torch.float64)
            if extra_u is not None and extra_scale > 0:
                extra = corner_moment(extra_u, r, target=self.extra_target)
                batch_moment = batch_moment + extra_scale / extra_u.shape[0] * extra
            r = procrustes(self._combined(batch_moment))
            z = u @ r.to(u.dtype)
        self.moment = self._combined(batch_moment)
        self.rotation = r
        after = self._objective(z, weights)
        self.history.append(after)
        return before, after

    def _objective(self, z: Tensor, weights: Tensor | None) -> float:
        if self.target is corners:
            return _objective_of_rotated(z, weights)
        return target_objective(z, self.target, weights)

    def _combined(self, batch_moment: Tensor) -> Tensor:
        if self.moment is None:
            return batch_moment
        if self.accumulate == "ema":
            return self.decay * self.moment + (1.0 - self.decay) * batch_moment
        return self.moment + batch_moment
