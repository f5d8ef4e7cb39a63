"""vLLM ``QuantizationConfig`` for ``quant_method: "conqur"`` checkpoints.

Built from the checkpoint's ``quantization_config`` through :class:`conqur_vllm.config.ConqurQuantConfig` (the
shared, validated contract). Layer dispatch: decoder linears -> :class:`ConqurLinearMethod`; layers named in
``ignore`` -> unquantized; token embedding and LM head -> :class:`ConqurVocabMethod` when the checkpoint's
``vocab`` quantizes them, else vLLM's unquantized default; ``Attention`` ->
:class:`ConqurKVCacheMethod` (R3 and the KV-cache dtype).

``ignore`` entries are module names matched against a layer's full name or a dotted suffix of it
(``lm_head`` matches ``lm_head``, ``mlp.down_proj`` matches ``model.layers.3.mlp.down_proj``), or
``re:<pattern>`` matched with ``re.fullmatch``.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

from conqur_vllm.config import QUANT_METHOD, CheckpointConfigError, ConqurQuantConfig
from conqur_vllm.vllm_plugin._compat import attention_layer_type
from conqur_vllm.vllm_plugin.kv_cache import ConqurKVCacheMethod
from conqur_vllm.vllm_plugin.kv_dtype import default_kv_cache_dtype
from conqur_vllm.vllm_plugin.linear_method import ConqurLinearMethod
from conqur_vllm.vllm_plugin.metrics import publish_checkpoint_info
from conqur_vllm.vllm_plugin.vocab_method import ConqurVocabMethod

FP8_KV_SCHEME: dict[str, Any] = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                                 "symmetric": True}
"""What ``kv_cache_scheme`` reports when the checkpoint's KV bits map to fp8: vLLM's ``Attention`` then stores
an fp8 cache whenever the user left ``kv_cache_dtype`` at ``auto`` (passing the model dtype, e.g. ``bfloat16``,
keeps an unquantized cache)."""


@register_quantization_config(QUANT_METHOD)
class ConqurConfig(QuantizationConfig):
    """vLLM view of a conqur checkpoint; ``ConqurConfig()`` serves the default W4A4 settings."""

    def __init__(self, checkpoint: ConqurQuantConfig | None = None) -> None:
        super().__init__()
        self.checkpoint = checkpoint if checkpoint is not None else ConqurQuantConfig()
        self.ignore: list[str] = list(self.checkpoint.ignore)

    def __repr__(self) -> str:
        c = self.checkpoint
        sites = ",".join(t.site for t in c.online_transforms) or "none"
        return (f"ConqurConfig(W{c.weights.num_bits}A{c.activations.num_bits}KV{c.kv_cache.num_bits}, "
                f"group_size={c.weights.group_size}, online={sites})")

    # --- QuantizationConfig interface ---------------------------------------------------------------------
    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 75  # int8 tensor cores (torch._int_mm) from Turing on

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # config.json's quantization_config is all we read

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ConqurConfig:
        ckpt = ConqurQuantConfig.from_dict(config)
        publish_checkpoint_info(ckpt, default_kv_cache_dtype(ckpt))
        return cls(ckpt)

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        plain = [n for n in self.ignore if not n.startswith("re:")]
        self.ignore = [n for n in self.ignore if n.startswith("re:")] + hf_to_vllm_mapper.apply_list(plain)

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, VocabParallelEmbedding):
            return self._vocab_method(layer)
        if isinstance(layer, LinearBase):
            if self.is_ignored(prefix):
                return UnquantizedLinearMethod()
            return ConqurLinearMethod(self, prefix)
        if isinstance(layer, attention_layer_type()):
            return ConqurKVCacheMethod(self)
        return None

    def _vocab_method(self, layer: nn.Module) -> QuantizeMethodBase | None:
        """The LM head or the token embedding (vLLM builds some embeddings without a prefix, so the layer's
        class decides which), quantized as ``vocab`` says; None keeps vLLM's unquantized default."""
        vocab = self.checkpoint.vocab
        if vocab is None:
            return None
        is_head = isinstance(layer, ParallelLMHead)
        bits = vocab.head_bits if is_head else vocab.embed_bits
        if bits >= 16:
            return None
        name = vocab.head_module if is_head else vocab.embed_module
        return ConqurVocabMethod(bits, vocab.group_for(bits), name, head=is_head)

    @property
    def kv_cache_scheme(self) -> dict[str, Any] | None:
        """An fp8 scheme when this platform's default for the checkpoint is fp8, else None (read by Attention)."""
        return dict(FP8_KV_SCHEME) if default_kv_cache_dtype(self.checkpoint).startswith("fp8") else None

    # --- ignore list ---------------------------------------------------------------------------------------
    def _matches(self, name: str) -> bool:
        for entry in self.ignore:
            if entry.startswith("re:"):
                if re.fullmatch(entry[3:], name):
                    return True
            elif name == entry or name.endswith("." + entry):
                return True
        return False

    def is_ignored(self, prefix: str) -> bool:
        """Whether the layer stays unquantized; a fused layer must be ignored in all of its shards or none."""
        head, _, last = prefix.rpartition(".")
        shards = self.packed_modules_mapping.get(last)
        if not shards:
            return self._matches(prefix)
        names = [f"{head}.{s}" if head else s for s in shards]
        hits = [self._matches(n) for n in names]
        if any(hits) and not all(hits):
            raise CheckpointConfigError(
                f"quantization_config.ignore covers only some of {names}, which vLLM fuses into {prefix}; "
                "ignore all of them or none"
            )
        return all(hits)
