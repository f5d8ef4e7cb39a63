"""Weight-only quantization of the token embedding and the LM head.

The embedding is RTN with MSE clip search (its "input" is a one-hot lookup: no Hessian to use). The LM head is
GPTQ against the Hessian of its real inputs (the final-normed hidden states leaving the quantized decoder) when
the run uses GPTQ and those are given, else RTN. The weights are replaced by their dequantized values, so the
evaluated model is the one the checkpoint stores. Bits 16 leaves a matrix alone; 4-bit matrices use groups of
``vocab_group_size`` columns, 8-bit ones one scale per row.
"""

from __future__ import annotations

import torch
from torch import nn

from conqur_vllm.calibration.options import CalibrationOptions
from conqur_vllm.config import VocabQuantArgs
from conqur_vllm.gptq import HessianAccumulator, gptq_rows
from conqur_vllm.models.adapters import ModelAdapter
from conqur_vllm.quant import QuantizedTensor, QuantSpec, dequantize, quantize_weight_rtn


def vocab_args(opts: CalibrationOptions, adapter: ModelAdapter) -> VocabQuantArgs | None:
    """The checkpoint's ``vocab`` entry for these options (None when both matrices stay unquantized)."""
    if opts.w_bits >= 16 or (opts.embed_bits >= 16 and opts.head_bits >= 16):
        return None
    return VocabQuantArgs(embed_bits=opts.embed_bits, head_bits=opts.head_bits, group_size=opts.vocab_group_size,
                          embed_module=adapter.embed, head_module=adapter.lm_head)


def head_hessian(model: nn.Module, adapter: ModelAdapter, final_hidden: list[torch.Tensor]) -> torch.Tensor:
    """GPTQ Hessian of the LM head's inputs: the final norm applied to the last decoder layer's outputs."""
    norm = model.get_submodule(adapter.final_norm)
    acc = HessianAccumulator(norm.weight.shape[0])
    with torch.no_grad():
        for h in final_hidden:
            acc.add(norm(h))
    return acc.hessian


def quantize_vocab(model: nn.Module, adapter: ModelAdapter, opts: CalibrationOptions,
                   final_hidden: list[torch.Tensor] | None = None) -> dict[str, QuantizedTensor]:
    """Quantize the embedding and LM head in place as ``opts`` says; returns ``{module path: codes}``.

    ``final_hidden``: the calibration batches' hidden states after the last (quantized) decoder layer; with
    ``opts.weight_quantizer == "gptq"`` the head is quantized by GPTQ against them.
    """
    args = vocab_args(opts, adapter)
    if args is None:
        return {}
    out = {}
    for path, bits in ((args.embed_module, args.embed_bits), (args.head_module, args.head_bits)):
        if bits >= 16:
            continue
        weight = model.get_submodule(path).weight
        spec = QuantSpec(bits=bits, symmetric=True, group_size=args.group_for(bits))
        if path == args.head_module and final_hidden and opts.weight_quantizer == "gptq":
            qt = gptq_rows(weight.detach(), head_hessian(model, adapter, final_hidden), spec,
                           clip_search=opts.clip_search)  # 8,192 rows at a time: small working copies
        else:
            qt = quantize_weight_rtn(weight.detach().float(), spec, clip_search=opts.clip_search)
        with torch.no_grad():
            weight.copy_(dequantize(qt, torch.float32).to(weight.dtype))
        out[path] = qt
    return out
