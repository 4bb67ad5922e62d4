"""Cameras: 25-value labels, the two look-at conventions of Portrait3D, and rays.

World frame (``pipeline.md`` §0.2): SMPL neck at the origin, y up, face toward +z, metres. Cameras sit on a sphere
around the origin and look at ``LOOKAT = (0, 0.0649, 0)``. cam2world matrices use OpenCV camera axes (x right,
y down, z forward). A camera label is ``[cam2world (16, row-major) | intrinsics (9, row-major, normalised)]``.

Two samplers, one geometry:
- GAN side (EG3D ``LookAtPoseSampler``): yaw ``h`` and pitch ``v`` in radians, ``h = v = π/2`` is the frontal camera
  at (0, 0, r); the polar angle is ``arccos(1 - 2v/π)``. Focal ``GAN_FOCAL`` = 6.5104166.
- SDS/refinement side (stable-dreamfusion): azimuth φ (0 = front, + toward +x) and polar θ taken directly.
  Focal ``SDS_FOCAL`` = ``fov_to_focal(12.447863)`` ≈ 6.4848.
Both reduce to ``orbit_pose(azimuth, polar)``.
"""
from __future__ import annotations

import math

import torch

from .errors import InvalidInputError

GAN_FOCAL = 6.5104166
SDS_FOV_DEG = 12.447863
LOOKAT = (0.0, 0.0649, 0.0)
RADIUS = 2.7


def fov_to_focal(fov_deg: float) -> float:
    """Portrait3D's ``FOV_to_intrinsics`` focal: ``1 / (tan(fov/2) · 1.414)`` (the √2 factor is theirs)."""
    return 1.0 / (math.tan(fov_deg * math.pi / 360.0) * 1.414)


SDS_FOCAL = fov_to_focal(SDS_FOV_DEG)
# stable-dreamfusion's provider writes π as 3.14159: f = 1 / (tan(fov·3.14159/360)·1.414) = 6.484789 (the SDS rays)
DREAMFUSION_FOCAL = 1.0 / (math.tan(SDS_FOV_DEG * 3.14159 / 360.0) * 1.414)


def _as_tensor(x, dtype=torch.float32) -> torch.Tensor:
    return torch.as_tensor(x, dtype=dtype).reshape(-1)


def look_at(origins: torch.Tensor, lookat=LOOKAT) -> torch.Tensor:
    """Camera centres ``[B, 3]`` → cam2world ``[B, 4, 4]`` looking at ``lookat``, world up +y, no roll (OpenCV axes)."""
    target = torch.as_tensor(lookat, dtype=origins.dtype, device=origins.device).expand_as(origins)
    forward = torch.nn.functional.normalize(target - origins, dim=-1)
    up_world = torch.tensor([0.0, 1.0, 0.0], dtype=origins.dtype, device=origins.device).expand_as(origins)
    right = -torch.nn.functional.normalize(torch.cross(up_world, forward, dim=-1), dim=-1)
    up = torch.nn.functional.normalize(torch.cross(forward, right, dim=-1), dim=-1)
    cam2world = torch.eye(4, dtype=origins.dtype, device=origins.device).repeat(origins.shape[0], 1, 1)
    cam2world[:, :3, :3] = torch.stack((right, up, forward), dim=-1)
    cam2world[:, :3, 3] = origins
    return cam2world


def orbit_pose(azimuth, polar, radius=RADIUS, lookat=LOOKAT) -> torch.Tensor:
    """Azimuth/polar in radians (0, π/2 = frontal; + azimuth toward +x; polar < π/2 above) → cam2world ``[B, 4, 4]``."""
    az, po = _as_tensor(azimuth), _as_tensor(polar)
    r = _as_tensor(radius)
    az, po, r = torch.broadcast_tensors(az, po, r)
    origins = torch.stack((r * torch.sin(po) * torch.sin(az), r * torch.cos(po), r * torch.sin(po) * torch.cos(az)), -1)
    return look_at(origins, lookat)


