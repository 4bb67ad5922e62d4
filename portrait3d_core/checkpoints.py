"""Reading untrusted checkpoint files without executing pickled code (``checkpoints.md`` §5–6).

- ``RestrictedUnpickler``: an allow-list ``find_class``. Tensors are rebuilt with torch's own functions, storages
  through torch's ``weights_only`` loader (CUDA storages land on the CPU). StyleGAN persistence records become inert
  ``PersistentRecord`` objects (their embedded source is kept as text and never executed); classes of the original
  code base (``training.``, ``smplx.``, ``torch.nn.modules.``) become inert ``Stub`` objects that only hold their
  pickled state. Anything else — ``os.system``, ``builtins.eval``, … — is refused with ``CheckpointError``.
- ``load_pickle``: a plain pickle (``trigrid.pkl``, ``model_512.pkl``) through that unpickler.
- ``load_torch_zip``: a ``torch.save`` file (``decoder_512.ckpt``, ``df.pth``, ``epoch_*.pth``) through torch's
  ``weights_only`` loader, with the few numpy names real files carry added to its allow-list.
- ``state_dict_of``: walk a pickled module tree (records and stubs) into an official ``state_dict``.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError

TENSOR_ONLY = "tensors"       # allow-list for pickles of plain tensors / dicts (tri-grid files)
NETWORKS = "networks"         # + persistence records and stub classes (model_512.pkl)


class PersistentRecord:
    """Inert stand-in for a StyleGAN ``persistence`` object: class name, version and pickled ``__dict__``."""

    def __init__(self, meta: dict):
        if not isinstance(meta, dict) or meta.get("type") != "class":
            raise CheckpointError("unexpected persistence record (not a class record)")
        self.class_name = meta.get("class_name")
        self.version = meta.get("version")
        self.module_src = meta.get("module_src")  # text only; never executed
        self.state = meta.get("state") or {}

    def __repr__(self) -> str:
        return f"PersistentRecord({self.class_name})"


class Stub:
    """Inert stand-in for a class of the original code base; ``NEWOBJ`` + ``BUILD`` just store the state."""

    qualname = "Stub"

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {"state": state}

    def __repr__(self) -> str:
        return f"Stub({self.qualname})"


class EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict``: a plain dict with attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


_STUBS: dict[str, type] = {}
_STUB_PREFIXES = ("training.", "smplx.", "torch.nn.modules.")


def _stub_class(full_name: str) -> type:
    if full_name not in _STUBS:
        _STUBS[full_name] = type(full_name.rsplit(".", 1)[-1], (Stub,), {"qualname": full_name})
    return _STUBS[full_name]


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles use it for bytes; only the latin-1 codec is accepted."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise CheckpointError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _load_storage_bytes(data: bytes):
    """Nested legacy ``torch.save`` of one storage; torch's restricted loader, remapped to the CPU."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _numpy_multiarray():
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    return multiarray


def _numpy_globals() -> dict:
    """numpy names real checkpoints carry (array/scalar reconstruction cannot run code)."""
    ma = _numpy_multiarray()
    out = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod_name in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(mod_name, "_reconstruct")] = ma._reconstruct
        out[(mod_name, "scalar")] = ma.scalar
    for name in ("Float32DType", "Float64DType", "Int64DType", "Int32DType", "UInt8DType", "UInt32DType", "BoolDType"):
        if hasattr(np, "dtypes") and hasattr(np.dtypes, name):
            out[("numpy.dtypes", name)] = getattr(np.dtypes, name)
    return out


