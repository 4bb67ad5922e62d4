"""Which global names a checkpoint may reference, and what each one resolves to (allow-list, by construction).

Every answer is one of our inert objects: a ``Constructor`` wrapping a function of plain data (tensor/array/scalar
rebuilders, ``torch.Size``, ``torch.device``, an ``OrderedDict`` that makes a plain dict, …), a ``Marker`` (a type
tag such as ``torch.FloatStorage`` or ``numpy.ndarray``), a torch dtype constant, our ``EasyDict`` class, or a
``Stub`` subclass. Real numpy/torch callables are never handed to a pickle. Anything else is refused.

Policies:
- ``TENSOR_ONLY`` (tri-grid files, torch.save zips): tensors, storages, numpy arrays/scalars, plain containers;
- ``NETWORKS`` (``model_512.pkl``): + StyleGAN persistence records, ``dnnlib.util.EasyDict`` and stubs for classes
  under ``training.``, ``smplx.``, ``torch.nn.modules.``;
- ``TORCHSCRIPT`` (``data.pkl``/``constants.pkl`` of a TorchScript archive): + stubs for ``__torch__.…`` and the
  ``torch.jit._pickle`` list helpers;
- ``HEADER`` (the small pickles of the legacy format): no globals at all.
"""
from __future__ import annotations

import re

import torch

from . import numpy_data, tensors
from .limits import MAX_LEGACY_NESTING, MAX_STUB_CLASSES, Refused
from .records import Constructor, EasyDict, Marker, PersistentRecord, PlainDict, Stub, stub_class

TENSOR_ONLY = "tensors"
NETWORKS = "networks"
TORCHSCRIPT = "torchscript"
HEADER = "header"
POLICIES = (TENSOR_ONLY, NETWORKS, TORCHSCRIPT, HEADER)

_STUB_PREFIXES = {NETWORKS: ("training.", "smplx.", "torch.nn.modules."), TORCHSCRIPT: ("__torch__.",)}
_DEVICE = re.compile(r"[a-z_]{1,16}(:[0-9]{1,5})?")


# ------------------------------------------------------------------------------------ plain-data constructors

def _make_dict(items=None) -> PlainDict:
    """``collections.OrderedDict``: a dict (insertion order is kept by every dict), plain once loaded."""
    if items is None:
        return PlainDict()
    if type(items) in (dict, PlainDict):
        return PlainDict(items)
    if type(items) not in (list, tuple) or not all(type(p) in (list, tuple) and len(p) == 2 for p in items):
        raise Refused("OrderedDict with unexpected arguments refused")
    return PlainDict((k, v) for k, v in items)


def _make_set(items=()) -> set:
    if type(items) not in (list, tuple, set, frozenset):
        raise Refused("set with unexpected arguments refused")
    return set(items)


def _make_frozenset(items=()) -> frozenset:
    return frozenset(_make_set(items))


def _make_size(dims=()) -> torch.Size:
    return torch.Size(numpy_data.check_shape(dims, "torch.Size"))


def _make_device(spec, index=None) -> torch.device:
    if type(spec) is not str or not _DEVICE.fullmatch(spec) or not (index is None or type(index) is int):
        raise Refused(f"torch.device({spec!r:.40}, {index!r:.20}) refused")
    try:
        return torch.device(spec) if index is None else torch.device(spec, index)
    except (RuntimeError, ValueError) as exc:
        raise Refused(f"torch.device({spec!r}, {index!r}) refused ({exc})") from None


