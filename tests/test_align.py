"""Stage 2 alignment (``portrait3d_core.align``) on real photographs that ship inside scikit-image.

Stated tolerances (measured spread of the Haar detections, ×~2): the same photo shifted by up to 60 px and scaled
by 0.8 … 2 gives a camera whose centre direction is within 4° and whose roll is within 2° of the original's, and a
crop that maps back to the same square of the photo within 5 % of its side. Detection is mirror-symmetrised, so a
flipped photo gives the mirrored camera to float round-off (1e-5).
"""
from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("cv2", reason="the [align] extra (requirements-align.txt) is not installed")
skimage_data = pytest.importorskip("skimage.data")

from portrait3d_core import cameras                                            # noqa: E402
from portrait3d_core.align import (AlignDependencyError, AlignSettings, FaceCutOffError, FaceTooSmallError,  # noqa: E402
                                   NoPersonError, SeveralPeopleError, align)
from portrait3d_core.align import camera as align_camera                      # noqa: E402
from portrait3d_core.align.landmarks import FALLBACK                          # noqa: E402


@pytest.fixture(scope="module")
def astronaut():
    return skimage_data.astronaut()


@pytest.fixture(scope="module")
def aligned(astronaut):
    return align(astronaut)


def _resize(img, size):
    return np.asarray(Image.fromarray(img).resize((size, size), Image.LANCZOS))


def _direction_deg(c1, c2):
    o1, o2 = c1[[3, 7, 11]].double(), c2[[3, 7, 11]].double()
    return math.degrees(math.acos(min(1.0, float(o1 @ o2 / (o1.norm() * o2.norm())))))


def _eyes_in_crop(result):
    """The detected eyes (photo px) expressed in crop px."""
    x0, y0, side = result.info["crop_px"]
    r = result.image.shape[0]
    return torch.tensor([[(x - x0) / side * r, (y - y0) / side * r] for x, y in result.info["eyes_px"]])


