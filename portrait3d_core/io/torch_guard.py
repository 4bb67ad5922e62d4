"""The one gate for ``torch.load(weights_only=True)``: refused on torch versions with known bypasses.

The package reads every checkpoint with its own reader (``torch_zip``, ``legacy``, ``pickle_vm``) and does not call
``torch.load`` on user files at all. Any future use must go through ``weights_only_load``, because ComfyUI runs on
whatever torch the user installed and torch's ``weights_only`` unpickler had published bypasses:

- CVE-2025-32434 (GHSA-53q9-r3pm-6pq6): ``torch.load(weights_only=True)`` leads to remote code execution in torch
  <= 2.5.1; fixed in 2.6.0.
- CVE-2026-24747 (GHSA-63cw-57p8-fm3p): the ``weights_only`` unpickler lets a crafted checkpoint corrupt memory
  (SETITEM/SETITEMS on non-dict objects; storage element count not matching the archive's data) and possibly run
  code, in torch < 2.10.0; fixed in 2.10.0.

So torch older than 2.10.0 is refused, and so are 2.10.0 pre-releases (they may predate the fix).
"""
from __future__ import annotations

import re
from typing import Any, Optional

import torch

from ..errors import CheckpointError

MIN_TORCH = (2, 10, 0)
ADVISORIES = ("CVE-2025-32434 (GHSA-53q9-r3pm-6pq6, remote code execution, torch <= 2.5.1) and CVE-2026-24747 "
              "(GHSA-63cw-57p8-fm3p, memory corruption, torch < 2.10.0)")
_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?(.*)")


def weights_only_problem(version: Optional[str] = None) -> Optional[str]:
    """Why ``torch.load(weights_only=True)`` is not trusted on torch ``version`` (default: the running one), or None."""
    version = str(torch.__version__ if version is None else version)
    match = _VERSION.fullmatch(version.strip())
    if match is None:
        return f"torch {version!r} is not a version this package can check"
    numbers = tuple(int(x or 0) for x in match.groups()[:3])
    suffix = match.group(4).split("+", 1)[0]           # a local build tag (+cpu, +cu121) is fine
    prerelease = bool(re.search(r"(a|b|rc|dev)", suffix))
    if numbers < MIN_TORCH or (numbers == MIN_TORCH and prerelease):
        return (f"torch {version} has published bypasses of torch.load(weights_only=True): {ADVISORIES}; "
                f"torch >= {'.'.join(map(str, MIN_TORCH))} (a release, not a pre-release) is required")
    return None


def weights_only_load(file, source: str) -> Any:
    """``torch.load(file, map_location='cpu', weights_only=True)`` on a torch without known bypasses."""
    problem = weights_only_problem()
    if problem:
        raise CheckpointError(f"{source}: refused to read with torch's weights_only loader: {problem}. Update "
                              f"torch in the Python environment ComfyUI runs in.")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad files; the caller gets one
        raise CheckpointError(f"{source}: could not be read safely ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
