"""Choose activation clip ratios from calibration data: one for the model (``a_clip="auto"``), one per layer
and input group (``layer_clips``).

Per-token INT-b activations use ``scale = clip * absmax / qmax`` (asymmetric: ``clip * (max - min) / (2^b - 1)``,
the range widened to include 0). A ratio below 1 trades a clipping error on the
few largest entries of a token for a finer grid on all the others. The served format has one ratio for every
decoder linear input, so one is chosen: the grid value with the least quantization error summed over all input
sites, each site's error being the mean over tokens of ``|Q(x) - x|^2 / |x|^2`` on one calibration batch of the
rotated model (what the served quantizer sees, after the online R4 at the down_proj input).

Per layer and input group (q/k/v, o_proj, gate/up, down_proj: the linears that read one quantized tensor), the
ratio is the grid value with the least relative error of the group's outputs, ``|(Q(x) - x) W^T|^2 /
|x W^T|^2`` over calibration tokens: what the quantizer's error costs the linear, not the input itself. The
checkpoint lists these ratios (``activations.input_clip_ratios``); the model-wide ratio stays the fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from conqur_vllm import fake_quant
from conqur_vllm.calibration.smooth import evenly_spaced_rows
from conqur_vllm.config import LINEAR_INPUT_GROUP
from conqur_vllm.models.adapters import ModelAdapter
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
    probe = _ErrorProbe(totals, bits, grid, symmetric)
    with fake_quant.quantizers_restored(model) as saved, torch.no_grad():
        saved.use(probe)
        model.get_decoder()(ids, use_cache=False)
    probe.last_input = None
    best = int(torch.argmin(totals))
    return ClipChoice(clip=grid[best], errors={c: float(e) for c, e in zip(grid, totals, strict=True)})


@dataclass
class InputClips:
    """Chosen ratio and relative output error (chosen / the model-wide ratio's) per ``layer.group``."""

    clips: dict[str, float]
    error_ratio: dict[str, float]

    def report(self) -> dict:
        return {"clip": self.clips, "error_ratio": {k: round(v, 4) for k, v in self.error_ratio.items()}}


class _InputRecorder:
    """Stands in for a linear's activation quantizer: keeps at most ``max_rows`` evenly spaced rows of what it
    would quantize (after R4 and the shift) and passes ``x`` on unchanged."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows, self.rows = max_rows, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.rows = evenly_spaced_rows(x, self.max_rows)
        return x


def input_group_key(layer_index: int, path: str) -> str:
    """``"{layer}.{group}"`` of a decoder linear (``path`` inside the layer, e.g. ``self_attn.q_proj``)."""
    return f"{layer_index}.{LINEAR_INPUT_GROUP[path.rsplit('.', 1)[-1]]}"


def _input_groups(model: nn.Module, adapter: ModelAdapter) -> list[tuple[str, list[fake_quant.QuantLinear]]]:
    """``(layer.group key, the group's wrapped linears)`` for every decoder layer."""
    return [(input_group_key(li, group[0]), [layer.get_submodule(p) for p in group])
            for li, layer in enumerate(adapter.decoder_layers(model)) for group in adapter.input_groups]


def choose_input_clips(model: nn.Module, adapter: ModelAdapter, ids: torch.Tensor, bits: int, symmetric: bool,
                       default: float, grid: tuple[float, ...] = ACT_CLIP_GRID, max_rows: int = 1024) -> InputClips:
    """Run ``ids`` through ``model`` (activations in full precision, shifts installed) and choose each layer's and
    input group's ratio by the group's relative output error (full-precision weights); ``default``: the
    model-wide ratio the errors are reported against."""
    groups = _input_groups(model, adapter)
    recorders = {key: _InputRecorder(max_rows) for key, _ in groups}
    with fake_quant.quantizers_restored(model) as saved, torch.no_grad():
        saved.use(fake_quant.ActQuant(bits=None))
        for key, linears in groups:
            linears[0].act = recorders[key]
        model.get_decoder()(ids, use_cache=False)
    out = InputClips({}, {})
    for key, linears in groups:
        x = recorders[key].rows
        weight = torch.cat([m.linear.weight.detach().float() for m in linears])
        energy = max(float((x @ weight.T).pow(2).sum(dtype=torch.float64)), 1e-30)
        errors = {c: float(((fake_quantize(x, activation_spec(bits, c, symmetric)) - x) @ weight.T)
                           .pow(2).sum(dtype=torch.float64)) / energy for c in (*grid, default)}
        best = min(grid, key=errors.__getitem__)
        out.clips[key] = best
        out.error_ratio[key] = errors[best] / max(errors[default], 1e-30)
    return out


def install_input_clips(model: nn.Module, adapter: ModelAdapter, clips: dict[str, float]) -> None:
    """Give each listed group's linears its own ratio (their activation quantizers keep bits and symmetry)."""
    for key, linears in _input_groups(model, adapter):
        if key in clips:
            for m in linears:
                m.act = fake_quant.ActQuant(bits=m.act.bits, clip_ratio=clips[key], symmetric=m.act.symmetric)
