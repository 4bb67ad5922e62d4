"""Nearest-triangle search (point → closest triangle of a soup) and its one dispatch point.

``nearest_triangle(points, triangles)`` returns, per point, the exact squared distance to the nearest triangle and
that triangle's index (lowest index among equal distances; NaN distances of degenerate triangles count as +inf).
Used by the SMPL deformation of posed rendering (``portrait3d_core/gan/deform.py``) on every coarse and fine sample.
Backends, all exact and (for the same dtype, without fused multiply-add) bit-identical:

- ``"triton"``: tiled brute force on CUDA (CPU tensors only under ``TRITON_INTERPRET=1``, for tests);
- ``"cpu"``: a numba BVH, best-first with the previous point's winner as the initial bound (the fast CPU path);
- ``"reference"``: chunked brute force in torch (the correctness oracle);
- ``"auto"`` (default): Triton for CUDA tensors when it works (else the reference, with one warning), the BVH on CPU
  (reference if numba is missing); ``PORTRAIT3D_BACKEND`` forces a backend (see ``kernels.backend``).

No gradients: the index is piecewise constant and the distance only gates (callers differentiate through the
triangle vertices they gather with the index).
"""
from __future__ import annotations

import importlib
from typing import Optional, Tuple

import torch

from . import nearest_triangle_cpu
from .backend import ENV_BACKEND, TRITON_INSTALL, TritonGate, fallback_message, forced_backend, is_fallback_worthy, warn_once
from .nearest_triangle_reference import nearest_triangle_reference

BACKENDS = ("auto", "triton", "cpu", "reference")


class NearestTriangleError(ValueError):
    """Invalid input to the nearest-triangle search (shape, dtype, device or non-finite values)."""


def _load_triton():
    return importlib.import_module(".nearest_triangle_triton", __package__)


def _probe_triton(module, device: torch.device) -> None:
    """Compile and launch the search on a tiny problem (what the first real use would need)."""
    tri = torch.tensor([[[[0.0, 0, 0], [1, 0, 0], [0, 1, 0]]]], device=device)
    dist, index = module.nearest_triangle(torch.tensor([[[0.25, 0.25, 2.0]]], device=device), tri)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if int(index[0, 0]) != 0 or abs(float(dist[0, 0]) - 4.0) > 1e-5:
        raise RuntimeError("the Triton nearest-triangle search disagrees with the reference on the check problem")


TRITON = TritonGate("nearest-triangle search", _load_triton, _probe_triton)
TRITON_DEVICE_TYPES = ("cuda",)  # where "auto" tries Triton


def _triton_backend():
    try:
        return _load_triton()
    except ImportError as exc:
        raise NearestTriangleError(f"backend 'triton' is unavailable ({exc}); install it with {TRITON_INSTALL} or use "
                                   f"'reference' ('cpu' for CPU tensors)")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for ``backend`` on ``device`` (``auto`` honours ``PORTRAIT3D_BACKEND``; see
    ``kernels.backend``)."""
    if backend not in BACKENDS:
        raise NearestTriangleError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    forced = forced_backend(BACKENDS, NearestTriangleError) if backend == "auto" else None
    where = f" (forced by {ENV_BACKEND})" if forced else ""
    chosen = forced or backend
    if chosen == "cpu":
        if device.type != "cpu":
            raise NearestTriangleError(f"backend 'cpu'{where} needs CPU tensors; move them with .cpu() or use 'auto'")
        if not nearest_triangle_cpu.AVAILABLE:
            raise NearestTriangleError(f"backend 'cpu'{where} needs numba (pip install numba); or use 'reference'")
        return "cpu"
    if chosen == "triton":
        _triton_backend()
        if device.type != "cpu":
            reason = TRITON.usable(device)
            if reason is not None:
                raise NearestTriangleError(f"backend 'triton'{where} cannot run: {reason}. Fix: {TRITON_INSTALL}; "
                                           f"or use 'reference'")
        return "triton"
    if chosen == "reference":
        return "reference"
    if device.type in TRITON_DEVICE_TYPES:
        reason = TRITON.usable(device)
        if reason is None:
            return "triton"
        warn_once(("nearest", str(device), reason), fallback_message("nearest-triangle search", reason))
        return "reference"
    if nearest_triangle_cpu.AVAILABLE:
        return "cpu"
    warn_once(("nearest", "numba"), "numba is not installed: the nearest-triangle search uses the slow reference "
              "path (pip install numba)")
    return "reference"


def _validate(points: torch.Tensor, triangles: torch.Tensor, max_distance) -> None:
    if not torch.is_tensor(points) or points.dim() != 3 or points.shape[-1] != 3:
        raise NearestTriangleError(f"points must have shape [B, N, 3], got "
                                   f"{tuple(points.shape) if torch.is_tensor(points) else type(points).__name__}")
    if not torch.is_tensor(triangles) or triangles.dim() != 4 or triangles.shape[-2:] != (3, 3):
        raise NearestTriangleError(f"triangles must have shape [B, F, 3, 3], got "
                                   f"{tuple(triangles.shape) if torch.is_tensor(triangles) else type(triangles).__name__}")
    if points.shape[0] != triangles.shape[0]:
        raise NearestTriangleError(f"batch mismatch: {points.shape[0]} point sets, {triangles.shape[0]} meshes")
    if points.dtype not in (torch.float32, torch.float64) or triangles.dtype != points.dtype:
        raise NearestTriangleError(f"points and triangles must both be float32 or float64, got {points.dtype} and "
                                   f"{triangles.dtype}")
    if points.device != triangles.device:
        raise NearestTriangleError(f"device mismatch: points on {points.device}, triangles on {triangles.device}")
    if not bool(torch.isfinite(points).all()):
        raise NearestTriangleError("points contain NaN or inf; check the camera and ray settings that produced them")
    if max_distance is not None and not float(max_distance) > 0:
        raise NearestTriangleError(f"max_distance must be positive, got {max_distance}")


def nearest_triangle(points: torch.Tensor, triangles: torch.Tensor, *, max_distance: Optional[float] = None,
                     backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest triangle per point.

    Args:
        points: ``[B, N, 3]`` float32 / float64.
        triangles: ``[B, F, 3, 3]`` (vertices a, b, c), same dtype and device.
        max_distance: optional search radius; points whose nearest squared distance exceeds ``max_distance²`` get
            (inf, -1). It only prunes: every point within it gets the exact answer.
        backend: ``"auto"``, ``"triton"``, ``"cpu"`` or ``"reference"``.

    Returns:
        (squared distance ``[B, N]`` in the points' dtype, triangle index ``[B, N]`` int64, -1 = none), on the
        points' device, without gradients.
    """
    _validate(points, triangles, max_distance)
    name = resolve_backend(backend, points.device)
    with torch.no_grad():
        if name == "reference":
            return nearest_triangle_reference(points, triangles, max_distance=max_distance)
        if name == "cpu":
            return nearest_triangle_cpu.nearest_triangle(points, triangles, max_distance=max_distance)
        guarded = backend == "auto" and forced_backend(BACKENDS, NearestTriangleError) is None
        try:
            return _triton_backend().nearest_triangle(points, triangles, max_distance=max_distance)
        except Exception as exc:  # noqa: BLE001  (auto: a failing launch falls back once, with one warning)
            if not guarded or not is_fallback_worthy(exc, (NearestTriangleError,)):
                raise
            reason = TRITON.failed(points.device, exc)
            warn_once(("nearest", str(points.device), reason), fallback_message("nearest-triangle search", reason))
            return nearest_triangle_reference(points, triangles, max_distance=max_distance)
