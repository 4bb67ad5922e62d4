"""Tri-grid sampling kernels and the one dispatch point that picks a backend.

``sample_trigrid(levels, coords)`` samples a pyramid of thin-volume planes ("tri-grid") at normalised coordinates
and returns the mean over levels and planes. Backends:

- ``"triton"``: fused Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``, for tests);
- ``"cpu"``: fused numba loops (the fast CPU path);
- ``"reference"``: one ``grid_sample`` per level (the correctness oracle and benchmark baseline);
- ``"auto"`` (default): Triton for CUDA tensors when it works (checked once per process and device; one warning and
  the reference otherwise), the fast CPU path for CPU tensors (reference if numba is missing);
  ``PORTRAIT3D_BACKEND`` forces a backend instead (errors rather than falling back). See ``backend.py``.

Gradients flow to the levels and to the coordinates through a thin ``autograd.Function``.
"""
from __future__ import annotations

import importlib
from typing import Sequence

import torch

from . import trigrid_cpu
from .backend import (ENV_BACKEND, NUMBA_MISSING_COST, TRITON_INSTALL, BackendFallbackWarning, TritonGate,
                      fallback_message, forced_backend, is_fallback_worthy, warn_once)
from .layout import from_kernel_layout, to_kernel_layout
from .nearest_triangle import NearestTriangleError, nearest_triangle
from .trigrid_reference import sample_trigrid_reference

__all__ = ["sample_trigrid", "to_kernel_layout", "from_kernel_layout", "TriGridSamplingError", "BACKENDS",
           "nearest_triangle", "NearestTriangleError", "resolve_backend", "BackendFallbackWarning", "ENV_BACKEND",
           "backend_report"]

BACKENDS = ("auto", "triton", "cpu", "reference")


class TriGridSamplingError(ValueError):
    """Invalid input to tri-grid sampling (shape, dtype, device or non-finite coordinates)."""


def _load_triton():
    return importlib.import_module(".trigrid_triton", __name__)