def test_align_astronaut_crop_camera_mask(aligned):
    r = aligned
    assert r.image.shape == (512, 512, 3) and r.image.dtype == torch.float32
    assert float(r.image.min()) >= 0 and float(r.image.max()) <= 1
    assert r.camera_label.shape == (25,) and r.mask.shape == (512, 512)
    pose, k = cameras.split_label(r.camera_label[None])
    pose, k = pose[0].double(), k[0].double()
    torch.testing.assert_close(k, torch.tensor([[cameras.GAN_FOCAL, 0, 0.5], [0, cameras.GAN_FOCAL, 0.5], [0, 0, 1]],
                                               dtype=torch.float64))
    rot, origin = pose[:3, :3], pose[:3, 3]
    torch.testing.assert_close(rot.T @ rot, torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
    assert abs(float(torch.det(rot)) - 1) < 1e-5
    assert abs(float(origin.norm()) - 2.7) < 1e-5                       # on the radius-2.7 sphere around the neck
    to_lookat = torch.tensor(cameras.LOOKAT, dtype=torch.float64) - origin
    assert float(torch.linalg.cross(rot[:, 2], to_lookat).norm()) < 1e-5    # optical axis through (0, 0.0649, 0)
    assert float(rot[:, 2] @ to_lookat) > 0
    # a near-frontal photo: the camera is in front (+z), within 10° of the frontal one
    assert _direction_deg(r.camera_label, align_camera.label(align_camera.cam2world(0, 0))) < 10
    # the template eyes projected with the label land on the detected eyes in the crop (the crop and camera agree)
    projected = align_camera.project(FALLBACK.tensor(), pose) * 512
    torch.testing.assert_close(projected.float(), _eyes_in_crop(r).float(), atol=1.0, rtol=0)
    # the mask: the person (face centre, chest) in, the top corners out, a plausible share of the crop
    fx, fy, fw, fh = r.info["face_box_px"]
    x0, y0, side = r.info["crop_px"]
    cx, cy = int((fx + fw / 2 - x0) / side * 512), int((fy + fh / 2 - y0) / side * 512)
    assert r.mask[cy, cx] == 1 and r.mask[500, cx] == 1
    assert r.mask[:40, :40].sum() == 0 and r.mask[:40, -40:].sum() == 0
    assert 0.2 < float(r.mask.mean()) < 0.8
    assert set(torch.unique(r.mask).tolist()) <= {0.0, 1.0}
    assert r.info["faces"] == 1 and r.info["fallback"] is None


def test_align_shift_and_scale_give_the_same_camera(astronaut, aligned):
    ref = aligned
    rx0, ry0, rside = ref.info["crop_px"]
    cases = {"shift": (astronaut[30:, 50:], 50, 30, 1.0),
             "scale_1.5": (_resize(astronaut, 768), 0, 0, 1.5),
             "scale_0.8": (_resize(astronaut, 410), 0, 0, 410 / 512),
             "shift_scale_2": (_resize(astronaut[40:, 40:], 944), 40, 40, 2.0)}
    for name, (img, dx, dy, s) in cases.items():
        r = align(img)
        assert _direction_deg(r.camera_label, ref.camera_label) < 4.0, name
        assert abs(r.info["roll_deg"] - ref.info["roll_deg"]) < 2.0, name
        x0, y0, side = r.info["crop_px"]
        back = torch.tensor([x0 / s + dx, y0 / s + dy, side / s])
        torch.testing.assert_close(back, torch.tensor([rx0, ry0, rside]), atol=0.05 * rside, rtol=0, msg=name)


def test_align_flip_gives_the_mirrored_camera(astronaut, aligned):
    flipped = align(np.ascontiguousarray(astronaut[:, ::-1]))
    torch.testing.assert_close(flipped.camera_label, cameras.flip_label(aligned.camera_label[None])[0],
                               atol=1e-5, rtol=0)
    assert flipped.info["yaw_deg"] == pytest.approx(-aligned.info["yaw_deg"], abs=1e-6)
    assert flipped.info["roll_deg"] == pytest.approx(-aligned.info["roll_deg"], abs=1e-6)
    torch.testing.assert_close(flipped.image, aligned.image.flip(1), atol=2e-3, rtol=0)


def test_align_roll_follows_a_rotated_photo(astronaut, aligned):
    """Turning the photo by +12° (counter-clockwise) turns the eye line by −12° in the image (y down)."""
    from skimage.transform import rotate

    turned = (rotate(astronaut, 12, resize=False, mode="reflect") * 255).round().astype(np.uint8)
    r = align(turned)
    assert r.info["roll_deg"] == pytest.approx(aligned.info["roll_deg"] - 12, abs=3.0)
    pose = cameras.split_label(r.camera_label[None])[0][0].double()
    projected = align_camera.project(FALLBACK.tensor(), pose) * 512
    torch.testing.assert_close(projected.float(), _eyes_in_crop(r).float(), atol=1.0, rtol=0)


def test_align_no_person():
    with pytest.raises(NoPersonError, match="no person"):
        align(skimage_data.chelsea())


def test_align_several_people(astronaut):
    with pytest.raises(SeveralPeopleError, match="several people"):
        align(np.concatenate([astronaut, astronaut], axis=1))


def test_align_face_too_small(astronaut):
    with pytest.raises(FaceTooSmallError, match="too small"):
        align(astronaut, AlignSettings(min_face_px=128))


def test_align_face_cut_off(astronaut):
    with pytest.raises(FaceCutOffError, match="cut off"):
        align(np.ascontiguousarray(astronaut[75:, :]))


def test_align_frontal_center_crop_is_opt_in_and_flagged():
    cat = skimage_data.chelsea()
    r = align(cat, AlignSettings(when_no_person="frontal_center_crop"))
    assert r.info["fallback"] == "frontal_center_crop" and "no person" in r.info["reason"]
    torch.testing.assert_close(r.camera_label, cameras.camera_label(cameras.yaw_pitch_pose(0.0, 0.0))[0])
    h, w = cat.shape[:2]
    torch.testing.assert_close(r.info["crop_px"], [(w - h) / 2, 0.0, float(h)])
    assert r.image.shape == (512, 512, 3) and bool((r.mask == 1).all())
    with pytest.raises(ValueError, match="when_no_person"):
        AlignSettings(when_no_person="silent")


def test_align_uses_the_checkpoint_smpl_eyes(astronaut, aligned):
    """Eyes taken from the SMPL buffers (by extra_joints_idxs) replace the fallback template: the same template
    gives the same result, eyes twice as far apart give a crop half the size around the same eyes."""
    def fake_smpl(scale):
        vertices = torch.zeros(6890, 3)
        vertices[6260] = torch.tensor(FALLBACK.eye_right) * torch.tensor([scale, 1, 1])
        vertices[2800] = torch.tensor(FALLBACK.eye_left) * torch.tensor([scale, 1, 1])
        return types.SimpleNamespace(shaped_vertices=vertices, source="test",
                                     extra_joints_idxs=torch.tensor([332, 6260, 2800, 4071, 583]))

    same = align(astronaut, smpl=fake_smpl(1.0))
    assert same.info["landmarks"].startswith("checkpoint SMPL")
    torch.testing.assert_close(same.camera_label, aligned.camera_label)
    torch.testing.assert_close(same.info["crop_px"], aligned.info["crop_px"], atol=1e-4, rtol=0)   # float32 vertices
    wide = align(astronaut, smpl=fake_smpl(2.0))
    assert wide.info["crop_px"][2] == pytest.approx(aligned.info["crop_px"][2] / 2, rel=0.02)


def test_align_without_opencv_says_how_to_install(monkeypatch, astronaut):
    from portrait3d_core.align import detect

    monkeypatch.setitem(sys.modules, "cv2", None)
    monkeypatch.setattr(detect, "_CASCADES", {})
    with pytest.raises(AlignDependencyError, match="requirements-align.txt"):
        align(astronaut)


def test_align_extra_is_the_requirements_file():
    """Every install path names the same requirement: the [align] extra, requirements-align.txt, the error text."""
    import tomllib

    from conftest import ROOT
    from portrait3d_core.align.errors import INSTALL_HINT

    with open(f"{ROOT}/pyproject.toml", "rb") as fh:
        extra = tomllib.load(fh)["project"]["optional-dependencies"]["align"]
    with open(f"{ROOT}/requirements-align.txt") as fh:
        lines = [line.split("#", 1)[0].strip() for line in fh if line.split("#", 1)[0].strip()]
    assert extra == lines == ["opencv-python-headless>=4.13,<5"]
    assert "requirements-align.txt" in INSTALL_HINT and "scripts/install_align.py" in INSTALL_HINT
