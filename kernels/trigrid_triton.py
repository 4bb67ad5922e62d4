"""Fused Triton tri-grid sampling: forward and both gradients in one pass over all levels and planes.

Works on the kernel layout (see ``kernels.layout``): each level ``[B, 3, H, W, D, C]`` contiguous, so a trilinear
corner is one row of C contiguous values. Semantics equal ``trigrid_reference``: plane (u, v, w) = (x, y, z),
(x, z, y), (y, z, x) with u → W, v → H, w → D; ``align_corners=False``; zero padding (weights not renormalised);
mean over levels and planes.

Design:
- grid ``(cdiv(M, BLOCK_M), B)``: a program owns ``BLOCK_M`` points of one batch item and loops over levels
  (unrolled) x 3 planes (runtime loop, keeps the GPU code small) x 8 corners (unrolled), loading
  ``[BLOCK_M, BLOCK_C]`` tiles (``BLOCK_C`` = next power of two >= C, masked);
- the levels are passed as a tuple of tensors plus tuples of their H and W: no copy of the pyramid; one compiled
  variant per number of levels;
- accumulation in fp32 (fp64 for fp64 inputs); all offsets in int64;
- feature gradient: ``tl.atomic_add`` (relaxed) into zeroed fp32 (fp64) buffers, cast to the input dtype afterwards;
  coordinate gradient: per point, channels reduced with ``tl.sum``, no atomics. One backward launch for both.

Bytes per point (fp32, C = 12, L levels; logical bytes, before caches). Gathers: 8 corner rows x 48 B per level
and plane = 1152·L B (8.1 KB for L = 7), plus 12 B coords in and 48 B out. Forward ≈ 1152·L + 60 B; backward
≈ 60 B in + 12 B out, + 1152·L B of atomic read-modify-writes (feature gradient) + 1152·L B of gathers (coordinate
gradient), and an O(pyramid) zero fill of the gradient buffers per call. The rows are contiguous (a corner = 48 B,
the two depth corners 96 B, the x-neighbours 144 B further), so a point touches 4–6 128-B lines per level and plane.
The reference (``grid_sample`` on ``[B·3, C, D, H, W]``) gathers the same 1152·L B, but channel-strided (each value
a separate sector, ~8x the memory transactions), and adds ≈ 580·L B of intermediates per point in the forward
(per level a ``[B·3, C, M]`` output written, then read with the running sum and written back) and about as much
again in its autograd backward.

On CPU the kernels run only under ``TRITON_INTERPRET=1`` (tests); production CPU runs use ``trigrid_cpu``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

MIN_TRITON = (3, 4)
if tuple(int(x) for x in triton.__version__.split(".")[:2] if x.isdigit()) < MIN_TRITON:
    raise ImportError(f"triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))} (the kernels pass "
                      f"tuples of tensors); the reference path is used instead")

from . import TriGridSamplingError

try:  # the interpreter's function type; absent names mean a compiled (GPU) runtime
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted
except ImportError:  # pragma: no cover
    _Interpreted = ()

GPU_BLOCK_M = {True: 128, False: 32}  # points per program on a GPU, forward / backward (backward: fewer registers)
INTERPRETER_BLOCK_M = 4096  # points per program under the interpreter (few programs = fast)
_ACC = {torch.float32: tl.float32, torch.float16: tl.float32, torch.bfloat16: tl.float32,  # accumulation dtypes
        torch.float64: tl.float64}


@triton.jit
def _trigrid_kernel(levels, heights, widths, coords_ptr, out_ptr, gout_ptr, grads, gcoords_ptr, M,
                    FORWARD: tl.constexpr, NEED_LEVELS: tl.constexpr, NEED_COORDS: tl.constexpr,
                    NUM_LEVELS: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Forward (``FORWARD``) or backward of tri-grid sampling for ``BLOCK_M`` points of batch item ``program_id(1)``.

    levels: tuple of ``[B, 3, H, W, D, C]`` tensors; heights / widths: their H and W; grads: like levels, in ACC
    (zeroed; backward adds into them); coords, gcoords: ``[B, M, 3]``; out, gout: ``[B, M, C]``. Unused pointer
    arguments get any tensor of the right kind (never read or written). NEED_LEVELS / NEED_COORDS: backward only.
    """
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ch = tl.arange(0, BLOCK_C)
    ch_ok = (ch < C)[None, :]
    tile_ok = row_ok[:, None] & ch_ok
    point = b * M + rows  # int64 point index into [B, M]
    q0 = tl.load(coords_ptr + point * 3, mask=row_ok, other=0.0).to(ACC)
    q1 = tl.load(coords_ptr + point * 3 + 1, mask=row_ok, other=0.0).to(ACC)
    q2 = tl.load(coords_ptr + point * 3 + 2, mask=row_ok, other=0.0).to(ACC)
    scale = tl.full([], 1.0, ACC) / (3 * NUM_LEVELS)  # in ACC: a Python float would be rounded to fp32
    if FORWARD:
        acc = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    else:
        g = tl.load(gout_ptr + point[:, None] * C + ch[None, :], mask=tile_ok, other=0.0).to(ACC)
        gq0 = tl.zeros([BLOCK_M], ACC)
        gq1 = tl.zeros([BLOCK_M], ACC)
        gq2 = tl.zeros([BLOCK_M], ACC)
    for lvl in tl.static_range(NUM_LEVELS):
        H = heights[lvl]
        W = widths[lvl]
        for p in range(3):  # runtime loop: 3x less code than unrolling (plane p reads (u, v, w), see module doc)
            u = tl.where(p == 2, q1, q0)
            v = tl.where(p == 0, q1, q2)
            w = tl.where(p == 0, q2, tl.where(p == 1, q1, q0))
            # align_corners=False pixel coordinates; the clamp keeps far-away points (all corners masked) in int range
            fx = tl.minimum(tl.maximum(((u + 1.0) * W - 1.0) * 0.5, -2.0), W + 1.0)
            fy = tl.minimum(tl.maximum(((v + 1.0) * H - 1.0) * 0.5, -2.0), H + 1.0)
            fz = tl.minimum(tl.maximum(((w + 1.0) * D - 1.0) * 0.5, -2.0), D + 1.0)
            x0f = tl.floor(fx)
            y0f = tl.floor(fy)
            z0f = tl.floor(fz)
            ax = fx - x0f
            ay = fy - y0f
            az = fz - z0f
            x0 = x0f.to(tl.int64)
            y0 = y0f.to(tl.int64)
            z0 = z0f.to(tl.int64)
            plane_off = (b * 3 + p) * H * W * (D * C)  # int64 (b is int64)
            if NEED_COORDS:
                gfx = tl.zeros([BLOCK_M], ACC)
                gfy = tl.zeros([BLOCK_M], ACC)
                gfz = tl.zeros([BLOCK_M], ACC)
            for dz in tl.static_range(2):
                zz = z0 + dz
                wz = (1 - dz) + (2 * dz - 1) * az  # dz ? az : 1 - az
                ok_z = row_ok & (zz >= 0) & (zz < D)
                for dy in tl.static_range(2):
                    yy = y0 + dy
                    wy = (1 - dy) + (2 * dy - 1) * ay
                    ok_yz = ok_z & (yy >= 0) & (yy < H)
                    for dx in tl.static_range(2):
                        xx = x0 + dx
                        wx = (1 - dx) + (2 * dx - 1) * ax
                        ok = ok_yz & (xx >= 0) & (xx < W)
                        offs = plane_off + ((yy * W + xx) * D + zz) * C
                        tile = offs[:, None] + ch[None, :]
                        mask = ok[:, None] & ch_ok
                        if FORWARD or NEED_COORDS:
                            val = tl.load(levels[lvl] + tile, mask=mask, other=0.0).to(ACC)
                        if FORWARD:
                            acc += (wx * wy * wz)[:, None] * val
                        else:
                            if NEED_LEVELS:
                                upd = (wx * wy * wz * scale)[:, None] * g
                                tl.atomic_add(grads[lvl] + tile, upd, mask=mask, sem="relaxed")
                            if NEED_COORDS:
                                dot = tl.sum(val * g, axis=1)
                                gfx += (2 * dx - 1) * wy * wz * dot
                                gfy += (2 * dy - 1) * wx * wz * dot
                                gfz += (2 * dz - 1) * wx * wy * dot
            if NEED_COORDS:  # chain rule through fx = ((u + 1) W - 1) / 2 and the plane projection
                gu = gfx * (0.5 * W)
                gv = gfy * (0.5 * H)
                gw = gfz * (0.5 * D)
                gq0 += tl.where(p == 2, gw, gu)
                gq1 += tl.where(p == 0, gv, tl.where(p == 1, gw, gu))
                gq2 += tl.where(p == 0, gw, gv)
    if FORWARD:
        tl.store(out_ptr + point[:, None] * C + ch[None, :], acc * scale, mask=tile_ok)
    elif NEED_COORDS:
        tl.store(gcoords_ptr + point * 3, gq0 * scale, mask=row_ok)
        tl.store(gcoords_ptr + point * 3 + 1, gq1 * scale, mask=row_ok)
        tl.store(gcoords_ptr + point * 3 + 2, gq2 * scale, mask=row_ok)


