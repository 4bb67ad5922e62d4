"""Launch a Triton kernel on the tensors' own device and that device's current stream.

Triton launches on ``torch.cuda.current_device()`` and its current stream, not on the device of the tensors it is
given: on a multi-GPU machine a tri-grid on ``cuda:1`` launched while ``cuda:0`` is current fails ("Pointer argument
cannot be accessed from Triton") or, with peer access, runs on the wrong device's stream and races with the work
queued on ``cuda:1``. ``launch`` makes the tensors' device current for the launch (``torch.cuda.device``), so Triton
picks that device and ``torch.cuda.current_stream(device)``, the stream the surrounding torch work is queued on.
"""
from __future__ import annotations

import contextlib

import torch


class LaunchDeviceError(ValueError):
    """The tensors handed to one kernel launch are not all on one device."""


def common_device(*tensors) -> torch.device:
    """The one device of ``tensors`` (``None`` entries skipped), or a clear error naming both devices."""
    device = None
    for t in tensors:
        if t is None:
            continue
        if device is None:
            device = t.device
        elif t.device != device:
            raise LaunchDeviceError(f"one kernel launch got tensors on {device} and on {t.device}; move them to one "
                                    f"device first (e.g. .to({str(device)!r}))")
    if device is None:
        raise LaunchDeviceError("a kernel launch got no tensors")
    return device


def device_guard(device: torch.device):
    """Context making ``device`` current for Triton (a CUDA device); nothing to do for CPU (interpreter) tensors."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel, grid, tensors, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` under the device guard of ``tensors`` (every tensor the kernel touches,
    including those it reaches only through pointer tables)."""
    device = common_device(*tensors)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with device_guard(device):
        return kernel[grid](*args, **kwargs)
