"""Tri-grid sampling kernels and the one dispatch point that picks a backend.

``sample_trigrid(levels, coords)`` samples a pyramid of thin-volume planes ("tri-grid") at normalised coordinates
and returns the mean over levels and planes. Backends:

- ``"triton"``: fused Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``, for tests);
- ``"cpu"``: fused numba loops (the fast CPU path);
- ``"reference"``: one ``grid_sample`` per level (the correctness oracle and benchmark baseline);
- ``"auto"`` (default): Triton for CUDA tensors, the fast CPU path otherwise (reference if numba is missing).

Gradients flow to the levels and to the coordinates through a thin ``autograd.Function``.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Sequence

import torch

from . import trigrid_cpu
from .layout import from_kernel_layout, to_kernel_layout
from .nearest_triangle import NearestTriangleError, nearest_triangle
from .trigrid_reference import sample_trigrid_reference

__all__ = ["sample_trigrid", "to_kernel_layout", "from_kernel_layout", "TriGridSamplingError", "BACKENDS",
           "nearest_triangle", "NearestTriangleError"]

BACKENDS = ("auto", "triton", "cpu", "reference")


class TriGridSamplingError(ValueError):
    """Invalid input to tri-grid sampling (shape, dtype, device or non-finite coordinates)."""


def _triton_backend():
    try:
        return importlib.import_module(".trigrid_triton", __name__)
    except ImportError as exc:  # triton missing or unusable
        raise TriGridSamplingError(f"backend 'triton' is unavailable ({exc}); install triton>=3.4 or use backend='cpu'")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend name for ``backend`` on ``device``."""
    if backend not in BACKENDS:
        raise TriGridSamplingError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        if backend == "cpu" and device.type != "cpu":
            raise TriGridSamplingError("backend 'cpu' needs CPU tensors; move them with .cpu() or use 'auto'")
        if backend == "cpu" and not trigrid_cpu.AVAILABLE:
            raise TriGridSamplingError("backend 'cpu' needs numba (pip install numba); or use backend='reference'")
        return backend
    if device.type == "cuda":
        try:
            _triton_backend()
            return "triton"
        except TriGridSamplingError:
            return "reference"
    if trigrid_cpu.AVAILABLE:
        return "cpu"
    warnings.warn("numba is not installed: tri-grid sampling uses the slow reference path (pip install numba)")
    return "reference"


def _validate(levels: Sequence[torch.Tensor], coords: torch.Tensor, layout: str, depth: int) -> None:
    if layout not in ("official", "kernel"):
        raise TriGridSamplingError(f"layout must be 'official' or 'kernel', got {layout!r}")
    if len(levels) == 0:
        raise TriGridSamplingError("the tri-grid has no levels")
    if not torch.is_tensor(coords) or coords.dim() != 3 or coords.shape[-1] != 3:
        shape = tuple(coords.shape) if torch.is_tensor(coords) else type(coords).__name__
        raise TriGridSamplingError(f"points must have shape [B, M, 3], got {shape}")
    if not coords.is_floating_point():
        raise TriGridSamplingError(f"points must be floating point, got {coords.dtype}")
    batch = coords.shape[0]
    want_dim = 5 if layout == "official" else 6
    channels = None
    for i, level in enumerate(levels):
        if level.dim() != want_dim or level.shape[1] != 3:
            hint = "[B, 3, C*D, H, W]" if layout == "official" else "[B, 3, H, W, D, C]"
            raise TriGridSamplingError(f"tri-grid level {i} has shape {tuple(level.shape)}; expected {hint}")
        if layout == "official":
            if level.shape[2] % depth:
                raise TriGridSamplingError(
                    f"tri-grid level {i} has {level.shape[2]} channels, not a multiple of the depth {depth} "
                    f"(the official tri-grid has 36 = 12 features x 3 depth slices)")
            level_channels = level.shape[2]
        else:
            level_channels = level.shape[4] * level.shape[5]
        if channels is None:
            channels = level_channels
        elif level_channels != channels:
            raise TriGridSamplingError(f"tri-grid level {i} has {level_channels} channels, level 0 has {channels}")
        if level.shape[0] != batch:
            raise TriGridSamplingError(
                f"batch mismatch: tri-grid level {i} has batch {level.shape[0]} but the points have batch {batch}")
        if level.dtype != coords.dtype:
            raise TriGridSamplingError(f"dtype mismatch: tri-grid level {i} is {level.dtype}, points are {coords.dtype}")
        if level.device != coords.device:
            raise TriGridSamplingError(f"device mismatch: tri-grid level {i} on {level.device}, points on {coords.device}")
    if not bool(torch.isfinite(coords).all()):
        raise TriGridSamplingError("points contain NaN or inf; check the camera and ray settings that produced them")


class _SampleTriGrid(torch.autograd.Function):
    """Thin autograd wrapper: the backend computes forward and both gradients."""

    @staticmethod
    def forward(ctx, backend, coords, *levels):
        ctx.backend = backend
        ctx.save_for_backward(coords, *levels)
        return backend.forward(levels, coords)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        coords, *levels = ctx.saved_tensors
        need_coords = ctx.needs_input_grad[1]
        need_levels = any(ctx.needs_input_grad[2:])
        grad_levels, grad_coords = ctx.backend.backward(levels, coords, grad_out, need_levels, need_coords)
        if grad_levels is None:
            grad_levels = [None] * len(levels)
        return (None, grad_coords, *grad_levels)


def sample_trigrid(levels: Sequence[torch.Tensor], coords: torch.Tensor, *, layout: str = "official",
                   depth: int = 3, backend: str = "auto") -> torch.Tensor:
    """Sample a pyramid tri-grid; mean over levels, then over the 3 planes.

    Args:
        levels: per level ``[B, 3, C*D, H, W]`` (``layout="official"``) or ``[B, 3, H, W, D, C]`` (``"kernel"``).
        coords: ``[B, M, 3]`` normalised coordinates; [-1, 1] spans the grid, zeros outside.
        layout: layout of ``levels``; hold levels in the kernel layout to avoid a conversion per call.
        depth: depth slices D per plane (official layout only; 3 in the released model).
        backend: ``"auto"``, ``"triton"``, ``"cpu"`` or ``"reference"``.

    Returns:
        ``[B, M, C]`` features.
    """
    _validate(levels, coords, layout, depth)
    name = resolve_backend(backend, coords.device)
    if name == "reference":
        official = levels if layout == "official" else [from_kernel_layout(level) for level in levels]
        d = depth if layout == "official" else levels[0].shape[4]
        return sample_trigrid_reference(official, coords, d)
    kernel_levels = [to_kernel_layout(level, depth) for level in levels] if layout == "official" else list(levels)
    kernel_levels = [level if level.is_contiguous() else level.contiguous() for level in kernel_levels]
    impl = trigrid_cpu if name == "cpu" else _triton_backend()
    return _SampleTriGrid.apply(impl, coords.contiguous(), *kernel_levels)
