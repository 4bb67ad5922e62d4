"""``fast`` render mode (occupancy grid, early ray termination, fine samples only on hit rays) against the exact one.

Quality contract (issue 13): PSNR >= 40 dB on the image (in [-1, 1], peak-to-peak 2) and mask IoU >= 0.995, on the
demo asset and on a GAN sample of the reduced oracle generator; gradients w.r.t. the levels agree with the exact
mode's (the skipped points carry no visible density, so their gradient is negligible) and are the true gradients
of the evaluated points (finite differences).
"""
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from portrait3d_core import cameras, occupancy
from portrait3d_core.decoder import Decoder, decoder_state_from
from portrait3d_core.demo_assets import SMALL_RESOLUTIONS, analytic_trigrid, demo_decoder
from portrait3d_core.renderer import RenderSettings, render_image, render_views
from portrait3d_core.trigrid import TriGrid

YAWS_DEG = (0.0, 100.0, 200.0)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (((a - b) / 2) ** 2).mean().clamp_min(1e-20)
    return float(10 * torch.log10(1 / mse))


def mask_iou(a: torch.Tensor, b: torch.Tensor, threshold: float) -> float:
    ma, mb = a > threshold, b > threshold
    union = (ma | mb).sum()
    assert union > 0, "empty masks: the test view shows nothing"
    return float((ma & mb).sum() / union)


@pytest.fixture(scope="module")
def demo():
    return analytic_trigrid(resolutions=SMALL_RESOLUTIONS), demo_decoder()


@pytest.fixture(scope="module")
def gan_sample():
    decoder = Decoder.from_state_dict(decoder_state_from(
        load_file(os.path.join(FIXTURES, "generator_state_dict.safetensors"))))
    data = load_file(os.path.join(FIXTURES, "case_0.safetensors"))
    keys = sorted((k for k in data if k.startswith("trigrid.")), key=lambda k: int(k.split(".")[1]))
    return TriGrid([data[k] for k in keys], data["mapping.ws"]), decoder.requires_grad_(False), data["input.c_render"]


def _pair(trigrid, decoder, c, resolution, seed=None, **changes):
    results = []
    for fast in (False, True):
        settings = RenderSettings(fast=fast, **changes).portrait3d()
        rng = None if seed is None else torch.Generator().manual_seed(seed)
        with torch.no_grad():
            results.append(render_image(trigrid, decoder, c, resolution, settings, generator=rng))
    return results


def _label(yaw_deg):
    return cameras.camera_label(cameras.yaw_pitch_pose(yaw_deg, 5.0))


@pytest.mark.parametrize("yaw_deg", YAWS_DEG)
def test_fast_render_quality_demo_asset(demo, yaw_deg):
    exact, fast = _pair(*demo, _label(yaw_deg), 64, deterministic=True)
    assert psnr(fast.image, exact.image) >= 40.0
    assert mask_iou(fast.mask, exact.mask, 0.5) >= 0.995


def test_fast_render_quality_demo_asset_random_depths(demo):
    """With jitter: both modes draw the same depths from the same generator."""
    exact, fast = _pair(*demo, _label(30.0), 64, seed=5)
    assert psnr(fast.image, exact.image) >= 40.0
    assert mask_iou(fast.mask, exact.mask, 0.5) >= 0.995


@pytest.mark.parametrize("view", ["oracle_camera", "side", "back"])
def test_fast_render_quality_gan_sample(gan_sample, view):
    """The reduced generator (random weights) makes a translucent fog (Σw ≤ 0.16): its mask is Σw > half the
    exact render's maximum."""
    trigrid, decoder, c_render = gan_sample
    c = {"oracle_camera": c_render, "side": _label(90.0), "back": _label(180.0)}[view]
    exact, fast = _pair(trigrid, decoder, c, 48, deterministic=True)
    assert psnr(fast.image, exact.image) >= 40.0
    assert mask_iou(fast.mask, exact.mask, 0.5 * float(exact.mask.max())) >= 0.995


def test_fast_render_evaluates_fewer_points(demo):
    """Fast mode must actually skip: count the decoder's points in both modes."""
    trigrid, decoder = demo
    counts = {}
    for fast in (False, True):
        seen = []
        hook = decoder.decoder.register_forward_hook(lambda m, args, out: seen.append(args[0][..., 0].numel()))
        try:
            with torch.no_grad():
                render_image(trigrid, decoder, _label(20.0), 48, RenderSettings(fast=fast).portrait3d())
        finally:
            hook.remove()
        counts[fast] = sum(seen)
    assert counts[False] == 48 * 48 * 96
    assert counts[True] < 0.35 * counts[False]


def _level_grads(trigrid, decoder, c, resolution, fast, weight, dtype=torch.float32, **changes):
    levels = [level.detach().clone().to(dtype).requires_grad_(True) for level in trigrid.levels]
    tg = TriGrid(levels, trigrid.ws.to(dtype), trigrid.box_warp)
    settings = RenderSettings(fast=fast, deterministic=True, **changes).portrait3d()
    out = render_image(tg, decoder.to(dtype), c.to(dtype), resolution, settings)
    (out.image * weight.to(dtype)).sum().backward()
    return [level.grad for level in levels]


@pytest.mark.parametrize("asset", ["demo", "gan_sample"])
def test_fast_render_gradients_match_exact(request, asset):
    trigrid, decoder, *rest = request.getfixturevalue(asset)
    c = rest[0] if rest else _label(40.0)
    weight = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    exact = _level_grads(trigrid, decoder, c, 32, False, weight)
    fast = _level_grads(trigrid, decoder, c, 32, True, weight)
    for e, f in zip(exact, fast):
        scale = e.abs().max().clamp_min(1e-12)
        assert float((e - f).abs().max() / scale) <= 2e-2
        assert float((e - f).norm() / e.norm().clamp_min(1e-12)) <= 1e-2


