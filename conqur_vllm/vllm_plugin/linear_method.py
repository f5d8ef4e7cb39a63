"""Linear method for conqur's INT4 (or INT8) weights with dynamic per-token INT activations.

Checkpoint layout (compressed-tensors ``pack-quantized``): ``weight_packed`` int32 ``[out, in/8]``
(symmetric: INT4 code v stored as nibble v+8; asymmetric: the unsigned code; value i of each 8 at bits 4i),
``weight_scale`` float32 ``[out, groups]``, ``weight_shape`` int64 ``[2]`` and, for ``weights.symmetric: false``,
``weight_zero_point`` int32 ``[out/8, groups]`` (signed ``zero - 8`` packed along the output dim). The
parameters are vLLM parameter classes, so fused qkv / gate_up shards and tensor-parallel slices load through
vLLM's own ``weight_loader_v2``.

After loading, the codes are unpacked once to int8 (asymmetric weights as their centered codes ``q - zero`` in
[-15, 15], so every GEMM serves them as it serves symmetric ones) and handed to the integer GEMM (see
``conqur_vllm.kernels.make_int_gemm``; ``CONQUR_INT_GEMM`` picks the backend); the packed int32 tensors are
freed. Resident per layer: float32 scales plus the int8 codes, 1 byte per weight, as oneDNN's copy
(``onednn``) or the parameter ``weight_int`` (``reference``), or both (``hybrid``, the CPU default: oneDNN for
prefill, the reference GEMM for fewer than 16 tokens).

Forward: [R4 Hadamard on down_proj's input] -> [minus the input shift mu, where ``activations.shifted_inputs``
names the linear's group; ``W mu`` (from the dequantized weights, float32) joins the bias] -> per-token quantization
(``conqur::quantize_per_token``; for ``activations.symmetric: false`` ``conqur::quantize_per_token_centered``,
whose codes ``q - zero`` already carry the zero point, so the same GEMM serves both; for a row-parallel shard the
row extremes are all-reduced over the tensor-parallel ranks first, so every rank uses the single-device scale)
-> integer GEMM with int32 accumulation and the scale epilogue (+ bias) -> output in the input dtype. On CUDA
R4 and the quantizer are one Triton kernel (``conqur::hadamard_quantize_per_token[_centered]``) where the row is
not split across ranks and not shifted. Asymmetric 8-bit activations, whose centered codes do not fit int8, use
``conqur::quantize_per_token_asym`` and subtract ``scale * zero`` times the row sums of the dequantized weights
(``weight_sum``) from the float32 GEMM output instead.
With ``activations.num_bits == 16`` (weight-only checkpoints) the weights are dequantized once at load and
served by ``F.linear`` (no memory saving; logged).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearMethodBase
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedColumnParameter,
    PackedvLLMParameter,
    RowvLLMParameter,
)

from conqur_vllm.config import CheckpointConfigError
from conqur_vllm.formats import unpack_int32
from conqur_vllm.kernels import Backend, backend_from_env, make_int_gemm, transforms  # noqa: F401
from conqur_vllm.kernels.reference import MAX_CENTERED_BITS
from conqur_vllm.vllm_plugin._compat import register_weight_loader_v2
from conqur_vllm.vllm_plugin.tp import row_absmax, row_range

if TYPE_CHECKING:
    from conqur_vllm.vllm_plugin.quant_config import ConqurConfig

logger = init_logger(__name__)

R4_LAYER = "down_proj"
GEMM_ATTR = "conqur_gemm"


def _dequantize(codes: Tensor, scale: Tensor) -> Tensor:
    """Float32 ``[out, in]`` weights from int8 codes and per-channel or per-group scales ``[out, groups]``."""
    return (codes.to(torch.float32).view(codes.shape[0], scale.shape[1], -1) * scale.unsqueeze(-1)).view(codes.shape)


def _centered_codes(codes: Tensor, packed_zero: Tensor, n_groups: int, bits: int) -> Tensor:
    """int8 ``q - zero`` (in [-(2^b - 1), 2^b - 1]) from unsigned codes ``[out, in]`` and packed zero points."""
    n_out = codes.shape[0]
    zero = unpack_int32(packed_zero, bits, n_out, packed_dim=0, signed=False).to(torch.int16)  # the field is zero
    grouped = codes.to(torch.int16).view(n_out, n_groups, -1) - zero.view(n_out, n_groups, 1)
    return grouped.view(codes.shape).to(torch.int8)


def _scale_parameter(n_out: int, n_groups: int, grouped: bool, weight_loader: Any) -> BasevLLMParameter:
    data = torch.empty(n_out, n_groups, dtype=torch.float32)
    if grouped:
        return GroupQuantScaleParameter(data=data, output_dim=0, input_dim=1, weight_loader=weight_loader)
    return ChannelQuantScaleParameter(data=data, output_dim=0, weight_loader=weight_loader)


@register_weight_loader_v2
class ConqurLinearMethod(LinearMethodBase):
    """One instance per linear layer; ``prefix`` decides whether the R4 online Hadamard runs before it."""

    def __init__(self, quant_config: ConqurConfig, prefix: str = "", backend: Backend | None = None) -> None:
        self.quant_config = quant_config
        self.prefix = prefix
        self.backend = backend_from_env() if backend is None else backend
        ckpt = quant_config.checkpoint
        self.weight_bits = ckpt.weights.num_bits
        self.group_size = ckpt.weights.group_size
        self.weight_symmetric = ckpt.weights.symmetric
        self.act_bits = ckpt.activations.num_bits
        self.clip_ratio = ckpt.clip_ratio_for(prefix)
        self.act_symmetric = ckpt.activations.symmetric
        # asymmetric codes too wide to center in int8: the zero point becomes a rank-1 term after the GEMM
        self.zero_point_term = not self.act_symmetric and self.act_bits > MAX_CENTERED_BITS
        r4 = ckpt.transform("down_proj_input")
        self.r4 = r4 if r4 is not None and prefix.rsplit(".", 1)[-1] == R4_LAYER else None
        self.shifted = ckpt.has_input_shift(prefix)

    # --- weights -------------------------------------------------------------------------------------------
    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        weight_loader = extra_weight_attrs.get("weight_loader")
        n_out = sum(output_partition_sizes)
        pack = 32 // self.weight_bits
        sharded_in = input_size_per_partition != input_size
        where = self.prefix or "linear layer"
        if sharded_in and input_size_per_partition % pack:
            raise CheckpointConfigError(
                f"{where}: input shard of {input_size_per_partition} is not a multiple of {pack} packed values; "
                "use a tensor_parallel_size that splits it evenly"
            )
        grouped = self.group_size is not None
        if grouped:
            if input_size_per_partition % self.group_size:
                raise CheckpointConfigError(
                    f"{where}: weights.group_size {self.group_size} does not divide the input size "
                    f"{input_size_per_partition} (per rank); use a tensor_parallel_size that keeps whole groups"
                )
            n_groups = input_size_per_partition // self.group_size
        else:
            n_groups = 1
        self._check_r4(input_size, input_size_per_partition)

        packed = PackedvLLMParameter(
            data=torch.empty(n_out, -(-input_size_per_partition // pack), dtype=torch.int32),
            input_dim=1,
            output_dim=0,
            packed_dim=1,
            packed_factor=pack,
            weight_loader=weight_loader,
        )
        shape = BasevLLMParameter(data=torch.empty(2, dtype=torch.int64), weight_loader=weight_loader)
        layer.register_parameter("weight_packed", packed)
        layer.register_parameter("weight_scale", _scale_parameter(n_out, n_groups, grouped, weight_loader))
        layer.register_parameter("weight_shape", shape)
        if not self.weight_symmetric:  # as compressed-tensors' asymmetric WNA16: zero points packed along the output
            zero_cls = PackedvLLMParameter if grouped else PackedColumnParameter
            zero_dims = {"input_dim": 1} if grouped else {}
            zero = zero_cls(data=torch.zeros(-(-n_out // pack), n_groups, dtype=torch.int32), output_dim=0,
                            packed_dim=0, packed_factor=pack, weight_loader=weight_loader, **zero_dims)
            layer.register_parameter("weight_zero_point", zero)
        if self.shifted:  # the same vector for every shard of a merged layer; sliced along the input for TP rows
            shift = RowvLLMParameter(data=torch.empty(input_size_per_partition, dtype=torch.float32), input_dim=0,
                                     weight_loader=weight_loader)
            layer.register_parameter("input_shift", shift)
        layer.input_size_per_partition = input_size_per_partition
        layer.output_size_per_partition = n_out
        layer.params_dtype = params_dtype
        layer.conqur_sharded_input = sharded_in

    def _check_r4(self, input_size: int, input_size_per_partition: int) -> None:
        if self.r4 is None:
            return
        if self.r4.size != input_size:
            raise CheckpointConfigError(
                f"{self.prefix}: down_proj_input transform size {self.r4.size} != intermediate size {input_size}; "
                "the checkpoint does not belong to this model"
            )
        if input_size_per_partition % self.r4.block_size:
            raise CheckpointConfigError(
                f"{self.prefix}: the R4 Hadamard block {self.r4.block_size} straddles tensor-parallel shards of "
                f"{input_size_per_partition}; recalibrate with a block-diagonal R4 whose block divides the shard, "
                "or lower tensor_parallel_size"
            )

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        k = layer.input_size_per_partition
        codes = unpack_int32(layer.weight_packed.data, self.weight_bits, k, packed_dim=1,
                             signed=self.weight_symmetric)
        scale = layer.weight_scale.data.to(torch.float32)
        if scale.shape[0] != codes.shape[0] or k % scale.shape[1]:
            raise CheckpointConfigError(
                f"{self.prefix}: weight_scale shape {tuple(scale.shape)} does not fit weights {tuple(codes.shape)}"
            )
        if not self.weight_symmetric:
            codes = _centered_codes(codes, layer.weight_zero_point.data, scale.shape[1], self.weight_bits)
            del layer.weight_zero_point
        del layer.weight_packed, layer.weight_shape
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)
        if self.act_bits >= 16:
            layer.weight = nn.Parameter(_dequantize(codes, scale).to(layer.params_dtype), requires_grad=False)
            logger.info_once("conqur: activations.num_bits=16, weights dequantized to %s at load", layer.params_dtype)
            return
        w_deq = _dequantize(codes, scale) if self.shifted or self.zero_point_term else None
        if self.shifted:  # W mu: this rank's part of the bias that puts the shift back (summed by the all-reduce)
            shift = layer.input_shift.data.to(layer.params_dtype)  # the bias uses the shift as subtracted
            layer.input_shift = nn.Parameter(shift, requires_grad=False)
            layer.shift_bias = nn.Parameter(w_deq @ shift.to(torch.float32), requires_grad=False)
        out_dtype = layer.params_dtype
        if self.zero_point_term:  # x = scale (q - zero): W x = scale (W q) - scale zero sum_k W[:, k]
            layer.weight_sum = nn.Parameter(w_deq.sum(1, dtype=torch.float64).to(torch.float32), requires_grad=False)
            out_dtype = torch.float32  # the correction is applied before rounding to the model dtype
        del w_deq
        gemm = make_int_gemm(codes, scale, out_dtype, self.backend)
        if gemm.b_q is not None:  # the codes stay resident: show them as a parameter of the layer
            layer.weight_int = nn.Parameter(gemm.b_q, requires_grad=False)
        elif getattr(gemm, "b_packed", None) is not None:
            layer.weight_int4 = nn.Parameter(gemm.b_packed, requires_grad=False)
        setattr(layer, GEMM_ATTR, gemm)
        logger.info_once("conqur: W%dA%d integer GEMM backend: %s", self.weight_bits, self.act_bits, gemm.name)

    # --- forward -------------------------------------------------------------------------------------------
    def fuse_r4_quant(self, layer: nn.Module, x: Tensor) -> bool:
        """R4, the row range and quantization in one pass (``conqur::hadamard_quantize_per_token[_centered]``):
        on CUDA, where it is one Triton kernel, unless the row is split across ranks (its range then needs an
        all-reduce), a shift comes between the transform and the quantizer, or asymmetric codes need the
        zero-point term."""
        return (x.is_cuda and self.act_bits < 16 and not self.zero_point_term and not layer.conqur_sharded_input
                and not self.shifted)

    def apply(self, layer: nn.Module, x: Tensor, bias: Tensor | None = None) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        block = None if self.r4 is None else (0 if self.r4.block_size == self.r4.size else self.r4.block_size)
        if block is not None and self.fuse_r4_quant(layer, x2):
            fused = (torch.ops.conqur.hadamard_quantize_per_token if self.act_symmetric
                     else torch.ops.conqur.hadamard_quantize_per_token_centered)
            a_q, a_scale = fused(x2, block, self.act_bits, self.clip_ratio)
            out = getattr(layer, GEMM_ATTR)(a_q, a_scale, bias)
        else:
            if block is not None:
                x2 = torch.ops.conqur.hadamard_transform(x2, block)
            if self.act_bits >= 16:
                out = F.linear(x2, layer.weight, bias)
            else:
                if self.shifted:
                    x2 = x2 - layer.input_shift.to(x2.dtype)
                    bias = layer.shift_bias if bias is None else layer.shift_bias + bias.to(torch.float32)
                out = self._quantized_matmul(layer, x2, bias)
        return out.to(x.dtype).view(*shape[:-1], out.shape[-1])

    def _quantized_matmul(self, layer: nn.Module, x2: Tensor, bias: Tensor | None) -> Tensor:
        """Per-token quantization of ``x2`` and the integer GEMM (with the zero-point term for 8-bit asymmetric)."""
        gemm = getattr(layer, GEMM_ATTR)
        if self.act_symmetric:
            absmax = row_absmax(x2, layer.conqur_sharded_input)
            a_q, a_scale = torch.ops.conqur.quantize_per_token(x2, self.act_bits, self.clip_ratio, absmax)
            return gemm(a_q, a_scale, bias)
        row_min, row_max = row_range(x2, layer.conqur_sharded_input)
        if not self.zero_point_term:
            a_q, a_scale = torch.ops.conqur.quantize_per_token_centered(x2, self.act_bits, self.clip_ratio,
                                                                       row_min, row_max)
            return gemm(a_q, a_scale, bias)
        a_q, a_scale, a_zero = torch.ops.conqur.quantize_per_token_asym(x2, self.act_bits, self.clip_ratio,
                                                                        row_min, row_max)
        out = gemm(a_q, a_scale, None if bias is None else bias.to(torch.float32))
        return out.addr_(a_scale.view(-1) * a_zero.view(-1), layer.weight_sum, alpha=-1)
