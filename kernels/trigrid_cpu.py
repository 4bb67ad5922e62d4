"""Fast CPU tri-grid sampling: fused forward and backward loops compiled with numba (no C toolchain needed).

Works on the kernel layout (see ``kernels.layout``): each level ``[B, 3, H, W, D, C]`` contiguous, so the 8 trilinear
corners of a (level, plane) are rows of C contiguous values. Semantics equal ``trigrid_reference``: plane (u, v, w) =
(x, y, z), (x, z, y), (y, z, x); ``align_corners=False``; zero padding; mean over levels and planes.

Parallelism on the CPU's threads without atomics:
- forward and the coordinate gradient: over blocks of points (each point written by one thread);
- feature gradient: over (batch, level, plane) work items, each owning a disjoint slice of the gradient.
Weights are computed in float64 and results accumulated in float64, then stored in the input dtype.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

try:  # numba is optional: without it the dispatcher falls back to the reference path.
    import numba as nb

    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only on installs without numba
    nb = None
    AVAILABLE = False

_POINT_BLOCK = 64  # points per work item in the forward pass (one texture at a time inside a block)

if AVAILABLE:
    _jit = nb.njit(inline="always")
    _pjit = nb.njit(parallel=True, fastmath=True, nogil=True, boundscheck=False, error_model="numpy", cache=True)

    @_jit
    def _cell(q0, q1, q2, plane, H, W, D):
        """Plane projection + align_corners=False pixel coordinates → (x0, y0, z0, fx-x0, fy-y0, fz-z0)."""
        if plane == 0:
            u, v, w = q0, q1, q2
        elif plane == 1:
            u, v, w = q0, q2, q1
        else:
            u, v, w = q1, q2, q0
        fx = ((u + 1.0) * W - 1.0) * 0.5
        fy = ((v + 1.0) * H - 1.0) * 0.5
        fz = ((w + 1.0) * D - 1.0) * 0.5
        x0 = math.floor(fx)
        y0 = math.floor(fy)
        z0 = math.floor(fz)
        return int(x0), int(y0), int(z0), fx - x0, fy - y0, fz - z0

    @_pjit
    def _forward(levels, coords, out):
        B, M, _ = coords.shape
        L = len(levels)
        C = out.shape[2]
        scale = 1.0 / (3.0 * L)
        nblk = (M + _POINT_BLOCK - 1) // _POINT_BLOCK
        for item in nb.prange(B * nblk):
            b = item // nblk
            m0 = (item % nblk) * _POINT_BLOCK
            m1 = min(M, m0 + _POINT_BLOCK)
            acc = np.zeros((_POINT_BLOCK, C), np.float64)
            for lvl in range(L):
                T = levels[lvl]
                H = T.shape[2]
                W = T.shape[3]
                D = T.shape[4]
                for plane in range(3):
                    for m in range(m0, m1):
                        x0, y0, z0, ax, ay, az = _cell(coords[b, m, 0], coords[b, m, 1], coords[b, m, 2], plane, H, W, D)
                        a = acc[m - m0]
                        for dz in range(2):
                            zz = z0 + dz
                            if zz < 0 or zz >= D:
                                continue
                            wz = az if dz else 1.0 - az
                            for dy in range(2):
                                yy = y0 + dy
                                if yy < 0 or yy >= H:
                                    continue
                                wyz = wz * (ay if dy else 1.0 - ay)
                                for dx in range(2):
                                    xx = x0 + dx
                                    if xx < 0 or xx >= W:
                                        continue
                                    wgt = wyz * (ax if dx else 1.0 - ax)
                                    row = T[b, plane, yy, xx, zz]
                                    for c in range(C):
                                        a[c] += wgt * row[c]
            for m in range(m0, m1):
                for c in range(C):
                    out[b, m, c] = acc[m - m0, c] * scale

    @_pjit
    def _backward_levels(grads, coords, gout):
        """Each (batch, level, plane) item zero-fills, then accumulates, its own slice of the gradient.

        Items run largest level first; the caller sets a chunk size of 1 so threads pick items dynamically.
        """
        B, M, _ = coords.shape
        L = len(grads)
        C = gout.shape[2]
        scale = 1.0 / (3.0 * L)
        for item in nb.prange(B * L * 3):
            lvl = L - 1 - item // (3 * B)
            b = (item // 3) % B
            plane = item % 3
            G = grads[lvl]
            H = G.shape[2]
            W = G.shape[3]
            D = G.shape[4]
            G[b, plane] = 0.0
            for m in range(M):
                x0, y0, z0, ax, ay, az = _cell(coords[b, m, 0], coords[b, m, 1], coords[b, m, 2], plane, H, W, D)
                g = gout[b, m]
                for dz in range(2):
                    zz = z0 + dz
                    if zz < 0 or zz >= D:
                        continue
                    wz = (az if dz else 1.0 - az) * scale
                    for dy in range(2):
                        yy = y0 + dy
                        if yy < 0 or yy >= H:
                            continue
                        wyz = wz * (ay if dy else 1.0 - ay)
                        for dx in range(2):
                            xx = x0 + dx
                            if xx < 0 or xx >= W:
                                continue
                            wgt = wyz * (ax if dx else 1.0 - ax)
                            row = G[b, plane, yy, xx, zz]
                            for c in range(C):
                                row[c] += wgt * g[c]

    @_pjit
    def _backward_coords(levels, coords, gout, gcoords):
        B, M, _ = coords.shape
        L = len(levels)
        C = gout.shape[2]
        scale = 1.0 / (3.0 * L)
        for bm in nb.prange(B * M):
            b = bm // M
            m = bm % M
            g = gout[b, m]
            gq0 = 0.0
            gq1 = 0.0
            gq2 = 0.0
            for lvl in range(L):
                T = levels[lvl]
                H = T.shape[2]
                W = T.shape[3]
                D = T.shape[4]
                for plane in range(3):
                    x0, y0, z0, ax, ay, az = _cell(coords[b, m, 0], coords[b, m, 1], coords[b, m, 2], plane, H, W, D)
                    gfx = 0.0
                    gfy = 0.0
                    gfz = 0.0
                    for dz in range(2):
                        zz = z0 + dz
                        if zz < 0 or zz >= D:
                            continue
                        wz = az if dz else 1.0 - az
                        sz = 1.0 if dz else -1.0
                        for dy in range(2):
                            yy = y0 + dy
                            if yy < 0 or yy >= H:
                                continue
                            wy = ay if dy else 1.0 - ay
                            sy = 1.0 if dy else -1.0
                            for dx in range(2):
                                xx = x0 + dx
                                if xx < 0 or xx >= W:
                                    continue
                                wx = ax if dx else 1.0 - ax
                                sx = 1.0 if dx else -1.0
                                row = T[b, plane, yy, xx, zz]
                                val = 0.0
                                for c in range(C):
                                    val += g[c] * row[c]
                                gfx += sx * wy * wz * val
                                gfy += wx * sy * wz * val
                                gfz += wx * wy * sz * val
                    gu = gfx * 0.5 * W
                    gv = gfy * 0.5 * H
                    gw = gfz * 0.5 * D
                    if plane == 0:
                        gq0 += gu
                        gq1 += gv
                        gq2 += gw
                    elif plane == 1:
                        gq0 += gu
                        gq2 += gv
                        gq1 += gw
                    else:
                        gq1 += gu
                        gq2 += gv
                        gq0 += gw
            gcoords[b, m, 0] = gq0 * scale
            gcoords[b, m, 1] = gq1 * scale
            gcoords[b, m, 2] = gq2 * scale


def _arrays(tensors: Sequence[torch.Tensor]) -> tuple:
    return tuple(t.detach().numpy() for t in tensors)


def forward(levels: Sequence[torch.Tensor], coords: torch.Tensor) -> torch.Tensor:
    """Kernel-layout levels ``[B, 3, H, W, D, C]`` + coords ``[B, M, 3]`` → features ``[B, M, C]``."""
    b, m, _ = coords.shape
    out = torch.empty(b, m, levels[0].shape[-1], dtype=coords.dtype)
    _forward(_arrays(levels), coords.detach().numpy(), out.numpy())
    return out


def backward(levels, coords, grad_out, need_levels: bool, need_coords: bool):
    """Gradients w.r.t. the kernel-layout levels (list or None) and the coordinates (tensor or None)."""
    grad_out = grad_out.contiguous()
    grad_levels = grad_coords = None
    if need_levels:
        grad_levels = [torch.empty_like(level) for level in levels]    # zero-filled inside, in parallel
        with nb.parallel_chunksize(1):
            _backward_levels(_arrays(grad_levels), coords.detach().numpy(), grad_out.numpy())
    if need_coords:
        grad_coords = torch.empty_like(coords)
        _backward_coords(_arrays(levels), coords.detach().numpy(), grad_out.numpy(), grad_coords.numpy())
    return grad_levels, grad_coords
