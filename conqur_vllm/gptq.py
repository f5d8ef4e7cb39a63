"""GPTQ weight quantization (block 128, damping 0.01, act-order off) with a streamed Hessian.

:class:`HessianAccumulator` adds ``2 x^T x`` of each batch of inputs (never storing them); :func:`gptq_quantize`
quantizes one ``[out, in]`` weight column by column against that Hessian, on a fixed grid (scales from the
original weight with MSE clip search, per channel or per group), so the result is stored exactly like RTN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from conqur_vllm.quant import QuantizedTensor, QuantSpec, compute_qparams, mse_clip_search


class HessianAccumulator:
    """Running ``H = 2/n sum x x^T`` over the rows of streamed inputs ``[..., in_features]`` (float64)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: Tensor) -> None:
        """Fold one batch in: the batch's ``x^T x`` is computed in the input's precision (float32 GEMMs are
        cheaper than float64 and GPTQ's damping dwarfs their rounding), the running sum in float64."""
        x = x.detach().reshape(-1, x.shape[-1])
        if x.dtype != torch.float64:
            x = x.float()
        n = x.shape[0]
        self.hessian *= self.count / (self.count + n)
        self.count += n
        self.hessian += (x.T @ x).to(torch.float64) * (2.0 / self.count)


class CrossAccumulator(HessianAccumulator):
    """``H`` of the inputs the quantized model feeds a linear and the cross moment ``C = 2/n sum x_ref x^T`` with
    the full-precision model's inputs at the same tokens, for GPTQ's asymmetric target (:func:`fp_target_weight`).
    With ``residual_error`` batches it also keeps ``E = 2/n sum e x^T`` (``[out, in]``), ``e`` the error of the
    residual stream the linear's output is added to (reference minus quantized) at the same tokens.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        super().__init__(in_features, device)
        self.cross = torch.zeros_like(self.hessian)
        self.residual: Tensor | None = None

    def add_pair(self, x_ref: Tensor, x: Tensor, residual_error: Tensor | None = None) -> None:
        """Fold in one batch: ``x`` what the quantized model feeds the weight, ``x_ref`` the reference model's,
        ``residual_error`` (optional, ``[..., out]``) the residual stream's error at the same tokens."""
        dtype = torch.float64 if x.dtype == x_ref.dtype == torch.float64 else torch.float32  # as ``add``
        x_ref = x_ref.detach().reshape(-1, x_ref.shape[-1]).to(dtype)
        x_flat = x.detach().reshape(-1, x.shape[-1]).to(dtype)
        n = x_ref.shape[0]
        self.cross *= self.count / (self.count + n)
        self.cross += (x_ref.T @ x_flat).to(torch.float64) * (2.0 / (self.count + n))
        if residual_error is not None:
            e = residual_error.detach().reshape(n, -1).to(dtype)
            if self.residual is None:
                if self.count:
                    raise ValueError("residual_error must come with every batch or with none")
                self.residual = torch.zeros(e.shape[1], x_flat.shape[1], dtype=torch.float64, device=x_flat.device)
            self.residual *= self.count / (self.count + n)
            self.residual += (e.T @ x_flat).to(torch.float64) * (2.0 / (self.count + n))
        elif self.residual is not None:
            raise ValueError("residual_error must come with every batch or with none")
        self.add(x)


GPTQ_DAMP = 0.01  # GPTQ's damping of H (x mean diag H), as in the reference implementation
TARGET_DAMP = 3.0  # measured: ridge 1-3 wins on the selection text, 0.1 overfits, 10 drifts back to W


def fp_target_weight(w: Tensor, hessian: Tensor, cross: Tensor, damp: float = TARGET_DAMP,
                     residual: Tensor | None = None) -> Tensor:
    """The weight that best maps the quantized model's inputs onto the reference outputs, kept near ``w`` where
    the inputs say little: ``argmin_V sum ||V x - W x_ref||^2 + lam ||V - W||^2 = W (C + lam I)(H + lam I)^-1``
    with ``lam = damp * mean(diag H)`` (float64). GPTQ of this weight against ``H`` then minimizes
    ``sum ||Q x - V x||^2``, which differs from ``sum ||Q x - W x_ref||^2`` by a constant when ``lam = 0`` (the
    least-squares residual is orthogonal to the inputs); the ridge trades that exactness for generalization.
    With ``residual`` (``E`` of :class:`CrossAccumulator`) the outputs also aim at the residual stream's error,
    target ``W x_ref + e``: ``V (H + lam I) = W (C + lam I) + E``."""
    h = hessian.to(torch.float64)
    lam = damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    rhs = w.to(torch.float64) @ (cross.to(torch.float64) + lam)  # [out, in]; V (H + lam) = W (C + lam)
    if residual is not None:
        rhs = rhs + residual.to(torch.float64)
    return torch.linalg.solve(h + lam, rhs.T).T


