"""Camera of an aligned portrait: on the radius-2.7 sphere around the neck, looking at (0, 0.0649, 0), f = 6.5104166
(``pipeline.md`` §2.1/§2.5, ``portrait_gan.md`` §10–11), direction and roll from the detected head.

The bundled detectors give no 3D torso, so yaw comes from where the eyes sit inside the face box (a coarse cue:
``yaw = asin(gain · offset / box width)``, clamped), roll from the eye line, pitch is level (0°). Head-versus-torso
rotation is left to the inversion's pose p, as the spec asks.
"""
from __future__ import annotations

import math

import torch

from .. import cameras


def estimate_yaw_roll(box, eyes, yaw_gain: float, max_yaw_deg: float):
    """Face box + eye centres (image px, ordered by x) → (yaw_deg, roll_deg). Without eyes both are 0.

    yaw_deg > 0 puts the camera on the person's left (+x), i.e. the face turned toward the image's left.
    roll_deg is the eye line angle in the image (y down): > 0 when the image-right eye is lower.
    """
    if eyes is None:
        return 0.0, 0.0
    (xl, yl), (xr, yr) = eyes
    offset = ((xl + xr) / 2 - box.cx) / box.w
    limit = math.sin(math.radians(max_yaw_deg))
    yaw_deg = -math.degrees(math.asin(max(-limit, min(limit, yaw_gain * offset))))
    roll_deg = math.degrees(math.atan2(yr - yl, xr - xl))
    return yaw_deg, roll_deg


def cam2world(yaw_deg: float, roll_deg: float, pitch_deg: float = 0.0, radius: float = cameras.RADIUS) -> torch.Tensor:
    """cam2world ``[4, 4]`` float64 (OpenCV axes): look-at camera at (yaw, pitch), rolled about its optical axis so
    that a horizontal world line appears at ``roll_deg`` in the image."""
    pose = cameras.yaw_pitch_pose(yaw_deg, pitch_deg, radius)[0].to(torch.float64)
    phi = math.radians(roll_deg)
    right, down = pose[:3, 0].clone(), pose[:3, 1].clone()
    # camera axes turned by −roll: world "right" then maps to image angle +roll
    pose[:3, 0] = math.cos(phi) * right - math.sin(phi) * down
    pose[:3, 1] = math.sin(phi) * right + math.cos(phi) * down
    return pose


def project(points: torch.Tensor, pose: torch.Tensor, focal: float = cameras.GAN_FOCAL) -> torch.Tensor:
    """World points ``[P, 3]`` → normalised image coordinates ``[P, 2]`` in [0, 1] (pixel = value · resolution)."""
    cam = (points.to(pose) - pose[:3, 3]) @ pose[:3, :3]
    return focal * cam[:, :2] / cam[:, 2:3] + 0.5


def label(pose: torch.Tensor, focal: float = cameras.GAN_FOCAL) -> torch.Tensor:
    """cam2world ``[4, 4]`` → 25-value camera label ``[25]`` float32."""
    return cameras.camera_label(pose[None].float(), focal)[0]
