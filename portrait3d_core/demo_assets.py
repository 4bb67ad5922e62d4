"""DEMO assets: an analytic, coloured, head-and-shoulders tri-grid and a hand-set decoder that renders it.

These are NOT the official Portrait3D weights (which cannot be downloaded here); they let every node, workflow and
test run end to end, and they give tests known answers (the analytic occupancy of the shape).

Construction:
- A shape is a union of ellipsoids. Ellipsoid j has the field q_j(p) = 1 − Σ_a ((p_a − c_a)/r_a)², positive inside.
  A field that is a sum of per-axis terms f(x) + g(y) + h(z) is exactly what a tri-grid holds: plane 0 (x, y) stores
  1.5·(f + g), plane 1 (x, z) 1.5·(f + h), plane 2 (y, z) 1.5·(g + h); the mean over planes returns f + g + h.
  Every level stores the same field, so the mean over levels returns it too (up to bilinear interpolation error).
- Colour: three channels hold an RGB field in [−1, 1] (a base skin tone plus hair, shirt, eye and lip patterns on
  single planes, stored ×3 so the plane mean restores them).
- The decoder: hidden unit j = softplus(k·q_j); σ_raw = A·Σ_j softplus(k·q_j) − A·ln 2 − 5 (a soft union whose
  surface is near q = 0); colours pass through softplus(x + 20) − 20 ≈ x; ToRGB is the identity on them.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass

import torch

from .decoder import Decoder, DecoderConfig
from .trigrid import BOX_WARP, TriGrid

DEMO_TRIGRID_NAME = "DEMO_head_trigrid.safetensors"
DEMO_DECODER_NAME = "DEMO_decoder.safetensors"
DEMO_LABEL = "DEMO asset (analytic head, not the official Portrait3D weights)"
FULL_RESOLUTIONS = (8, 16, 32, 64, 128, 256, 512)
SMALL_RESOLUTIONS = (8, 16, 32, 64)

SHARPNESS = 50.0        # k: hidden = softplus(k·q)
DENSITY_SCALE = 30.0    # A
DENSITY_OFFSET = DENSITY_SCALE * math.log(2.0) + 5.0
COLOUR_SHIFT = 20.0     # softplus(x + 20) − 20 ≈ x for |x| ≤ 1
N_SHAPE_CHANNELS = 6
COLOUR_CHANNELS = (6, 7, 8)
DETAIL_MIN_RESOLUTION = 32
FRONT_SLICE_GAIN = 2.3   # 1 / trilinear weight of the front depth slice at the face surface (z ≈ 0.1 m)


@dataclass(frozen=True)
class Ellipsoid:
    center: tuple
    radii: tuple

    def field(self, points: torch.Tensor) -> torch.Tensor:
        """``[..., 3]`` world points → q ``[...]`` (> 0 inside)."""
        c = torch.tensor(self.center, dtype=points.dtype, device=points.device)
        r = torch.tensor(self.radii, dtype=points.dtype, device=points.device)
        return 1.0 - (((points - c) / r) ** 2).sum(-1)


# Head-and-shoulders bust in the Portrait3D world frame (neck at the origin, y up, face toward +z, metres).
HEAD_SHAPES = (
    Ellipsoid((0.0, 0.105, 0.0), (0.082, 0.112, 0.098)),     # cranium + face
    Ellipsoid((0.0, -0.06, -0.005), (0.052, 0.14, 0.052)),   # neck
    Ellipsoid((0.0, -0.215, -0.01), (0.26, 0.095, 0.11)),    # shoulders / upper chest
    Ellipsoid((0.0, 0.085, 0.098), (0.014, 0.024, 0.022)),   # nose
    Ellipsoid((0.083, 0.095, -0.005), (0.012, 0.028, 0.02)),  # right ear (+x)
    Ellipsoid((-0.083, 0.095, -0.005), (0.012, 0.028, 0.02)),  # left ear
)

SKIN = (0.78, 0.56, 0.44)
HAIR = (0.22, 0.13, 0.08)
SHIRT = (0.18, 0.32, 0.62)
EYE = (0.08, 0.07, 0.10)
LIPS = (0.66, 0.25, 0.26)


def _to_signed(rgb) -> torch.Tensor:
    return torch.tensor(rgb) * 2.0 - 1.0


def _texel_axes(height: int, width: int, box_warp: float):
    """World coordinates of texel centres: columns (u) ``[W]``, rows (v) ``[H]``, depth slices (w) ``[3]``."""
    u = ((torch.arange(width) * 2 + 1) / width - 1) * box_warp / 2
    v = ((torch.arange(height) * 2 + 1) / height - 1) * box_warp / 2
    w = ((torch.arange(3) * 2 + 1) / 3 - 1) * box_warp / 2
    return u, v, w


def _axis_terms(shape: Ellipsoid, axis: int, coords: torch.Tensor) -> torch.Tensor:
    return -((coords - shape.center[axis]) / shape.radii[axis]) ** 2


def _smoothstep(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    t = ((x - lo) / (hi - lo)).clamp(0, 1)
    return t * t * (3 - 2 * t)


def _colour_planes(u, v, w):
    """RGB contributions per plane, ``[3, 3(rgb), D, H, W]`` for planes 0, 1, 2 (already ×3 where single-plane)."""
    hh, ww, dd = v.numel(), u.numel(), w.numel()
    planes = torch.zeros(3, 3, dd, hh, ww)
    skin = _to_signed(SKIN)
    planes += skin[None, :, None, None, None]
    # plane 2 = (y, z): u → y, v → z. Hair on top and at the back of the head; shirt below the neck.
    y = u.reshape(1, 1, -1)
    z = v.reshape(1, -1, 1)
    hair = torch.clamp(_smoothstep(y, 0.135, 0.16) + _smoothstep(-z, -0.03, 0.02) * _smoothstep(y, 0.05, 0.09), 0, 1)
    shirt = _smoothstep(-y, 0.11, 0.14)
    delta = hair * (_to_signed(HAIR) - skin)[:, None, None] + shirt * (_to_signed(SHIRT) - skin)[:, None, None]
    planes[2] += 3 * delta[:, None]
    # plane 0 = (x, y) with depth slices along z: eyes and lips on the front slice only.
    x = u.reshape(1, -1)
    y0 = v.reshape(-1, 1)
    eyes = sum(torch.exp(-(((x - ex) / 0.012) ** 2 + ((y0 - 0.115) / 0.008) ** 2)) for ex in (-0.032, 0.032))
    lips = torch.exp(-((x / 0.022) ** 2 + ((y0 - 0.045) / 0.007) ** 2))
    front = eyes * (_to_signed(EYE) - skin)[:, None, None] + lips * (_to_signed(LIPS) - skin)[:, None, None]
    planes[0, :, 2] += 3 * FRONT_SLICE_GAIN * front
    return planes


def analytic_level(shapes, height: int, width: int, box_warp: float = BOX_WARP, colour: bool = True) -> torch.Tensor:
    """One level ``[1, 3, 36, H, W]`` holding the shape fields (channels 0..5) and the colour field (6..8)."""
    u, v, w = _texel_axes(height, width, box_warp)
    feats = torch.zeros(3, 12, 3, height, width)   # [plane, C, D, H, W]
    # plane → (axis on u/W, axis on v/H, axis on w/D)
    plane_axes = ((0, 1, 2), (0, 2, 1), (1, 2, 0))
    for j, shape in enumerate(shapes):
        for p, (au, av, aw) in enumerate(plane_axes):
            # the two in-plane axes of plane p carry 1.5× their terms; the constant 1 goes to every plane.
            tu = _axis_terms(shape, au, u).reshape(1, 1, -1)
            tv = _axis_terms(shape, av, v).reshape(1, -1, 1)
            feats[p, j] = 1.0 + 1.5 * (tu + tv)
    if colour:
        planes = _colour_planes(u, v, w)
        for i, ch in enumerate(COLOUR_CHANNELS):
            feats[:, ch] = planes[:, i]
    return feats.reshape(1, 3, 36, height, width)


def analytic_trigrid(shapes=HEAD_SHAPES, resolutions=FULL_RESOLUTIONS, box_warp: float = BOX_WARP,
                     num_ws: int = 14, w_dim: int = 512, colour: bool = True, meta: dict | None = None) -> TriGrid:
    """A tri-grid (batch 1) whose decoded density is the union of ``shapes`` (≤ 6 ellipsoids)."""
    if len(shapes) > N_SHAPE_CHANNELS:
        raise ValueError(f"at most {N_SHAPE_CHANNELS} ellipsoids fit the demo channel layout")
    sizes = [(r, r) if isinstance(r, int) else tuple(r) for r in resolutions]
    # Coarse levels interpolate the quadratic fields poorly: store the fields on levels of at least
    # DETAIL_MIN_RESOLUTION (scaled so the mean over all levels restores them) and zeros elsewhere.
    fine = [min(h, w) >= DETAIL_MIN_RESOLUTION for h, w in sizes] if max(map(min, sizes)) >= DETAIL_MIN_RESOLUTION \
        else [True] * len(sizes)
    gain = len(sizes) / sum(fine)
    levels = [analytic_level(shapes, h, w, box_warp, colour) * gain if use else torch.zeros(1, 3, 36, h, w)
              for (h, w), use in zip(sizes, fine)]
    info = {"source": "demo", "label": DEMO_LABEL}
    info.update(meta or {})
    return TriGrid(levels, torch.zeros(1, num_ws, w_dim), box_warp, info)


def linear_colour(points: torch.Tensor, centre=(0.0, 0.05, 0.0), scale: float = 0.2) -> torch.Tensor:
    """Known answer of ``linear_colour_trigrid``: RGB in [0, 1] = 0.5 + 0.5·(p − centre)/scale per axis (R from x,
    G from y, B from z), ``[..., 3]``. Exact where |p − centre| ≤ scale and |y|, |z| ≤ box/3 (depth-slice range)."""
    c = torch.as_tensor(centre, dtype=points.dtype)
    return 0.5 + 0.5 * (points - c) / scale


def linear_colour_trigrid(shapes, resolutions=SMALL_RESOLUTIONS, centre=(0.0, 0.05, 0.0), scale: float = 0.2,
                          box_warp: float = BOX_WARP) -> TriGrid:
    """``analytic_trigrid`` whose colour is the linear field of ``linear_colour`` (a known answer for colour tests).

    Signed colour (p − centre)/scale: R = f(x) and G = g(y) on plane 0 (x, y), B = h(z) on plane 1 (x, z), each
    stored ×3 so the plane mean restores it; bilinear/trilinear interpolation reproduces a linear field exactly.
    """
    base = analytic_trigrid(shapes, resolutions, box_warp, colour=False)
    levels = []
    fine = [min(level.shape[-2:]) >= DETAIL_MIN_RESOLUTION for level in base.levels]
    if not any(fine):
        fine = [True] * len(fine)
    gain = len(fine) / sum(fine)
    for level, use in zip(base.levels, fine):
        level = level.clone()
        if use:
            h, w = level.shape[-2:]
            u, v, _ = _texel_axes(h, w, box_warp)
            view = level.view(1, 3, 12, 3, h, w)
            r_, g_, b_ = COLOUR_CHANNELS
            view[0, 0, r_] = (3 * gain * (u - centre[0]) / scale).reshape(1, 1, w)
            view[0, 0, g_] = (3 * gain * (v - centre[1]) / scale).reshape(1, h, 1)
            view[0, 1, b_] = (3 * gain * (v - centre[2]) / scale).reshape(1, h, 1)
        levels.append(level)
    return TriGrid(levels, base.ws, box_warp, dict(base.meta))


def demo_decoder(n_shapes: int = N_SHAPE_CHANNELS, w_dim: int = 512) -> Decoder:
    """Hand-set decoder for ``analytic_trigrid`` (σ = soft union of the shape fields; colour channels → RGB)."""
    dec = Decoder(DecoderConfig(w_dim=w_dim))
    sd = {k: torch.zeros_like(v) for k, v in dec.state_dict().items()}
    g1, g2 = math.sqrt(12), math.sqrt(32)      # undo the equalised-LR gains 1/√12, 1/√32
    for j in range(n_shapes):
        sd["decoder.net.0.weight"][j, j] = SHARPNESS * g1
        sd["decoder.net.2.weight"][0, j] = DENSITY_SCALE * g2
    sd["decoder.net.2.bias"][0] = -DENSITY_OFFSET
    for i, ch in enumerate(COLOUR_CHANNELS):
        hidden = N_SHAPE_CHANNELS + i
        sd["decoder.net.0.weight"][hidden, ch] = g1
        sd["decoder.net.0.bias"][hidden] = COLOUR_SHIFT
        sd["decoder.net.2.weight"][1 + i, hidden] = g2
        sd["decoder.net.2.bias"][1 + i] = -COLOUR_SHIFT
        sd["torgb.weight"][i, i, 0, 0] = 1.0
    sd["torgb.affine.bias"][:] = math.sqrt(32)   # style s = affine(w)/√32 = 1 for any w
    dec.load_state_dict(sd)
    return dec.eval().requires_grad_(False)


def analytic_occupancy(points: torch.Tensor, shapes=HEAD_SHAPES, box_warp: float = BOX_WARP,
                       crop: float | None = 0.1) -> torch.Tensor:
    """Known answer: bool ``[...]``, inside the union of ``shapes``, within the box and outside the crop."""
    inside = torch.zeros(points.shape[:-1], dtype=torch.bool)
    for shape in shapes:
        inside |= shape.field(points) > 0
    inside &= (points.abs() <= box_warp / 2).all(-1)
    if crop is not None:
        limit = box_warp / 2 - crop * box_warp
        inside &= (points[..., 0].abs() <= limit) & (points[..., 2].abs() <= limit)
    return inside


def analytic_mask(c: torch.Tensor, resolution: int, shapes=HEAD_SHAPES, ray_start: float = 2.35,
                  ray_end: float = 3.12, samples: int = 384) -> torch.Tensor:
    """Known-answer silhouette ``[B, H, W]`` (bool) of the analytic shape for camera labels ``[B, 25]``."""
    from .cameras import rays

    origins, dirs = rays(c.float(), resolution)
    t = torch.linspace(ray_start, ray_end, samples)
    hit = torch.zeros(origins.shape[:2], dtype=torch.bool)
    for start in range(0, samples, 64):
        pts = origins[:, :, None] + t[None, None, start:start + 64, None] * dirs[:, :, None]
        hit |= analytic_occupancy(pts, shapes).any(-1)
    return hit.reshape(-1, resolution, resolution)


def write_demo_assets(out_dir: str, resolutions=FULL_RESOLUTIONS, force: bool = False,
                      trigrid_name: str = DEMO_TRIGRID_NAME, decoder_name: str = DEMO_DECODER_NAME) -> list:
    """Write the demo tri-grid and decoder (safetensors) into ``out_dir``; existing files are kept."""
    from safetensors.torch import save_file

    from .fileio import atomic_write

    os.makedirs(out_dir, exist_ok=True)
    written = []
    tri_path = os.path.join(out_dir, trigrid_name)
    if force or not os.path.exists(tri_path):
        demo = analytic_trigrid(resolutions=resolutions, meta={"description": "demo head (analytic)"})
        demo.save(tri_path, overwrite=True)
        written.append(tri_path)
    dec_path = os.path.join(out_dir, decoder_name)
    if force or not os.path.exists(dec_path):
        tensors = {k: v.contiguous() for k, v in demo_decoder().state_dict().items()}
        atomic_write(dec_path, lambda tmp: save_file(tensors, tmp, metadata={"label": DEMO_LABEL,
                                                                           "format": "portrait3d-decoder"}),
                     overwrite=True)
        written.append(dec_path)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the Portrait3D DEMO assets (analytic head tri-grid + "
                                                 "hand-set decoder; not the official weights).")
    parser.add_argument("--out", required=True, help="folder to write into (e.g. ComfyUI/models/portrait3d)")
    parser.add_argument("--force", action="store_true", help="rewrite existing demo files")
    args = parser.parse_args(argv)
    written = write_demo_assets(args.out, force=args.force)
    for path in written:
        print(f"[demo] wrote {path}")
    if not written:
        print(f"[demo] demo assets already present in {args.out}")


if __name__ == "__main__":
    main()
