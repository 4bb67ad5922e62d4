"""Camera conventions, renderer behaviour (chunking, determinism, compositing) and the demo's known answers."""
import math

import pytest
import torch

from portrait3d_core import cameras
from portrait3d_core.demo_assets import SMALL_RESOLUTIONS, analytic_mask, analytic_trigrid, demo_decoder
from portrait3d_core.renderer import RenderSettings, normalized_depth, over_colour, render_image, render_views


def _origin(c2w):
    return c2w[0, :3, 3]


def test_render_camera_frontal_and_directions():
    c2w = cameras.yaw_pitch_pose(0.0, 0.0)
    assert torch.allclose(_origin(c2w), torch.tensor([0.0, 0.0, 2.7]), atol=1e-6)
    forward = c2w[0, :3, 2]
    target = torch.tensor(cameras.LOOKAT) - _origin(c2w)
    assert torch.allclose(forward, target / target.norm(), atol=1e-6)
    assert c2w[0, 1, 1] < 0                                   # OpenCV: camera y points down
    assert _origin(cameras.yaw_pitch_pose(30.0, 0.0))[0] > 0   # +yaw → +x
    assert _origin(cameras.yaw_pitch_pose(0.0, 20.0))[1] > 0   # +pitch → up
    assert torch.allclose(_origin(cameras.yaw_pitch_pose(90.0, 0.0)), torch.tensor([2.7, 0.0, 0.0]), atol=1e-5)


def test_render_camera_conventions_agree():
    gan = cameras.gan_pose(math.pi / 2 + math.radians(25), math.pi / 2)
    assert torch.allclose(gan, cameras.yaw_pitch_pose(25.0, 0.0), atol=1e-6)
    # EG3D's pitch → polar angle is non-linear: v = π/2 − 30° puts the camera at polar 70.53° (19.47° up).
    up = cameras.gan_pose(math.pi / 2, math.pi / 2 - math.radians(30))
    assert torch.allclose(up, cameras.yaw_pitch_pose(0.0, 90 - 70.528779), atol=1e-5)
    assert torch.allclose(cameras.sds_pose(40.0, 80.0), cameras.yaw_pitch_pose(40.0, 10.0), atol=1e-6)
    assert abs(cameras.SDS_FOCAL - 6.4848) < 1e-3


def test_render_camera_label_layout_and_average_camera():
    label = cameras.camera_label(cameras.gan_pose(math.pi / 2, math.pi / 2), cameras.GAN_FOCAL)
    assert label.shape == (1, 25)
    assert torch.allclose(label[0, 16:], torch.tensor([6.5104166, 0, 0.5, 0, 6.5104166, 0.5, 0, 0, 1]))
    rot = label[0, :16].reshape(4, 4)[:3, :3]
    avg_rot = torch.tensor([[1.0, 0, 0], [0, -0.99951, 0.024033], [0, -0.024033, -0.99951]])
    assert torch.allclose(rot, avg_rot, atol=2e-4)
    flipped = cameras.flip_label(cameras.camera_label(cameras.yaw_pitch_pose(30.0, 5.0)))
    assert torch.allclose(flipped, cameras.camera_label(cameras.yaw_pitch_pose(-30.0, 5.0)), atol=1e-6)


def test_render_turntable_presets():
    full = cameras.preset_labels("paper_360")
    small = cameras.preset_labels("paper_small_orbit")
    assert full.shape == (240, 25) and small.shape == (120, 25)
    x = small[:, 3]
    assert x.max() > 0.9 and x.min() < -0.9                 # ±20° yaw at radius 2.7 → |x| ≈ 0.92
    assert torch.allclose(full[0], cameras.camera_label(cameras.yaw_pitch_pose(0.0, 0.0))[0], atol=1e-5)
    with pytest.raises(ValueError, match="unknown turntable preset"):
        cameras.preset_labels("spin")


@pytest.fixture(scope="module")
def demo():
    return analytic_trigrid(resolutions=SMALL_RESOLUTIONS), demo_decoder()


def test_render_chunking_does_not_change_the_image(demo):
    tg, dec = demo
    c = cameras.camera_label(cameras.yaw_pitch_pose(20.0, 5.0))
    base = RenderSettings(deterministic=True).portrait3d(coarse_samples=24, fine_samples=24)
    with torch.no_grad():
        a = render_image(tg, dec, c, 32, base)
        b = render_image(tg, dec, c, 32, RenderSettings(**{**base.__dict__, "chunk_samples": 48 * 37}))
    assert torch.allclose(a.image, b.image, atol=1e-5)
    assert torch.allclose(a.weight_sum, b.weight_sum, atol=1e-6)