def _probe_triton(module, device: torch.device) -> None:
    """Compile and launch forward + backward on a tiny problem (what the first real use would need)."""
    gen = torch.Generator().manual_seed(0)
    levels = [torch.randn(1, 3, s, s, 3, 12, generator=gen).to(device) for s in (2, 3)]
    coords = (torch.rand(1, 16, 3, generator=gen) * 2 - 1).to(device)
    out = module.forward(levels, coords)
    grads, gcoords = module.backward(levels, coords, torch.ones_like(out), True, True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    want = sample_trigrid_reference([from_kernel_layout(level) for level in levels], coords, 3)
    if not torch.allclose(out, want, atol=1e-4, rtol=1e-4):
        raise RuntimeError("the Triton forward disagrees with the reference on the check problem")


TRITON = TritonGate("tri-grid sampling", _load_triton, _probe_triton)
TRITON_DEVICE_TYPES = ("cuda",)  # where "auto" tries Triton (tests add "cpu" under TRITON_INTERPRET=1)


def _triton_backend():
    try:
        return _load_triton()
    except ImportError as exc:  # triton missing or unusable
        raise TriGridSamplingError(f"backend 'triton' is unavailable ({exc}); install it with {TRITON_INSTALL} or "
                                   f"use backend='reference' ('cpu' for CPU tensors)")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend name for ``backend`` on ``device``.

    ``"auto"`` honours ``PORTRAIT3D_BACKEND`` (a forced backend errors instead of falling back); otherwise Triton on
    CUDA when it works (checked once per process and device), else the reference with one warning; on CPU the numba
    path, else the reference with one warning.
    """
    if backend not in BACKENDS:
        raise TriGridSamplingError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    forced = forced_backend(BACKENDS, TriGridSamplingError) if backend == "auto" else None
    where = f" (forced by {ENV_BACKEND})" if forced else ""
    chosen = forced or backend
    if chosen == "cpu":
        if device.type != "cpu":
            raise TriGridSamplingError(f"backend 'cpu'{where} needs CPU tensors; move them with .cpu(), or use 'auto'")
        if not trigrid_cpu.AVAILABLE:
            raise TriGridSamplingError(f"backend 'cpu'{where} needs numba (pip install numba); or use 'reference'")
        return "cpu"
    if chosen == "triton":
        _triton_backend()
        if device.type != "cpu":  # CPU tensors: the module's own check (interpreter only) gives the error
            reason = TRITON.usable(device)
            if reason is not None:
                raise TriGridSamplingError(f"backend 'triton'{where} cannot run: {reason}. Fix: {TRITON_INSTALL}; "
                                           f"or use 'reference'")
        return "triton"
    if chosen == "reference":
        return "reference"
    if device.type in TRITON_DEVICE_TYPES:
        reason = TRITON.usable(device)
        if reason is None:
            return "triton"
        warn_once(("trigrid", str(device), reason), fallback_message("tri-grid sampling", reason))
        return "reference"
    if trigrid_cpu.AVAILABLE:
        return "cpu"
    warn_once(("trigrid", "numba"), "numba is not installed: tri-grid sampling uses the slow reference path "
              f"({NUMBA_MISSING_COST}); fix: pip install numba")
    return "reference"


class _ReferenceKernel:
    """The reference path in the kernel-layout interface of the fast backends (the fallback after a failed launch)."""

    @staticmethod
    def forward(levels, coords):
        return sample_trigrid_reference([from_kernel_layout(level) for level in levels], coords, levels[0].shape[4])

    @staticmethod
    def backward(levels, coords, grad_out, need_levels, need_coords):
        with torch.enable_grad():
            lv = [level.detach().requires_grad_(need_levels) for level in levels]
            cc = coords.detach().requires_grad_(need_coords)
            out = _ReferenceKernel.forward(lv, cc)
            inputs = (lv if need_levels else []) + ([cc] if need_coords else [])
            grads = list(torch.autograd.grad(out, inputs, grad_out))
        glevels = grads[:len(levels)] if need_levels else None
        return glevels, (grads[-1] if need_coords else None)


class _AutoTriton:
    """Triton chosen by ``auto``: a failing launch (compile error, missing toolchain) warns once, marks Triton
    unusable on that device and answers with the reference instead."""

    @staticmethod
    def _guarded(name, levels, coords, *args):
        if TRITON.usable(coords.device) is None:
            try:
                return getattr(_triton_backend(), name)(levels, coords, *args)
            except Exception as exc:  # noqa: BLE001
                if not is_fallback_worthy(exc, (TriGridSamplingError,)):
                    raise
                reason = TRITON.failed(coords.device, exc)
                warn_once(("trigrid", str(coords.device), reason), fallback_message("tri-grid sampling", reason))
        return getattr(_ReferenceKernel, name)(levels, coords, *args)

    @staticmethod
    def forward(levels, coords):
        return _AutoTriton._guarded("forward", levels, coords)

    @staticmethod
    def backward(levels, coords, grad_out, need_levels, need_coords):
        return _AutoTriton._guarded("backward", levels, coords, grad_out, need_levels, need_coords)


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
    if name == "cpu":
        impl = trigrid_cpu
    elif backend == "auto" and forced_backend(BACKENDS, TriGridSamplingError) is None:
        impl = _AutoTriton  # chosen by auto: a failing launch falls back (forced / explicit Triton errors instead)
    else:
        impl = _triton_backend()
    return _SampleTriGrid.apply(impl, coords.contiguous(), *kernel_levels)


def backend_report(device: torch.device) -> dict:
    """What ``auto`` runs on ``device``, for the host's log line / route: ``{device, trigrid_sampling,
    nearest_triangle, triton, reason}`` (``reason``: why Triton is not used, or None)."""
    nearest = importlib.import_module(".nearest_triangle", __name__)
    device = torch.device(device)
    name = resolve_backend("auto", device)
    try:
        import triton

        version = triton.__version__
    except ImportError:
        version = None
    reason = TRITON.usable(device) if device.type in TRITON_DEVICE_TYPES else None
    return {"device": str(device), "trigrid_sampling": name,
            "nearest_triangle": nearest.resolve_backend("auto", device),
            "triton": version, "forced_by_env": forced_backend(BACKENDS, TriGridSamplingError), "reason": reason}