def gptq_quantize(w: Tensor, hessian: Tensor, spec: QuantSpec, *, block_size: int = 128,
                  damp: float = GPTQ_DAMP, clip_search: bool = True) -> QuantizedTensor:
    """Quantize ``w`` [out, in] with GPTQ error feedback; returns codes and the (fixed) grid's scales."""
    if w.ndim != 2 or hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"GPTQ needs w [out, in] and H [in, in]; got {tuple(w.shape)} and {tuple(hessian.shape)}")
    w = w.detach().to(torch.float64).clone()
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    # the grid is chosen on the float32 weight, exactly as RTN chooses it
    clip = mse_clip_search(w.float(), spec) if clip_search else None
    scale, zero = compute_qparams(w, spec, clip)  # [out, n_groups]
    group = spec.group_size or w.shape[1]
    col_group = torch.arange(w.shape[1], device=w.device) // group

    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    hinv = _upper_cholesky_of_inverse(h)

    # the column sweep runs in float32 like the reference GPTQ (the Cholesky factor is computed in float64);
    # per-column grid (scale, zero) so the inner loop is a handful of vector ops
    w, hinv = w.float(), hinv.float()
    s_cols = scale.float()[:, col_group]
    z_cols = None if zero is None else zero.float()[:, col_group]
    q = torch.empty_like(w)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the column loop is many tiny ops: threads only add overhead
    try:
        _gptq_columns(w, q, hinv, s_cols, z_cols, float(spec.qmin), float(spec.qmax), block_size)
    finally:
        torch.set_num_threads(threads)
    return QuantizedTensor(q.to(spec.code_dtype), scale, None if zero is None else zero.to(torch.uint8), spec)


def gptq_rows(weight: Tensor, hessian: Tensor, spec: QuantSpec, *, clip_search: bool,
              rows: int = 8192) -> QuantizedTensor:
    """GPTQ of a tall matrix in blocks of ``rows`` output rows (rows are independent under one Hessian), so the
    working copies stay small for a 49k-row LM head."""
    parts = [gptq_quantize(block.float(), hessian, spec, clip_search=clip_search) for block in weight.split(rows)]
    zero = None if parts[0].zero is None else torch.cat([p.zero for p in parts])
    return QuantizedTensor(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), zero, spec)


def _gptq_columns(w: Tensor, q: Tensor, hinv: Tensor, s_cols: Tensor, z_cols: Tensor | None, qmin: float,
                  qmax: float, block_size: int) -> None:
    """The GPTQ column sweep: writes codes into ``q`` and propagates the error through ``w`` in place."""
    cols = w.shape[1]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        s1 = s_cols[:, i1:i2]
        z1 = None if z_cols is None else z_cols[:, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            codes = torch.round(col / s1[:, i])
            if z1 is not None:
                codes += z1[:, i]
            codes.clamp_(qmin, qmax)
            q[:, i1 + i] = codes
            deq = (codes - z1[:, i]) * s1[:, i] if z1 is not None else codes * s1[:, i]
            e = (col - deq) / hinv1[i, i]
            w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1.0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]


def _upper_cholesky_of_inverse(h: Tensor) -> Tensor:
    """Upper Cholesky factor of H^-1, adding damping until H is positive definite."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    extra = 0.0
    for _ in range(8):
        lower, info = torch.linalg.cholesky_ex(h + extra * eye)
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        extra = max(extra * 10, 1e-6 * float(torch.mean(torch.diag(h))))
    raise RuntimeError("GPTQ: the Hessian is not positive definite even after extra damping; use more samples")
