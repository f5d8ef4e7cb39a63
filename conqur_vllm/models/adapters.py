"""Where each supported family keeps its embedding, norms, attention and MLP modules.

One :class:`ModelAdapter` per family, as data (llm-compressor style). The rotation engine, fake-quant model and
calibrator address modules only through these names, never through ``if model_type == ...`` branches.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class UnsupportedArchitecture(ValueError):
    """The model's architecture has no adapter."""


@dataclass(frozen=True)
class ModelAdapter:
    """Module paths of one decoder-only family (relative to the model / to a decoder layer)."""

    family: str
    model_types: tuple[str, ...]
    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    gate_proj: str = "mlp.gate_proj"
    up_proj: str = "mlp.up_proj"
    down_proj: str = "mlp.down_proj"
    attention: str = "self_attn"
    qk_norms: tuple[str, ...] = ()  # per-head norms on q/k before RoPE (Qwen3); untouched by R1-R4
    qkv_bias: bool = False

    @property
    def attn_readers(self) -> tuple[str, str, str]:
        return (self.q_proj, self.k_proj, self.v_proj)

    @property
    def mlp_readers(self) -> tuple[str, str]:
        return (self.gate_proj, self.up_proj)

    @property
    def writers(self) -> tuple[str, str]:
        return (self.o_proj, self.down_proj)

    @property
    def input_groups(self) -> tuple[tuple[str, ...], ...]:
        """Linears that read the same input (one Hessian, one activation quantizer each)."""
        return (self.attn_readers, (self.o_proj,), self.mlp_readers, (self.down_proj,))

    @property
    def linears(self) -> tuple[str, ...]:
        """Every linear of a decoder layer, in execution order."""
        return (*self.attn_readers, self.o_proj, *self.mlp_readers, self.down_proj)

    # --- module access -------------------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    @staticmethod
    def sub(module: nn.Module, path: str) -> nn.Module:
        return module.get_submodule(path)


ADAPTERS: tuple[ModelAdapter, ...] = (
    ModelAdapter(family="llama", model_types=("llama",)),
    ModelAdapter(family="mistral", model_types=("mistral",)),
    ModelAdapter(family="qwen2", model_types=("qwen2",), qkv_bias=True),
    ModelAdapter(family="qwen3", model_types=("qwen3",), qk_norms=("self_attn.q_norm", "self_attn.k_norm")),
)


def supported_model_types() -> list[str]:
    return [t for a in ADAPTERS for t in a.model_types]


def get_adapter(config) -> ModelAdapter:
    """The adapter for a transformers config (or a model_type string); fails at once for other families."""
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedArchitecture(
        f"model_type {model_type!r} is not supported; supported: {', '.join(supported_model_types())} "
        "(Llama, Mistral, Qwen2 and Qwen3 families)"
    )
