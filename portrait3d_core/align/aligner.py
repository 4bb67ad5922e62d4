"""``align(image)``: a photo → the GAN's aligned 512² crop, its 25-value camera label and a person mask
(``pipeline.md`` stage 2, §2.5; ``portrait_gan.md`` §10–11)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import cameras
from ..errors import InvalidInputError
from . import camera as cam
from . import crop as crops
from .detect import detect_faces
from .errors import FaceCutOffError, FaceTooSmallError, NoPersonError, SeveralPeopleError
from .landmarks import template

WHEN_NO_PERSON = ("error", "frontal_center_crop")


@dataclass(frozen=True)
class AlignSettings:
    """Alignment knobs; defaults follow the paper where it has a number."""
    resolution: int = 512              # stage 3 resizes the official 1024² crop to 512² (pipeline.md §2.1)
    focal: float = cameras.GAN_FOCAL   # 6.5104166 = 5000 / (1024 · 0.75), fixed intrinsics (§2.1)
    radius: float = cameras.RADIUS     # 2.7 m around the neck, looking at (0, 0.0649, 0)
    min_face_px: int = 48              # smaller faces → FaceTooSmallError (the crop would upscale > ~3.5×)
    other_face_ratio: float = 0.5      # a second face at least this wide (relative) → SeveralPeopleError
    border_margin: float = 0.1         # face box grown by this share per side must stay in the image, else cut off
    yaw_gain: float = 3.0              # yaw = asin(gain · eye offset in the face box / box width), coarse cue
    max_yaw_deg: float = 40.0          # the frontal face detector does not see larger turns
    detect_max_side: int = 800         # detection resolution cap (larger photos are downscaled for detection only)
    mask_iterations: int = 4           # GrabCut iterations of the person mask
    when_no_person: str = "error"      # or "frontal_center_crop": centre crop + frontal camera, flagged in info

    def __post_init__(self):
        if self.resolution < 64:
            raise InvalidInputError(f"resolution must be at least 64, got {self.resolution}")
        if self.when_no_person not in WHEN_NO_PERSON:
            raise InvalidInputError(f"when_no_person must be one of {WHEN_NO_PERSON}, got {self.when_no_person!r}")
        if not 0 < self.other_face_ratio <= 1:
            raise InvalidInputError("other_face_ratio must be in (0, 1]")
        if self.min_face_px < 12 or self.detect_max_side < 64:
            raise InvalidInputError("min_face_px must be >= 12 and detect_max_side >= 64")


@dataclass
class AlignedPortrait:
    image: torch.Tensor          # [R, R, 3] float 0..1
    camera_label: torch.Tensor   # [25] float32
    mask: torch.Tensor           # [R, R] float {0, 1}
    info: dict = field(default_factory=dict)


def _as_image(image) -> torch.Tensor:
    """[H, W, 3] / [H, W] (torch or numpy, float 0..1 or uint8) → float32 torch [H, W, 3] on the CPU."""
    t = image if torch.is_tensor(image) else torch.from_numpy(np.array(image))
    if t.dim() == 2:
        t = t[..., None].expand(*t.shape, 3)
    if t.dim() != 3 or t.shape[-1] not in (3, 4):
        raise InvalidInputError(f"align takes one image [H, W, 3], got shape {tuple(t.shape)}")
    t = t[..., :3]
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    if not bool(torch.isfinite(t).all()):
        raise InvalidInputError("the image contains NaN or inf")
    if min(t.shape[:2]) < 32:
        raise InvalidInputError(f"the image is {t.shape[1]}×{t.shape[0]} px; give at least 32 px per side")
    return t.detach().cpu().clamp(0, 1).contiguous()


def frontal_center_crop(image, settings: AlignSettings = AlignSettings(), reason: str = "") -> AlignedPortrait:
    """The opt-in fallback: centre square crop, the GAN's default frontal camera (yaw = pitch = 0), full mask."""
    img = _as_image(image)
    h, w = img.shape[:2]
    side = float(min(h, w))
    x0, y0 = (w - side) / 2, (h - side) / 2
    out = crops.crop(img, x0, y0, side, settings.resolution)
    label = cam.label(cam.cam2world(0.0, 0.0, 0.0, settings.radius), settings.focal)
    info = {"fallback": "frontal_center_crop", "reason": reason, "crop_px": [x0, y0, side], "yaw_deg": 0.0,
            "roll_deg": 0.0, "pitch_deg": 0.0, "mask": "whole crop (no person found)", "faces": 0}
    return AlignedPortrait(out, label, torch.ones(settings.resolution, settings.resolution), info)


