"""Triangle rasterisation on the CPU, used for UV texture baking and for mesh silhouettes.

``rasterize(tri_xy [F, 3, 2], height, width)`` fills every pixel whose centre (integer coordinates: pixel ``(i, j)``
has its centre at ``x = j``, ``y = i``) lies inside a triangle with that triangle's index and the barycentric weights
of the centre. Either winding is accepted; pixels on a shared edge go to one of the two triangles. Later triangles
overwrite earlier ones (no depth test: UV charts do not overlap, and a silhouette needs only coverage).

Compiled with numba when it is installed (a requirement of the package); the same function runs as plain Python
otherwise (correct, much slower).
"""
from __future__ import annotations

import numpy as np
import torch

try:
    import numba as nb

    _njit = nb.njit(cache=True, nogil=True, boundscheck=False)
except ImportError:  # pragma: no cover - numba is a package requirement
    nb = None

    def _njit(fn):
        return fn


@_njit
def _raster_kernel(tri, face_out, bary_out):
    height, width = face_out.shape
    eps = 1e-7
    for f in range(tri.shape[0]):
        x0, y0 = tri[f, 0, 0], tri[f, 0, 1]
        x1, y1 = tri[f, 1, 0], tri[f, 1, 1]
        x2, y2 = tri[f, 2, 0], tri[f, 2, 1]
        area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
        if abs(area) < 1e-12:
            continue
        inv = 1.0 / area
        jmin = max(int(np.ceil(min(x0, x1, x2))), 0)
        jmax = min(int(np.floor(max(x0, x1, x2))), width - 1)
        imin = max(int(np.ceil(min(y0, y1, y2))), 0)
        imax = min(int(np.floor(max(y0, y1, y2))), height - 1)
        for i in range(imin, imax + 1):
            py = float(i)
            for j in range(jmin, jmax + 1):
                px = float(j)
                b0 = ((x1 - px) * (y2 - py) - (x2 - px) * (y1 - py)) * inv
                b1 = ((x2 - px) * (y0 - py) - (x0 - px) * (y2 - py)) * inv
                b2 = 1.0 - b0 - b1
                if b0 >= -eps and b1 >= -eps and b2 >= -eps:
                    face_out[i, j] = f
                    bary_out[i, j, 0] = b0
                    bary_out[i, j, 1] = b1
                    bary_out[i, j, 2] = b2


def rasterize(tri_xy: np.ndarray, height: int, width: int):
    """Triangles in pixel coordinates ``[F, 3, 2]`` (x = column, y = row) → (face index ``[H, W]`` int32, −1 where
    empty; barycentrics ``[H, W, 3]`` float32)."""
    tri = np.ascontiguousarray(tri_xy, dtype=np.float64)
    if tri.ndim != 3 or tri.shape[1:] != (3, 2):
        raise ValueError(f"triangles must be [F, 3, 2], got {tri.shape}")
    face = np.full((height, width), -1, dtype=np.int32)
    bary = np.zeros((height, width, 3), dtype=np.float32)
    if len(tri):
        _raster_kernel(tri, face, bary)
    return face, bary


def project(vertices: np.ndarray, c: torch.Tensor | np.ndarray, resolution: int) -> tuple:
    """World points ``[N, 3]`` through one camera label ``[25]`` (or ``[1, 25]``) → (pixel coordinates ``[N, 2]``
    (x = column, y = row; pixel centres at integers, matching ``cameras.rays``), camera depth ``[N]``)."""
    label = np.asarray(c.detach().cpu() if torch.is_tensor(c) else c, dtype=np.float64).reshape(-1)[:25]
    cam2world = label[:16].reshape(4, 4)
    k = label[16:25].reshape(3, 3)
    world2cam = np.linalg.inv(cam2world)
    pts = np.asarray(vertices, dtype=np.float64) @ world2cam[:3, :3].T + world2cam[:3, 3]
    z = pts[:, 2]
    safe = np.where(np.abs(z) < 1e-9, 1e-9, z)
    xn, yn = pts[:, 0] / safe, pts[:, 1] / safe
    # normalised image coordinates u = fx·x + sk·y + cx (cameras.rays inverts exactly this)
    u = k[0, 0] * xn + k[0, 1] * yn + k[0, 2]
    v = k[1, 1] * yn + k[1, 2]
    return np.stack([u * resolution - 0.5, v * resolution - 0.5], -1), z


def silhouette(vertices: np.ndarray, faces: np.ndarray, c, resolution: int) -> np.ndarray:
    """Binary silhouette ``[H, W]`` (bool) of a mesh seen by camera label ``c`` at ``resolution``² (pixel grid and
    camera of ``renderer.render_image``). Triangles behind the camera are skipped."""
    xy, z = project(vertices, c, resolution)
    faces = np.asarray(faces, dtype=np.int64)
    keep = (z[faces] > 1e-6).all(1)
    face, _ = rasterize(xy[faces[keep]], resolution, resolution)
    return face >= 0
