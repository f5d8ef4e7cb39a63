"""Offline rotation fusion (QuaRot/SpinQuant placement), computed in float64.

Order: :func:`untie_embeddings`, :func:`fold_norms` (weightless RMSNorms), then any of :func:`rotate_residual`
(R1), :func:`rotate_values` (R2) and :func:`fuse_down_transform` (the weight side of R4; its online side is
applied in the forward by :mod:`conqur_vllm.fake_quant` and the vLLM plugin). Each step leaves the
full-precision model's function unchanged.

Conventions (activations are row vectors): R1 rotates the residual stream h -> h R1, so readers W <- W R1,
writers W <- R1^T W, the embedding E <- E R1. R2 rotates each value head v -> v R2 (v_proj rows per KV head),
undone in o_proj's input columns. R4: down_proj input x -> x H, down_proj W <- W H.
"""

from __future__ import annotations

import torch
from torch import nn

from conqur_vllm.models.adapters import ModelAdapter


def _set(param: nn.Parameter, value64: torch.Tensor) -> None:
    with torch.no_grad():
        param.data = value64.to(dtype=param.dtype, device=param.device).contiguous()


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def untie_embeddings(model: nn.Module, adapter: ModelAdapter) -> None:
    """Give lm_head its own copy of the embedding so the two can be transformed differently."""
    embed = model.get_submodule(adapter.embed)
    head = model.get_submodule(adapter.lm_head)
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(embed.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = []
    text_config = getattr(model.config, "text_config", None)
    if text_config is not None:
        text_config.tie_word_embeddings = False


def _fold(norm: nn.Module, readers: list[nn.Linear]) -> None:
    g = _f64(norm.weight)
    for lin in readers:
        _set(lin.weight, _f64(lin.weight) * g)
    with torch.no_grad():
        norm.weight.fill_(1.0)


def fold_norms(model: nn.Module, adapter: ModelAdapter) -> None:
    """Fold every residual RMSNorm weight into the linears that read its output; the norms become weightless."""
    for layer in adapter.decoder_layers(model):
        _fold(layer.get_submodule(adapter.attn_norm), [layer.get_submodule(p) for p in adapter.attn_readers])
        _fold(layer.get_submodule(adapter.mlp_norm), [layer.get_submodule(p) for p in adapter.mlp_readers])
    _fold(model.get_submodule(adapter.final_norm), [model.get_submodule(adapter.lm_head)])


def rotate_residual(model: nn.Module, adapter: ModelAdapter, r1: torch.Tensor, *, ends: bool = True,
                    precision: torch.dtype = torch.float64) -> None:
    """Fuse R1 (d_model x d_model, orthogonal) into embedding, readers and writers. Norms must be folded.

    ``ends=False`` leaves the embedding and the LM head alone (the caller fuses them later, e.g. once after
    many small online updates, with :func:`rotate_residual_ends`). ``precision`` float32 is only for scratch
    models whose result is re-fused from the original weights in float64 (the online learner's updates).
    """
    r1 = r1.detach().to(precision)
    readers = []
    for layer in adapter.decoder_layers(model):
        readers += [layer.get_submodule(p) for p in (*adapter.attn_readers, *adapter.mlp_readers)]
        for path in adapter.writers:
            lin = layer.get_submodule(path)
            _set(lin.weight, r1.T @ lin.weight.detach().to(precision))
            if lin.bias is not None:
                _set(lin.bias, lin.bias.detach().to(precision) @ r1)
    for lin in readers:
        _set(lin.weight, lin.weight.detach().to(precision) @ r1)
    if ends:
        rotate_residual_ends(model, adapter, r1)


def rotate_residual_ends(model: nn.Module, adapter: ModelAdapter, r1: torch.Tensor) -> None:
    """The embedding and LM-head part of :func:`rotate_residual`."""
    r1 = _f64(r1)
    for path in (adapter.embed, adapter.lm_head):
        weight = model.get_submodule(path).weight
        _set(weight, _f64(weight) @ r1)


def rotate_values(model: nn.Module, adapter: ModelAdapter, r2: torch.Tensor) -> None:
    """Fuse R2 into v_proj (output rows per KV head) and o_proj (input columns per head).

    ``r2``: [hd, hd] (one for all), [L, hd, hd] (per layer) or [L, n_kv, hd, hd] (per layer, per KV head).
    """
    layers = adapter.decoder_layers(model)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    r2 = _f64(r2)
    if r2.dim() == 2:
        r2 = r2.expand(len(layers), n_kv, head_dim, head_dim)
    elif r2.dim() == 3:
        r2 = r2[:, None].expand(len(layers), n_kv, head_dim, head_dim)
    if r2.shape != (len(layers), n_kv, head_dim, head_dim):
        raise ValueError(f"R2 has shape {tuple(r2.shape)}; expected [{len(layers)}, {n_kv}, {head_dim}, {head_dim}]")
    group = n_heads // n_kv
    for li, layer in enumerate(layers):
        rot = r2[li]  # [n_kv, hd, hd]
        v = layer.get_submodule(adapter.v_proj)
        wv = _f64(v.weight).view(n_kv, head_dim, -1)  # rows of head h: v_h = W_h x
        _set(v.weight, torch.einsum("hij,hik->hjk", rot, wv).reshape(n_kv * head_dim, -1))  # R^T W_h
        if v.bias is not None:
            _set(v.bias, torch.einsum("hi,hij->hj", _f64(v.bias).view(n_kv, head_dim), rot).reshape(-1))
        o = layer.get_submodule(adapter.o_proj)
        wo = _f64(o.weight).view(o.weight.shape[0], n_heads, head_dim)
        rot_q = rot.repeat_interleave(group, dim=0)  # query head j reads KV head j // group
        _set(o.weight, torch.einsum("dhi,hij->dhj", wo, rot_q).reshape(o.weight.shape[0], -1))


def fuse_down_transform(model: nn.Module, adapter: ModelAdapter, h4: torch.Tensor) -> None:
    """Weight side of R4: down_proj W <- W H (the forward must apply x -> x H online)."""
    h4 = _f64(h4)
    for layer in adapter.decoder_layers(model):
        down = layer.get_submodule(adapter.down_proj)
        _set(down.weight, _f64(down.weight) @ h4)


def prepare_rotation_invariant(model: nn.Module, adapter: ModelAdapter) -> None:
    """Untie the embeddings and fold the norms: the model is then invariant under R1."""
    untie_embeddings(model, adapter)
    fold_norms(model, adapter)