def align(image, settings: AlignSettings = AlignSettings(), smpl=None) -> AlignedPortrait:
    """One photo ``[H, W, 3]`` → ``AlignedPortrait`` (crop ``[R, R, 3]``, camera_label ``[25]``, mask ``[R, R]``,
    info). ``smpl``: the GAN's ``SMPLModel`` (template eye positions from its buffers), or None for the fallback
    template. Raises ``NoPersonError`` / ``SeveralPeopleError`` / ``FaceTooSmallError`` / ``FaceCutOffError``."""
    start = time.perf_counter()
    img = _as_image(image)
    h, w = img.shape[:2]
    rgb = (img.numpy() * 255).round().astype(np.uint8)
    faces = detect_faces(rgb, settings.detect_max_side, min(settings.min_face_px, 24))
    if not faces:
        reason = (f"no person found: no frontal face in the {w}×{h} image (OpenCV Haar cascade). Give a photo of one "
                  f"person facing the camera (turns beyond ~{settings.max_yaw_deg:.0f}° are not detected)")
        if settings.when_no_person == "frontal_center_crop":
            return frontal_center_crop(img, settings, reason)
        raise NoPersonError(reason)
    main = faces[0]
    others = [f for f in faces[1:] if f.box.w >= settings.other_face_ratio * main.box.w]
    if others:
        boxes = ", ".join(f"{f.box.w:.0f} px at ({f.box.cx:.0f}, {f.box.cy:.0f})" for f in [main] + others)
        raise SeveralPeopleError(f"several people: {1 + len(others)} faces of similar size ({boxes}); crop the photo "
                                 f"to one person")
    box = main.box
    if box.w < settings.min_face_px:
        raise FaceTooSmallError(f"the face is too small: {box.w:.0f} px wide, at least {settings.min_face_px} px are "
                                f"needed for a {settings.resolution}² crop; use a larger or closer photo")
    m = settings.border_margin
    if box.x - m * box.w < 0 or box.y - m * box.h < 0 or box.x + (1 + m) * box.w > w or \
            box.y + (1 + m) * box.h > h:
        raise FaceCutOffError(f"the face is cut off: its box ({box.x:.0f}, {box.y:.0f}, {box.w:.0f}×{box.h:.0f} px) "
                              f"touches the border of the {w}×{h} image; use a photo with the whole head inside")

    yaw_deg, roll_deg = cam.estimate_yaw_roll(box, main.eyes, settings.yaw_gain, settings.max_yaw_deg)
    if main.eyes is not None:
        eyes_px = torch.tensor(main.eyes, dtype=torch.float64)
    else:      # the usual eye positions in a Haar face box (0.49 box widths apart, 0.38 box heights down)
        eyes_px = torch.tensor([[box.cx - 0.245 * box.w, box.y + 0.38 * box.h],
                                [box.cx + 0.245 * box.w, box.y + 0.38 * box.h]], dtype=torch.float64)
    landmarks = template(smpl)
    pose = cam.cam2world(yaw_deg, roll_deg, 0.0, settings.radius)
    uv = cam.project(landmarks.tensor(), pose, settings.focal)        # right eye, left eye (image left, image right)
    x0, y0, side = crops.fit_square(uv, eyes_px)
    if not math.isfinite(side) or side <= 0:
        raise FaceCutOffError("the eye landmarks are degenerate; use a clearer frontal photo")
    out = crops.crop(img, x0, y0, side, settings.resolution)
    r = settings.resolution
    t = (torch.arange(r, dtype=torch.float64) + 0.5) / r
    inside = ((y0 + side * t)[:, None] >= 0) & ((y0 + side * t)[:, None] < h) & \
             ((x0 + side * t)[None, :] >= 0) & ((x0 + side * t)[None, :] < w)
    face_uv = ((box.x - x0) / side, (box.y - y0) / side, (box.x + box.w - x0) / side, (box.y + box.h - y0) / side)
    mask = crops.person_mask(out, face_uv, inside.numpy(), settings.mask_iterations)
    info = {
        "detector": "opencv-haar (frontalface_default + eye, mirror-symmetrised)",
        "faces": len(faces), "face_box_px": [box.x, box.y, box.w, box.h],
        "eyes_px": None if main.eyes is None else [list(e) for e in main.eyes],
        "yaw_deg": yaw_deg, "roll_deg": roll_deg, "pitch_deg": 0.0,
        "crop_px": [x0, y0, side], "upscale": r / side,
        "padded_fraction": crops.padded_fraction(h, w, x0, y0, side),
        "landmarks": landmarks.source, "fallback": None,
        "seconds": time.perf_counter() - start,
    }
    return AlignedPortrait(out, cam.label(pose, settings.focal), mask, info)
