"""numpy dtypes, arrays and scalars of official pickles, rebuilt by our code from (shape, dtype string, bytes).

numpy itself is never called: a pickle's ``numpy.dtype(...)``, ``_reconstruct(ndarray, ...)``, ``scalar(...)`` and
``_frombuffer(...)`` reach the functions below. Only plain numeric/bool dtypes are accepted (``b1 i1 u1 i2 u2 i4 u4
i8 u8 f2 f4 f8`` with an explicit byte order for multi-byte types); object, void, structured, subarray, string and
datetime dtypes are refused, whether they come by name (descr), through the state's fields/names, subarray, flags or
an itemsize that does not match. Array data must be exactly shape product × itemsize bytes, checked before anything
is allocated. Arrays leave the loader as CPU tensors (``to_tensor``), scalars as Python numbers.
"""
from __future__ import annotations

import math
import struct

import torch

from .limits import MAX_NDIM, Refused
from .records import Marker
from .tensors import byteswap

# name → (struct code, itemsize, torch dtype name, widened torch dtype name for torch builds without it)
_PLAIN = {
    "b1": ("?", 1, "bool", None), "i1": ("b", 1, "int8", None), "u1": ("B", 1, "uint8", None),
    "i2": ("h", 2, "int16", None), "u2": ("H", 2, "uint16", "int32"), "i4": ("i", 4, "int32", None),
    "u4": ("I", 4, "uint32", "int64"), "i8": ("q", 8, "int64", None), "u8": ("Q", 8, "uint64", None),
    "f2": ("e", 2, "float16", None), "f4": ("f", 4, "float32", None), "f8": ("d", 8, "float64", None),
}
_ORDERS = ("<", ">", "|")


def _refuse_name(name) -> Refused:
    return Refused(f"numpy dtype {name!r} refused: only plain numeric/bool dtypes ({' '.join(_PLAIN)}) are read, "
                   f"never object, void, structured, subarray, string or datetime dtypes")


class DtypeRecord:
    """``numpy.dtype(name, align, copy)`` + BUILD(state), validated to a plain dtype."""

    __slots__ = ("code", "itemsize", "byteorder", "built", "used")

    def __init__(self, name, align=False, copy=True):
        if type(name) is not str or type(align) not in (bool, int) or type(copy) not in (bool, int):
            raise Refused(f"numpy dtype({name!r}, {align!r}, {copy!r}) refused: expected a dtype name")
        order = name[0] if name[:1] in ("<", ">", "|", "=") else None
        base = name[1:] if order else name
        if base not in _PLAIN:
            raise _refuse_name(name)
        if order == "=":
            raise Refused(f"numpy dtype {name!r} refused: native byte order is not explicit")
        self.code, self.itemsize = _PLAIN[base][0], _PLAIN[base][1]
        self.byteorder = order if order in ("<", ">") else None
        self.built = self.used = False

    def build_state(self, state) -> None:
        """numpy's dtype state: (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])."""
        if self.built or self.used:
            raise Refused("the state of a numpy dtype is set twice (or after it was used)")
        if type(state) is not tuple or len(state) not in (8, 9) or state[0] not in (3, 4) or type(state[0]) is not int:
            raise Refused(f"numpy dtype state {_short(state)} refused (unknown layout)")
        _, order, subarray, names, fields, elsize, alignment, flags = state[:8]
        if subarray is not None:
            raise Refused("numpy dtype with a subarray refused")
        if names is not None or fields is not None:
            raise Refused("structured numpy dtype (names/fields) refused")
        if type(flags) is not int or flags != 0:
            raise Refused(f"numpy dtype flags {flags!r} refused (object references or structure)")
        for what, value in (("itemsize", elsize), ("alignment", alignment)):
            if type(value) is not int or value not in (-1, self.itemsize):
                raise Refused(f"numpy dtype {what} {value!r} does not match a {self.itemsize}-byte plain dtype")
        if len(state) == 9 and state[8] is not None:
            raise Refused("numpy dtype metadata refused")
        if order not in _ORDERS or type(order) is not str:
            raise Refused(f"numpy dtype byte order {order!r} refused")
        if self.itemsize > 1:
            if order == "|":
                raise Refused(f"numpy dtype byte order '|' refused for a {self.itemsize}-byte dtype")
            if self.byteorder is not None and order != self.byteorder:
                raise Refused("numpy dtype byte order differs between its name and its state")
            self.byteorder = order
        self.built = True

    def spec(self) -> tuple:
        """(struct code, itemsize, byteorder '<'/'>'); freezes the record."""
        if self.itemsize > 1 and self.byteorder is None:
            raise Refused("numpy dtype without an explicit byte order refused")
        self.used = True
        return self.code, self.itemsize, self.byteorder or "<"

    def name(self) -> str:
        code, size, order = self.spec()
        base = next(k for k, v in _PLAIN.items() if v[0] == code)
        return ("|" if size == 1 else order) + base


