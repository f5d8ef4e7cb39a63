"""The project's own reference forward of a conqur checkpoint (pure torch + transformers, no vLLM).

Loads the packed INT4 weights (and the packed embedding / LM head), dequantizes them, and installs the online transforms and activation/KV
fake-quantizers (with the input shifts) that ``config.json`` describes: the function the served model must
reproduce.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from conqur_vllm import fake_quant
from conqur_vllm.calibration.kv_shift import CHECKPOINT_LEAF, attention_modules, install_key_shifts
from conqur_vllm.checkpoint import read_checkpoint_tensors
from conqur_vllm.config import ConqurQuantConfig
from conqur_vllm.formats import unpack_int32
from conqur_vllm.models.adapters import get_adapter
from conqur_vllm.quant import QuantizedTensor, QuantSpec, dequantize
from conqur_vllm.rotation.rotations import head_dim_of


def dequantize_linear(tensors: dict[str, torch.Tensor], prefix: str, qcfg: ConqurQuantConfig) -> torch.Tensor:
    """Float32 ``[out, in]`` weight of a packed linear (or of the packed embedding / LM head)."""
    out_f, in_f = (int(v) for v in tensors[f"{prefix}.weight_shape"])
    bits, group_size = qcfg.packed_weight_args(prefix)
    zero_name = f"{prefix}.weight_zero_point"
    symmetric = zero_name not in tensors
    if symmetric != qcfg.weights.symmetric and not qcfg.is_vocab_module(prefix):
        raise ValueError(f"{prefix}: weights.symmetric is {qcfg.weights.symmetric} but {zero_name} is "
                         f"{'missing' if symmetric else 'present'}; the checkpoint is inconsistent, recalibrate it")
    q = unpack_int32(tensors[f"{prefix}.weight_packed"], bits, in_f, packed_dim=1, signed=symmetric)
    zero = None
    if not symmetric:  # packed along the output dim; the unsigned field is the zero point itself
        zero = unpack_int32(tensors[zero_name], bits, out_f, packed_dim=0, signed=False)
    spec = QuantSpec(bits=bits, symmetric=symmetric, group_size=group_size)
    return dequantize(QuantizedTensor(q, tensors[f"{prefix}.weight_scale"], zero, spec), torch.float32)


def load_reference_model(ckpt_dir: str | Path, dtype: torch.dtype = torch.float32,
                         kv_override: fake_quant.KVQuant | None = None) -> tuple[nn.Module, ConqurQuantConfig]:
    """HF model of the checkpoint with fake-quant wrappers exactly as the checkpoint's config says.

    ``kv_override`` replaces the KV simulation (e.g. ``KVQuant(bits=None)`` to compare against a server that
    stores the KV cache in another format).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    qcfg = ConqurQuantConfig.from_model_dir(ckpt_dir)
    config = AutoConfig.from_pretrained(ckpt_dir)
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    adapter = get_adapter(config)
    tensors = read_checkpoint_tensors(ckpt_dir)
    state = {}
    for name in model.state_dict():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and f"{module}.weight_packed" in tensors:
            state[name] = dequantize_linear(tensors, module, qcfg)
        elif name in tensors:
            state[name] = tensors[name].to(torch.float32)
    missing = [n for n in model.state_dict() if n not in state]
    if missing:
        raise ValueError(f"{ckpt_dir}: checkpoint lacks {len(missing)} tensors (e.g. {missing[0]}); rewrite it")
    model.load_state_dict(state, strict=True)
    model.to(dtype)
    r4 = qcfg.transform("down_proj_input")
    r3 = qcfg.transform("qk_post_rope")
    a_bits = None if qcfg.activations.num_bits >= 16 else qcfg.activations.num_bits
    kv = kv_override or fake_quant.KVQuant(
        bits=None if qcfg.kv_cache.num_bits >= 16 else qcfg.kv_cache.num_bits,
        symmetric=qcfg.kv_cache.symmetric, clip_ratio=qcfg.kv_cache.clip_ratio,
        group_size=qcfg.kv_cache.group_size)
    fake_quant.install(model, adapter, act=fake_quant.ActQuant(bits=a_bits, clip_ratio=qcfg.activations.clip_ratio,
                                                                   symmetric=qcfg.activations.symmetric),
                       attention=fake_quant.AttentionSim(r3=r3 is not None, kv=kv),
                       r4=r4 is not None, r4_block=None if r4 is None else r4.block)
    for name, module in model.named_modules():
        if isinstance(module, fake_quant.QuantLinear) and a_bits is not None:
            module.act = fake_quant.ActQuant(bits=a_bits, clip_ratio=qcfg.clip_ratio_for(name),
                                             symmetric=qcfg.activations.symmetric)
        if isinstance(module, fake_quant.QuantLinear) and qcfg.has_input_shift(name):
            if f"{name}.input_shift" not in tensors:
                raise ValueError(f"{ckpt_dir}: config.json shifts the input of {name} but the checkpoint has no "
                                 f"{name}.input_shift; rewrite it with `conqur calibrate`")
            module.input_shift = tensors[f"{name}.input_shift"].to(torch.float32)
    if qcfg.kv_cache.key_shift:
        install_key_shifts(model, adapter, _key_shifts(tensors, model, adapter, ckpt_dir))
    return model, qcfg


def _key_shifts(tensors: dict[str, torch.Tensor], model: nn.Module, adapter, ckpt_dir) -> dict[str, torch.Tensor]:
    """The checkpoint's ``{attention}.attn.k_shift`` as ``[kv_heads, head_dim]`` per attention module name."""
    kv_heads, head_dim = model.config.num_key_value_heads, head_dim_of(model.config)
    shifts = {}
    for name in attention_modules(model, adapter):
        key = f"{name}.{CHECKPOINT_LEAF}"
        if key not in tensors:
            raise ValueError(f"{ckpt_dir}: config.json says kv_cache.key_shift but the checkpoint has no {key}; "
                             "rewrite it with `conqur calibrate`")
        shifts[name] = tensors[key].to(torch.float32).view(kv_heads, head_dim)
    return shifts