def gan_pose(yaw, pitch, radius=RADIUS, lookat=LOOKAT) -> torch.Tensor:
    """EG3D ``LookAtPoseSampler.sample(yaw, pitch, lookat, radius)`` (radians) → cam2world ``[B, 4, 4]``."""
    h, v = _as_tensor(yaw, torch.float64), _as_tensor(pitch, torch.float64)
    polar = torch.arccos((1.0 - 2.0 * v / math.pi).clamp(-1.0, 1.0))
    return orbit_pose((h - math.pi / 2).float(), polar.float(), radius, lookat)


def sds_pose(azimuth_deg, polar_deg, radius=RADIUS, lookat=LOOKAT) -> torch.Tensor:
    """stable-dreamfusion convention in degrees (azimuth 0 = front, polar 90 = horizon) → cam2world ``[B, 4, 4]``."""
    return orbit_pose(torch.deg2rad(_as_tensor(azimuth_deg)), torch.deg2rad(_as_tensor(polar_deg)), radius, lookat)


def yaw_pitch_pose(yaw_deg, pitch_deg, radius=RADIUS, lookat=LOOKAT) -> torch.Tensor:
    """User-facing degrees: yaw 0 = frontal, + moves the camera to +x; pitch + moves it up → cam2world ``[B, 4, 4]``."""
    return sds_pose(yaw_deg, 90.0 - _as_tensor(pitch_deg), radius, lookat)


def intrinsics(focal: float, batch: int = 1, cx: float = 0.5, cy: float = 0.5) -> torch.Tensor:
    """Normalised intrinsics ``[B, 3, 3]``."""
    k = torch.tensor([[focal, 0.0, cx], [0.0, focal, cy], [0.0, 0.0, 1.0]])
    return k.expand(batch, 3, 3).clone()


def camera_label(cam2world: torch.Tensor, focal: float = GAN_FOCAL) -> torch.Tensor:
    """cam2world ``[B, 4, 4]`` + focal → 25-value labels ``[B, 25]``."""
    b = cam2world.shape[0]
    k = intrinsics(focal, b).to(cam2world)
    return torch.cat((cam2world.reshape(b, 16), k.reshape(b, 9)), dim=1)


def split_label(c: torch.Tensor):
    """``[B, 25]`` → (cam2world ``[B, 4, 4]``, intrinsics ``[B, 3, 3]``), with a clear error on a wrong shape."""
    if c.dim() != 2 or c.shape[1] != 25:
        raise InvalidInputError(f"camera labels must have shape [B, 25], got {tuple(c.shape)}")
    if not bool(torch.isfinite(c).all()):
        raise InvalidInputError("camera labels contain NaN or inf")
    return c[:, :16].reshape(-1, 4, 4), c[:, 16:].reshape(-1, 3, 3)


def flip_label(c: torch.Tensor) -> torch.Tensor:
    """Mirror a camera across x = 0 (negates flat entries 1, 2, 3, 4, 8): ``[B, 25] -> [B, 25]``."""
    out = c.clone()
    out[:, [1, 2, 3, 4, 8]] *= -1
    return out


def rays(c: torch.Tensor, height: int, width: int | None = None):
    """Pixel-centre rays of a label ``[B, 25]`` → origins, unit directions ``[B, H·W, 3]`` (index m = i·W + j).

    EG3D ``RaySampler``: u = (j + 0.5)/W, v = (i + 0.5)/H, camera point ((u − cx + cy·sk/fy − sk·v/fy)/fx,
    (v − cy)/fy, 1) rotated into the world and normalised.
    """
    width = height if width is None else width
    cam2world, k = split_label(c)
    fx, fy, cx, cy, sk = k[:, 0, 0], k[:, 1, 1], k[:, 0, 2], k[:, 1, 2], k[:, 0, 1]
    i, j = torch.meshgrid(torch.arange(height, dtype=c.dtype, device=c.device),
                          torch.arange(width, dtype=c.dtype, device=c.device), indexing="ij")
    u = ((j + 0.5) / width).reshape(1, -1)
    v = ((i + 0.5) / height).reshape(1, -1)
    x_cam = (u - cx[:, None] + cy[:, None] * sk[:, None] / fy[:, None] - sk[:, None] * v / fy[:, None]) / fx[:, None]
    y_cam = (v - cy[:, None]) / fy[:, None]
    cam_points = torch.stack((x_cam, y_cam, torch.ones_like(x_cam), torch.ones_like(x_cam)), dim=-1)
    world = torch.bmm(cam2world, cam_points.permute(0, 2, 1)).permute(0, 2, 1)[..., :3]
    origins = cam2world[:, :3, 3]
    directions = torch.nn.functional.normalize(world - origins[:, None, :], dim=-1)
    return origins[:, None, :].expand_as(directions).contiguous(), directions


