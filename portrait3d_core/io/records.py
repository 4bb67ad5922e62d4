"""Inert objects the pickle VM builds: they hold plain data and never run code.

- ``Constructor``: one of our functions of plain data that a pickle may call (REDUCE); slots only.
- ``Marker``: a referenced name that is data, not callable (``numpy.ndarray``, ``torch.FloatStorage``, …).
- ``PersistentRecord``: a StyleGAN ``persistence`` object (class name, version, ``__dict__``; its embedded source is
  kept as text and never executed).
- ``Stub`` (+ one subclass per referenced class name, bounded cache): a class of the original code base
  (``training.…``, ``smplx.…``, ``torch.nn.modules.…``, TorchScript ``__torch__.…``); holds its pickled state only.
- ``EasyDict``: stand-in for ``dnnlib.util.EasyDict``, a dict with attribute access.
- ``PlainDict``: what a pickled ``OrderedDict`` becomes (its instance attributes are dropped).
"""
from __future__ import annotations

import collections
import threading

from .limits import MAX_NAME, MAX_STUB_CACHE, Refused


class Constructor:
    """A callable the pickle may invoke (REDUCE): ``fn`` takes plain data and returns plain data or a record."""

    __slots__ = ("qualname", "fn")

    def __init__(self, qualname: str, fn):
        self.qualname = qualname
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


class Marker:
    """A referenced global that is data (a type tag), not something to call."""

    __slots__ = ("qualname", "value")

    def __init__(self, qualname: str, value=None):
        self.qualname = qualname
        self.value = value

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


class PlainDict(dict):
    """What ``collections.OrderedDict(...)`` builds in a pickle: a dict whose BUILD (instance attributes such as a
    state dict's ``_metadata``) is accepted and dropped. It leaves the loader as a plain ``dict``."""

    def build_state(self, state) -> None:
        if state is not None and (type(state) not in (dict, PlainDict) or not all(type(k) is str for k in state)):
            raise Refused("an OrderedDict with a non-dict state")


DICT_TYPES = (dict, PlainDict)


class PersistentRecord:
    """Inert stand-in for a StyleGAN ``persistence`` object: class name, version and pickled ``__dict__``."""

    def __init__(self, meta: dict):
        if type(meta) not in DICT_TYPES or meta.get("type") != "class":
            raise Refused("unexpected persistence record (not a class record)")
        self.class_name = meta.get("class_name")
        self.version = meta.get("version")
        self.module_src = meta.get("module_src")  # text only; never executed
        self.state = meta.get("state")

    @classmethod
    def from_parts(cls, class_name: str, version, module_src, state: dict) -> "PersistentRecord":
        rec = cls.__new__(cls)
        rec.class_name, rec.version, rec.module_src, rec.state = class_name, version, module_src, state
        return rec

    def __repr__(self) -> str:
        return f"PersistentRecord({self.class_name})"


class Stub:
    """Inert stand-in for a class of the original code base: NEWOBJ creates it, BUILD stores the state."""

    qualname = "Stub"

    def build_state(self, state) -> None:
        if "state" in self.__dict__:
            raise Refused(f"the state of a {self.qualname} object is set twice")
        if type(state) is tuple and len(state) == 2 and all(s is None or type(s) in DICT_TYPES for s in state):
            merged = dict(state[0] or {})       # (__dict__, slot state), as pickle writes it for slotted classes
            merged.update(state[1] or {})
            state = merged
        self.state = state if type(state) in DICT_TYPES else {"state": state}

    def __repr__(self) -> str:
        return f"Stub({self.qualname})"


class EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict``: a plain dict with attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def build_state(self, state) -> None:
        """BUILD: instance attributes of an EasyDict are its items."""
        if state is None:
            return
        if type(state) not in DICT_TYPES or not all(type(k) is str for k in state):
            raise Refused("an EasyDict with a non-dict state")
        self.update(state)


_STUBS: "collections.OrderedDict[str, type]" = collections.OrderedDict()
_STUBS_LOCK = threading.Lock()


def _valid_dotted(text: str) -> bool:
    return bool(text) and len(text) <= MAX_NAME and all(part.isidentifier() for part in text.split("."))


def stub_class(module: str, name: str) -> type:
    """The stub class for ``module.name`` (one per name; least recently used ones dropped beyond the cache size)."""
    if not (_valid_dotted(module) and _valid_dotted(name)):
        raise Refused(f"invalid class name {module!r}.{name!r}")
    full = f"{module}.{name}"
    with _STUBS_LOCK:
        cls = _STUBS.get(full)
        if cls is None:
            cls = type(name.rsplit(".", 1)[-1], (Stub,), {"qualname": full, "__module__": __name__})
            _STUBS[full] = cls
            while len(_STUBS) > MAX_STUB_CACHE:
                _STUBS.popitem(last=False)
        else:
            _STUBS.move_to_end(full)
    return cls