class ArrayRecord:
    """``_reconstruct(ndarray, (0,), b'b')`` + BUILD(state): shape, plain dtype, order and exactly enough bytes."""

    __slots__ = ("shape", "code", "itemsize", "byteorder", "fortran", "data")

    def __init__(self):
        self.data = None

    def build_state(self, state) -> None:
        if self.data is not None:
            raise Refused("the state of a numpy array is set twice")
        if type(state) is not tuple or len(state) not in (4, 5):
            raise Refused(f"numpy array state {_short(state)} refused (unknown layout)")
        if len(state) == 5:
            if state[0] != 1 or type(state[0]) is not int:
                raise Refused(f"numpy array state version {state[0]!r} refused")
            state = state[1:]
        shape, dtype, fortran, raw = state
        self._set(shape, dtype, fortran, raw)

    def _set(self, shape, dtype, fortran, raw) -> None:
        if not isinstance(dtype, DtypeRecord):
            raise Refused(f"numpy array with dtype {_short(dtype)} refused")
        if type(raw) not in (bytes, bytearray):
            raise Refused("numpy array whose data is not raw bytes (an object array) refused")
        if type(fortran) is not bool:
            raise Refused(f"numpy array order flag {fortran!r} refused")
        shape = check_shape(shape, "numpy array")
        self.code, self.itemsize, self.byteorder = dtype.spec()
        need = math.prod(shape) * self.itemsize
        if need != len(raw):
            raise Refused(f"numpy array of shape {shape} ({self.itemsize}-byte items) needs {need} bytes but the "
                          f"file holds {len(raw)}")
        self.shape, self.fortran, self.data = shape, fortran, raw

    def to_tensor(self) -> torch.Tensor:
        if self.data is None:
            raise Refused("numpy array without data")
        dtype = _torch_dtype(self.code)
        raw = bytearray(self.data)
        if self.itemsize > 1 and self.byteorder == ">":
            raw = byteswap(raw, self.itemsize)
        wide = _PLAIN[_name_of(self.code)][3]
        if dtype is None and wide is not None:   # this torch has no uint16/uint32: widen losslessly
            flat = torch.tensor(list(struct.iter_unpack("<" + self.code, raw)), dtype=getattr(torch, wide))
            flat = flat.reshape(-1)
        elif dtype is None:
            raise Refused(f"numpy dtype {_name_of(self.code)!r} needs a newer torch (no torch dtype for it)")
        elif not raw:
            flat = torch.empty(0, dtype=dtype)
        elif dtype is torch.bool:
            flat = torch.frombuffer(raw, dtype=torch.uint8) != 0
        else:
            flat = torch.frombuffer(raw, dtype=dtype)
        if self.fortran and len(self.shape) > 1:
            return flat.reshape(self.shape[::-1]).permute(*reversed(range(len(self.shape)))).contiguous()
        return flat.reshape(self.shape)


def _name_of(code: str) -> str:
    return next(k for k, v in _PLAIN.items() if v[0] == code)


def _torch_dtype(code: str):
    return getattr(torch, _PLAIN[_name_of(code)][2], None)


def check_shape(shape, what: str) -> tuple:
    if type(shape) not in (tuple, list) and not isinstance(shape, torch.Size):
        raise Refused(f"{what} shape {_short(shape)} refused")
    if len(shape) > MAX_NDIM or not all(type(d) is int and 0 <= d < 1 << 62 for d in shape):
        raise Refused(f"{what} shape {_short(shape)} refused (dimensions must be non-negative integers)")
    return tuple(shape)


def _short(value) -> str:
    text = repr(value) if type(value) in (int, float, str, bool, type(None)) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------------------ what a pickle may call

def make_dtype(name, align=False, copy=True) -> DtypeRecord:
    """``numpy.dtype``."""
    return DtypeRecord(name, align, copy)


def reconstruct(cls, shape, typecode) -> ArrayRecord:
    """``numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b'b')``; the data comes with BUILD."""
    if not (isinstance(cls, Marker) and cls.value == "ndarray"):
        raise Refused(f"numpy _reconstruct of {_short(cls)} refused (only plain numpy.ndarray)")
    if type(shape) is not tuple or type(typecode) not in (bytes, str):
        raise Refused("numpy _reconstruct with unexpected arguments refused")
    return ArrayRecord()


def frombuffer(buf, dtype, shape, order) -> ArrayRecord:
    """``numpy.core.numeric._frombuffer`` (protocol-5 array pickles)."""
    if order not in ("C", "F") or type(order) is not str:
        raise Refused(f"numpy _frombuffer order {order!r} refused")
    rec = ArrayRecord()
    rec._set(shape, dtype, order == "F", buf)
    return rec


def scalar(dtype, data=None):
    """``numpy.core.multiarray.scalar(dtype, bytes)`` → a Python bool/int/float."""
    if not isinstance(dtype, DtypeRecord):
        raise Refused(f"numpy scalar of dtype {_short(dtype)} refused")
    code, size, order = dtype.spec()
    if type(data) is not bytes or len(data) != size:
        raise Refused(f"numpy scalar needs {size} bytes, got {_short(data)}")
    return struct.unpack(order + code, data)[0]
