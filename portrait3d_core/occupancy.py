"""Occupancy grid of a tri-grid: which cells of the box can hold visible density (for ``fast`` rendering).

The grid is derived from the tri-grid's own density: the box ``[-box_warp/2, box_warp/2]³`` is split into N³ cells,
the volume density softplus(σ − 1) is evaluated at every cell corner and centre, a cell is occupied when the largest
of its 9 values exceeds ``density_threshold``, and the occupied set is dilated by one cell (thin structure between
samples, and the interval averaging of the ray marcher, reach into the neighbours). Cropped samples count as empty.

``occupancy_for`` keeps one grid per (tri-grid levels, decoder, grid settings) and reuses it across renders (a
turntable's frames, an optimisation's iterations). A grid is rebuilt when the levels changed in place by more than
``rebuild_threshold`` (max |Δ| over all levels since the build), or when the decoder changed.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .errors import InvalidInputError


@dataclass(frozen=True)
class OccupancySettings:
    """How the grid is built. 64³ cells of 1.1 cm for the 0.7 m box; 0.01 /m density ≈ 1e-4 opacity per cell."""

    resolution: int = 64
    density_threshold: float = 0.01
    rebuild_threshold: float = 0.02     # max |Δ level| since the build before it is rebuilt (optimisation)
    chunk_points: int = 1 << 18

    def __post_init__(self):
        if self.resolution < 2:
            raise InvalidInputError(f"occupancy resolution must be >= 2, got {self.resolution}")
        if self.density_threshold < 0 or self.rebuild_threshold < 0:
            raise InvalidInputError("occupancy thresholds must be >= 0")


@dataclass
class OccupancyGrid:
    """``occupied`` bool ``[B, N, N, N]`` indexed (z, y, x) over ``[-half, half]³`` (world units)."""

    occupied: torch.Tensor
    half: float

    @property
    def resolution(self) -> int:
        return self.occupied.shape[-1]

    def fraction(self) -> float:
        """Occupied fraction of the cells (all batch items)."""
        return float(self.occupied.float().mean())

    def lookup(self, points: torch.Tensor) -> torch.Tensor:
        """World points ``[B, M, 3]`` → bool ``[B, M]``: True where the point's cell is occupied (False outside)."""
        n = self.resolution
        b, m, _ = points.shape
        cell = torch.floor((points.detach() + self.half) * (n / (2 * self.half)))
        inside = ((cell >= 0) & (cell < n)).all(-1)
        idx = cell.clamp(0, n - 1).long()
        flat = (idx[..., 2] * n + idx[..., 1]) * n + idx[..., 0]
        flat = flat + torch.arange(b, device=points.device).unsqueeze(1) * (n ** 3)
        return self.occupied.reshape(-1)[flat.reshape(-1)].reshape(b, m) & inside


def _lattice(n: int, half: float, offset: float, count: int, device, dtype) -> torch.Tensor:
    axis = (torch.arange(count, device=device, dtype=dtype) + offset) * (2 * half / n) - half
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    return torch.stack([x, y, z], -1).reshape(1, -1, 3)


@torch.no_grad()
def build_occupancy(trigrid, decoder, settings: OccupancySettings = OccupancySettings(), *,
                    crop: Optional[float] = 0.1, backend: str = "auto") -> OccupancyGrid:
    """Evaluate the tri-grid's density on the cell corners and centres → dilated ``OccupancyGrid``."""
    from .renderer import density

    n, half = settings.resolution, trigrid.box_warp / 2
    device, dtype, b = trigrid.device, trigrid.dtype, trigrid.batch_size
    detached = trigrid.detach()

    def evaluate(points: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, points.shape[1], settings.chunk_points):
            pts = points[:, start:start + settings.chunk_points].expand(b, -1, -1)
            out.append(density(detached, decoder, pts, crop=crop, backend=backend)[..., 0])
        return torch.cat(out, 1)

    corners = evaluate(_lattice(n, half, 0.0, n + 1, device, dtype)).reshape(b, 1, n + 1, n + 1, n + 1)
    centres = evaluate(_lattice(n, half, 0.5, n, device, dtype)).reshape(b, n, n, n)
    corner_max = F.max_pool3d(corners, 2, 1)[:, 0]                       # [B, n, n, n]: max of each cell's 8
    occupied = torch.maximum(corner_max, centres) > settings.density_threshold
    occupied = F.max_pool3d(occupied.float().unsqueeze(1), 3, 1, padding=1)[:, 0] > 0
    return OccupancyGrid(occupied, half)


# --------------------------------------------------------------------------------------------------- cache

@dataclass
class _Entry:
    owner: "weakref.ref"          # levels[0] of the tri-grid the grid belongs to
    decoder: "weakref.ref"
    decoder_versions: tuple
    key: tuple
    versions: tuple
    snapshot: list
    grid: OccupancyGrid


_CACHE: dict = {}       # id(levels[0]) → _Entry (dropped when that tensor is freed)
BUILDS = {"count": 0}   # grids built so far (tests and benchmarks read it)


def _versions(tensors) -> tuple:
    """In-place modification counters (inference-mode tensors have none: they are treated as immutable)."""
    return tuple(None if t.is_inference() else t._version for t in tensors)


def occupancy_for(trigrid, decoder, settings: OccupancySettings = OccupancySettings(), *,
                  crop: Optional[float] = 0.1, backend: str = "auto") -> OccupancyGrid:
    """The cached grid of ``trigrid`` + ``decoder`` (built or rebuilt as the module docstring says)."""
    levels = trigrid.levels
    key = (settings, crop, trigrid.box_warp, tuple(id(level) for level in levels))
    params = list(decoder.parameters())
    entry = _CACHE.get(id(levels[0]))
    if entry is not None and entry.owner() is levels[0] and entry.key == key and entry.decoder() is decoder \
            and entry.decoder_versions == _versions(params):
        if entry.versions == _versions(levels):
            return entry.grid
        if entry.snapshot is not None:
            with torch.no_grad():
                change = max(float((level.detach() - old).abs().max())
                             for level, old in zip(levels, entry.snapshot))
            if change <= settings.rebuild_threshold:
                entry.versions = _versions(levels)
                return entry.grid
    grid = build_occupancy(trigrid, decoder, settings, crop=crop, backend=backend)
    BUILDS["count"] += 1
    trainable = any(level.requires_grad for level in levels)
    snapshot = [level.detach().clone() for level in levels] if trainable else None
    owner_id = id(levels[0])
    owner = weakref.ref(levels[0], lambda ref: _CACHE.pop(owner_id) if _CACHE.get(owner_id, ref).owner is ref else None)
    _CACHE[owner_id] = _Entry(owner, weakref.ref(decoder), _versions(params), key, _versions(levels), snapshot, grid)
    return grid