INTERPRETED = isinstance(_trigrid_kernel, _Interpreted)  # True under TRITON_INTERPRET=1 (CPU tensors)


def _check(levels: Sequence[torch.Tensor], coords: torch.Tensor) -> None:
    if coords.device.type == "cpu" and not INTERPRETED:
        raise TriGridSamplingError("backend 'triton' needs CUDA tensors (CPU tensors only with TRITON_INTERPRET=1 set "
                                   "before triton is imported); use backend='cpu' for CPU tensors")
    if coords.dtype not in _ACC:
        raise TriGridSamplingError(f"backend 'triton' supports float32/float16/bfloat16/float64, got {coords.dtype}")
    if len(levels) == 0:
        raise TriGridSamplingError("the tri-grid has no levels")
    tail = tuple(levels[0].shape[4:])  # (D, C)
    for i, level in enumerate(levels):
        if level.dim() != 6 or tuple(level.shape[:2]) != (coords.shape[0], 3) or tuple(level.shape[4:]) != tail:
            raise TriGridSamplingError(f"level {i} has shape {tuple(level.shape)}; expected the kernel layout "
                                       f"[B, 3, H, W, D, C] with B = {coords.shape[0]} and (D, C) = {tail} as level 0")
        if not level.is_contiguous() or level.dtype != coords.dtype or level.device != coords.device:
            raise TriGridSamplingError(f"level {i} must be contiguous, {coords.dtype}, on {coords.device}")


