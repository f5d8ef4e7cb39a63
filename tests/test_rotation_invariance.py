"""Fused R1/R2/R4 and online R3/R4 leave the full-precision model's logits unchanged."""

import copy

import pytest
import torch

from conqur_vllm.models import UnsupportedArchitecture, get_adapter
from conqur_vllm.rotation import apply_rotations, quarot_rotations
from conqur_vllm.rotation.rotations import Rotations
from tests.tiny_models import FAMILIES, tiny_model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("r4_block", [None, 128])
def test_rotated_model_is_invariant(family, r4_block):
    model = tiny_model(family)
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    rotated = copy.deepcopy(model)
    adapter = get_adapter(rotated.config)
    rot = quarot_rotations(rotated.config, seed=3, r4_block=r4_block)
    # per-layer, per-KV-head random orthogonal R2 exercises the general fusion path
    g = torch.Generator().manual_seed(5)
    n_layers, n_kv, hd = 2, 2, 32
    rot.r2 = torch.linalg.qr(torch.randn(n_layers, n_kv, hd, hd, generator=g, dtype=torch.float64))[0]
    apply_rotations(rotated, adapter, rot)
    with torch.no_grad():
        out = rotated(ids).logits
    assert _rel(out, ref) < 2e-6  # float64 model; HF's RMSNorm computes in float32
    # weights really changed (the check above is not vacuous)
    q_ref = model.model.layers[0].self_attn.q_proj.weight
    q_rot = rotated.model.layers[0].self_attn.q_proj.linear.weight
    assert _rel(q_rot, q_ref) > 0.1


@pytest.mark.parametrize("family", FAMILIES)
def test_rotated_model_float32_invariance(family):
    model64 = tiny_model(family)
    model = copy.deepcopy(model64).float()
    ids = torch.randint(3, 256, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
    apply_rotations(model64, get_adapter(model64.config), quarot_rotations(model64.config, seed=0))
    model64.float()
    with torch.no_grad():
        out = model64(ids).logits
    assert _rel(out, ref) < 1e-5


def test_unsupported_architecture_lists_supported():
    with pytest.raises(UnsupportedArchitecture, match="llama, mistral, qwen2, qwen3"):
        get_adapter("gpt2")


def test_no_rotation_is_identity_after_folding():
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids).logits
    apply_rotations(model, get_adapter(model.config), Rotations(r1=None, r2=None, r3=False, r4=False))
    assert all(float((layer.input_layernorm.weight - 1).abs().max()) == 0 for layer in model.model.layers)
    with torch.no_grad():
        assert _rel(model(ids).logits, ref) < 2e-6


@pytest.mark.slow
def test_real_smollm2_rotation_invariance():
    """QuaRot rotations (R1-R4, fused in float64) on the real SmolLM2 keep float32 logits to < 1e-5."""
    from conqur_vllm import assets
    from conqur_vllm.calibration.pipeline import load_model

    model, tok = load_model(assets.smollm2_dir())
    ids = tok(assets.evaluation_text()[:2000], return_tensors="pt", add_special_tokens=False).input_ids[:, :96]
    with torch.no_grad():
        ref = model(ids).logits
    model64 = model.double()
    apply_rotations(model64, get_adapter(model64.config), quarot_rotations(model64.config, seed=0))
    model64.float()
    with torch.no_grad():
        out = model64(ids).logits
    assert _rel(out, ref) < 1e-5