def test_render_stochastic_mode_is_seeded_and_close_to_deterministic(demo):
    tg, dec = demo
    c = cameras.camera_label(cameras.yaw_pitch_pose(0.0, 0.0))
    s = RenderSettings().portrait3d(coarse_samples=32, fine_samples=32)
    with torch.no_grad():
        r1 = render_image(tg, dec, c, 32, s, generator=torch.Generator().manual_seed(3))
        r2 = render_image(tg, dec, c, 32, s, generator=torch.Generator().manual_seed(3))
        r3 = render_image(tg, dec, c, 32, s, generator=torch.Generator().manual_seed(4))
        det = render_image(tg, dec, c, 32, RenderSettings(deterministic=True).portrait3d(coarse_samples=32,
                                                                                         fine_samples=32))
    assert torch.equal(r1.image, r2.image)
    assert not torch.equal(r1.image, r3.image)
    assert (r1.weight_sum - det.weight_sum).abs().mean() < 0.02


@pytest.mark.parametrize("yaw", [0.0, 90.0, 180.0])
def test_render_demo_mask_matches_analytic_shape(demo, yaw):
    tg, dec = demo
    c = cameras.camera_label(cameras.yaw_pitch_pose(yaw, 0.0))
    with torch.no_grad():
        result = render_image(tg, dec, c, 64, RenderSettings().portrait3d())
    pred = result.weight_sum[0, 0] > 0.5
    truth = analytic_mask(c, 64)[0]
    iou = (pred & truth).sum() / (pred | truth).sum()
    assert iou >= 0.9, f"IoU {iou:.3f}"


def test_render_colour_background_and_depth_image(demo):
    tg, dec = demo
    c = cameras.camera_label(cameras.yaw_pitch_pose(0.0, 0.0))
    with torch.no_grad():
        views = render_views(tg, dec, torch.cat([c, c]), 32, RenderSettings().portrait3d())
    on_red = over_colour(views, dec, (1.0, 0.0, 0.0))
    empty = views.weight_sum[:, 0] < 1e-4
    solid = views.weight_sum[:, 0] > 0.999
    assert empty.any() and solid.any()
    red = torch.tensor([1.0, -1.0, -1.0])
    assert torch.allclose(on_red.permute(0, 2, 3, 1)[empty], red.expand(int(empty.sum()), 3), atol=1e-3)
    assert torch.allclose(on_red.permute(0, 2, 3, 1)[solid], views.image.permute(0, 2, 3, 1)[solid], atol=2e-3)
    depth01 = normalized_depth(views.depth, views.weight_sum)
    assert depth01.min() >= 0 and depth01.max() <= 1
    assert (depth01[:, 0][empty] == 0).all() and (depth01[:, 0][solid] > 0).all()


def test_render_rejects_bad_settings_and_cameras(demo):
    tg, dec = demo
    with pytest.raises(ValueError, match="ray_start < ray_end"):
        RenderSettings(ray_start=3.0, ray_end=2.0)
    with pytest.raises(ValueError, match=r"\[B, 25\]"):
        render_image(tg, dec, torch.zeros(1, 16), 16)
    with pytest.raises(ValueError, match="NaN"):
        render_image(tg, dec, torch.full((1, 25), float("nan")), 16)
    with pytest.raises(ValueError, match="camera"):
        render_image(tg, dec, cameras.camera_label(cameras.yaw_pitch_pose([0.0, 10.0], [0.0, 0.0])), 16)


def test_render_views_renders_every_trigrid_of_a_batch_item_major(demo):
    """A batch of B tri-grids × N cameras → B·N views, view b·N + n = tri-grid b from camera n."""
    from portrait3d_core.trigrid import stack

    tg, dec = demo
    other = tg.to()
    other.levels = [level.flip(-1) for level in other.levels]      # a different portrait: mirrored planes
    other.ws = tg.ws + 0.5
    c = cameras.camera_label(cameras.yaw_pitch_pose([0.0, 40.0, -70.0], [0.0, 5.0, -5.0]))
    seen = []
    settings = RenderSettings(deterministic=True).portrait3d(coarse_samples=16, fine_samples=16)
    with torch.no_grad():
        views = render_views(stack([tg, other]), dec, c, 24, settings,
                             on_view=lambda done, total: seen.append((done, total)))
        singles = [render_views(t, dec, c, 24, settings) for t in (tg, other)]
    assert seen == [(i, 6) for i in range(1, 7)]
    for name in ("image", "depth", "weight_sum"):
        want = torch.cat([getattr(s, name) for s in singles])
        torch.testing.assert_close(getattr(views, name), want)
    assert not torch.allclose(singles[0].image, singles[1].image)
