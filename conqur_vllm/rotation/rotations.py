"""A model's set of rotations and how it is applied: offline R1/R2/R4-weights, online R3/R4 in the forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from conqur_vllm import fake_quant
from conqur_vllm.hadamard import block_hadamard_matrix, hadamard_matrix, random_hadamard_matrix
from conqur_vllm.models.adapters import ModelAdapter
from conqur_vllm.rotation.fuse import (
    fuse_down_transform,
    prepare_rotation_invariant,
    rotate_residual,
    rotate_values,
)


@dataclass
class Rotations:
    """R1 [d, d]; R2 [L, n_kv, hd, hd] (or broadcastable); online R3 (Hadamard on Q/K) and R4 (block size)."""

    r1: torch.Tensor | None
    r2: torch.Tensor | None
    r3: bool = True
    r4: bool = True
    r4_block: int | None = None


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def quarot_rotations(config, seed: int = 0, r4_block: int | None = None) -> Rotations:
    """QuaRot: randomized Hadamard R1, Hadamard R2 (per head), Hadamard R3 and R4 online."""
    return Rotations(
        r1=random_hadamard_matrix(config.hidden_size, seed),
        r2=hadamard_matrix(head_dim_of(config)),
        r4_block=r4_block,
    )


def down_transform(config, rot: Rotations) -> torch.Tensor | None:
    """The R4 matrix (float64) fused into down_proj's columns, None without R4."""
    if not rot.r4:
        return None
    n = config.intermediate_size
    return hadamard_matrix(n) if rot.r4_block is None else block_hadamard_matrix(n, rot.r4_block)


def apply_rotations(model: nn.Module, adapter: ModelAdapter, rot: Rotations) -> None:
    """Make the model rotation-invariant, fuse R1/R2/R4 weights, and install the online R3/R4 in the forward.

    After this the model computes the same function (up to float rounding) until quantizers are switched on.
    """
    prepare_rotation_invariant(model, adapter)
    if rot.r1 is not None:
        rotate_residual(model, adapter, rot.r1)
    if rot.r2 is not None:
        rotate_values(model, adapter, rot.r2)
    if rot.r4:
        fuse_down_transform(model, adapter, down_transform(model.config, rot))
    fake_quant.install(model, adapter, attention=fake_quant.AttentionSim(r3=rot.r3), r4=rot.r4,
                       r4_block=rot.r4_block)
