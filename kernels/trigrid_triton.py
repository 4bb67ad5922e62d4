"""Fused Triton tri-grid sampling: forward and both gradients in one pass over all levels and planes.

Works on the kernel layout (see ``kernels.layout``): each level ``[B, 3, H, W, D, C]`` contiguous, so a trilinear
corner is one row of C contiguous values. Semantics equal ``trigrid_reference``: plane (u, v, w) = (x, y, z),
(x, z, y), (y, z, x) with u → W, v → H, w → D; ``align_corners=False``; zero padding (weights not renormalised);
mean over levels and planes.

Design (argued from the compiled code, see ``scripts/triton_compiled_stats.py`` and the README's Triton section):
- grid ``(cdiv(M, BLOCK_M), B)``; a program owns ``BLOCK_M`` points of one batch item, **one point per thread**
  (``BLOCK_M = 32 · num_warps``): its index and weight maths run once per (level, plane), its C channels live in
  registers as ``cdiv(C, CHUNK)`` chunks of ``CHUNK`` contiguous values (4 fp32 = one 128-bit access; C = 12 is
  exactly 3 chunks, no padded lanes). A ``[BLOCK_M, 16]`` tile (the previous design) spread each point over 4
  threads that repeated its maths, with 4 of 16 lanes masked.
- the levels are reached through a table of their addresses (int64 ``[L]``) and sizes (int32 ``[L, 2]``), looped
  over at run time: one compiled variant for any number of levels, code size independent of L (the unrolled level
  loop made 7-level kernels ~8k PTX lines and ~15 s to compile);
- 3 planes (runtime loop) x 8 corners (unrolled); accumulation in fp32 (fp64 for fp64 inputs); int64 offsets;
- feature gradient: ``tl.atomic_add`` (relaxed) of one 128-bit chunk per instruction where the target has vector
  atomics (sm_90+: ``red.global.v4.f32``), into zeroed fp32 (fp64) buffers cast to the input dtype afterwards;
  coordinate gradient: per point, reduced inside the thread, no atomics. One backward launch for both.
- deterministic mode (``torch.use_deterministic_algorithms(True)``): the feature gradient is a sorted segment
  reduction (torch's deterministic ``index_put_(accumulate=True)``) instead of atomics; the coordinate gradient has
  no atomics and stays in the kernel.

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
TRITON_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:2] if x.isdigit())
if TRITON_VERSION < MIN_TRITON:
    raise ImportError(f"triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}, the oldest "
                      f"release these kernels are built and checked with")

from . import TriGridSamplingError
from .launch import launch

try:  # the interpreter's function type; absent names mean a compiled (GPU) runtime
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted
except ImportError:  # pragma: no cover
    _Interpreted = ()

GPU_NUM_WARPS = 4
GPU_BLOCK_M = 32 * GPU_NUM_WARPS  # one point per thread, forward and backward
INTERPRETER_BLOCK_M = 4096  # points per program under the interpreter (few programs = fast)
_ELEM = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float64: tl.float64}
_ACC = {torch.float32: tl.float32, torch.float16: tl.float32, torch.bfloat16: tl.float32,  # accumulation dtypes
        torch.float64: tl.float64}
# Register cap of the two-gradient backward on sm_9x: uncapped it takes 164 registers (3 programs of 4 warps per SM);
# at 128 it has no spills, +4 % instructions and 4 programs per SM. Not on sm_8x / sm_120, where ptxas then spills
# inside the level loop (scripts/triton_compiled_stats.py measures both).
BACKWARD_MAXNREG = 128
DETERMINISTIC_CHUNK = 1 << 16  # points per step of the deterministic feature gradient (bounds its temporaries)


@triton.jit
def _chunk_offsets(offs, ok, K: tl.constexpr, CHUNK: tl.constexpr, C: tl.constexpr):
    """Addresses ``[BLOCK_M, CHUNK]`` and mask of channel chunk K of one corner row per point."""
    ch = K * CHUNK + tl.arange(0, CHUNK)
    return offs[:, None] + ch[None, :], ok[:, None] & (ch < C)[None, :]


@triton.jit
def _trigrid_kernel(level_ptrs, grad_ptrs, sizes_ptr, coords_ptr, out_ptr, gout_ptr, gcoords_ptr, M, NUM_LEVELS,
                    FORWARD: tl.constexpr, NEED_LEVELS: tl.constexpr, NEED_COORDS: tl.constexpr,
                    D: tl.constexpr, C: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
                    ELEM: tl.constexpr, ACC: tl.constexpr):
    """Forward (``FORWARD``) or backward of tri-grid sampling for ``BLOCK_M`` points of batch item ``program_id(1)``.

    level_ptrs / grad_ptrs: int64 ``[L]`` addresses of the ``[B, 3, H, W, D, C]`` levels (ELEM) and of their zeroed
    gradient buffers (ACC, backward adds into them); sizes: int32 ``[L, 2]`` (H, W); coords, gcoords: ``[B, M, 3]``;
    out, gout: ``[B, M, C]``. Unused pointer arguments get any tensor of the right kind (never read or written).
    Each point's C channels are handled in ``cdiv(C, CHUNK)`` chunks of CHUNK contiguous values (CHUNK = 4 fp32:
    one 128-bit access), so a thread owns a whole point and computes its weights once.
    """
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    point = b * M + rows  # int64 point index into [B, M]
    NCH: tl.constexpr = (C + CHUNK - 1) // CHUNK
    q0 = tl.load(coords_ptr + point * 3, mask=row_ok, other=0.0).to(ACC)
    q1 = tl.load(coords_ptr + point * 3 + 1, mask=row_ok, other=0.0).to(ACC)
    q2 = tl.load(coords_ptr + point * 3 + 2, mask=row_ok, other=0.0).to(ACC)
    scale = tl.full([], 1.0, ACC) / (3 * NUM_LEVELS)  # in ACC: a Python float would be rounded to fp32
    zero = tl.zeros([BLOCK_M, CHUNK], ACC)
    acc0 = zero
    acc1 = zero
    acc2 = zero
    acc3 = zero
    out_row = point * C
    if not FORWARD:  # the point's output gradient, chunk by chunk, kept in registers
        o, m = _chunk_offsets(out_row, row_ok, 0, CHUNK, C)
        acc0 = tl.load(gout_ptr + o, mask=m, other=0.0).to(ACC)
        if NCH > 1:
            o, m = _chunk_offsets(out_row, row_ok, 1, CHUNK, C)
            acc1 = tl.load(gout_ptr + o, mask=m, other=0.0).to(ACC)
        if NCH > 2:
            o, m = _chunk_offsets(out_row, row_ok, 2, CHUNK, C)
            acc2 = tl.load(gout_ptr + o, mask=m, other=0.0).to(ACC)
        if NCH > 3:
            o, m = _chunk_offsets(out_row, row_ok, 3, CHUNK, C)
            acc3 = tl.load(gout_ptr + o, mask=m, other=0.0).to(ACC)
    gq0 = tl.zeros([BLOCK_M], ACC)
    gq1 = tl.zeros([BLOCK_M], ACC)
    gq2 = tl.zeros([BLOCK_M], ACC)
    for lvl in range(NUM_LEVELS):  # runtime loop: code size and compile time independent of the level count
        H = tl.load(sizes_ptr + 2 * lvl)
        W = tl.load(sizes_ptr + 2 * lvl + 1)
        base = tl.multiple_of(tl.load(level_ptrs + lvl).to(tl.pointer_type(ELEM)), 16)
        gbase = tl.multiple_of(tl.load(grad_ptrs + lvl).to(tl.pointer_type(ACC)), 16)
        for p in range(3):  # plane p reads (u, v, w), see module doc
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
            gfx = tl.zeros([BLOCK_M], ACC)
            gfy = tl.zeros([BLOCK_M], ACC)
            gfz = tl.zeros([BLOCK_M], ACC)
            for dy in tl.static_range(2):
                yy = y0 + dy
                wy = (1 - dy) + (2 * dy - 1) * ay  # dy ? ay : 1 - ay
                ok_y = row_ok & (yy >= 0) & (yy < H)
                for dx in tl.static_range(2):
                    xx = x0 + dx
                    wx = (1 - dx) + (2 * dx - 1) * ax
                    ok_xy = ok_y & (xx >= 0) & (xx < W)
                    wxy = wx * wy
                    for dz in tl.static_range(2):
                        zz = z0 + dz
                        wz = (1 - dz) + (2 * dz - 1) * az
                        ok = ok_xy & (zz >= 0) & (zz < D)
                        offs = plane_off + ((yy * W + xx) * D + zz) * C
                        if FORWARD:
                            wgt = (wxy * wz)[:, None]
                            o, m = _chunk_offsets(offs, ok, 0, CHUNK, C)
                            acc0 += wgt * tl.load(base + o, mask=m, other=0.0).to(ACC)
                            if NCH > 1:
                                o, m = _chunk_offsets(offs, ok, 1, CHUNK, C)
                                acc1 += wgt * tl.load(base + o, mask=m, other=0.0).to(ACC)
                            if NCH > 2:
                                o, m = _chunk_offsets(offs, ok, 2, CHUNK, C)
                                acc2 += wgt * tl.load(base + o, mask=m, other=0.0).to(ACC)
                            if NCH > 3:
                                o, m = _chunk_offsets(offs, ok, 3, CHUNK, C)
                                acc3 += wgt * tl.load(base + o, mask=m, other=0.0).to(ACC)
                        else:
                            if NEED_LEVELS:
                                wgt = (wxy * wz * scale)[:, None]
                                o, m = _chunk_offsets(offs, ok, 0, CHUNK, C)
                                tl.atomic_add(gbase + o, wgt * acc0, mask=m, sem="relaxed")
                                if NCH > 1:
                                    o, m = _chunk_offsets(offs, ok, 1, CHUNK, C)
                                    tl.atomic_add(gbase + o, wgt * acc1, mask=m, sem="relaxed")
                                if NCH > 2:
                                    o, m = _chunk_offsets(offs, ok, 2, CHUNK, C)
                                    tl.atomic_add(gbase + o, wgt * acc2, mask=m, sem="relaxed")
                                if NCH > 3:
                                    o, m = _chunk_offsets(offs, ok, 3, CHUNK, C)
                                    tl.atomic_add(gbase + o, wgt * acc3, mask=m, sem="relaxed")
                            if NEED_COORDS:  # <corner value, output gradient>, reduced inside the thread
                                o, m = _chunk_offsets(offs, ok, 0, CHUNK, C)
                                dot = tl.sum(tl.load(base + o, mask=m, other=0.0).to(ACC) * acc0, axis=1)
                                if NCH > 1:
                                    o, m = _chunk_offsets(offs, ok, 1, CHUNK, C)
                                    dot += tl.sum(tl.load(base + o, mask=m, other=0.0).to(ACC) * acc1, axis=1)
                                if NCH > 2:
                                    o, m = _chunk_offsets(offs, ok, 2, CHUNK, C)
                                    dot += tl.sum(tl.load(base + o, mask=m, other=0.0).to(ACC) * acc2, axis=1)
                                if NCH > 3:
                                    o, m = _chunk_offsets(offs, ok, 3, CHUNK, C)
                                    dot += tl.sum(tl.load(base + o, mask=m, other=0.0).to(ACC) * acc3, axis=1)
                                gfx += (2 * dx - 1) * wy * wz * dot
                                gfy += (2 * dy - 1) * wx * wz * dot
                                gfz += (2 * dz - 1) * wxy * dot
            if NEED_COORDS:  # chain rule through fx = ((u + 1) W - 1) / 2 and the plane projection
                gu = gfx * (0.5 * W)
                gv = gfy * (0.5 * H)
                gw = gfz * (0.5 * D)
                gq0 += tl.where(p == 2, gw, gu)
                gq1 += tl.where(p == 0, gv, tl.where(p == 1, gw, gu))
                gq2 += tl.where(p == 0, gw, gv)
    if FORWARD:
        o, m = _chunk_offsets(out_row, row_ok, 0, CHUNK, C)
        tl.store(out_ptr + o, acc0 * scale, mask=m)
        if NCH > 1:
            o, m = _chunk_offsets(out_row, row_ok, 1, CHUNK, C)
            tl.store(out_ptr + o, acc1 * scale, mask=m)
        if NCH > 2:
            o, m = _chunk_offsets(out_row, row_ok, 2, CHUNK, C)
            tl.store(out_ptr + o, acc2 * scale, mask=m)
        if NCH > 3:
            o, m = _chunk_offsets(out_row, row_ok, 3, CHUNK, C)
            tl.store(out_ptr + o, acc3 * scale, mask=m)
    elif NEED_COORDS:
        tl.store(gcoords_ptr + point * 3, gq0 * scale, mask=row_ok)
        tl.store(gcoords_ptr + point * 3 + 1, gq1 * scale, mask=row_ok)
        tl.store(gcoords_ptr + point * 3 + 2, gq2 * scale, mask=row_ok)


INTERPRETED = isinstance(_trigrid_kernel, _Interpreted)  # True under TRITON_INTERPRET=1 (CPU tensors)


def chunk_size(channels: int) -> int:
    """Channels per chunk: 4 (one 128-bit fp32 access) up to C = 16, more for wider rows (at most 4 chunks)."""
    return max(4, triton.next_power_of_2(triton.cdiv(channels, 4)))


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


def _aligned(level: torch.Tensor) -> torch.Tensor:
    """The level detached, copied when its data does not start on a 16-byte boundary (a view at an odd offset): the
    kernel tells the compiler that level addresses are multiples of 16 (for 128-bit accesses)."""
    level = level.detach()
    return level if level.data_ptr() % 16 == 0 else level.clone()


def _address_table(tensors, device) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64).to(device, non_blocking=True)


def _arch(device: torch.device):
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def launch_args(levels, coords, out, gout, grads, gcoords, forward, need_levels, need_coords, block_m=None,
                arch=None):
    """(grid, positional args, constexpr/launch kwargs, every tensor touched) of one kernel launch.

    ``arch``: the target's compute capability (e.g. 90; default: that of ``coords.device``), for ``maxnreg``.
    """
    b, m, _ = coords.shape
    d, c = levels[0].shape[4:]
    if block_m is None:
        block_m = min(INTERPRETER_BLOCK_M, triton.next_power_of_2(max(m, 16))) if INTERPRETED else GPU_BLOCK_M
    sizes = torch.tensor([[int(t.shape[2]), int(t.shape[3])] for t in levels], dtype=torch.int32)
    device = coords.device
    grads = levels if grads is None else grads
    args = (_address_table(levels, device), _address_table(grads, device), sizes.to(device, non_blocking=True),
            coords, out, gout, gcoords, m, len(levels))
    kwargs = dict(FORWARD=forward, NEED_LEVELS=need_levels, NEED_COORDS=need_coords, D=d, C=c, BLOCK_M=block_m,
                  CHUNK=chunk_size(c), ELEM=_ELEM[coords.dtype], ACC=_ACC[coords.dtype], num_warps=GPU_NUM_WARPS)
    arch = _arch(device) if arch is None else arch
    if not INTERPRETED and not forward and need_levels and need_coords and 90 <= (arch or 0) < 100:
        kwargs["maxnreg"] = BACKWARD_MAXNREG
    touched = (*levels, *grads, *args[:7])
    return (triton.cdiv(m, block_m), b), args, kwargs, touched


def _launch(*spec, **kw):
    grid, args, kwargs, touched = launch_args(*spec, **kw)
    launch(_trigrid_kernel, grid, touched, *args, **kwargs)


def forward(levels: Sequence[torch.Tensor], coords: torch.Tensor, block_m: int | None = None) -> torch.Tensor:
    """Kernel-layout levels ``[B, 3, H_l, W_l, D, C]`` + coords ``[B, M, 3]`` → features ``[B, M, C]``.

    ``block_m``: points per program (a power of two; default 128 on GPU, up to 4096 under the interpreter).
    """
    _check(levels, coords)
    coords = coords.detach().contiguous()
    levels = [_aligned(level) for level in levels]
    out = torch.empty(coords.shape[0], coords.shape[1], levels[0].shape[5], dtype=coords.dtype, device=coords.device)
    if out.numel():
        _launch(levels, coords, out, out, None, coords, True, False, False, block_m)
    return out


def _corner_rows(level_shape, coords_acc: torch.Tensor, plane: int):
    """Rows (into the level viewed as ``[B·3·H·W·D, C]``) and weights of the 8 trilinear corners of plane ``plane``
    for points ``[B, M, 3]`` (in the accumulation dtype): ``[8, B, M]`` int64, ``[8, B, M]`` (0 outside), as the
    kernel computes them."""
    b, _, h, w, d, _ = level_shape
    axes = ((0, 1, 2), (0, 2, 1), (1, 2, 0))[plane]
    u, v, t = (coords_acc[..., a] for a in axes)
    fx = (((u + 1.0) * w - 1.0) * 0.5).clamp(-2.0, w + 1.0)
    fy = (((v + 1.0) * h - 1.0) * 0.5).clamp(-2.0, h + 1.0)
    fz = (((t + 1.0) * d - 1.0) * 0.5).clamp(-2.0, d + 1.0)
    x0, y0, z0 = fx.floor(), fy.floor(), fz.floor()
    ax, ay, az = fx - x0, fy - y0, fz - z0
    x0, y0, z0 = x0.long(), y0.long(), z0.long()
    batch = torch.arange(b, device=coords_acc.device)[:, None]
    rows, weights = [], []
    for dy in (0, 1):
        for dx in (0, 1):
            for dz in (0, 1):
                xx, yy, zz = x0 + dx, y0 + dy, z0 + dz
                wgt = (ax if dx else 1 - ax) * (ay if dy else 1 - ay) * (az if dz else 1 - az)
                ok = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h) & (zz >= 0) & (zz < d)
                row = (((batch * 3 + plane) * h + yy.clamp(0, h - 1)) * w + xx.clamp(0, w - 1)) * d + zz.clamp(0, d - 1)
                rows.append(row)
                weights.append(torch.where(ok, wgt, torch.zeros_like(wgt)))
    return torch.stack(rows), torch.stack(weights)


def _level_grads_sorted(levels, coords, grad_out, acc_dtype) -> list:
    """Deterministic feature gradients: per level, a sorted segment reduction of every (point, corner) contribution
    (``index_put_(accumulate=True)`` under ``torch.use_deterministic_algorithms``), in chunks of points."""
    scale = 1.0 / (3 * len(levels))
    coords_acc = coords.to(acc_dtype)
    g = grad_out.to(acc_dtype)
    grads = []
    for level in levels:
        c = level.shape[5]
        flat = torch.zeros(level.numel() // c, c, dtype=acc_dtype, device=level.device)
        for start in range(0, coords.shape[1], DETERMINISTIC_CHUNK):
            part = slice(start, start + DETERMINISTIC_CHUNK)
            for plane in range(3):
                rows, weights = _corner_rows(level.shape, coords_acc[:, part], plane)
                values = (weights * scale)[..., None] * g[None, :, part]
                flat.index_put_((rows.reshape(-1),), values.reshape(-1, c), accumulate=True)
        grads.append(flat.reshape(level.shape))
    return grads


def backward(levels: Sequence[torch.Tensor], coords: torch.Tensor, grad_out: torch.Tensor, need_levels: bool,
             need_coords: bool, block_m: int | None = None):
    """Gradients w.r.t. the kernel-layout levels (list of ``[B, 3, H_l, W_l, D, C]`` or None) and the coordinates
    (``[B, M, 3]`` or None), given ``grad_out`` ``[B, M, C]``; both computed in one launch.

    With ``torch.use_deterministic_algorithms(True)`` the feature gradient is computed without atomics (bitwise
    reproducible); otherwise its fp32 atomics make the last bits depend on the GPU's scheduling.
    ``block_m``: points per program (a power of two; default 128 on GPU, up to 4096 under the interpreter).
    """
    _check(levels, coords)
    if not (need_levels or need_coords):
        return None, None
    coords = coords.detach().contiguous()
    levels = [_aligned(level) for level in levels]
    grad_out = grad_out.detach().to(coords.dtype).contiguous()
    acc_dtype = torch.float64 if coords.dtype == torch.float64 else torch.float32
    deterministic = need_levels and torch.are_deterministic_algorithms_enabled()
    kernel_levels = need_levels and not deterministic
    grads = None
    if kernel_levels:
        grads = [torch.zeros(level.shape, dtype=acc_dtype, device=level.device) for level in levels]
    gcoords = torch.empty_like(coords) if need_coords else None
    if grad_out.numel() and (kernel_levels or need_coords):
        _launch(levels, coords, grad_out, grad_out, grads, coords if gcoords is None else gcoords,
                False, kernel_levels, need_coords, block_m)
    elif gcoords is not None:
        gcoords.zero_()
    if deterministic:
        grads = _level_grads_sorted(levels, coords, grad_out, acc_dtype)
    if grads is not None:
        grads = [grad.to(level.dtype) for grad, level in zip(grads, levels)]
    return grads, gcoords
