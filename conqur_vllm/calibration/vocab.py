"""Weight-only quantization of the token embedding and the LM head (RTN with MSE clip search).

The weights are replaced by their dequantized values, so the evaluated model is the one the checkpoint
stores. Bits 16 leaves a matrix alone; 4-bit matrices use groups of ``vocab_group_size`` columns, 8-bit ones
one scale per row.
"""

from __future__ import annotations

import torch
from torch import nn

from conqur_vllm.calibration.options import CalibrationOptions
from conqur_vllm.config import VocabQuantArgs
from conqur_vllm.models.adapters import ModelAdapter
from conqur_vllm.quant import QuantizedTensor, QuantSpec, dequantize, quantize_weight_rtn


def vocab_args(opts: CalibrationOptions, adapter: ModelAdapter) -> VocabQuantArgs | None:
    """The checkpoint's ``vocab`` entry for these options (None when both matrices stay unquantized)."""
    if opts.w_bits >= 16 or (opts.embed_bits >= 16 and opts.head_bits >= 16):
        return None
    return VocabQuantArgs(embed_bits=opts.embed_bits, head_bits=opts.head_bits, group_size=opts.vocab_group_size,
                          embed_module=adapter.embed, head_module=adapter.lm_head)


def quantize_vocab(model: nn.Module, adapter: ModelAdapter, opts: CalibrationOptions
                   ) -> dict[str, QuantizedTensor]:
    """Quantize the embedding and LM head in place as ``opts`` says; returns ``{module path: codes}``."""
    args = vocab_args(opts, adapter)
    if args is None:
        return {}
    out = {}
    for path, bits in ((args.embed_module, args.embed_bits), (args.head_module, args.head_bits)):
        if bits >= 16:
            continue
        weight = model.get_submodule(path).weight
        spec = QuantSpec(bits=bits, symmetric=True, group_size=args.group_for(bits))
        qt = quantize_weight_rtn(weight.detach().float(), spec, clip_search=opts.clip_search)
        with torch.no_grad():
            weight.copy_(dequantize(qt, torch.float32).to(weight.dtype))
        out[path] = qt
    return out
