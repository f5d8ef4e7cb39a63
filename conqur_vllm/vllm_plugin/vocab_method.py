"""Weight-only INT4/INT8 token embedding and LM head (``quantization_config.vocab``).

Layout as for linears (symmetric ``pack-quantized``): ``weight_packed`` int32 ``[vocab, dim*bits/32]``,
``weight_scale`` float32 ``[vocab, groups]``, ``weight_shape`` int64 ``[2]``; rows shard over tensor-parallel
ranks through vLLM's own ``VocabParallelEmbedding.weight_loader``.

- Embedding: resident as packed codes (INT4: 0.5 byte per weight) or int8 codes (INT8) plus scales;
  ``embedding`` dequantizes only the looked-up rows, so no full-precision copy of the matrix exists.
- LM head: every row is read at every decode step, so the head is dequantized once at load (``LOAD_CHUNK_ROWS``
  rows at a time, bounding the float32 scratch) into the model dtype (``weight``, 2 bytes per weight resident
  in bf16; the checkpoint still stores INT4) and served by one ``F.linear``; dequantizing it at every step
  held a CPU server at 201 instead of 283 output tok/s (``benchmarks/RESULTS.md``).

Activations are not quantized here: this is the function of the reference forward, whose embedding and head
weights are the dequantized codes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
from vllm.model_executor.utils import set_weight_attrs

from conqur_vllm.config import CheckpointConfigError
from conqur_vllm.formats import unpack_int32
from conqur_vllm.quant import QuantizedTensor, QuantSpec, dequantize

LOAD_CHUNK_ROWS = 8192


class ConqurVocabMethod(QuantizeMethodBase):
    """Quantized ``VocabParallelEmbedding`` / ``ParallelLMHead`` weights of ``bits`` with groups of ``group_size``
    columns (None = one scale per row); ``head``: the LM head, dequantized once at load."""

    def __init__(self, bits: int, group_size: int | None, name: str, head: bool = False) -> None:
        self.bits = bits
        self.group_size = group_size
        self.name = name
        self.head = head
        self.spec = QuantSpec(bits=bits, symmetric=True, group_size=group_size)

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype,
                       **extra_weight_attrs: Any) -> None:
        rows, dim = sum(output_partition_sizes), input_size_per_partition
        pack = 32 // self.bits
        group = self.group_size or dim
        if dim % pack or dim % group:
            raise CheckpointConfigError(
                f"{self.name}: embedding size {dim} is not a multiple of {pack} packed values and of the group "
                f"size {group}; recalibrate with --embed-bits/--head-bits 16 for this model"
            )
        packed = nn.Parameter(torch.zeros(rows, dim // pack, dtype=torch.int32), requires_grad=False)
        set_weight_attrs(packed, {"output_dim": 0, "input_dim": 1, **extra_weight_attrs})
        scale = nn.Parameter(torch.zeros(rows, dim // group, dtype=torch.float32), requires_grad=False)
        set_weight_attrs(scale, {"output_dim": 0, **extra_weight_attrs})
        shape = nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)
        set_weight_attrs(shape, extra_weight_attrs)
        layer.register_parameter("weight_packed", packed)
        layer.register_parameter("weight_scale", scale)
        layer.register_parameter("weight_shape", shape)
        layer.conqur_dim = dim
        layer.params_dtype = params_dtype

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        del layer.weight_shape
        if self.head:
            codes, scale = layer.weight_packed.data, layer.weight_scale.data
            weight = torch.empty(codes.shape[0], layer.conqur_dim, dtype=layer.params_dtype, device=codes.device)
            for start in range(0, codes.shape[0], LOAD_CHUNK_ROWS):
                rows = slice(start, start + LOAD_CHUNK_ROWS)
                weight[rows] = self._rows(layer, codes[rows], scale[rows], layer.params_dtype)
            del layer.weight_packed, layer.weight_scale
            layer.weight = nn.Parameter(weight, requires_grad=False)
        elif self.bits == 8:  # int8 codes are as small as packed ones and need no unpacking
            codes = unpack_int32(layer.weight_packed.data, 8, layer.conqur_dim, packed_dim=1, signed=True)
            layer.weight_packed = nn.Parameter(codes, requires_grad=False)

    def _rows(self, layer: nn.Module, codes: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
        if codes.dtype == torch.int32:  # packed
            codes = unpack_int32(codes, self.bits, layer.conqur_dim, packed_dim=1, signed=True)
        return dequantize(QuantizedTensor(codes, scale, None, self.spec), dtype)

    def embedding(self, layer: nn.Module, input_: Tensor) -> Tensor:
        flat = input_.reshape(-1)
        rows = self._rows(layer, layer.weight_packed[flat], layer.weight_scale[flat], layer.params_dtype)
        return rows.view(*input_.shape, -1)

    def apply(self, layer: nn.Module, x: Tensor, bias: Tensor | None = None) -> Tensor:
        if not self.head:
            raise TypeError(f"{self.name}: logits come from the LM head's method, not the embedding's")
        return F.linear(x, layer.weight.to(x.dtype), bias)

    def tie_weights(self, layer: nn.Module, embed_tokens: nn.Module) -> nn.Module:
        raise CheckpointConfigError(f"{self.name}: a quantized LM head cannot be tied to the embedding; "
                                    "set tie_word_embeddings to false (conqur checkpoints always do)")
