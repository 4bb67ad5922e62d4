"""Reference pyramid tri-grid sampling: one 5-D ``grid_sample`` per level, as in the official renderer.

Kept as the correctness oracle and the benchmark baseline. Semantics (``portrait_gan.md`` §3): each level is
``[B, 3, C*D, H, W]`` with channel ``k = D*c + d``; plane i is a thin volume ``[C, D, H, W]`` sampled trilinearly at
(u, v, w) = (x, y, z), (x, z, y), (y, z, x) for planes 0, 1, 2, ``align_corners=False``, zeros outside; the result is
averaged over levels, then over planes.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

# (u, v, w) = coordinate indices read by planes 0, 1, 2 (u → W, v → H, w → D).
PLANE_AXES = ((0, 1, 2), (0, 2, 1), (1, 2, 0))


def project_to_planes(coords: torch.Tensor) -> torch.Tensor:
    """[B, M, 3] normalised coordinates → [B, 3, M, 3] per-plane (u, v, w)."""
    return torch.stack([coords[..., list(axes)] for axes in PLANE_AXES], dim=1)


def sample_level_planes(level: torch.Tensor, plane_coords: torch.Tensor, depth: int = 3) -> torch.Tensor:
    """One level [B, 3, C*D, H, W] at plane coordinates [B, 3, M, 3] → per-plane features [B, 3, M, C]."""
    b, n_planes, cd, h, w = level.shape
    m = plane_coords.shape[2]
    volumes = level.reshape(b * n_planes, cd // depth, depth, h, w)
    grid = plane_coords.reshape(b * n_planes, 1, 1, m, 3).to(volumes.dtype)
    out = F.grid_sample(volumes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(b, n_planes, cd // depth, m).permute(0, 1, 3, 2)


def sample_trigrid_per_plane(levels: Sequence[torch.Tensor], coords: torch.Tensor, depth: int = 3) -> torch.Tensor:
    """Levels of [B, 3, C*D, H_l, W_l], coords [B, M, 3] in [-1, 1] → level-mean per-plane features [B, 3, M, C]."""
    plane_coords = project_to_planes(coords)
    total = None
    for level in levels:
        sampled = sample_level_planes(level, plane_coords, depth)
        total = sampled if total is None else total + sampled
    return total / len(levels)


def sample_trigrid_reference(levels: Sequence[torch.Tensor], coords: torch.Tensor, depth: int = 3) -> torch.Tensor:
    """Levels of [B, 3, C*D, H_l, W_l], coords [B, M, 3] in [-1, 1] → features [B, M, C] (mean of levels, planes)."""
    return sample_trigrid_per_plane(levels, coords, depth).mean(dim=1)
