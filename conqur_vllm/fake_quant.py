"""Simulated (fake-quantized) W/A/KV quantization of a Hugging Face decoder, for evaluation and calibration.

:func:`install` wraps every decoder linear in a :class:`QuantLinear` (online transform, then per-token activation
fake-quant, then the linear) and switches attention to ``conqur_sdpa``, which applies R3 (Hadamard on Q and K
after RoPE), subtracts the layer's key shift (``conqur_key_shift``) if one is installed, and fake-quantizes K and
V per token per head. Weights are quantized separately (RTN or GPTQ) by replacing ``QuantLinear.linear.weight``
with its dequantized values. Every part is switchable on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from conqur_vllm.hadamard import hadamard_transform
from conqur_vllm.models.adapters import ModelAdapter
from conqur_vllm.quant import QuantSpec, dequantize, fake_quantize, quantize_weight_rtn

ATTN_IMPL = "conqur_sdpa"


@dataclass(frozen=True)
class ActQuant:
    """Per-token activation fake-quant, symmetric or asymmetric (a zero point per token; bits None = off)."""

    bits: int | None = 4
    clip_ratio: float = 0.9
    symmetric: bool = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits is None or self.bits >= 16:
            return x
        return fake_quantize(x, QuantSpec(bits=self.bits, symmetric=self.symmetric, clip_ratio=self.clip_ratio))


@dataclass(frozen=True)
class KVQuant:
    """Per-token, per-head KV fake-quant (bits None = off)."""

    bits: int | None = 4
    symmetric: bool = False
    clip_ratio: float = 0.95
    group_size: int | None = None  # None = head_dim

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits is None or self.bits >= 16:
            return x
        spec = QuantSpec(bits=self.bits, symmetric=self.symmetric, group_size=self.group_size,
                         clip_ratio=self.clip_ratio)
        return fake_quantize(x, spec)


class QuantLinear(nn.Module):
    """``linear(act_quant(online(x)))``; ``online`` is the run-time side of a fused rotation (e.g. R4).

    With an ``input_shift`` mu (a buffer, saved with the model) the quantizer reads ``online(x) - mu`` and mu is
    added back before the weight: ``W (Q(x - mu) + mu)``, i.e. ``W Q(x - mu)`` plus the bias ``W mu``, as served.
    """

    def __init__(self, linear: nn.Linear, act: ActQuant, online_block: int | None = None,
                 online: bool = False) -> None:
        super().__init__()
        self.linear = linear
        self.act = act
        self.online = online
        self.online_block = online_block
        self.weight_override: torch.Tensor | None = None  # e.g. fake-quantized weights during calibration
        self.weight_quant: QuantSpec | None = None  # RTN (absmax) fake-quant of the weight at every forward
        self.input_observer: Callable[[torch.Tensor], None] | None = None  # sees what the weight multiplies
        self.register_buffer("input_shift", None)

    @property
    def weight(self) -> nn.Parameter:
        return self.linear.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.linear.bias

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the weight matrix multiplies: online transform then activation fake-quant."""
        if self.online:
            x = hadamard_transform(x, self.online_block)
        shift = self.input_shift
        if shift is None:
            return self.act(x)
        return self.act(x - shift.to(x.dtype)) + shift.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.linear.weight if self.weight_override is None else self.weight_override
        if self.weight_quant is not None:
            qt = quantize_weight_rtn(weight.detach().float(), self.weight_quant, clip_search=False)
            weight = dequantize(qt, torch.float32).to(weight.dtype)
        x = self.transform_input(x)
        if self.input_observer is not None:
            self.input_observer(x)
        return F.linear(x, weight, self.linear.bias)


def _conqur_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    settings: AttentionSim | None = getattr(module, "conqur_attention", None)
    if settings is not None:
        if settings.r3:
            query = hadamard_transform(query)
            key = hadamard_transform(key)
        observer = getattr(module, "conqur_key_observer", None)
        if observer is not None:
            observer(key)
        shift = getattr(module, "conqur_key_shift", None)  # [kv_heads, head_dim]: softmax ignores it (key shifts)
        if shift is not None:
            key = key - shift.to(key.dtype)[:, None, :]
        key = settings.kv(key)
        value = settings.kv(value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPL, _conqur_attention)
AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)


@dataclass(frozen=True)
class AttentionSim:
    """What the attention simulates: R3 online Hadamard on Q/K after RoPE, then KV fake-quant."""

    r3: bool = False
    kv: KVQuant = KVQuant(bits=None)


