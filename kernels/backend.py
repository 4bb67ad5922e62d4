"""Backend selection shared by the kernels' dispatch points: ``PORTRAIT3D_BACKEND``, the once-per-process Triton
check and the one warning when a slower path is used instead.

- ``PORTRAIT3D_BACKEND`` = ``triton`` | ``cpu`` | ``reference`` | ``auto`` (or unset) replaces ``backend="auto"``: a
  forced backend that cannot run raises a clear error instead of falling back.
- ``auto`` on CUDA uses Triton when it works: the first use per process and device compiles and launches a tiny
  problem (``TritonGate.usable``); a missing or too old triton, or a compile/launch failure (no C compiler, no Python
  headers, no libcuda, ...), gives **one** ``BackendFallbackWarning`` naming the cause, the install command and the
  cost, and the grid_sample / torch reference is used from then on (the only other path for CUDA tensors).
"""
from __future__ import annotations

import logging
import os
import threading
import warnings

import torch

ENV_BACKEND = "PORTRAIT3D_BACKEND"
TRITON_INSTALL = 'pip install "triton>=3.4"'
TRITON_INSTALL_NOTE = ("torch >= 2.8 ships a new enough triton; with an older torch, upgrading torch is the safer fix "
                       "than installing triton next to it")
# What running without Triton costs on a GPU. Estimated from the compiled code (warp instructions and bytes per point,
# 262k points x 7 levels, A100/4090 class), not yet measured on a GPU: benchmarks/gpu_check.sh measures it.
TRITON_MISSING_COST = ("the grid_sample reference is estimated ~5x slower in the forward and ~2-4x slower forward + "
                       "backward than the Triton kernels (an estimate from the compiled code, not yet measured on a GPU; "
                       "benchmarks/gpu_check.sh measures it)")
NUMBA_MISSING_COST = "the fast CPU path is x4.46 faster forward + backward than the reference (benchmarks/bench_trigrid.py)"

log = logging.getLogger("portrait3d")


class BackendFallbackWarning(RuntimeWarning):
    """A slower backend is used because the fast one cannot run here (issued once per process and cause)."""


_WARNED: set = set()
_LOCK = threading.Lock()


def warn_once(key, message: str) -> None:
    """Warn (``warnings`` + the ``portrait3d`` log) once per process for ``key``."""
    with _LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    log.warning(message)
    warnings.warn(message, BackendFallbackWarning, stacklevel=3)


def forced_backend(backends, error_cls):
    """The backend ``PORTRAIT3D_BACKEND`` forces (None when unset, empty or ``auto``); unknown values are an error."""
    value = os.environ.get(ENV_BACKEND, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in backends:
        raise error_cls(f"{ENV_BACKEND}={value!r} is not a backend; set it to one of {', '.join(backends)} or unset it")
    return value


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:400]


class TritonGate:
    """Whether a Triton kernel module works on a device, decided once per process and device.

    ``load()`` imports the module (ImportError = missing / too old); ``probe(module, device)`` compiles and launches a
    tiny problem. ``usable(device)`` returns None when both worked, else the reason (cached, also after a failure of
    a real launch reported with ``failed``).
    """

    def __init__(self, name: str, load, probe):
        self.name, self._load, self._probe = name, load, probe
        self._status: dict = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(device: torch.device) -> str:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return str(device)

    def usable(self, device: torch.device):
        key = self._key(device)
        with self._lock:
            if key in self._status:
                return self._status[key]
            try:
                module = self._load()
            except ImportError as exc:
                reason = f"triton is not installed or too old ({_reason(exc)})"
            else:
                try:
                    self._probe(module, device)
                    reason = None
                except Exception as exc:  # noqa: BLE001  (any compile / launch failure means: do not use it)
                    reason = (f"the first Triton compile + launch on {key} failed ({_reason(exc)}); Triton needs a C "
                              f"compiler, the Python headers and libcuda at run time")
            self._status[key] = reason
            return reason

    def failed(self, device: torch.device, exc: BaseException) -> str:
        """Record that a real launch failed on ``device``; returns the reason."""
        reason = f"a Triton launch on {self._key(device)} failed ({_reason(exc)})"
        with self._lock:
            self._status[self._key(device)] = reason
        return reason

    def reset(self) -> None:
        """Forget every decision (tests; or after installing triton in a running process)."""
        with self._lock:
            self._status.clear()


def fallback_message(what: str, reason: str) -> str:
    return (f"Portrait3D {what}: Triton is not used on CUDA because {reason}. Using the reference path instead: "
            f"{TRITON_MISSING_COST}. Fix: {TRITON_INSTALL} ({TRITON_INSTALL_NOTE}); or set {ENV_BACKEND}=reference "
            f"to choose the reference path explicitly (no warning).")


def is_fallback_worthy(exc: BaseException, input_errors=()) -> bool:
    """A failure of the Triton path to fall back from (not a bad input, not out of memory, not an interrupt)."""
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return False
    return isinstance(exc, Exception) and not isinstance(exc, tuple(input_errors))
