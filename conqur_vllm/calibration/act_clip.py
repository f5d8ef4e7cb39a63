"""Choose the activation clip ratio from calibration data (``a_clip="auto"``).

Per-token INT-b activations use ``scale = clip * absmax / qmax`` (asymmetric: ``clip * (max - min) / (2^b - 1)``,
the range widened to include 0). A ratio below 1 trades a clipping error on the
few largest entries of a token for a finer grid on all the others. The served format has one ratio for every
decoder linear input, so one is chosen: the grid value with the least quantization error summed over all input
sites, each site's error being the mean over tokens of ``|Q(x) - x|^2 / |x|^2`` on one calibration batch of the
rotated model (what the served quantizer sees, after the online R4 at the down_proj input).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from conqur_vllm import fake_quant
from conqur_vllm.quant import activation_spec, fake_quantize

ACT_CLIP_GRID: tuple[float, ...] = tuple(round(1.0 - 0.05 * i, 2) for i in range(9))  # 1.0 .. 0.6


@dataclass
class ClipChoice:
    """The chosen ratio and, per grid value, the summed relative error over all sites."""

    clip: float
    errors: dict[float, float]

    def to_dict(self) -> dict:
        return {"chosen": self.clip, "relative_error_by_clip": {str(c): e for c, e in self.errors.items()}}


class _ErrorProbe:
    """Stands in for one linear's activation quantizer: adds each grid ratio's error, passes ``x`` on unchanged.

    Linears that read the same tensor (q/k/v, gate/up) each count as a site; its errors are computed once."""

    def __init__(self, totals: torch.Tensor, bits: int, grid: tuple[float, ...], symmetric: bool = True) -> None:
        self.totals, self.bits, self.grid, self.symmetric = totals, bits, grid, symmetric
        self.last_input: torch.Tensor | None = None
        self.last_errors = torch.zeros_like(totals)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self.last_input:
            rows = x.detach().reshape(-1, x.shape[-1]).float()
            energy = rows.pow(2).sum(-1).clamp_min(1e-30)
            for i, clip in enumerate(self.grid):
                err = (fake_quantize(rows, activation_spec(self.bits, clip, self.symmetric)) - rows).pow(2).sum(-1)
                self.last_errors[i] = (err / energy).mean(dtype=torch.float64)
            self.last_input = x
        self.totals += self.last_errors
        return x


def choose_activation_clip(model: nn.Module, ids: torch.Tensor, bits: int,
                           grid: tuple[float, ...] = ACT_CLIP_GRID, symmetric: bool = True) -> ClipChoice:
    """Run ``ids`` through ``model`` (decoder linears wrapped by :func:`fake_quant.install`, activations in full
    precision) and return the grid ratio with the least summed relative quantization error."""
    linears = [m for m in model.modules() if isinstance(m, fake_quant.QuantLinear)]
    if not linears:
        raise ValueError("choose_activation_clip needs a model whose decoder linears are wrapped (apply_rotations)")
    totals = torch.zeros(len(grid), dtype=torch.float64)
    saved = [m.act for m in linears]
    probe = _ErrorProbe(totals, bits, grid, symmetric)
    try:
        for m in linears:
            m.act = probe
        with torch.no_grad():
            model.get_decoder()(ids, use_cache=False)
    finally:
        probe.last_input = None
        for m, act in zip(linears, saved, strict=True):
            m.act = act
    best = int(torch.argmin(totals))
    return ClipChoice(clip=grid[best], errors={c: float(e) for c, e in zip(grid, totals, strict=True)})