def _latin1_encode(text, encoding="latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes; only the latin-1 codec is accepted."""
    if encoding not in ("latin1", "latin-1") or type(text) is not str:
        raise Refused(f"_codecs.encode with encoding {encoding!r:.40} refused")
    return text.encode("latin1")


def _typed_list(kind: type, what: str):
    def build(values):
        if type(values) is not list or not all(type(v) is kind or (kind is float and type(v) is int)
                                               for v in values):
            raise Refused(f"torch.jit._pickle.{what} with unexpected values refused")
        return values
    return build


def _tensor_list(values):
    if type(values) is not list or not all(isinstance(v, tensors.TensorRecord) for v in values):
        raise Refused("torch.jit._pickle.build_tensorlist with non-tensors refused")
    return values


def _restore_type_tag(value, type_str):
    if type(type_str) is not str:
        raise Refused("torch.jit._pickle.restore_type_tag with a non-string type refused")
    return value


def _persistent_record(meta) -> PersistentRecord:
    return PersistentRecord(meta)


# ------------------------------------------------------------------------------------ tables

def _c(qualname: str, fn) -> Constructor:
    return Constructor(qualname, fn)


_COMMON: dict = {}


def _common_table() -> dict:
    """Shared by every policy but HEADER (all entries are stateless)."""
    if _COMMON:
        return _COMMON
    table = {}
    for module, name, fn in (
            ("torch._utils", "_rebuild_tensor_v2", tensors.rebuild_tensor_v2),
            ("torch._utils", "_rebuild_tensor_v3", tensors.rebuild_tensor_v3),
            ("torch._utils", "_rebuild_tensor", tensors.rebuild_tensor_v1),
            ("torch._utils", "_rebuild_parameter", tensors.rebuild_parameter),
            ("torch._utils", "_rebuild_parameter_with_state", tensors.rebuild_parameter),
            ("torch._tensor", "_rebuild_from_type_v2", tensors.rebuild_from_type_v2),
            ("collections", "OrderedDict", _make_dict),
            ("torch", "Size", _make_size),
            ("torch", "device", _make_device),
            ("_codecs", "encode", _latin1_encode),
            ("builtins", "set", _make_set), ("__builtin__", "set", _make_set),
            ("builtins", "frozenset", _make_frozenset), ("__builtin__", "frozenset", _make_frozenset),
            ("numpy", "dtype", numpy_data.make_dtype)):
        table[(module, name)] = _c(f"{module}.{name}", fn)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(module, "_reconstruct")] = _c(f"{module}._reconstruct", numpy_data.reconstruct)
        table[(module, "scalar")] = _c(f"{module}.scalar", numpy_data.scalar)
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        table[(module, "_frombuffer")] = _c(f"{module}._frombuffer", numpy_data.frombuffer)
    table[("numpy", "ndarray")] = Marker("numpy.ndarray", "ndarray")
    for module, name in (("torch._tensor", "Tensor"), ("torch", "Tensor"), ("torch.nn.parameter", "Parameter")):
        table[(module, name)] = Marker(f"{module}.{name}", "tensor_type")
    table.update(tensors.storage_markers())
    table.update(tensors.dtype_constants())
    _COMMON.update(table)
    return _COMMON


def _extra_table(kind: str) -> dict:
    if kind == NETWORKS:
        return {("torch_utils.persistence", "_reconstruct_persistent_obj"):
                _c("torch_utils.persistence._reconstruct_persistent_obj", _persistent_record),
                ("dnnlib.util", "EasyDict"): EasyDict}
    if kind == TORCHSCRIPT:
        out = {("torch.jit._pickle", name): _c(f"torch.jit._pickle.{name}", _typed_list(kind_, name))
               for name, kind_ in (("build_intlist", int), ("build_doublelist", float), ("build_boollist", bool))}
        out[("torch.jit._pickle", "build_tensorlist")] = _c("torch.jit._pickle.build_tensorlist", _tensor_list)
        out[("torch.jit._pickle", "restore_type_tag")] = _c("torch.jit._pickle.restore_type_tag", _restore_type_tag)
        return out
    return {}


class Policy:
    """The allow-list of one load: ``resolve`` answers GLOBAL, ``instantiate`` answers NEWOBJ."""

    def __init__(self, kind: str, nesting: int = 0):
        if kind not in POLICIES:
            raise ValueError(f"unknown checkpoint policy {kind!r}; expected one of {POLICIES}")
        self.kind, self.nesting = kind, nesting
        self._table = {} if kind == HEADER else {**_common_table(), **_extra_table(kind)}
        if kind != HEADER:
            self._table[("torch.storage", "_load_from_bytes")] = _c("torch.storage._load_from_bytes",
                                                                    self._load_from_bytes)
        self._prefixes = _STUB_PREFIXES.get(kind, ())
        self._stubs: set = set()
        self.globals_seen: set = set()

    def resolve(self, module: str, name: str):
        self.globals_seen.add((module, name))
        found = self._table.get((module, name))
        if found is not None:
            return found
        if self._prefixes and (module + ".").startswith(self._prefixes):
            if (module, name) not in self._stubs and len(self._stubs) >= MAX_STUB_CLASSES:
                raise Refused(f"the pickle references more than {MAX_STUB_CLASSES} distinct classes")
            self._stubs.add((module, name))
            return stub_class(module, name)
        raise Refused(f"the pickle references '{module}.{name}', which is not on the allow-list of checkpoint "
                      f"types")

    def instantiate(self, cls, args, kwargs=None):
        """NEWOBJ / NEWOBJ_EX / INST / OBJ: only our EasyDict and stub classes, without constructor arguments."""
        allowed = (cls is EasyDict and self.kind == NETWORKS) or (
            isinstance(cls, type) and issubclass(cls, Stub) and cls is not Stub and self._prefixes)
        if not allowed:
            raise Refused(f"creating an object of {cls!r:.80} refused (only stand-ins for known classes)")
        if args or kwargs:
            raise Refused(f"creating a {cls.__name__} with constructor arguments refused")
        return EasyDict() if cls is EasyDict else object.__new__(cls)

    def _load_from_bytes(self, data):
        """``torch.storage._load_from_bytes``: a nested legacy ``torch.save``, parsed by our own reader."""
        from .legacy import read_legacy

        if type(data) is not bytes:
            raise Refused("torch.storage._load_from_bytes without bytes refused")
        if self.nesting >= MAX_LEGACY_NESTING:
            raise Refused("a legacy storage nested inside another one refused")
        return read_legacy(data, Policy(TENSOR_ONLY, self.nesting + 1))