def test_fast_render_gradients_are_exact_on_evaluated_points(demo):
    """float64: the autograd gradient of a fast render equals central differences along a random direction (the
    occupancy grid is reused: the perturbation is far below its rebuild threshold). Coarse samples only: importance
    depths move with the levels but carry no gradient, in both modes."""
    trigrid, decoder = demo
    decoder = decoder.double()
    levels = [level.detach().double().clone().requires_grad_(True) for level in trigrid.levels]
    tg = TriGrid(levels, trigrid.ws.double(), trigrid.box_warp)
    c = _label(60.0).double()
    settings = RenderSettings(fast=True, deterministic=True, coarse_samples=48, fine_samples=0).portrait3d()
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(1, 3, 16, 16, generator=g, dtype=torch.float64)
    direction = [torch.randn(level.shape, generator=g, dtype=torch.float64) for level in levels]
    loss = lambda: (render_image(tg, decoder, c, 16, settings).image * weight).sum()  # noqa: E731
    loss().backward()
    analytic = sum(float((level.grad * d).sum()) for level, d in zip(levels, direction))
    builds = occupancy.BUILDS["count"]
    eps = 1e-6
    with torch.no_grad():
        for level, d in zip(levels, direction):
            level.add_(eps * d)
        plus = float(loss())
        for level, d in zip(levels, direction):
            level.sub_(2 * eps * d)
        minus = float(loss())
        for level, d in zip(levels, direction):
            level.add_(eps * d)
    assert occupancy.BUILDS["count"] == builds
    numeric = (plus - minus) / (2 * eps)
    assert abs(analytic) > 1e-3
    assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic))


def test_fast_render_occupancy_rebuilt_only_after_large_change(demo):
    trigrid, decoder = demo
    levels = [level.clone().requires_grad_(True) for level in trigrid.levels]
    tg = TriGrid(levels, trigrid.ws, trigrid.box_warp)
    settings = RenderSettings(fast=True, coarse_samples=8, fine_samples=8).portrait3d()
    threshold = settings.occupancy.rebuild_threshold
    with torch.no_grad():
        render_image(tg, decoder, _label(0.0), 8, settings)
        builds = occupancy.BUILDS["count"]
        levels[-1].add_(0.5 * threshold)                   # small optimiser step: grid kept
        render_image(tg, decoder, _label(0.0), 8, settings)
        assert occupancy.BUILDS["count"] == builds
        levels[-1][:, :, :, :4] += 4 * threshold            # large change since the build: rebuilt
        render_image(tg, decoder, _label(0.0), 8, settings)
        assert occupancy.BUILDS["count"] == builds + 1


def test_fast_render_turntable_shares_one_grid(demo):
    trigrid, decoder = demo
    fresh = TriGrid([level.clone() for level in trigrid.levels], trigrid.ws, trigrid.box_warp)
    labels = cameras.orbit_labels(4, 0.0, 2.7, cameras.DEFAULT_FOCAL) if hasattr(cameras, "DEFAULT_FOCAL") \
        else torch.cat([_label(yaw) for yaw in (0.0, 90.0, 180.0, 270.0)])
    builds = occupancy.BUILDS["count"]
    with torch.no_grad():
        views = render_views(fresh, decoder, labels, 16, RenderSettings(fast=True, coarse_samples=8,
                                                                         fine_samples=8).portrait3d())
    assert views.image.shape[0] == 4
    assert occupancy.BUILDS["count"] == builds + 1


def test_fast_render_occupancy_covers_the_analytic_shape(demo):
    """Every point inside the analytic head (within the crop) lies in an occupied cell."""
    from portrait3d_core.demo_assets import analytic_occupancy

    trigrid, decoder = demo
    grid = occupancy.build_occupancy(trigrid, decoder)
    points = (torch.rand(1, 200_000, 3, generator=torch.Generator().manual_seed(6)) - 0.5) * trigrid.box_warp
    inside = analytic_occupancy(points[0])
    assert int(inside.sum()) > 1000
    assert bool(grid.lookup(points)[0][inside].all())
    assert grid.fraction() < 0.25


def test_fast_render_runs_through_triton_kernels():
    """Fast mode is renderer-level: with the Triton backend (interpreted on CPU here) it gives the CPU path's image
    and the exact Triton render's quality."""
    from portrait3d_kernels import trigrid_triton as tt

    device = torch.device("cpu" if tt.INTERPRETED else "cuda")
    trigrid = analytic_trigrid(resolutions=(16, 32)).to(device)
    decoder = demo_decoder().to(device)
    c = _label(30.0).to(device)
    images = {}
    for backend in ("triton", "cpu") if device.type == "cpu" else ("triton",):
        for fast in (False, True):
            settings = RenderSettings(fast=fast, backend=backend, deterministic=True, coarse_samples=12,
                                      fine_samples=12, occupancy=occupancy.OccupancySettings(resolution=24))
            with torch.no_grad():
                images[backend, fast] = render_image(trigrid, decoder, c, 12, settings.portrait3d())
    exact, fast = images["triton", False], images["triton", True]
    assert psnr(fast.image, exact.image) >= 40.0
    assert mask_iou(fast.mask, exact.mask, 0.5) >= 0.995
    if ("cpu", True) in images:
        torch.testing.assert_close(fast.image, images["cpu", True].image, atol=1e-4, rtol=0)
