"""Mesh extraction from a pyramid tri-grid: density grid → marching cubes → clean-up → colours.

Frame and units (``pipeline.md`` §0.2): vertices are in the world frame of the tri-grid, in **metres**, **y up**, the
face looking toward **+z**, the SMPL **neck joint at the origin**. Faces are wound counter-clockwise seen from outside
(normals point out of the head), as glTF expects.

Geometry (``extract_mesh``):
1. The volume density softplus(σ − 1) (the renderer's, crop applied: |x| or |z| > 0.28 m is empty) is sampled on a
   regular lattice with ``resolution`` points across the tri-grid box (voxel = box_warp / (resolution − 1), 2.75 mm
   at 256, 1.37 mm at 512). The lattice covers y ∈ [−0.35, 0.35] and, with the crop, only |x|, |z| ≤ 0.28 m + 1.5
   voxels. It is evaluated in slabs of y-slices (a few MB each), so memory stays bounded at any resolution. Above 256³ a
   coarse pass (every 2nd point) finds the cells the surface crosses and only those are evaluated finely (≈ 15 % of
   the 512³ lattice; identical mesh for every surface the coarse pass sees, see ``_CoarseGuide``).
2. Marching cubes (scikit-image, Lewiner) runs per slab at the density ``threshold``; the slabs' shared vertices are
   merged. With ``close_holes`` a zero-density layer surrounds the lattice, so the cut at the bottom of the box (the
   chest/neck cut) and any other cut are capped flat and the mesh is watertight.
3. The largest connected component is kept (by face count); optional Taubin smoothing; optional quadric decimation
   (``fast-simplification``); area-weighted vertex normals.

Threshold: ``DEFAULT_DENSITY_THRESHOLD`` = 30 (density units, 1/m) is the level whose mesh silhouette matched the
renderer's mask best on the demo head (front, side and back-45° views; numbers beside the constant; reproduce with
``benchmarks/bench_export.py --threshold-sweep``). ``threshold="auto"`` calibrates the level per portrait
(``calibrate_threshold``: front + side mask IoU from the density field at 64², ~2 M decoder queries). The paper's
raw-σ levels are available as ``"paper_sigma_10"`` / ``"paper_sigma_15"`` (``shape_utils.py`` CLI default 10;
stage 7's disabled PLY branch 15): marching cubes at raw σ = L is the same surface as density = softplus(L − 1).

Colour (``add_vertex_colours`` / ``colours_at``): decoder features at the surface point → ToRGB with the tri-grid's
``ws[:, -1]`` (the model has no view dependence), mapped from [−1, 1] to [0, 1] and clamped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import renderer
from .decoder import Decoder
from .errors import InvalidInputError, Portrait3DError
from .trigrid import TriGrid

ProgressFn = Optional[Callable[[int, int], None]]

DEFAULT_RESOLUTION = 256
MIN_RESOLUTION = 16
MAX_RESOLUTION = 512
CROP = 0.1                    # triplane_crop (fraction of box_warp), as in every render
PAPER_SIGMA_LEVELS = (10.0, 15.0)
# Chosen by a silhouette sweep on the demo head (7 levels, 256³ lattice, 256² renders with 96 + 96 deterministic
# samples, mask Σw > 0.5): mesh/mask IoU front | side | back-45° = 0.969 | 0.972 | 0.973 at 10, 0.981 | 0.982 |
# 0.986 at 20, 0.991 | 0.992 | 0.995 at 30, 0.992 | 0.994 | 0.993 at 40, 0.988 | 0.991 | 0.989 at 50, 0.970 | 0.974 |
# 0.969 at 80. Below the optimum the mesh is fatter than the mask, above it thinner. ``calibrate_threshold`` (preset
# "auto") repeats the measurement per portrait from the density field itself (31.5 on the demo head).
DEFAULT_DENSITY_THRESHOLD = 30.0
POINT_CHUNK = 1 << 17         # points per decoder call (≈ 50 MB of temporaries with the colour head)
SLAB_POINTS = 1 << 20         # lattice points per marching-cubes slab (4 MB of float32 density)


def density_from_sigma(level: float) -> float:
    """Density softplus(σ − 1) at raw σ = ``level`` (marching cubes on either gives the same surface)."""
    x = float(level) - 1.0
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


THRESHOLD_PRESETS = {
    "silhouette": DEFAULT_DENSITY_THRESHOLD,
    "paper_sigma_10": density_from_sigma(10.0),
    "paper_sigma_15": density_from_sigma(15.0),
}


def resolve_threshold(threshold: Union[float, str, None]) -> float:
    """A density level from a number (density units) or a preset name (``THRESHOLD_PRESETS``).

    ``"auto"`` (per-portrait silhouette calibration) needs the tri-grid: ``extract_mesh`` resolves it through
    ``calibrate_threshold``; here it is an error.
    """
    if threshold is None:
        return DEFAULT_DENSITY_THRESHOLD
    if isinstance(threshold, str):
        key = threshold.strip().lower()
        if key == "auto":
            raise InvalidInputError("threshold 'auto' is resolved per tri-grid by extract_mesh / calibrate_threshold")
        if key in THRESHOLD_PRESETS:
            return THRESHOLD_PRESETS[key]
        try:
            threshold = float(key)
        except ValueError:
            raise InvalidInputError(f"unknown threshold {threshold!r}; use a number (density, 1/m) or one of "
                                    f"{', '.join(THRESHOLD_PRESETS)}") from None
    value = float(threshold)
    if not (math.isfinite(value) and value > 0):
        raise InvalidInputError(f"the density threshold must be a positive number, got {threshold!r}")
    return value


# --------------------------------------------------------------------------------------------------- data

@dataclass
class MeshData:
    """A triangle mesh in the world frame (metres, y up, face toward +z, neck at the origin).

    ``vertices [N, 3]`` float32, ``faces [M, 3]`` int64, ``normals [N, 3]`` float32 (unit), ``vertex_colors
    [N, 3]`` float32 in [0, 1] or None; a UV-unwrapped mesh also has ``uvs [N, 2]`` float32 (OpenGL convention,
    v up) and ``texture [H, W, 3]`` uint8 (row 0 = top = v 1).
    """

    vertices: np.ndarray
    faces: np.ndarray
    normals: Optional[np.ndarray] = None
    vertex_colors: Optional[np.ndarray] = None
    uvs: Optional[np.ndarray] = None
    texture: Optional[np.ndarray] = None
    stats: dict = field(default_factory=dict)

    @property
    def num_vertices(self) -> int:
        return int(self.vertices.shape[0])

    @property
    def num_faces(self) -> int:
        return int(self.faces.shape[0])

    def as_tensors(self) -> dict:
        """Batch-1 torch tensors for ComfyUI's MESH type: ``vertices [1, N, 3]`` float32, ``faces [1, M, 3]`` int64,
        and when present ``normals [1, N, 3]``, ``vertex_colors [1, N, 3]`` (0..1), ``uvs [1, N, 2]``,
        ``texture [1, H, W, 3]`` float32 (0..1)."""
        out = {"vertices": torch.from_numpy(np.ascontiguousarray(self.vertices, np.float32))[None],
               "faces": torch.from_numpy(np.ascontiguousarray(self.faces, np.int64))[None]}
        if self.normals is not None:
            out["normals"] = torch.from_numpy(np.ascontiguousarray(self.normals, np.float32))[None]
        if self.vertex_colors is not None:
            out["vertex_colors"] = torch.from_numpy(np.ascontiguousarray(self.vertex_colors, np.float32))[None]
        if self.uvs is not None:
            out["uvs"] = torch.from_numpy(np.ascontiguousarray(self.uvs, np.float32))[None]
        if self.texture is not None:
            out["texture"] = torch.from_numpy(self.texture.astype(np.float32) / 255.0)[None]
        return out


def batch_tensors(meshes: list) -> dict:
    """Several meshes as one zero-padded batch for ComfyUI's MESH: ``as_tensors`` fields stacked to ``[B, N_max, …]``
    / ``[B, M_max, 3]``, plus ``vertex_counts`` / ``face_counts`` ``[B]`` int64 (the real lengths) when B > 1.

    Padding rows are zeros: padded vertices sit at the origin (the neck, inside every portrait's bounds) and padded
    faces are the degenerate triangle (0, 0, 0), so a host that ignores the counts still draws nothing extra.
    """
    if not meshes:
        raise InvalidInputError("batch_tensors needs at least one mesh")
    items = [m.as_tensors() for m in meshes]
    if len(items) == 1:
        return items[0]
    keys = [k for k in items[0] if all(k in item for item in items)]
    out = {}
    for key in keys:
        tensors = [item[key][0] for item in items]
        if key == "texture":
            if any(t.shape != tensors[0].shape for t in tensors):
                raise InvalidInputError("meshes of one batch need textures of one size")
            out[key] = torch.stack(tensors)
            continue
        rows = max(t.shape[0] for t in tensors)
        padded = tensors[0].new_zeros((len(tensors), rows) + tuple(tensors[0].shape[1:]))
        for i, t in enumerate(tensors):
            padded[i, :t.shape[0]] = t
        out[key] = padded
    out["vertex_counts"] = torch.tensor([m.num_vertices for m in meshes], dtype=torch.int64)
    out["face_counts"] = torch.tensor([m.num_faces for m in meshes], dtype=torch.int64)
    return out


class _Progress:
    """Maps a stage's own (done, total) onto a slice [start, stop) of one overall 0…``total`` scale."""

    def __init__(self, fn: ProgressFn, start: float = 0.0, stop: float = 1.0, total: int = 1000):
        self.fn, self.start, self.stop, self.total = fn, start, stop, total

    def sub(self, start: float, stop: float) -> "_Progress":
        span = self.stop - self.start
        return _Progress(self.fn, self.start + span * start, self.start + span * stop, self.total)

    def __call__(self, done: float, total: float) -> None:
        if self.fn is None:
            return
        frac = 0.0 if total <= 0 else min(1.0, max(0.0, done / total))
        self.fn(int(round((self.start + (self.stop - self.start) * frac) * self.total)), self.total)


def as_progress(progress) -> _Progress:
    return progress if isinstance(progress, _Progress) else _Progress(progress)


# --------------------------------------------------------------------------------------------------- queries

def _check(trigrid: TriGrid, decoder: Decoder) -> None:
    if not isinstance(trigrid, TriGrid):
        raise InvalidInputError(f"expected a TriGrid, got {type(trigrid).__name__}")
    if trigrid.batch_size != 1:
        raise InvalidInputError(f"mesh export takes one portrait; this tri-grid has batch {trigrid.batch_size} "
                                f"(use trigrid.select(i))")
    if decoder is None:
        raise InvalidInputError("a decoder is needed to turn the tri-grid into density and colour")


def _sigma_fn(decoder: Decoder):
    """features ``[M, 12]`` → raw σ ``[M]``, computing only the σ row of the last decoder layer."""
    try:
        first, act, last = decoder.decoder.net[0], decoder.decoder.net[1], decoder.decoder.net[2]
        w2 = (last.weight[:1] * last.weight_gain).t().contiguous()
        b2 = last.bias[:1] * last.bias_gain
    except (AttributeError, IndexError, TypeError):
        return lambda feats: decoder(feats)[0][..., 0]

    def run(feats):
        hidden = act(first(feats))
        return torch.addmm(b2.to(hidden.dtype), hidden, w2.to(hidden.dtype))[:, 0]

    return run


@torch.no_grad()
def raw_sigma_at(trigrid: TriGrid, decoder: Decoder, points: torch.Tensor, crop: Optional[float] = None,
                 chunk: int = POINT_CHUNK) -> torch.Tensor:
    """Raw σ at world points ``[M, 3]`` → ``[M]`` (cropped samples −1000 when ``crop`` is set), chunked."""
    sigma_of = _sigma_fn(decoder)
    levels = trigrid.kernel_levels()
    out = torch.empty(points.shape[0], dtype=trigrid.dtype, device=trigrid.device)
    for s in range(0, points.shape[0], chunk):
        p = points[s:s + chunk].to(device=trigrid.device, dtype=trigrid.dtype)
        feats = trigrid.sample(p[None], kernel_levels=levels)[0]
        sigma = sigma_of(feats)
        mask = renderer.crop_mask(p[None], trigrid.box_warp, crop)
        if mask is not None:
            sigma = sigma.masked_fill(mask[0, :, 0], renderer.CROPPED_SIGMA)
        out[s:s + chunk] = sigma
    return out


def density_at(trigrid: TriGrid, decoder: Decoder, points: torch.Tensor, crop: Optional[float] = CROP,
               chunk: int = POINT_CHUNK) -> torch.Tensor:
    """Volume density softplus(σ − 1) at world points ``[M, 3]`` → ``[M]`` (the renderer's density, crop applied)."""
    return F.softplus(raw_sigma_at(trigrid, decoder, points, crop, chunk) - 1)


@torch.no_grad()
def colours_at(trigrid: TriGrid, decoder: Decoder, points, chunk: int = POINT_CHUNK,
               progress: ProgressFn = None) -> np.ndarray:
    """RGB in [0, 1] at world points ``[M, 3]`` (array or tensor) → float32 ``[M, 3]``.

    decoder feature → ToRGB with ``ws[:, -1]`` → (x + 1)/2, clamped; ``progress(done, total)`` per chunk.
    """
    if trigrid.ws is None:
        raise InvalidInputError("this tri-grid has no ws; colours need ToRGB with ws[:, -1] (load a tri-grid file "
                                "that has 'ws')")
    pts = torch.as_tensor(np.asarray(points) if not torch.is_tensor(points) else points)
    levels = trigrid.kernel_levels()
    w = trigrid.ws[:, -1]
    out = np.empty((pts.shape[0], 3), dtype=np.float32)
    total = pts.shape[0]
    for s in range(0, total, chunk):
        p = pts[s:s + chunk].to(device=trigrid.device, dtype=trigrid.dtype)
        _, feats = decoder(trigrid.sample(p[None], kernel_levels=levels))
        rgb = decoder.to_rgb(feats, w)[0]
        out[s:s + chunk] = ((rgb.float() + 1) * 0.5).clamp(0, 1).cpu().numpy()
        if progress is not None:
            progress(min(total, s + chunk), total)
    return out


# --------------------------------------------------------------------------------------------------- lattice

@dataclass(frozen=True)
class Lattice:
    """The extraction lattice: coordinate of index i on every axis = −box/2 + i·voxel; per-axis index ranges."""

    resolution: int
    box_warp: float
    x_range: tuple   # (first, last) inclusive lattice indices
    y_range: tuple
    z_range: tuple

    @property
    def voxel(self) -> float:
        return self.box_warp / (self.resolution - 1)

    def coords(self, lo: int, hi: int) -> np.ndarray:
        """World coordinates of indices lo … hi (inclusive), float64."""
        return -self.box_warp / 2 + np.arange(lo, hi + 1, dtype=np.float64) * self.voxel

    @property
    def shape(self) -> tuple:
        """(ny, nx, nz) sample counts."""
        return tuple(r[1] - r[0] + 1 for r in (self.y_range, self.x_range, self.z_range))


def make_lattice(resolution: int, box_warp: float, crop: Optional[float] = CROP) -> Lattice:
    if not (MIN_RESOLUTION <= int(resolution) <= MAX_RESOLUTION):
        raise InvalidInputError(f"mesh resolution must be between {MIN_RESOLUTION} and {MAX_RESOLUTION}, "
                                f"got {resolution}")
    n = int(resolution)
    voxel = box_warp / (n - 1)
    full = (0, n - 1)
    if crop is None:
        return Lattice(n, box_warp, full, full, full)
    limit = box_warp / 2 - crop * box_warp + 1.5 * voxel   # one sample beyond the crop wall on each side
    lo = max(0, int(math.floor((box_warp / 2 - limit) / voxel)))
    return Lattice(n, box_warp, (lo, n - 1 - lo), full, (lo, n - 1 - lo))


def _grid_density(trigrid, decoder, ys: np.ndarray, xs: np.ndarray, zs: np.ndarray, crop,
                  need: Optional[np.ndarray] = None, fill: Optional[np.ndarray] = None) -> np.ndarray:
    """Density on the grid ys × xs × zs (world coordinates) → float32 ``[ny, nx, nz]`` (z fastest). With ``need``
    (bool, same shape) only those points are evaluated and the others take ``fill``."""
    gy, gx, gz = np.meshgrid(ys.astype(np.float32), xs.astype(np.float32), zs.astype(np.float32), indexing="ij")
    pts = np.stack([gx, gy, gz], -1)
    if need is None:
        dens = density_at(trigrid, decoder, torch.from_numpy(pts.reshape(-1, 3)), crop)
        return dens.reshape(len(ys), len(xs), len(zs)).cpu().numpy().astype(np.float32, copy=False)
    out = fill.astype(np.float32, copy=True)
    if need.any():
        out[need] = density_at(trigrid, decoder, torch.from_numpy(pts[need]), crop).cpu().numpy()
    return out


class _CoarseGuide:
    """Sparse evaluation: a coarse lattice (every ``stride``-th point) finds the cells the surface can cross; only
    fine points in those cells (dilated by one coarse cell) are evaluated, the rest get a value on their known side.

    Exact for every surface the coarse lattice (or its one-cell neighbourhood) sees; with ``stride`` chosen so the
    coarse spacing is at most the 256³ voxel, only features thinner than ~2.8 mm that stand > 2.8 mm away from any
    detected surface could be missed.
    """

    def __init__(self, trigrid, decoder, lattice: "Lattice", level: float, crop, stride: int, report=None):
        from scipy.ndimage import binary_dilation

        self.stride, self.level = stride, level
        self.lo = [lattice.y_range[0], lattice.x_range[0], lattice.z_range[0]]
        his = [lattice.y_range[1], lattice.x_range[1], lattice.z_range[1]]
        counts = [-(-(hi - lo) // stride) + 1 for lo, hi in zip(self.lo, his)]      # coarse points per axis
        axes = [-lattice.box_warp / 2 + (lo + stride * np.arange(c)) * lattice.voxel
                for lo, c in zip(self.lo, counts)]
        per_slab = max(1, SLAB_POINTS // (counts[1] * counts[2]))
        parts = []
        for s0 in range(0, counts[0], per_slab):
            parts.append(_grid_density(trigrid, decoder, axes[0][s0:s0 + per_slab], axes[1], axes[2], crop))
            if report is not None:
                report(min(counts[0], s0 + per_slab), counts[0])
        coarse = np.concatenate(parts, 0)
        inside = coarse > level
        corners = [inside[dy:dy + counts[0] - 1, dx:dx + counts[1] - 1, dz:dz + counts[2] - 1]
                   for dy in (0, 1) for dx in (0, 1) for dz in (0, 1)]
        any_in = np.logical_or.reduce(corners)
        all_in = np.logical_and.reduce(corners)
        self.cells = binary_dilation(any_in & ~all_in, structure=np.ones((3, 3, 3), bool))
        self.inside = inside
        self.fine_points = int(np.prod([hi - lo + 1 for lo, hi in zip(self.lo, his)]))
        self.evaluated = int(coarse.size)

    def _axis(self, axis: int, first: int, last: int):
        f = np.arange(first, last + 1) - self.lo[axis]
        ncell = self.cells.shape[axis]
        a = np.minimum(f // self.stride, ncell - 1)
        b = np.where((f % self.stride == 0) & (f > 0), np.maximum(f // self.stride - 1, 0), a)
        b = np.minimum(b, ncell - 1)
        return a, b

    def need_and_fill(self, y_range, x_range, z_range):
        (ya, yb), (xa, xb), (za, zb) = (self._axis(0, *y_range), self._axis(1, *x_range), self._axis(2, *z_range))
        need = np.zeros((len(ya), len(xa), len(za)), bool)
        for yi in (ya, yb):
            for xi in (xa, xb):
                for zi in (za, zb):
                    need |= self.cells[np.ix_(yi, xi, zi)]
        side = self.inside[np.ix_(ya, xa, za)]
        fill = np.where(side, np.float32(2 * self.level + 1), np.float32(0))
        self.evaluated += int(need.sum())
        return need, fill


def coarse_stride_for(resolution: int) -> int:
    """Sparse-evaluation stride: the coarse spacing stays at most the 256³ voxel (1 = dense, up to 256)."""
    return max(1, (int(resolution) - 1) // 255)


# --------------------------------------------------------------------------------------------------- marching cubes

def _marching_cubes(volume: np.ndarray, level: float):
    from skimage import measure

    vmin, vmax = float(volume.min()), float(volume.max())
    if not (vmin < level < vmax):
        return np.zeros((0, 3), np.float64), np.zeros((0, 3), np.int64)
    verts, faces, _, _ = measure.marching_cubes(volume, level, method="lewiner", allow_degenerate=False)
    return verts.astype(np.float64), faces.astype(np.int64)


def _merge_seam(prev_keys: dict, verts_local: np.ndarray, seam_local_y: float) -> np.ndarray:
    """Ids of the previous slab's vertices for this slab's vertices on its bottom seam (−1 for new vertices).

    Vertices on a seam lie on edges inside the shared lattice slice, so both slabs compute them from the same two
    samples: their (x, z) agree to rounding and are matched by key.
    """
    remap = np.full(len(verts_local), -1, dtype=np.int64)
    if not prev_keys:
        return remap
    on_seam = np.nonzero(verts_local[:, 0] == seam_local_y)[0]
    if len(on_seam):
        for idx, key in zip(on_seam, _seam_keys(verts_local[on_seam])):
            hit = prev_keys.get(key)
            if hit is not None:
                remap[idx] = hit
    return remap


def _seam_keys(v: np.ndarray):
    """Hashable keys for vertices on a seam plane: (x, z) rounded to 1e-5 voxel."""
    q = np.round(v[:, 1:3] * 1e5).astype(np.int64)
    return list(map(tuple, q))


def extract_surface(trigrid: TriGrid, decoder: Decoder, resolution: int = DEFAULT_RESOLUTION,
                    threshold: Union[float, str, None] = None, *, crop: Optional[float] = CROP,
                    close_holes: bool = True, coarse_stride: Optional[int] = None, progress: ProgressFn = None,
                    info: Optional[dict] = None):
    """Density lattice + marching cubes, slab by slab → (vertices ``[N, 3]`` float64 world, faces ``[M, 3]`` int64).

    No clean-up (all components kept). ``coarse_stride`` > 1 evaluates the fine lattice only near the surface found
    on every stride-th point (``_CoarseGuide``; None = ``coarse_stride_for(resolution)``, dense up to 256).
    ``progress(done, total)`` is called after each slab and may raise to cancel. ``info`` (a dict) receives the
    number of evaluated lattice points.
    """
    _check(trigrid, decoder)
    level = resolve_threshold(threshold)
    lattice = make_lattice(resolution, trigrid.box_warp, crop)
    stride = coarse_stride_for(resolution) if coarse_stride is None else max(1, int(coarse_stride))
    report = as_progress(progress)
    guide = None
    if stride > 1:
        guide = _CoarseGuide(trigrid, decoder, lattice, level, crop, stride, report.sub(0.0, 0.25))
        report = report.sub(0.25, 1.0)
    ny, nx, nz = lattice.shape
    slices_per_slab = max(2, SLAB_POINTS // (nx * nz))
    y0, y1 = lattice.y_range
    origin = np.array([lattice.coords(lattice.x_range[0], lattice.x_range[0])[0],
                       lattice.coords(y0, y0)[0],
                       lattice.coords(lattice.z_range[0], lattice.z_range[0])[0]])
    voxel = lattice.voxel
    pad = 1 if close_holes else 0
    xs, zs = lattice.coords(*lattice.x_range), lattice.coords(*lattice.z_range)

    all_verts, all_faces = [], []
    n_verts = 0
    prev_keys: dict = {}
    carry = None                     # density of the previous slab's top slice (the next slab's first slice)
    starts = list(range(y0, y1, slices_per_slab - 1)) or [y0]
    for si, s_lo in enumerate(starts):
        s_hi = min(s_lo + slices_per_slab - 1, y1)
        fresh_lo = s_lo + (1 if carry is not None else 0)
        dens = None
        if fresh_lo <= s_hi:
            ys = lattice.coords(fresh_lo, s_hi)
            if guide is None:
                dens = _grid_density(trigrid, decoder, ys, xs, zs, crop)
            else:
                need, fill = guide.need_and_fill((fresh_lo, s_hi), lattice.x_range, lattice.z_range)
                dens = _grid_density(trigrid, decoder, ys, xs, zs, crop, need, fill)
        if carry is not None:
            dens = carry[None] if dens is None else np.concatenate([carry[None], dens], 0)
        carry = dens[-1].copy()
        first, last = s_lo == y0, s_hi == y1
        vol = dens
        if pad:
            vol = np.pad(vol, ((1 if first else 0, 1 if last else 0), (1, 1), (1, 1)))
        local_y_of_slo = 1 if (pad and first) else 0   # local y index of lattice slice s_lo inside vol
        verts, faces = _marching_cubes(vol, level)
        if len(faces):
            # local (y, x, z) index coordinates → lattice indices relative to the lattice origin
            gy = verts[:, 0] - local_y_of_slo + (s_lo - y0)
            gx = verts[:, 1] - pad
            gz = verts[:, 2] - pad
            remap = _merge_seam(prev_keys, verts, float(local_y_of_slo))
            new = remap < 0
            ids = np.empty(len(verts), dtype=np.int64)
            ids[new] = n_verts + np.arange(int(new.sum()))
            ids[~new] = remap[~new]
            world = np.stack([gx, gy, gz], -1) * voxel + origin
            all_verts.append(world[new])
            all_faces.append(ids[faces])
            n_verts += int(new.sum())
            top_local = float(local_y_of_slo + (s_hi - s_lo))
            on_top = np.nonzero(verts[:, 0] == top_local)[0]
            prev_keys = dict(zip(_seam_keys(verts[on_top]), ids[on_top])) if not last else {}
        else:
            prev_keys = {}
        report(si + 1, len(starts))
    if info is not None:
        total = ny * nx * nz
        info.update(coarse_stride=stride, lattice_points=total,
                    evaluated_points=total if guide is None else guide.evaluated)
    if not all_faces:
        return np.zeros((0, 3), np.float64), np.zeros((0, 3), np.int64)
    verts = np.concatenate(all_verts, 0)
    faces = np.concatenate(all_faces, 0)
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    return verts, faces


# --------------------------------------------------------------------------------------------------- clean-up

def remove_unreferenced(vertices: np.ndarray, faces: np.ndarray, *attrs):
    """Drop vertices no face uses; re-index faces. Extra per-vertex arrays are filtered alike."""
    used = np.zeros(len(vertices), dtype=bool)
    used[faces.reshape(-1)] = True
    new_index = np.cumsum(used) - 1
    out = [vertices[used], new_index[faces]]
    out += [None if a is None else a[used] for a in attrs]
    return tuple(out)


def largest_component(vertices: np.ndarray, faces: np.ndarray):
    """Keep the connected component (through shared vertices) with the most faces."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(faces) == 0:
        return vertices, faces
    n = len(vertices)
    rows = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2]])
    cols = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0]])
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    count, labels = connected_components(graph, directed=False)
    if count <= 1:
        return remove_unreferenced(vertices, faces)
    face_labels = labels[faces[:, 0]]
    best = np.bincount(face_labels, minlength=count).argmax()
    return remove_unreferenced(vertices, faces[face_labels == best])


def taubin_smooth(vertices: np.ndarray, faces: np.ndarray, iterations: int, lam: float = 0.5,
                  mu: float = -0.53) -> np.ndarray:
    """Taubin λ|μ smoothing with uniform (umbrella) weights; keeps volume far better than plain Laplacian."""
    from scipy.sparse import coo_matrix, diags

    if iterations <= 0 or len(faces) == 0:
        return vertices
    n = len(vertices)
    rows = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2], faces[:, 1], faces[:, 2], faces[:, 0]])
    cols = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0], faces[:, 0], faces[:, 1], faces[:, 2]])
    adj = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)).tocsr()
    adj.data[:] = 1.0                                    # duplicates summed → binary adjacency
    degree = np.asarray(adj.sum(1)).ravel()
    avg = diags(1.0 / np.maximum(degree, 1)) @ adj
    v = vertices.astype(np.float64, copy=True)
    for _ in range(int(iterations)):
        v = v + lam * (avg @ v - v)
        v = v + mu * (avg @ v - v)
    return v


def decimate(vertices: np.ndarray, faces: np.ndarray, target_faces: int):
    """Quadric edge-collapse decimation to about ``target_faces`` faces (``fast-simplification`` package)."""
    if target_faces is None or target_faces <= 0 or len(faces) <= target_faces:
        return vertices, faces
    try:
        import fast_simplification
    except ImportError:
        raise Portrait3DError("decimation needs the 'fast-simplification' package (pip install "
                              "fast-simplification); or leave the face target empty") from None
    v, f = fast_simplification.simplify(np.ascontiguousarray(vertices, np.float64),
                                        np.ascontiguousarray(faces, np.int64), target_count=int(target_faces))
    f = np.asarray(f, dtype=np.int64)
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])]
    return remove_unreferenced(np.asarray(v, np.float64), f)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals ``[N, 3]`` float32."""
    v = vertices.astype(np.float64)
    fn = np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])
    n = np.zeros_like(v)
    for k in range(3):
        np.add.at(n, faces[:, k], fn)
    length = np.linalg.norm(n, axis=1, keepdims=True)
    n = np.divide(n, length, out=np.zeros_like(n), where=length > 0)
    return n.astype(np.float32)


def topology(vertices: np.ndarray, faces: np.ndarray) -> dict:
    """Edge-manifold and orientation checks, Euler characteristic, area, enclosed volume."""
    if len(faces) == 0:
        return {"watertight": False, "euler": 0, "edges": 0, "area_m2": 0.0, "volume_m3": 0.0, "boundary_edges": 0}
    directed = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    undirected = np.sort(directed, axis=1)
    key = undirected[:, 0] * len(vertices) + undirected[:, 1]
    _, counts = np.unique(key, return_counts=True)
    dkey = directed[:, 0] * len(vertices) + directed[:, 1]
    consistent = len(np.unique(dkey)) == len(dkey)
    v = vertices.astype(np.float64)
    a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    cross = np.cross(b - a, c - a)
    return {
        "watertight": bool((counts == 2).all() and consistent),
        "euler": int(len(vertices) - len(counts) + len(faces)),
        "edges": int(len(counts)),
        "boundary_edges": int((counts == 1).sum()),
        "area_m2": float(0.5 * np.linalg.norm(cross, axis=1).sum()),
        "volume_m3": float(np.einsum("ij,ij->i", a, cross).sum() / 6.0),
    }


# --------------------------------------------------------------------------------------------------- calibration

CALIBRATION_VIEWS = ((0.0, 0.0), (90.0, 0.0))       # (yaw, pitch) in degrees: front and side


@torch.no_grad()
def calibrate_threshold(trigrid: TriGrid, decoder: Decoder, *, image_resolution: int = 64,
                        views=CALIBRATION_VIEWS, samples: int = 160, candidates=None,
                        progress: ProgressFn = None) -> tuple:
    """The density level whose iso-surface silhouette best matches the renderer's mask for this tri-grid.

    For every pixel of the front and side views (GAN focal, Portrait3D ray range 2.35 … 3.12) the renderer's
    opacity Σw (48 + 48 samples, deterministic) gives the mask Σw > 0.5, and ``samples`` uniform samples give the
    maximum density along the ray; the iso-surface at level τ covers the pixel iff that maximum exceeds τ. Returns
    (τ, info) with τ maximising the mean IoU over the views (the geometric middle of the best plateau) and
    ``info = {"threshold": τ, "iou": {view: IoU at τ}, "curve": [(τ, mean IoU), …]}``.
    """
    from . import cameras

    _check(trigrid, decoder)
    report = as_progress(progress)
    grid = np.geomspace(0.5, 500.0, 61) if candidates is None else np.asarray(candidates, np.float64)
    settings = renderer.RenderSettings().portrait3d(deterministic=True)
    t = torch.linspace(settings.ray_start, settings.ray_end, samples, dtype=trigrid.dtype)
    ious, names = [], []
    for vi, (yaw, pitch) in enumerate(views):
        c = cameras.camera_label(cameras.yaw_pitch_pose(yaw, pitch), cameras.GAN_FOCAL).to(trigrid.dtype)
        origins, dirs = cameras.rays(c, image_resolution)
        out = renderer.render_rays(trigrid, decoder, origins.to(trigrid.device), dirs.to(trigrid.device), settings)
        mask = (out.weight_sum[0, :, 0] > 0.5).cpu().numpy()
        peak = torch.empty(origins.shape[1], dtype=trigrid.dtype)
        step = max(1, POINT_CHUNK // samples)
        for s in range(0, origins.shape[1], step):
            pts = origins[0, s:s + step, None] + t[None, :, None] * dirs[0, s:s + step, None]
            dens = density_at(trigrid, decoder, pts.reshape(-1, 3)).reshape(-1, samples)
            peak[s:s + step] = dens.max(1).values.cpu()
        peak = peak.numpy()
        sil = peak[None, :] > grid[:, None]                          # [T, R]
        inter = (sil & mask[None]).sum(1)
        union = (sil | mask[None]).sum(1)
        ious.append(np.where(union > 0, inter / np.maximum(union, 1), 0.0))
        names.append(f"yaw{yaw:g}_pitch{pitch:g}")
        report(vi + 1, len(views))
    mean = np.mean(ious, 0)
    best = mean.max()
    plateau = grid[mean >= best - 1e-3]
    tau = float(np.exp(np.log(plateau).mean()))
    at = int(np.argmin(np.abs(np.log(grid / tau))))
    info = {"threshold": tau, "iou": {n: float(v[at]) for n, v in zip(names, ious)},
            "curve": [(float(g), float(m)) for g, m in zip(grid, mean)]}
    return tau, info


# --------------------------------------------------------------------------------------------------- pipeline

@dataclass(frozen=True)
class MeshSettings:
    """Geometry settings of ``extract_mesh`` (defaults: 256³, silhouette-matched threshold, watertight)."""

    resolution: int = DEFAULT_RESOLUTION
    threshold: Union[float, str, None] = None   # density (1/m) or a THRESHOLD_PRESETS name; None = default
    crop: Optional[float] = CROP
    close_holes: bool = True
    keep_largest: bool = True
    smooth_iterations: int = 0
    decimate_faces: Optional[int] = None
    coarse_stride: Optional[int] = None          # None: dense up to 256³, sparse (stride 2) at 512³

    def describe(self) -> dict:
        return {"resolution": int(self.resolution), "threshold_density": resolve_threshold(self.threshold),
                "threshold_preset": self.threshold if isinstance(self.threshold, str) else None,
                "crop": self.crop, "close_holes": bool(self.close_holes), "keep_largest": bool(self.keep_largest),
                "smooth_iterations": int(self.smooth_iterations),
                "decimate_faces": None if self.decimate_faces is None else int(self.decimate_faces)}


def extract_mesh(trigrid: TriGrid, decoder: Decoder, settings: MeshSettings = MeshSettings(), *,
                 progress: ProgressFn = None, **overrides) -> MeshData:
    """The portrait's surface as a ``MeshData`` (geometry + normals, no colours yet).

    ``overrides`` replace fields of ``settings`` (e.g. ``resolution=128``). ``progress(done, total)`` may raise
    to cancel; the lattice evaluation takes ~90 % of the time.
    """
    settings = replace(settings, **overrides) if overrides else settings
    if settings.smooth_iterations < 0:
        raise InvalidInputError("smooth_iterations must be ≥ 0")
    if settings.decimate_faces is not None and settings.decimate_faces < 4:
        raise InvalidInputError("decimate_faces must be ≥ 4 (or None to keep every face)")
    report = as_progress(progress)
    calibration = None
    if isinstance(settings.threshold, str) and settings.threshold.strip().lower() == "auto":
        tau, calibration = calibrate_threshold(trigrid, decoder, progress=report.sub(0.0, 0.15))
        settings = replace(settings, threshold=tau)
        report = report.sub(0.15, 1.0)
    lattice_info: dict = {}
    verts, faces = extract_surface(trigrid, decoder, settings.resolution, settings.threshold, crop=settings.crop,
                                   close_holes=settings.close_holes, coarse_stride=settings.coarse_stride,
                                   progress=report.sub(0.0, 0.9), info=lattice_info)
    if len(faces) == 0:
        raise Portrait3DError(f"no surface at density {resolve_threshold(settings.threshold):g}: the tri-grid is empty "
                              f"or entirely above the level; try a lower threshold")
    raw_faces = len(faces)
    if settings.keep_largest:
        verts, faces = largest_component(verts, faces)
    else:
        verts, faces = remove_unreferenced(verts, faces)
    verts = taubin_smooth(verts, faces, settings.smooth_iterations)
    report(0.93, 1.0)
    if settings.decimate_faces:
        verts, faces = decimate(verts, faces, settings.decimate_faces)
    report(0.99, 1.0)
    normals = vertex_normals(verts, faces)
    stats = {"raw_faces": int(raw_faces), "voxel_m": trigrid.box_warp / (settings.resolution - 1), **lattice_info,
             **settings.describe(), **topology(verts, faces),
             "bounds_min": verts.min(0).round(5).tolist(), "bounds_max": verts.max(0).round(5).tolist()}
    if calibration is not None:
        stats.update(threshold_preset="auto", calibration_iou=calibration["iou"])
    report(1.0, 1.0)
    return MeshData(verts.astype(np.float32), faces.astype(np.int64), normals, stats=stats)


def add_vertex_colours(mesh: MeshData, trigrid: TriGrid, decoder: Decoder, progress: ProgressFn = None) -> MeshData:
    """``mesh`` with ``vertex_colors`` from the decoder at each vertex (float32 [N, 3] in [0, 1])."""
    colours = colours_at(trigrid, decoder, mesh.vertices, progress=progress)
    return replace(mesh, vertex_colors=colours)
