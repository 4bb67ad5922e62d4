"""Reference nearest-triangle search: exact brute force over all triangles, chunked, in torch.

For a point p and a triangle (a, b, c) the squared distance is (kaolin ``point_to_mesh_distance`` semantics):
- the squared distance to the triangle's plane, (ap·n)² / n·n with n = ab × ac, when the projection of p onto the
  plane falls inside the triangle (barycentric β = (ap × ac)·n / n·n ≥ 0, γ = (ab × ap)·n / n·n ≥ 0, β + γ ≤ 1);
- otherwise the smallest squared distance to the three edges ab, bc, ca: |p − q|² with the closest point
  q = s + clamp(u, 0, 1)·(t − s) of segment [s, t] (so a vertex reached with u = 0 is exactly |p − s|²).
A NaN distance (a degenerate triangle with a zero-length edge) counts as +inf. Among equal minima the **lowest**
triangle index wins. A point with no finite distance gets (inf, -1).

Every step is one elementwise tensor operation in float32/float64 in a fixed order (no fused multiply-add), so the
numba path (``nearest_triangle_cpu``), which performs the same operations on scalars, agrees bit for bit.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def _dot(ax, ay, az, bx, by, bz):
    return ax * bx + ay * by + az * bz


def _cross(ax, ay, az, bx, by, bz):
    return ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx


def _segment_sq(px, py, pz, sx, sy, sz, tx, ty, tz):
    """Squared distance from p to the segment [s, t]: closest point q = s + clamp(u, 0, 1)·(t − s)."""
    ex, ey, ez = tx - sx, ty - sy, tz - sz
    u = _dot(px - sx, py - sy, pz - sz, ex, ey, ez) / _dot(ex, ey, ez, ex, ey, ez)
    u = u.clamp(0, 1)
    dx, dy, dz = px - (sx + u * ex), py - (sy + u * ey), pz - (sz + u * ez)
    return _dot(dx, dy, dz, dx, dy, dz)


def point_triangle_distance_sq(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared point-to-triangle distance; ``p``, ``a``, ``b``, ``c`` broadcast to ``[..., 3]`` → ``[...]``.

    NaN (degenerate triangle) is returned as +inf.
    """
    px, py, pz = p.unbind(-1)
    ax, ay, az = a.unbind(-1)
    bx, by, bz = b.unbind(-1)
    cx, cy, cz = c.unbind(-1)
    abx, aby, abz = bx - ax, by - ay, bz - az
    acx, acy, acz = cx - ax, cy - ay, cz - az
    apx, apy, apz = px - ax, py - ay, pz - az
    nx, ny, nz = _cross(abx, aby, abz, acx, acy, acz)
    nn = _dot(nx, ny, nz, nx, ny, nz)
    ux, uy, uz = _cross(apx, apy, apz, acx, acy, acz)
    beta = _dot(ux, uy, uz, nx, ny, nz) / nn
    vx, vy, vz = _cross(abx, aby, abz, apx, apy, apz)
    gamma = _dot(vx, vy, vz, nx, ny, nz) / nn
    inside = (beta >= 0) & (gamma >= 0) & (beta + gamma <= 1)
    h = _dot(apx, apy, apz, nx, ny, nz)
    plane = h * h / nn
    e0 = _segment_sq(px, py, pz, ax, ay, az, bx, by, bz)
    e1 = _segment_sq(px, py, pz, bx, by, bz, cx, cy, cz)
    e2 = _segment_sq(px, py, pz, cx, cy, cz, ax, ay, az)
    edges = torch.minimum(torch.minimum(e0, e1), e2)   # NaN propagates (zero-length edge)
    dist = torch.where(inside, plane, edges)
    return torch.nan_to_num(dist, nan=float("inf"))


def nearest_triangle_reference(points: torch.Tensor, triangles: torch.Tensor, *,
                               max_distance: Optional[float] = None, chunk_points: int = 2048,
                               chunk_triangles: int = 1024) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest triangle by brute force.

    Args:
        points: ``[B, N, 3]``.
        triangles: ``[B, F, 3, 3]`` (vertex a, b, c of each triangle).
        max_distance: optional; points whose nearest squared distance exceeds ``max_distance²`` get (inf, -1).

    Returns:
        (squared distance ``[B, N]`` in the points' dtype, triangle index ``[B, N]`` int64; -1 = none).
    """
    batch, n, _ = points.shape
    n_tri = triangles.shape[1]
    dist = torch.full((batch, n), float("inf"), dtype=points.dtype, device=points.device)
    index = torch.full((batch, n), -1, dtype=torch.int64, device=points.device)
    with torch.no_grad():
        for b in range(batch):
            for p0 in range(0, n, chunk_points):
                p = points[b, p0:p0 + chunk_points, None, :]
                best = dist[b, p0:p0 + chunk_points]
                best_i = index[b, p0:p0 + chunk_points]
                for f0 in range(0, n_tri, chunk_triangles):
                    tri = triangles[b, f0:f0 + chunk_triangles]
                    d = point_triangle_distance_sq(p, tri[None, :, 0], tri[None, :, 1], tri[None, :, 2])
                    d_min, i_min = d.min(dim=1)           # first (lowest) index among equal minima
                    better = d_min < best                 # strict: earlier chunks win ties
                    best.copy_(torch.where(better, d_min, best))
                    best_i.copy_(torch.where(better, i_min + f0, best_i))
        if max_distance is not None:
            far = dist > float(max_distance) ** 2
            dist[far] = float("inf")
            index[far] = -1
        index[torch.isinf(dist)] = -1
    return dist, index
