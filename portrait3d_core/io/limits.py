"""Limits of the checkpoint reader and the two kinds of problem it reports.

Inside the reader a problem is raised without the file name; the public loaders (``checkpoints.py``) add the file
name and turn every problem, and any other exception, into one ``CheckpointError``.
"""
from __future__ import annotations

from ..errors import CheckpointError


class Refused(CheckpointError):
    """The file asks for something the reader does not allow (a global, a dtype, a size beyond its data, …)."""


class Malformed(CheckpointError):
    """The file is not well formed (truncated, unknown opcode, stack underflow, missing archive member, …)."""


# Structure. The official model_512.pkl nests ~30 levels deep and memoizes ~1e5 objects.
MAX_DEPTH = 100                 # nesting of the loaded structure (containers, records)
MAX_MEMO = 1 << 21              # memo entries per pickle
MAX_STACK = 1 << 21             # values on the pickle stack
MAX_MARKS = 1 << 12             # nested MARKs
MAX_LINE = 1 << 20              # bytes of one protocol-0 text argument
MAX_NAME = 256                  # characters of a global's module or name
MAX_STUB_CLASSES = 512          # distinct stub classes one file may reference
MAX_STUB_CACHE = 4096           # stub classes kept per process (least recently used are dropped)
MAX_LEGACY_NESTING = 1          # legacy storages inside legacy storages: not in real files

# Sizes (bytes).
MAX_NDIM = 64
MAX_TOTAL_BYTES = 1 << 36       # tensor data one file may hold (64 GiB)
MAX_EXPANDED_BYTES = 1 << 28    # logical bytes a tensor may repeat beyond its storage (stride 0 views)
MAX_PICKLE_MEMBER = 1 << 32     # size of data.pkl / constants.pkl in a zip
MAX_DEFLATE_RATIO = 64          # a compressed zip member may not unpack to more than 64x its stored size
