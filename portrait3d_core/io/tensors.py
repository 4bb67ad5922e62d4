"""Storages and tensors of checkpoint files, rebuilt by our code from bytes + offset/size/stride.

Inside the pickle VM a tensor is only a ``TensorRecord`` (storage record, offset, size, stride, requires_grad):
nothing of torch is called on file data, and BUILD on a record is refused by the VM. The record is checked when it
is made: every element that size/stride/offset can address lies inside its storage, and a view may repeat storage
elements (stride 0) for at most ``MAX_EXPANDED_BYTES``. ``TensorBuilder`` (used by the validating walk after
unpickling) turns records into CPU tensors: one tensor per storage over a private copy of its bytes (byte-swapped for
big-endian files, bool bytes normalised to 0/1), each tensor ``set_`` onto it. Location tags (``cuda:0``) are
ignored: everything lands on the CPU.
"""
from __future__ import annotations

import math

import torch

from .limits import MAX_EXPANDED_BYTES, MAX_NDIM, Refused
from .records import DICT_TYPES, Constructor, Marker

# torch.<Name>Storage → dtype name (typed storages as torch.save writes them)
STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool",
}
# dtypes a file may name (torch.float32, …, and _rebuild_tensor_v3's dtype argument)
TENSOR_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
                 "uint16", "uint32", "uint64")
UNTYPED = "untyped"


def storage_markers() -> dict:
    """Global names of storage types → markers whose value is the torch dtype (or ``UNTYPED``)."""
    out = {("torch", name): Marker(f"torch.{name}", getattr(torch, dtype)) for name, dtype in STORAGE_DTYPES.items()}
    for module in ("torch", "torch.storage"):
        out[(module, "UntypedStorage")] = Marker(f"{module}.UntypedStorage", UNTYPED)
    return out


def dtype_constants() -> dict:
    return {("torch", name): getattr(torch, name) for name in TENSOR_DTYPES if hasattr(torch, name)}


_ELEMENT_SIZES: dict = {}


def element_size(dtype) -> int:
    if dtype == UNTYPED:
        return 1
    if dtype not in _ELEMENT_SIZES:
        _ELEMENT_SIZES[dtype] = torch.empty(0, dtype=dtype).element_size()
    return _ELEMENT_SIZES[dtype]


class StorageRecord:
    """One storage: dtype, element count and exactly ``numel × element size`` bytes (``data`` None until read)."""

    __slots__ = ("dtype", "numel", "data", "big_endian", "_views")

    def __init__(self, dtype, numel: int, data=None, big_endian: bool = False):
        self.dtype, self.numel, self.data, self.big_endian = dtype, numel, data, big_endian
        self._views = {}

    @property
    def torch_dtype(self):
        return torch.uint8 if self.dtype == UNTYPED else self.dtype

    def typed_view(self, dtype) -> "StorageRecord":
        """An untyped storage read as ``dtype`` (``_rebuild_tensor_v3``)."""
        if self.dtype != UNTYPED:
            raise Refused("_rebuild_tensor_v3 over a typed storage refused")
        size = element_size(dtype)
        if self.numel % size:
            raise Refused(f"a storage of {self.numel} bytes is not a whole number of {size}-byte {dtype} elements")
        if dtype not in self._views:
            self._views[dtype] = _StorageView(self, dtype, self.numel // size)
        return self._views[dtype]


class _StorageView(StorageRecord):
    """A typed view of an untyped storage; its bytes are the parent's (read when the parent is read)."""

    __slots__ = ("parent",)

    def __init__(self, parent: StorageRecord, dtype, numel: int):
        super().__init__(dtype, numel, None, parent.big_endian)
        self.parent = parent

    def bytes(self):
        return self.parent.data


class TensorRecord:
    """``_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)``, bounds already checked."""

    __slots__ = ("storage", "offset", "size", "stride", "requires_grad")

    def __init__(self, storage: StorageRecord, offset: int, size: tuple, stride: tuple, requires_grad: bool):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
        self.requires_grad = requires_grad


def _ints(values, what: str) -> tuple:
    if type(values) not in (tuple, list) and not isinstance(values, torch.Size):
        raise Refused(f"tensor {what} of type {type(values).__name__} refused")
    if len(values) > MAX_NDIM or not all(type(v) is int and 0 <= v < 1 << 62 for v in values):
        raise Refused(f"tensor {what} {tuple(values)!r:.80} refused (expected non-negative integers)")
    return tuple(values)


def check_layout(storage: StorageRecord, offset, size, stride) -> tuple:
    """(size, stride) after checking that every addressable element lies inside ``storage``."""
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if type(offset) is not int or not 0 <= offset < 1 << 62:
        raise Refused(f"tensor storage offset {offset!r:.40} refused")
    if len(size) != len(stride):
        raise Refused(f"tensor size {size} and stride {stride} have different lengths")
    count = math.prod(size)
    if count == 0:
        if offset > storage.numel:
            raise Refused(f"an empty tensor at offset {offset} lies past its storage of {storage.numel} elements")
        return size, stride
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.numel:
        raise Refused(f"a tensor of size {list(size)}, stride {list(stride)}, offset {offset} reads element {last} "
                      f"of a storage of {storage.numel} elements (past its end)")
    repeated = (count - storage.numel) * element_size(storage.torch_dtype)
    if repeated > MAX_EXPANDED_BYTES:
        raise Refused(f"a tensor of size {list(size)} repeats its storage of {storage.numel} elements beyond "
                      f"{MAX_EXPANDED_BYTES >> 20} MiB (overlapping strides)")
    return size, stride


def _check_extras(requires_grad, backward_hooks, metadata, dtype) -> None:
    if type(requires_grad) is not bool:
        raise Refused(f"tensor requires_grad {requires_grad!r:.40} refused")
    if requires_grad and not (dtype.is_floating_point or dtype.is_complex):
        raise Refused(f"a {dtype} tensor cannot require gradients")
    if backward_hooks is not None and (type(backward_hooks) not in DICT_TYPES or backward_hooks):
        raise Refused("tensor with backward hooks refused")
    if metadata is not None and (type(metadata) not in DICT_TYPES or metadata):
        raise Refused("tensor with metadata (conj/neg bits) refused")


# ------------------------------------------------------------------------------------ what a pickle may call

def rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                      metadata=None) -> TensorRecord:
    """``torch._utils._rebuild_tensor_v2``."""
    if not isinstance(storage, StorageRecord):
        raise Refused(f"tensor over a {type(storage).__name__} (not a storage) refused")
    _check_extras(requires_grad, backward_hooks, metadata, storage.torch_dtype)
    size, stride = check_layout(storage, storage_offset, size, stride)
    return TensorRecord(storage, storage_offset, size, stride, requires_grad)


def rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                      metadata=None) -> TensorRecord:
    """``torch._utils._rebuild_tensor_v3``: an untyped storage read as ``dtype``."""
    if not isinstance(storage, StorageRecord):
        raise Refused(f"tensor over a {type(storage).__name__} (not a storage) refused")
    if not isinstance(dtype, torch.dtype) or str(dtype).removeprefix("torch.") not in TENSOR_DTYPES:
        raise Refused(f"tensor dtype {dtype!r:.40} refused")
    return rebuild_tensor_v2(storage.typed_view(dtype), storage_offset, size, stride, requires_grad, backward_hooks,
                             metadata)


def rebuild_tensor_v1(storage, storage_offset, size, stride) -> TensorRecord:
    """``torch._utils._rebuild_tensor`` (old files)."""
    return rebuild_tensor_v2(storage, storage_offset, size, stride)


def rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None) -> TensorRecord:
    """``torch._utils._rebuild_parameter`` (``_with_state``): the parameter's data tensor (attributes dropped)."""
    if not isinstance(data, TensorRecord):
        raise Refused(f"parameter over a {type(data).__name__} (not a tensor) refused")
    _check_extras(requires_grad, backward_hooks, None, data.storage.torch_dtype)
    if state is not None and type(state) not in DICT_TYPES:
        raise Refused("parameter state that is not a dict refused")
    return data


def rebuild_from_type_v2(func, new_type, args, state) -> TensorRecord:
    """``torch._tensor._rebuild_from_type_v2``: a plain tensor (or Parameter) with Python attributes (dropped)."""
    if not (isinstance(func, Constructor) and func.fn in (rebuild_tensor_v2, rebuild_tensor_v3)):
        raise Refused(f"_rebuild_from_type_v2 with {func!r:.60} refused")
    if not (isinstance(new_type, Marker) and new_type.value == "tensor_type") or type(args) is not tuple:
        raise Refused(f"_rebuild_from_type_v2 to {new_type!r:.60} refused")
    if state is not None and type(state) not in DICT_TYPES:
        raise Refused("tensor state that is not a dict refused")
    return func(*args)


# ------------------------------------------------------------------------------------ after unpickling

class TensorBuilder:
    """Records → CPU tensors; tensors over one storage share its memory."""

    def __init__(self):
        self._bases: dict = {}
        self._expanded = 0

    def storage_tensor(self, rec: StorageRecord) -> torch.Tensor:
        """The whole storage as a 1-D tensor (own writable copy of the bytes)."""
        known = self._bases.get(id(rec))
        if known is not None:
            return known[1]
        data = rec.bytes() if isinstance(rec, _StorageView) else rec.data
        dtype = rec.torch_dtype
        size = element_size(dtype)
        if data is None or len(data) != rec.numel * size:
            raise Refused(f"a storage of {rec.numel} {dtype} elements has {0 if data is None else len(data)} bytes "
                          f"of data")
        if rec.numel == 0:
            base = torch.empty(0, dtype=dtype)
        else:
            raw = bytearray(data)
            if rec.big_endian and size > 1:
                raw = byteswap(raw, size)
            base = (torch.frombuffer(raw, dtype=torch.uint8) != 0) if dtype is torch.bool else \
                torch.frombuffer(raw, dtype=dtype)
        self._bases[id(rec)] = (rec, base)          # rec kept alive: its id stays unique
        return base

    def tensor(self, rec: TensorRecord) -> torch.Tensor:
        base = self.storage_tensor(rec.storage)
        count = math.prod(rec.size)
        self._expanded += max(0, count - rec.storage.numel) * base.element_size()
        if self._expanded > MAX_EXPANDED_BYTES:
            raise Refused(f"tensors repeat their storages (overlapping strides) beyond {MAX_EXPANDED_BYTES >> 20} MiB")
        out = torch.empty(0, dtype=base.dtype).set_(base.untyped_storage(), rec.offset, rec.size, rec.stride)
        if rec.requires_grad:
            out.requires_grad_(True)
        return out


def byteswap(raw: bytearray, itemsize: int) -> bytearray:
    """Reverse the byte order of each ``itemsize``-byte element."""
    out = bytearray(len(raw))
    for i in range(itemsize):
        out[i::itemsize] = raw[itemsize - 1 - i::itemsize]
    return out


def storage_dtype(marker):
    """The dtype (or ``UNTYPED``) of a storage-type marker from a persistent id."""
    if not (isinstance(marker, Marker) and (isinstance(marker.value, torch.dtype) or marker.value == UNTYPED)):
        raise Refused(f"storage of type {marker!r:.60} refused")
    return marker.value
