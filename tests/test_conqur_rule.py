"""The corner/Procrustes rule: closed form, monotone objective, determinism, bounded memory."""

import itertools

import torch

from conqur_vllm.hadamard import random_hadamard_matrix
from conqur_vllm.quant import QuantSpec, fake_quantize
from conqur_vllm.rotation.conqur import (
    CornerSite,
    corner_moment,
    corner_objective,
    corners,
    grid_target,
    normalize_rows,
    procrustes,
    target_objective,
)


def _outlier_vectors(n=512, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:, :3] *= 20.0  # a few outlier channels, as in LLM activations
    return normalize_rows(x)


def _low_rank_vectors(n=512, d=64, seed=0):
    """Vectors near a fixed 2-D subspace (shared across seeds), whose Hadamard image is not flat."""
    basis = torch.randn(d, 2, generator=torch.Generator().manual_seed(99), dtype=torch.float64) * 3.0
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64) @ basis.T
    return normalize_rows(x + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64))


def test_corners_sign_zero_is_plus():
    z = torch.tensor([[0.0, -1.0, 2.0, -0.0]], dtype=torch.float64)
    assert torch.equal(corners(z), torch.tensor([[0.5, -0.5, 0.5, 0.5]], dtype=torch.float64))


def test_objective_identity_matches_l1_form():
    u = _outlier_vectors()
    r = random_hadamard_matrix(64, 1)
    d = 64
    l1 = (u @ r).abs().sum(-1).mean()
    assert abs(corner_objective(u, r) - float(2 - 2 / d**0.5 * l1)) < 1e-12


def test_procrustes_is_orthogonal_and_optimal():
    u = _outlier_vectors()
    r0 = random_hadamard_matrix(64, 2)
    m = corner_moment(u, r0)
    r = procrustes(m)
    eye = torch.eye(64, dtype=torch.float64)
    assert float((r.T @ r - eye).abs().max()) < 1e-12
    c = corners(u @ r0)
    best = float(((u @ r - c) ** 2).sum())
    g = torch.Generator().manual_seed(3)
    for _ in range(20):  # no random orthogonal matrix beats the closed form for these fixed corners
        q = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))[0]
        assert float(((u @ q - c) ** 2).sum()) >= best - 1e-9


def test_objective_never_rises_on_a_fixed_batch():
    u = _outlier_vectors()
    site = CornerSite(random_hadamard_matrix(64, 0))
    values = [corner_objective(u, site.rotation)]
    for _ in range(6):
        before, after = site.update(u, alternations=1)
        assert abs(before - values[-1]) < 1e-12
        values.append(after)
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(values))
    assert values[-1] < values[0] - 0.01  # it actually learns


def test_ema_and_weights_and_extra_rows_keep_rotation_orthogonal():
    u = _outlier_vectors()
    rows = _outlier_vectors(seed=5)
    site = CornerSite(random_hadamard_matrix(64, 0), accumulate="ema", decay=0.5)
    for _ in range(3):
        site.update(u, weights=torch.rand(u.shape[0], dtype=torch.float64) + 0.5, extra_u=rows,
                    extra_scale=2.0 * u.shape[0], alternations=2)
    eye = torch.eye(64, dtype=torch.float64)
    assert float((site.rotation.T @ site.rotation - eye).abs().max()) < 1e-12
    assert site.moment.shape == (64, 64)


def test_deterministic():
    u = _outlier_vectors()
    a, b = CornerSite(random_hadamard_matrix(64, 7)), CornerSite(random_hadamard_matrix(64, 7))
    a.update(u, alternations=3)
    b.update(u, alternations=3)
    assert torch.equal(a.rotation, b.rotation)


def test_grid_target_lowers_the_quantizers_error_on_held_out_vectors():
    """Procrustes towards the INT4 grid reduces the per-token INT4 error of ``u R``, also on unseen vectors."""
    spec = QuantSpec(bits=4, symmetric=True, clip_ratio=0.9)
    train, held_out = _low_rank_vectors(seed=1), _low_rank_vectors(seed=2)
    start = random_hadamard_matrix(64, 0)
    site = CornerSite(start.clone(), target=grid_target(spec))
    before, after = site.update(train, alternations=3)
    assert abs(before - target_objective(train @ start, grid_target(spec))) < 1e-12
    assert after < before
    for u in (train, held_out):
        err = [float((u @ r - fake_quantize(u @ r, spec)).pow(2).sum()) for r in (start, site.rotation)]
        assert err[1] < 0.97 * err[0]
    eye = torch.eye(64, dtype=torch.float64)
    assert float((site.rotation.T @ site.rotation - eye).abs().max()) < 1e-12


def test_a_stack_of_sites_matches_separate_sites():
    """One batched site over S stacked rotations equals S separate sites (rotations, moments, mean objective)."""
    starts = [random_hadamard_matrix(64, s) for s in range(3)]
    data = [_outlier_vectors(seed=s) for s in range(3)]
    singles = [CornerSite(r.clone()) for r in starts]
    stacked = CornerSite(torch.stack(starts))
    for _ in range(2):
        single_obj = [site.update(u, alternations=2) for site, u in zip(singles, data, strict=True)]
        before, after = stacked.update(torch.stack(data), alternations=2)
        assert abs(before - sum(b for b, _ in single_obj) / 3) < 1e-12
        assert abs(after - sum(a for _, a in single_obj) / 3) < 1e-12
    for i, site in enumerate(singles):
        rel = (stacked.rotation[i] - site.rotation).norm() / site.rotation.norm()
        assert float(rel) < 1e-12
        assert float((stacked.moment[i] - site.moment).norm() / site.moment.norm()) < 1e-12
