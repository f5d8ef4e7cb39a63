"""Activation shifts (``a_shift``): quantize each linear input around its calibration mean.

After RMSNorm and R1, the inputs of q/k/v and gate/up share a large common component: on SmolLM2 the mean over
tokens carries about half of their energy (layer medians 0.50 and 0.51; 0.21 at the o_proj input; measured by
``benchmarks/input_means.py``). A per-token quantizer spends its range on that component for every token. With a shift mu per input (the mean over one calibration batch, in the basis
the linear sees) the quantizer reads ``x - mu`` and the linear adds ``W mu`` back as a bias, so the function is
unchanged up to the quantization error, which shrinks. The down_proj input (after R4) is left alone: its mean
carries a median 5% of its energy there, and its online Hadamard stays fused with the quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from conqur_vllm import fake_quant
from conqur_vllm.config import LINEAR_INPUT_GROUP
from conqur_vllm.models.adapters import ModelAdapter

SHIFTED_GROUPS: tuple[str, ...] = ("qkv", "o_proj", "gate_up")


def shifted_linears(adapter: ModelAdapter, groups: tuple[str, ...] = SHIFTED_GROUPS) -> tuple[str, ...]:
    """The adapter paths (inside a decoder layer) of the linears whose inputs are shifted."""
    return tuple(p for p in adapter.linears if LINEAR_INPUT_GROUP.get(p.rsplit(".", 1)[-1]) in groups)


@dataclass
class InputShifts:
    """The shifted input groups, the shifts by module name, and the share of its input's energy each removes
    (|mu|^2 / mean |x|^2). No shifts: no groups."""

    groups: tuple[str, ...] = ()
    shifts: dict[str, torch.Tensor] = field(default_factory=dict)
    energy_share: dict[str, float] = field(default_factory=dict)

    def report(self) -> dict:
        """What ``calibration_report.json`` says: the groups, and the energy share per layer and group."""
        return {"groups": list(self.groups),
                "mean_energy_share": {name: round(v, 4) for name, v in self.energy_share.items()}}


class MeanRecorder:
    """Sums the rows (last dim) it sees in float64 and passes them on unchanged: stands in for a linear's
    activation quantizer here, observes keys in ``kv_shift``."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.energy = 0.0
        self.count = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.detach().reshape(-1, x.shape[-1])
        part = rows.sum(0, dtype=torch.float64)
        self.total = part if self.total is None else self.total + part
        self.energy += float(rows.pow(2).sum(dtype=torch.float64))
        self.count += rows.shape[0]
        return x

    def mean(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("nothing reached this recorder during the shift measurement")
        return self.total / self.count

    def energy_share(self) -> float:
        return float(self.mean().pow(2).sum()) / max(self.energy / self.count, 1e-30)


def measure_input_shifts(model: nn.Module, adapter: ModelAdapter, ids: torch.Tensor,
                         groups: tuple[str, ...] = SHIFTED_GROUPS) -> InputShifts:
    """Mean input (after any online transform) of every shifted linear, full-precision forward of ``ids``.

    Keys are module names (``model.layers.0.self_attn.q_proj``); linears that read one tensor get the same
    vector. Shifts already installed are ignored (the means are of the unshifted inputs).
    """
    paths = shifted_linears(adapter, groups)
    recorders: dict[str, MeanRecorder] = {}
    modules: dict[str, fake_quant.QuantLinear] = {}
    for name, module in model.named_modules():
        if isinstance(module, fake_quant.QuantLinear) and any(name.endswith("." + p) for p in paths):
            modules[name] = module
    if not modules:
        raise ValueError("measure_input_shifts needs a model whose decoder linears are wrapped (apply_rotations)")
    with fake_quant.quantizers_restored(model) as saved, torch.no_grad():
        saved.use(fake_quant.ActQuant(bits=None))
        for m in saved.shifts:
            m.input_shift = None
        for name, m in modules.items():
            m.act = recorders[name] = MeanRecorder()
        model.get_decoder()(ids, use_cache=False)
    return InputShifts(groups=tuple(groups),
                       shifts={name: rec.mean().to(torch.float32) for name, rec in recorders.items()},
                       energy_share={name: rec.energy_share() for name, rec in recorders.items()})


def install_input_shifts(model: nn.Module, shifts: dict[str, torch.Tensor]) -> None:
    """Set each named linear's ``input_shift``; every other wrapped linear gets none."""
    for name, module in model.named_modules():
        if isinstance(module, fake_quant.QuantLinear):
            shift = shifts.get(name)
            module.input_shift = None if shift is None else shift.to(module.linear.weight.device)
