"""The validating walk after unpickling: records → tensors and plain values; nothing else leaves the loader.

Output types (exactly): ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``; ``list``, ``tuple``, ``dict``
(keys: those scalars or tuples of them), ``set``/``frozenset`` of such keys; CPU tensors (from tensor, storage and
numpy array records); ``torch.Size``, torch dtypes and devices; our ``EasyDict``, ``PersistentRecord`` and ``Stub``
objects, whose state is itself made of these types. Numpy dtypes become their dtype string (``'<f4'``).

The walk is iterative (no Python recursion), keeps shared references shared, refuses self-referencing structures,
and refuses nesting deeper than ``MAX_DEPTH`` (the longest path, so consumers may recurse safely). Anything else —
a constructor or class reference left as a value, an unbuilt record — is refused.
"""
from __future__ import annotations

from typing import Any

import torch

from .limits import MAX_DEPTH, Refused
from .numpy_data import ArrayRecord, DtypeRecord
from .records import EasyDict, PersistentRecord, PlainDict, Stub
from .tensors import StorageRecord, TensorBuilder, TensorRecord

SCALARS = (type(None), bool, int, float, str, bytes)
_KEY_DEPTH = 4


def _check_key(key, depth: int = 0) -> None:
    if type(key) in SCALARS:
        return
    if type(key) is tuple and depth < _KEY_DEPTH:
        for part in key:
            _check_key(part, depth + 1)
        return
    raise Refused(f"a dictionary key or set element of type {type(key).__name__} refused")


def _describe(obj) -> str:
    return getattr(obj, "qualname", None) or type(obj).__name__


class _Walk:
    def __init__(self, max_depth: int):
        self.max_depth = max_depth
        self.tensors = TensorBuilder()
        self.done: dict = {}      # id → (output, height)

    def leaf(self, obj):
        """(True, output) for values without children, (False, None) for containers and records."""
        kind = type(obj)
        if kind in SCALARS or isinstance(obj, (torch.dtype, torch.device)):
            return True, obj
        if kind is torch.Size:
            return True, obj
        if kind is bytearray:
            return True, bytes(obj)
        if isinstance(obj, TensorRecord):
            return True, self.tensors.tensor(obj)
        if isinstance(obj, StorageRecord):
            return True, self.tensors.storage_tensor(obj)
        if kind is ArrayRecord:
            return True, obj.to_tensor()
        if kind is DtypeRecord:
            return True, obj.name()
        return False, None

    @staticmethod
    def children(obj) -> list:
        kind = type(obj)
        if kind in (list, tuple):
            return list(obj)
        if kind in (dict, EasyDict, PlainDict):
            for key in obj:
                _check_key(key)
            return list(obj.values())
        if kind in (set, frozenset):
            for item in obj:
                _check_key(item)
            return []
        if kind is PersistentRecord:
            if type(obj.class_name) is not str or type(obj.version) not in (int, type(None)) or \
                    type(obj.module_src) not in (str, bytes, type(None)) or type(obj.state) not in (dict, PlainDict, type(None)):
                raise Refused("a persistence record with unexpected fields refused")
            return [] if obj.state is None else [obj.state]
        if isinstance(obj, Stub):
            state = obj.__dict__.get("state")
            return [] if state is None else [state]
        raise Refused(f"a {_describe(obj)} cannot be a value in a checkpoint (only tensors, numbers, strings, "
                      f"containers and records)")

    def assemble(self, obj):
        out = lambda child: self.done[id(child)][0]   # noqa: E731
        kind = type(obj)
        if kind is list:
            return [out(c) for c in obj]
        if kind is tuple:
            return tuple(out(c) for c in obj)
        if kind in (dict, PlainDict):
            return {k: out(v) for k, v in obj.items()}
        if kind is EasyDict:
            return EasyDict((k, out(v)) for k, v in obj.items())
        if kind in (set, frozenset):
            return kind(obj)
        if kind is PersistentRecord:
            return PersistentRecord.from_parts(obj.class_name, obj.version, obj.module_src,
                                               {} if obj.state is None else out(obj.state))
        fresh = object.__new__(type(obj))      # a Stub subclass
        state = obj.__dict__.get("state")
        fresh.state = {} if state is None else out(state)
        return fresh

    def run(self, root) -> Any:
        active: set = set()
        stack = [(root, 0, False)]
        while stack:
            obj, depth, leaving = stack.pop()
            key = id(obj)
            if leaving:
                kids = self.children(obj)
                height = 1 + max((self.done[id(c)][1] for c in kids), default=0)
                if height > self.max_depth:
                    raise Refused(f"the structure is nested deeper than {self.max_depth} levels")
                self.done[key] = (self.assemble(obj), height)
                active.discard(key)
                continue
            if key in self.done:
                continue
            is_leaf, value = self.leaf(obj)
            if is_leaf:
                self.done[key] = (value, 0)
                continue
            if key in active:
                raise Refused("the file holds a self-referencing structure")
            if depth >= self.max_depth:
                raise Refused(f"the structure is nested deeper than {self.max_depth} levels")
            kids = self.children(obj)
            active.add(key)
            stack.append((obj, depth, True))
            stack.extend((c, depth + 1, False) for c in kids if id(c) not in self.done)
        return self.done[id(root)][0]


def materialize(root, max_depth: int = MAX_DEPTH) -> Any:
    """The loaded value of ``root`` (the pickle VM's result) in the output types above."""
    return _Walk(max_depth).run(root)