def dreamfusion_rays(cam2world: torch.Tensor, height: int, focal: float = DREAMFUSION_FOCAL, width: int | None = None):
    """Rays as stable-dreamfusion's ``get_rays`` builds them for Portrait3D's SDS (``pipeline.md`` §4.4):
    origins, **unnormalised** directions ``[B, H·W, 3]`` (camera-space z = 1), index m = i·W + j.

    Its look-at frame has the image x axis opposite to the EG3D/OpenCV one, so column j sees what column
    ``W − 1 − j`` of ``rays`` sees: SDS renders are mirror images of the GAN camera's view of the same pose.
    ``cam2world`` ``[B, 4, 4]`` in OpenCV axes (e.g. from ``sds_pose``).
    """
    width = height if width is None else width
    b = cam2world.shape[0]
    i, j = torch.meshgrid(torch.arange(height, dtype=cam2world.dtype, device=cam2world.device),
                          torch.arange(width, dtype=cam2world.dtype, device=cam2world.device), indexing="ij")
    x_cam = (0.5 - (j + 0.5) / width) / focal            # mirrored x (see above)
    y_cam = ((i + 0.5) / height - 0.5) / focal
    cam = torch.stack((x_cam, y_cam, torch.ones_like(x_cam)), -1).reshape(1, -1, 3)
    directions = torch.matmul(cam, cam2world[:, :3, :3].transpose(1, 2))
    origins = cam2world[:, None, :3, 3].expand(b, height * width, 3).contiguous()
    return origins, directions


# --- turntable camera paths (``pipeline.md`` §7) --------------------------------------------------------------

def turntable_gan_angles(preset: str, frames: int | None = None):
    """The paper's video paths in EG3D (yaw, pitch) radians: ``paper_360`` (240 frames) or ``paper_small_orbit`` (120)."""
    if preset == "paper_360":
        n = frames or 240
        k = torch.arange(n, dtype=torch.float64)
        return math.pi / 2 + 2 * math.pi * k / n, torch.full_like(k, math.pi / 2)
    if preset == "paper_small_orbit":
        n = frames or 120
        k = torch.arange(n, dtype=torch.float64)
        return (math.pi / 2 + 0.35 * torch.sin(2 * math.pi * k / n),
                math.pi / 2 - 0.05 + 0.25 * torch.cos(2 * math.pi * k / n))
    raise InvalidInputError(f"unknown turntable preset {preset!r}; use 'paper_360' or 'paper_small_orbit'")


def orbit_labels(frames: int, elevation_deg: float = 0.0, radius: float = RADIUS, focal: float = GAN_FOCAL,
                 start_yaw_deg: float = 0.0) -> torch.Tensor:
    """A full 360° orbit at a fixed elevation, starting at ``start_yaw_deg`` → labels ``[frames, 25]``."""
    if frames < 1:
        raise InvalidInputError("a turntable needs at least one frame")
    yaw = start_yaw_deg + 360.0 * torch.arange(frames, dtype=torch.float64) / frames
    return camera_label(yaw_pitch_pose(yaw.float(), torch.full((frames,), float(elevation_deg)), radius), focal)


def preset_labels(preset: str, radius: float = RADIUS, focal: float = GAN_FOCAL, frames: int | None = None):
    """The paper's video camera paths (``pipeline.md`` §7) → labels ``[N, 25]``."""
    yaw, pitch = turntable_gan_angles(preset, frames)
    return camera_label(gan_pose(yaw, pitch, radius), focal)
