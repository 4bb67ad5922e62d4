"""Atomic, never-overwriting file output."""
from __future__ import annotations

import os
import re
import tempfile
from typing import Callable

from .errors import Portrait3DError

# Provenance metadata as ComfyUI names it: "prompt" = the API graph, "workflow" = the editor graph (JSON strings).
# Writers take them as a plain ``{key: str}`` mapping (the ComfyUI nodes build it; the core never imports ComfyUI).
PROVENANCE_KEYS = ("prompt", "workflow")


def atomic_write(path: str, write: Callable[[str], None], *, overwrite: bool = False) -> str:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then publish it atomically as ``path``.

    Without ``overwrite`` an existing file is never replaced (``FileExistsError``); readers never see a partial file.
    """
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)      # mkstemp creates 0600; published files get normal permissions
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)          # atomic and fails if path exists
            except FileExistsError:
                raise
            except OSError:                 # filesystems without hard links
                if os.path.exists(path):
                    raise FileExistsError(path) from None
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def next_free_path(directory: str, prefix: str, extension: str, digits: int = 5) -> str:
    """``<directory>/<prefix>_00001_<extension>`` with the first counter not taken (ComfyUI's naming style)."""
    if not re.fullmatch(r"[\w\-. /]+", prefix) or ".." in prefix.split("/"):
        raise Portrait3DError(f"invalid file name prefix {prefix!r}: use letters, digits, '-', '_', '.' and '/'")
    full_prefix = os.path.join(directory, prefix)
    os.makedirs(os.path.dirname(full_prefix) or directory, exist_ok=True)
    base = os.path.basename(full_prefix)
    folder = os.path.dirname(full_prefix)
    pattern = re.compile(re.escape(base) + r"_(\d+)_")
    taken = [int(m.group(1)) for name in os.listdir(folder) if (m := pattern.match(name))]
    counter = max(taken, default=0) + 1
    while True:
        candidate = os.path.join(folder, f"{base}_{counter:0{digits}d}_{extension}")
        if not os.path.exists(candidate):
            return candidate
        counter += 1


def save_new(directory: str, prefix: str, extension: str, write: Callable[[str], None]) -> str:
    """Write a new file ``<prefix>_NNNNN_<extension>`` atomically; retries the next counter on a race."""
    for _ in range(1000):
        path = next_free_path(directory, prefix, extension)
        try:
            return atomic_write(path, write)
        except FileExistsError:
            continue
    raise Portrait3DError(f"could not find a free file name for {prefix!r} in {directory}")
