"""The legacy (non-zip) ``torch.save`` format, read by our own code (``checkpoints.md`` §2.3).

Official pickles embed every storage this way (``torch.storage._load_from_bytes(<bytes>)``); old ``.pth`` files on
disk use it too. Layout: five consecutive pickles, then raw storage data:
1. the magic number 0x1950a86a20f9469cfc6c, 2. the protocol version 1001, 3. ``sys_info`` (``little_endian``,
``type_sizes``), 4. the object, whose storages are persistent ids
``('storage', <storage type>, key, location, numel, view_metadata)``, 5. the list of storage keys;
then for each key of that list an 8-byte element count (in the writer's byte order) followed by numel × element size
bytes (torch writes them little-endian on every machine). The small pickles run with no globals at all, the object
under the caller's policy; every count must equal its persistent id's numel and fit in the bytes left, and every
referenced storage must have its data. Location tags (``cuda:0``) are ignored: storages land on the CPU.
"""
from __future__ import annotations

import re
import struct
from typing import Any

from .limits import Malformed, Refused
from .pickle_vm import MemorySource, PickleVM
from .policy import HEADER, Policy
from .tensors import StorageRecord, element_size, storage_dtype

MAGIC = 0x1950A86A20F9469CFC6C
PROTOCOL = 1001
_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def is_legacy(head: bytes) -> bool:
    """True when ``head`` (the first 14+ bytes of a file) starts a legacy ``torch.save``."""
    return head.startswith(b"\x80\x02\x8a\x0a" + MAGIC.to_bytes(10, "little"))


def storage_pid(pid, fields: int) -> tuple:
    """(dtype, key, numel) of a persistent id ``('storage', type, key, location, numel[, view_metadata])``."""
    if type(pid) is not tuple or len(pid) != fields or pid[0] != "storage":
        raise Refused(f"persistent id {type(pid).__name__} of {len(pid) if type(pid) is tuple else '?'} fields "
                      f"refused (expected a storage reference)")
    dtype, key, location, numel = storage_dtype(pid[1]), pid[2], pid[3], pid[4]
    if type(key) is not str or not _KEY.fullmatch(key):
        raise Refused(f"storage key {key!r:.40} refused")
    if type(location) is not str or len(location) > 64:
        raise Refused(f"storage location {location!r:.40} refused")
    if type(numel) is not int or not 0 <= numel < 1 << 62:
        raise Refused(f"storage size {numel!r:.40} refused")
    return dtype, key, numel


def read_legacy(data: bytes, policy: Policy) -> Any:
    """The object of a legacy ``torch.save`` held in ``data`` (records; ``materialize`` makes tensors)."""
    src = MemorySource(data)
    header = Policy(HEADER)
    magic = PickleVM(src, header).load()
    if type(magic) is not int or magic != MAGIC:
        raise Malformed("not a legacy torch.save (bad magic number)")
    protocol = PickleVM(src, header).load()
    if type(protocol) is not int or protocol != PROTOCOL:
        raise Malformed(f"unsupported legacy torch.save protocol {protocol!r:.20}")
    info = PickleVM(src, header).load()
    if type(info) is not dict or type(info.get("little_endian")) is not bool:
        raise Malformed("legacy torch.save without a valid sys_info record")
    storages: dict = {}

    def persistent_load(pid):
        dtype, key, numel = storage_pid(pid, 6)
        if pid[5] is not None:
            raise Refused("legacy storage views (view_metadata) refused")
        rec = storages.get(key)
        if rec is None:
            rec = storages[key] = StorageRecord(dtype, numel)
        elif rec.dtype != dtype or rec.numel != numel:
            raise Refused(f"storage {key} is referenced with two different types or sizes")
        return rec

    obj = PickleVM(src, policy, persistent_load).load()
    keys = PickleVM(src, header).load()
    if type(keys) is not list or sorted(keys, key=str) != sorted(storages, key=str):
        raise Malformed("the legacy storage key list does not match the storages the object references")
    count_format = struct.Struct("<q" if info["little_endian"] else ">q")
    for key in keys:
        rec = storages[key]
        count = count_format.unpack(src.read(8))[0]
        if count != rec.numel:
            raise Refused(f"storage {key} declares {rec.numel} elements but its data header says {count}")
        nbytes = count * element_size(rec.dtype)
        if nbytes > src.remaining():
            raise Refused(f"storage {key}: {count} elements need {nbytes} bytes but only {src.remaining()} are left "
                          f"(numel larger than the data)")
        rec.data = src.view(nbytes)
    return obj