_TORCH_DTYPES = ("float32", "float16", "float64", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")


def _allowed_globals(policy: str) -> dict:
    allowed = {
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
        ("_codecs", "encode"): _latin1_encode,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
    }
    for name in _TORCH_DTYPES:
        allowed[("torch", name)] = getattr(torch, name)
    if policy == NETWORKS:
        allowed.update(_numpy_globals())
        allowed[("torch_utils.persistence", "_reconstruct_persistent_obj")] = PersistentRecord
        allowed[("dnnlib.util", "EasyDict")] = EasyDict
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only returns allow-listed, non-executing callables."""

    def __init__(self, file, policy: str = TENSOR_ONLY, source: str = "file"):
        super().__init__(file)
        self._allowed = _allowed_globals(policy)
        self._policy = policy
        self._source = source
        self.globals_seen: set[tuple[str, str]] = set()

    def find_class(self, module: str, name: str):
        self.globals_seen.add((module, name))
        found = self._allowed.get((module, name))
        if found is not None:
            return found
        if self._policy == NETWORKS and module.startswith(_STUB_PREFIXES):
            return _stub_class(f"{module}.{name}")
        raise CheckpointError(
            f"{self._source}: refused to load: the pickle references '{module}.{name}', which is not on the "
            f"allow-list of tensor/checkpoint types. The file is not a Portrait3D checkpoint, or it is unsafe; "
            f"nothing in it was executed.")

    def persistent_load(self, pid):
        raise CheckpointError(f"{self._source}: unexpected persistent id {pid!r} in a plain pickle")


def _describe(path) -> str:
    return os.fspath(path) if not isinstance(path, (bytes, bytearray)) else "<bytes>"


def load_pickle(path, policy: str = TENSOR_ONLY) -> Any:
    """Unpickle ``path`` with the restricted unpickler; clear ``CheckpointError`` on truncation or refusal."""
    source = _describe(path)
    try:
        with open(path, "rb") as fh:
            return RestrictedUnpickler(fh, policy, source).load()
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{source}: file not found") from None
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, RuntimeError, IndexError, KeyError,
            AttributeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{source}: not a readable pickle (truncated or corrupted?): "
                              f"{type(exc).__name__}: {exc}") from None


def _torch_safe_globals() -> list:
    return list(dict.fromkeys(_numpy_globals().values()))


def load_torch_zip(path) -> Any:
    """A ``torch.save`` file read with torch's ``weights_only`` loader on the CPU (+ numpy scalars allowed)."""
    source = _describe(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{source}: file not found")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{source}: not a torch.save archive (truncated, or a different kind of file)")
    try:
        with torch.serialization.safe_globals(_torch_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{source}: could not be read safely ({msg}). Only tensors, plain Python values and "
                              f"numpy scalars are accepted; nothing in the file was executed.") from None


def is_safetensors(path) -> bool:
    """True when ``path`` starts like a safetensors file (8-byte header length, then a JSON object)."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def load_any(path, policy: str = TENSOR_ONLY) -> Any:
    """Read a ``torch.save`` zip or a plain pickle, whichever ``path`` is."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{_describe(path)}: file not found")
    if zipfile.is_zipfile(path):
        return load_torch_zip(path)
    return load_pickle(path, policy)


# ----------------------------------------------------------------------------------- pickled module trees

def state_of(obj) -> dict:
    """The pickled ``__dict__`` of a persistence record or stub ({} for anything else)."""
    if isinstance(obj, PersistentRecord):
        return obj.state
    if isinstance(obj, Stub):
        return getattr(obj, "state", {})
    return {}


def state_dict_of(obj, prefix: str = "", out: dict | None = None) -> dict:
    """Official ``nn.Module.state_dict()`` order from a pickled module tree: params, persistent buffers, children."""
    out = {} if out is None else out
    st = state_of(obj)
    skip = set(st.get("_non_persistent_buffers_set") or ())
    for name, value in (st.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + name] = value
    for name, value in (st.get("_buffers") or {}).items():
        if value is not None and name not in skip:
            out[prefix + name] = value
    for name, child in (st.get("_modules") or {}).items():
        if child is not None:
            state_dict_of(child, f"{prefix}{name}.", out)
    return out


def guess_file_kind(path: str) -> str:
    """Cheap guess of what a model file holds: 'trigrid', 'decoder', 'gan', 'discriminator' or 'unknown'.

    Our safetensors files say it in their metadata; official files are recognised by their release names
    (``decoder_512.ckpt``, ``model_512.pkl``, ``trigrid.pkl``, ``df.pth``, ``epoch_*.pth``, ``*_pyramid_trigrid.pth``).
    """
    name = os.path.basename(path).lower()
    if name.endswith(".safetensors"):
        try:
            with open(path, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = fh.read(size) if 0 < size < 100_000_000 else b"{}"
            import json

            fmt = (json.loads(header).get("__metadata__") or {}).get("format", "")
        except (OSError, ValueError):
            fmt = ""
        if fmt:
            return {"portrait3d-trigrid": "trigrid", "portrait3d-decoder": "decoder", "portrait3d-gan": "gan",
                    "portrait3d-discriminator": "discriminator"}.get(fmt, "unknown")
    if "decoder" in name:
        return "decoder"
    if "trigrid" in name or name == "df.pth" or name.startswith("epoch_"):
        return "trigrid"
    if "model_512" in name or "generator" in name:
        return "gan"
    return "unknown"