def _launch(levels, coords, out, gout, grads, gcoords, forward, need_levels, need_coords, block_m):
    b, m, _ = coords.shape
    d, c = levels[0].shape[4:]
    if block_m is None:
        block_m = min(INTERPRETER_BLOCK_M, triton.next_power_of_2(max(m, 16))) if INTERPRETED else GPU_BLOCK_M[forward]
    grid = (triton.cdiv(m, block_m), b)
    _trigrid_kernel[grid](
        tuple(levels), tuple(int(t.shape[2]) for t in levels), tuple(int(t.shape[3]) for t in levels),
        coords, out, gout, tuple(grads), gcoords, m,
        FORWARD=forward, NEED_LEVELS=need_levels, NEED_COORDS=need_coords, NUM_LEVELS=len(levels), D=d, C=c,
        BLOCK_M=block_m, BLOCK_C=triton.next_power_of_2(c), ACC=_ACC[coords.dtype], num_warps=4)


def forward(levels: Sequence[torch.Tensor], coords: torch.Tensor, block_m: int | None = None) -> torch.Tensor:
    """Kernel-layout levels ``[B, 3, H_l, W_l, D, C]`` + coords ``[B, M, 3]`` → features ``[B, M, C]``.

    ``block_m``: points per program (a power of two; default 128 on GPU, up to 4096 under the interpreter).
    """
    _check(levels, coords)
    coords = coords.detach().contiguous()
    levels = [level.detach() for level in levels]
    out = torch.empty(coords.shape[0], coords.shape[1], levels[0].shape[5], dtype=coords.dtype, device=coords.device)
    if out.numel():
        _launch(levels, coords, out, out, levels, coords, True, False, False, block_m)
    return out


def backward(levels: Sequence[torch.Tensor], coords: torch.Tensor, grad_out: torch.Tensor, need_levels: bool,
             need_coords: bool, block_m: int | None = None):
    """Gradients w.r.t. the kernel-layout levels (list of ``[B, 3, H_l, W_l, D, C]`` or None) and the coordinates
    (``[B, M, 3]`` or None), given ``grad_out`` ``[B, M, C]``; both computed in one launch.

    ``block_m``: points per program (a power of two; default 32 on GPU, up to 4096 under the interpreter).
    """
    _check(levels, coords)
    if not (need_levels or need_coords):
        return None, None
    coords = coords.detach().contiguous()
    levels = [level.detach() for level in levels]
    grad_out = grad_out.detach().to(coords.dtype).contiguous()
    acc_dtype = torch.float64 if coords.dtype == torch.float64 else torch.float32
    grads = None
    if need_levels:
        grads = [torch.zeros(level.shape, dtype=acc_dtype, device=level.device) for level in levels]
    gcoords = torch.empty_like(coords) if need_coords else None
    if grad_out.numel():
        _launch(levels, coords, grad_out, grad_out, grads or levels, coords if gcoords is None else gcoords,
                False, need_levels, need_coords, block_m)
    elif gcoords is not None:
        gcoords.zero_()
    if grads is not None:
        grads = [grad.to(level.dtype) for grad, level in zip(grads, levels)]
    return grads, gcoords
