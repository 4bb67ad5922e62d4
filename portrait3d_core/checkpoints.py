"""Reading untrusted checkpoint files without executing anything from them (``checkpoints.md`` §5–6).

Every file goes through our own readers (``portrait3d_core/io/``); ``pickle.load`` and ``torch.load`` are never
called on user files:
- plain pickles (``trigrid.pkl``, ``model_512.pkl``) run through our pickle VM, whose globals resolve only to our
  inert constructors (``io/policy.py``); nested ``torch.storage._load_from_bytes`` storages are parsed by our legacy
  reader (``io/legacy.py``);
- ``torch.save`` zips (``decoder_512.ckpt``, ``df.pth``, ``epoch_*.pth``, gallery ``*_pyramid_trigrid.pth``) and
  legacy ``torch.save`` files are read member by member by our zip/legacy readers (``io/torch_zip.py``);
- numpy arrays/scalars are rebuilt from (shape, plain dtype, bytes) by our code, tensors from storage bytes +
  offset/size/stride after bounds checks; CUDA-tagged storages land on the CPU;
- what leaves a loader is only tensors, plain Python values and containers, ``torch.Size``/dtypes/devices and our
  inert records (``PersistentRecord``, ``Stub``, ``EasyDict``), see ``io/materialize.py``.
Every problem — truncation, a refused global or dtype, a shape larger than its data, a stride past its storage, … —
is a ``CheckpointError`` naming the file.

Public API: ``load_pickle``, ``load_torch_zip``, ``load_any``, ``read_torchscript_tensors``, ``state_dict_of``,
``state_of``, ``is_safetensors``, ``guess_file_kind``; policies ``TENSOR_ONLY``, ``NETWORKS``, ``TORCHSCRIPT``.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from .errors import CheckpointError
from .io.legacy import is_legacy, read_legacy
from .io.limits import MAX_PICKLE_MEMBER, Malformed, Refused
from .io.materialize import materialize
from .io.pickle_vm import FileSource, PickleVM
from .io.policy import NETWORKS, TENSOR_ONLY, TORCHSCRIPT, Policy
from .io.records import EasyDict, PersistentRecord, Stub
from .io.torch_guard import weights_only_load, weights_only_problem
from .io.torch_zip import TorchZip, file_head, is_zip

__all__ = ["CheckpointError", "EasyDict", "NETWORKS", "PersistentRecord", "Stub", "TENSOR_ONLY", "TORCHSCRIPT",
           "guess_file_kind", "is_safetensors", "load_any", "load_pickle", "load_torch_zip",
           "read_torchscript_tensors", "state_dict_of", "state_of", "weights_only_load", "weights_only_problem"]

_UNSAFE = "nothing in it was executed; it is not a Portrait3D checkpoint, or it is unsafe"


def _describe(path) -> str:
    return os.fspath(path) if not isinstance(path, (bytes, bytearray)) else "<bytes>"


def _error(source: str, exc: BaseException, archive: bool) -> CheckpointError:
    """One ``CheckpointError`` naming ``source`` for any problem met while reading it."""
    if isinstance(exc, (FileNotFoundError, IsADirectoryError)):
        return CheckpointError(f"{source}: file not found")
    if isinstance(exc, OSError):
        return CheckpointError(f"{source}: cannot be read ({exc.strerror or exc})")
    lead = f"{source}: could not be read safely: " if archive else f"{source}: "
    if isinstance(exc, Refused):
        return CheckpointError(f"{lead}refused to load: {exc} ({_UNSAFE})")
    if isinstance(exc, CheckpointError) and not isinstance(exc, Malformed):
        return CheckpointError(f"{lead}{exc}")
    detail = str(exc) if isinstance(exc, Malformed) else f"{type(exc).__name__}: {exc}"
    kind = "not a readable archive" if archive else "not a readable pickle"
    return CheckpointError(f"{lead}{kind} (truncated or corrupted?): {detail[:500]}")


def _check_file(source: str) -> tuple:
    """(size, first 16 bytes) of an existing, non-empty, readable file."""
    if not os.path.isfile(source):
        raise CheckpointError(f"{source}: file not found")
    try:
        size = os.path.getsize(source)
        head = file_head(source)
    except OSError as exc:
        raise CheckpointError(f"{source}: cannot be read ({exc.strerror or exc})") from None
    if size == 0:
        raise CheckpointError(f"{source}: the file is empty")
    return size, head


def load_pickle(path, policy: str = TENSOR_ONLY) -> Any:
    """A plain pickle (``trigrid.pkl``, ``model_512.pkl``) read by our VM under ``policy``."""
    source = _describe(path)
    size, _ = _check_file(source)
    try:
        with open(source, "rb") as fh:
            raw = PickleVM(FileSource(fh, size), Policy(policy)).load()
        return materialize(raw)
    except Exception as exc:  # every failure becomes one CheckpointError naming the file
        raise _error(source, exc, archive=False) from None


def load_torch_zip(path, policy: str = TENSOR_ONLY) -> Any:
    """A ``torch.save`` zip archive read by our own reader (``data.pkl`` through our VM, storages from ``data/``)."""
    source = _describe(path)
    if not is_zip(_check_file(source)[1]):
        raise CheckpointError(f"{source}: not a torch.save archive (truncated, or a different kind of file)")
    try:
        with TorchZip(source) as archive:
            raw = archive.load_pickle("data.pkl", Policy(policy), "data")
        return materialize(raw)
    except Exception as exc:  # every failure becomes one CheckpointError naming the file
        raise _error(source, exc, archive=True) from None


def load_legacy(path, policy: str = TENSOR_ONLY) -> Any:
    """A legacy (non-zip) ``torch.save`` file read by our own reader."""
    source = _describe(path)
    size, _ = _check_file(source)
    if size > MAX_PICKLE_MEMBER:
        raise CheckpointError(f"{source}: legacy torch.save file larger than {MAX_PICKLE_MEMBER >> 30} GiB refused")
    try:
        with open(source, "rb") as fh:
            raw = read_legacy(fh.read(), Policy(policy))
        return materialize(raw)
    except Exception as exc:  # every failure becomes one CheckpointError naming the file
        raise _error(source, exc, archive=True) from None


def load_any(path, policy: str = TENSOR_ONLY) -> Any:
    """Read a ``torch.save`` zip, a legacy ``torch.save`` file or a plain pickle, whichever ``path`` is."""
    source = _describe(path)
    _, head = _check_file(source)
    if is_zip(head):
        return load_torch_zip(source, policy)
    if is_legacy(head):
        return load_legacy(source, policy)
    return load_pickle(source, policy)


def read_torchscript_tensors(path) -> dict:
    """The tensors of a TorchScript archive (``torch.jit.save``, e.g. StyleGAN2-ADA's ``vgg16.pt``) as
    ``{attribute path: tensor}``, e.g. ``layers.conv1.weight``, plus constant tensors as ``CONSTANTS.c<i>``.

    Only ``data.pkl`` and ``constants.pkl`` are read, as data (``__torch__`` classes become inert stubs); the
    archive's code is never read, compiled or run. Tensors are CPU tensors without gradients.
    """
    source = _describe(path)
    if not is_zip(_check_file(source)[1]):
        raise CheckpointError(f"{source}: not a TorchScript archive (not a zip file)")
    try:
        with TorchZip(source) as archive:
            if not (archive.has("constants.pkl") or archive.members_under("code/")):
                raise Malformed("not a TorchScript archive (no code/ or constants.pkl; a torch.save file? use "
                                "load_torch_zip)")
            module = archive.load_pickle("data.pkl", Policy(TORCHSCRIPT), "data")
            constants = (archive.load_pickle("constants.pkl", Policy(TORCHSCRIPT), "constants")
                         if archive.has("constants.pkl") else ())
        module, constants = materialize((module, constants))
        if not isinstance(module, Stub):
            raise Malformed(f"data.pkl holds a {type(module).__name__}, not a TorchScript module")
        out: dict = {}
        _collect_module_tensors(module, "", out)
        for i, value in enumerate(constants if isinstance(constants, (list, tuple)) else ()):
            if torch.is_tensor(value):
                out[f"CONSTANTS.c{i}"] = value
        return {k: v.detach().requires_grad_(False) for k, v in out.items()}
    except Exception as exc:  # every failure becomes one CheckpointError naming the file
        raise _error(source, exc, archive=True) from None


def _collect_module_tensors(obj, prefix: str, out: dict) -> None:
    """Tensor attributes of a TorchScript module stub and its submodules, by attribute path (depth is bounded)."""
    for name, value in state_of(obj).items():
        if type(name) is not str:
            continue
        if torch.is_tensor(value):
            out.setdefault(prefix + name, value)
        elif isinstance(value, Stub):
            _collect_module_tensors(value, f"{prefix}{name}.", out)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if torch.is_tensor(item):
                    out.setdefault(f"{prefix}{name}.{i}", item)
                elif isinstance(item, Stub):
                    _collect_module_tensors(item, f"{prefix}{name}.{i}.", out)


def is_safetensors(path) -> bool:
    """True when ``path`` starts like a safetensors file (8-byte header length, then a JSON object)."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{"


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
