"""Tri-grid sampling: reference and fast CPU backends against the official oracle, gradients, bad input."""
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from portrait3d_core._kernels import kernels
from portrait3d_core.trigrid import TriGrid

sample_trigrid = kernels.sample_trigrid
reference = kernels.trigrid_reference.sample_trigrid_reference
CPU_BACKENDS = ["reference", "cpu"]


@pytest.fixture(scope="module")
def oracle():
    return load_file(os.path.join(FIXTURES, "trigrid_sampling.safetensors"))


def _levels(oracle):
    return [oracle[f"trigrid.level{i}"] for i in range(3)]


def _coords(oracle):
    return oracle["input.points"] * (2.0 / oracle["input.box_warp"])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sampling_matches_oracle_all_levels(oracle, backend):
    out = sample_trigrid(_levels(oracle), _coords(oracle), backend=backend)
    ref = oracle["sampled_features"].mean(1)          # per-plane level means → plane mean
    assert out.shape == (2, 300, 12)
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("plane", [0, 1, 2])
def test_sampling_matches_oracle_per_plane(oracle, backend, plane):
    """Zero the other planes: the output is then exactly plane ``plane``'s features / 3 (catches axis swaps)."""
    levels = [lvl.clone() for lvl in _levels(oracle)]
    for lvl in levels:
        for other in {0, 1, 2} - {plane}:
            lvl[:, other] = 0
    out = sample_trigrid(levels, _coords(oracle), backend=backend)
    ref = oracle["sampled_features"][:, plane] / 3
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("level", [0, 1, 2])
def test_sampling_matches_oracle_single_level(oracle, backend, level):
    """Level 2 is non-square (12 × 20): catches H/W swaps."""
    out = sample_trigrid([_levels(oracle)[level]], _coords(oracle), backend=backend)
    ref = oracle[f"sampled_features.level{level}_only"].mean(1)
    assert (out - ref).abs().max().item() <= 1e-5


def test_sampling_reference_projection_matches_oracle(oracle):
    planes = kernels.trigrid_reference.project_to_planes(_coords(oracle))
    assert torch.allclose(planes.reshape(6, 300, 3), oracle["projected_coordinates"], atol=1e-6)


def _away_from_cell_boundaries(n, sizes, generator, dtype=torch.float64):
    """Random coords in ±1.2 whose continuous texel coordinate stays ≥ 0.1 from an integer on every axis/level."""
    pts = []
    while sum(p.shape[0] for p in pts) < n:
        q = (torch.rand(4 * n, 3, generator=generator, dtype=dtype) * 2.4 - 1.2)
        ok = torch.ones(q.shape[0], dtype=torch.bool)
        for size in list(sizes) + [3]:
            f = ((q + 1) * size - 1) / 2
            ok &= ((f - f.round()).abs() > 0.1).all(-1)
        pts.append(q[ok])
    return torch.cat(pts)[:n]


def test_sampling_cpu_kernel_gradcheck_float64():
    """Small sizes (C = 2 features × 3 depth slices, batch 2) keep the number of numerical evaluations low."""
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (2, 5), (4, 3)]
    levels = [torch.randn(2, 3, 6, h, w, dtype=torch.float64, generator=g).requires_grad_(True) for h, w in shapes]
    coords = _away_from_cell_boundaries(2 * 6, [2, 3, 4, 5], g).reshape(2, 6, 3).requires_grad_(True)
    fn = lambda c, *lv: sample_trigrid(list(lv), c, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (coords, *levels), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shapes", [[(8, 8)], [(8, 8), (16, 16), (12, 20)], [(5, 9), (16, 16), (32, 32), (64, 64)]])
def test_sampling_cpu_kernel_gradients_match_reference(shapes):
    g = torch.Generator().manual_seed(1)
    levels = [torch.randn(2, 3, 36, h, w, generator=g) for h, w in shapes]
    coords = torch.rand(2, 500, 3, generator=g) * 2.6 - 1.3        # partly outside the box
    grad_out = torch.randn(2, 500, 12, generator=g)
    results = {}
    for backend in CPU_BACKENDS:
        lv = [x.clone().requires_grad_(True) for x in levels]
        c = coords.clone().requires_grad_(True)
        out = sample_trigrid(lv, c, backend=backend)
        (out * grad_out).sum().backward()
        results[backend] = (out.detach(), [x.grad for x in lv], c.grad)
    (o_ref, gl_ref, gc_ref), (o_cpu, gl_cpu, gc_cpu) = results["reference"], results["cpu"]
    assert (o_ref - o_cpu).abs().max() <= 1e-5
    for a, b in zip(gl_ref, gl_cpu):
        assert (a - b).abs().max() <= 1e-4 * max(1.0, a.abs().max().item())
    assert (gc_ref - gc_cpu).abs().max() <= 1e-4 * max(1.0, gc_ref.abs().max().item())


def test_sampling_kernel_layout_input_equals_official_layout():
    g = torch.Generator().manual_seed(2)
    levels = [torch.randn(1, 3, 36, r, r, generator=g) for r in (8, 16)]
    coords = torch.rand(1, 100, 3, generator=g) * 2 - 1
    k = [kernels.to_kernel_layout(x) for x in levels]
    assert torch.equal(kernels.from_kernel_layout(k[0]), levels[0])
    a = sample_trigrid(levels, coords, backend="cpu")
    b = sample_trigrid(k, coords, layout="kernel", backend="cpu")
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sampling_rejects_bad_input(backend):
    lv = [torch.zeros(1, 3, 36, 8, 8)]
    pts = torch.zeros(1, 10, 3)
    cases = [
        ([torch.zeros(1, 3, 35, 8, 8)], pts, "not a multiple of the depth"),
        ([torch.zeros(1, 3, 36, 8, 8), torch.zeros(1, 3, 33, 8, 8)], pts, "channels"),
        (lv, torch.zeros(2, 10, 3), "batch mismatch"),
        (lv, torch.zeros(1, 10, 2), r"\[B, M, 3\]"),
        (lv, torch.tensor([[[0.0, float("nan"), 0.0]]]), "NaN or inf"),
        (lv, torch.tensor([[[0.0, float("inf"), 0.0]]]), "NaN or inf"),
        ([torch.zeros(1, 2, 36, 8, 8)], pts, "expected"),
        ([], pts, "no levels"),
        (lv, pts.double(), "dtype mismatch"),
    ]
    for levels, coords, message in cases:
        with pytest.raises(kernels.TriGridSamplingError, match=message):
            sample_trigrid(levels, coords, backend=backend)


def test_sampling_rejects_unknown_backend():
    with pytest.raises(kernels.TriGridSamplingError, match="unknown backend"):
        sample_trigrid([torch.zeros(1, 3, 36, 8, 8)], torch.zeros(1, 1, 3), backend="fast")


def test_trigrid_sample_scales_world_points_by_box_warp(oracle):
    tg = TriGrid(_levels(oracle), box_warp=float(oracle["input.box_warp"]))
    out = tg.sample(oracle["input.points"])
    assert (out - oracle["sampled_features"].mean(1)).abs().max() <= 1e-5