def install(model: nn.Module, adapter: ModelAdapter, *, act: ActQuant = ActQuant(bits=None),
            attention: AttentionSim = AttentionSim(), r4: bool = False, r4_block: int | None = None) -> None:
    """Wrap the decoder linears and route attention through ``conqur_sdpa`` (idempotent: re-install updates)."""
    for layer in adapter.decoder_layers(model):
        for path in adapter.linears:
            parent_path, _, name = path.rpartition(".")
            parent = layer.get_submodule(parent_path)
            current = getattr(parent, name)
            is_down = path == adapter.down_proj
            linear = current.linear if isinstance(current, QuantLinear) else current
            wrapped = QuantLinear(linear, act, online_block=r4_block if is_down else None, online=r4 and is_down)
            if isinstance(current, QuantLinear):
                wrapped.input_shift = current.input_shift
            setattr(parent, name, wrapped)
        layer.get_submodule(adapter.attention).conqur_attention = attention
    model.config._attn_implementation = ATTN_IMPL
    text_config = getattr(model.config, "text_config", None)
    if text_config is not None:
        text_config._attn_implementation = ATTN_IMPL


def set_activation_quant(model: nn.Module, act: ActQuant) -> None:
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.act = act


def set_attention(model: nn.Module, adapter: ModelAdapter, attention: AttentionSim) -> None:
    for layer in adapter.decoder_layers(model):
        layer.get_submodule(adapter.attention).conqur_attention = attention


_ATTENTION_STATE = ("conqur_attention", "conqur_key_shift", "conqur_key_observer")


@dataclass
class SavedQuantizers:
    """Every wrapped linear's activation quantizer and input shift and, when an adapter is given, every decoder
    layer's attention simulation, key shift and key observer, as they were when saved.

    Calibration stages swap these for probes or switch quantization off; :meth:`restore` (or
    :func:`quantizers_restored`) puts them all back."""

    acts: dict[QuantLinear, Callable[[torch.Tensor], torch.Tensor]]
    shifts: dict[QuantLinear, torch.Tensor | None]
    attention: list[nn.Module] = field(default_factory=list)
    attention_state: list[tuple] = field(default_factory=list)

    @classmethod
    def of(cls, model: nn.Module, adapter: ModelAdapter | None = None) -> SavedQuantizers:
        linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
        attention = [] if adapter is None else [layer.get_submodule(adapter.attention)
                                                for layer in adapter.decoder_layers(model)]
        return cls(acts={m: m.act for m in linears}, shifts={m: m.input_shift for m in linears},
                   attention=attention,
                   attention_state=[tuple(getattr(a, k, None) for k in _ATTENTION_STATE) for a in attention])

    @property
    def simulations(self) -> list[AttentionSim | None]:
        """The saved attention simulations, one per decoder layer."""
        return [state[0] for state in self.attention_state]

    def use(self, acts: Mapping[QuantLinear, Callable] | Callable | None = None,
            simulations: list[AttentionSim | None] | None = None) -> None:
        """Set every saved linear's activation quantizer (one callable for all, or one per linear) and, when
        given, every layer's attention simulation."""
        if acts is not None:
            for m in self.acts:
                m.act = acts[m] if isinstance(acts, Mapping) else acts
        if simulations is not None:
            for a, sim in zip(self.attention, simulations, strict=True):
                a.conqur_attention = sim

    def restore(self) -> None:
        for m, act in self.acts.items():
            m.act, m.input_shift = act, self.shifts[m]
        for a, state in zip(self.attention, self.attention_state, strict=True):
            for key, value in zip(_ATTENTION_STATE, state, strict=True):
                setattr(a, key, value)


@contextmanager
def quantizers_restored(model: nn.Module, adapter: ModelAdapter | None = None) -> Iterator[SavedQuantizers]:
    """Save the model's quantizers (:class:`SavedQuantizers`), let the body change them, restore them on exit,
    after an error too."""
    saved = SavedQuantizers.of(model, adapter)
    try:
        yield saved
    finally:
        saved.restore()


def quant_linears(layer: nn.Module, adapter: ModelAdapter) -> dict[str, QuantLinear]:
    """The wrapped linears of one decoder layer, by adapter path."""
    return {path: layer.get_submodule(path) for path in adapter.linears}


def set_weight_fake_quant(model: nn.Module, spec: QuantSpec | None, clip_search: bool = True) -> None:
    """Run every QuantLinear with RTN fake-quantized weights (``spec`` None: back to the real weights).

    With ``clip_search`` the quantized copies are computed once and stored; without it each forward quantizes
    its weight on the fly (absmax RTN is cheap), so no second copy of the model's weights is held.
    """
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.weight_override = None
            module.weight_quant = None
            if spec is None:
                continue
            if not clip_search:
                module.weight_quant = spec
                continue
            w = module.linear.weight.detach()
            qt = quantize_weight_rtn(w.float(), spec, clip_search=True)
            module.weight_override = dequantize(qt, torch.float32).to(w.dtype)
