"""Tiny random decoders of every supported family (head_dim >= 32, as vLLM's CPU attention needs)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def tiny_config(model_type: str, *, hidden: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 384, vocab: int = 256):
    extra = {"attention_bias": True} if model_type == "qwen2" else {}
    cfg = AutoConfig.for_model(
        model_type, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab, head_dim=hidden // heads,
        max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-6, **extra,
    )
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 0
    return cfg


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float64, **kw):
    """A random model whose norms and biases are non-trivial (so folding and bias rotation are exercised)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **kw), dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    return model.eval()
