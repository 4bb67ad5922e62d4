"""``torch.save`` zip archives and TorchScript archives, read by our own code (``torch.load`` is never called).

Layout (``torch.save`` since torch 1.6): the members sit under one folder (``archive/``): ``data.pkl`` (the object;
each storage is a persistent id ``('storage', <storage type>, key, location, numel)``), ``data/<key>`` (the
storage's raw bytes, exactly numel × element size), ``byteorder`` (``little``/``big``; absent in old files: little)
and version files. ``data.pkl`` runs through the restricted pickle VM; the storage type gives the dtype; location tags
(``cuda:0``) are ignored, everything lands on the CPU.

TorchScript archives (``torch.jit.save``) add ``constants.pkl`` (storages in ``constants/<key>``) and ``code/``. We
read ``data.pkl`` and ``constants.pkl`` as data only (``__torch__.…`` classes become inert stubs) and never read,
compile or run ``code/``.

Members are checked before they are read: known compression (stored/deflate), no encryption, declared sizes within
the limits and, for storages, equal to numel × element size.
"""
from __future__ import annotations

import os
import zipfile
from typing import Any

from .legacy import storage_pid
from .limits import MAX_DEFLATE_RATIO, MAX_PICKLE_MEMBER, MAX_TOTAL_BYTES, Malformed, Refused
from .pickle_vm import MemorySource, PickleVM
from .policy import Policy
from .tensors import StorageRecord, element_size


def is_zip(head: bytes) -> bool:
    return head.startswith(b"PK\x03\x04")


class TorchZip:
    """An open ``torch.save`` / ``torch.jit.save`` archive."""

    def __init__(self, path):
        self._fh = open(path, "rb")
        try:
            self._zip = zipfile.ZipFile(self._fh)
            self.prefix = self._find_prefix(self._zip.namelist())
            self.big_endian = self._byteorder() == "big"
        except BaseException:
            self._fh.close()
            raise
        self._storages: dict = {}
        self._bytes = 0

    def close(self) -> None:
        self._zip.close()
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @staticmethod
    def _find_prefix(names: list) -> str:
        folders = {n[:-len("data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1}
        if not folders:
            raise Malformed("no data.pkl record: not a torch.save archive")
        if len(folders) > 1:
            raise Malformed(f"several data.pkl records ({', '.join(sorted(folders))})")
        return folders.pop()

    def has(self, member: str) -> bool:
        return (self.prefix + member) in self._zip.NameToInfo

    def members_under(self, folder: str) -> list:
        start = self.prefix + folder
        return [n for n in self._zip.namelist() if n.startswith(start)]

    def _byteorder(self) -> str:
        if not self.has("byteorder"):
            return "little"
        order = self._read(self.prefix + "byteorder", 16).decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise Malformed(f"unknown byteorder {order!r}")
        return order

    def _read(self, name: str, limit: int) -> bytes:
        info = self._zip.NameToInfo.get(name)
        if info is None:
            raise Malformed(f"archive member {name} missing")
        if info.flag_bits & 0x1:
            raise Refused(f"encrypted archive member {name} refused")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise Refused(f"archive member {name} uses compression method {info.compress_type} (refused)")
        if info.file_size > limit:
            raise Refused(f"archive member {name} is {info.file_size} bytes, more than the {limit} allowed")
        if info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > MAX_DEFLATE_RATIO * info.compress_size:
            raise Refused(f"archive member {name} unpacks {info.compress_size} bytes to {info.file_size} (refused)")
        data = self._zip.read(info)
        if len(data) != info.file_size:
            raise Malformed(f"archive member {name} is truncated")
        return data

    def _storage(self, folder: str, pid) -> StorageRecord:
        dtype, key, numel = storage_pid(pid, 5)
        name = f"{self.prefix}{folder}/{key}"
        rec = self._storages.get(name)
        if rec is not None:
            if rec.dtype != dtype or rec.numel != numel:
                raise Refused(f"storage {key} is referenced with two different types or sizes")
            return rec
        info = self._zip.NameToInfo.get(name)
        if info is None:
            raise Malformed(f"storage {key} ({folder}/{key}) missing from the archive")
        nbytes = numel * element_size(dtype)
        if info.file_size != nbytes:
            raise Refused(f"storage {key} declares {numel} elements ({nbytes} bytes) but the archive holds "
                          f"{info.file_size} bytes")
        self._bytes += nbytes
        if self._bytes > MAX_TOTAL_BYTES:
            raise Refused(f"the archive holds more than {MAX_TOTAL_BYTES >> 30} GiB of tensor data")
        rec = self._storages[name] = StorageRecord(dtype, numel, self._read(name, nbytes), self.big_endian)
        return rec

    def load_pickle(self, member: str, policy: Policy, storage_folder: str) -> Any:
        """Run ``<prefix>/<member>`` through the VM; storages come from ``<prefix>/<storage_folder>/<key>``."""
        data = self._read(self.prefix + member, MAX_PICKLE_MEMBER)
        try:
            return PickleVM(MemorySource(data), policy, lambda pid: self._storage(storage_folder, pid)).load()
        except Malformed as exc:
            raise Malformed(f"{member}: {exc}") from None
        except Refused as exc:
            raise Refused(f"{member}: {exc}") from None


def file_head(path, n: int = 16) -> bytes:
    with open(os.fspath(path), "rb") as fh:
        return fh.read(n)
