"""Hand-assembled hostile checkpoints for the pickle-safety tests, and the fuzz mutators.

- ``Asm``: a tiny pickle assembler (opcode by opcode), so a test can write exactly the bytes an attacker would;
- ``legacy_save``: the legacy ``torch.save`` bytes that ``torch.storage._load_from_bytes`` receives;
- ``torch_zip``: a ``torch.save``-layout zip archive around a given ``data.pkl``;
- ``mutate_pickle`` / ``mutate_zip``: deterministic mutations (byte flips, truncations, opcode splices, length-field
  corruption) for the fuzz tests;
- ``check_output_types``: what may leave the loader (used by the worker on every successful load).
Nothing here is imported by the package.
"""
from __future__ import annotations

import io
import pickletools
import random
import struct
import zipfile

import torch


class Asm:
    """Pickle assembler: ``Asm(2).call('numpy', 'dtype', 'f8', False, True).build(state).stop()``."""

    def __init__(self, proto: int = 2):
        self.out = bytearray(b"\x80" + bytes([proto]))

    def raw(self, data: bytes) -> "Asm":
        self.out += data
        return self

    def glob(self, module: str, name: str) -> "Asm":
        return self.raw(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def value(self, v) -> "Asm":
        if callable(v):                       # a sub-expression: fn(asm) emits it
            v(self)
        elif v is None:
            self.raw(b"N")
        elif v is True or v is False:
            self.raw(b"\x88" if v else b"\x89")
        elif type(v) is int:
            if -(1 << 31) <= v < 1 << 31:
                self.raw(b"J" + struct.pack("<i", v))
            else:
                n = (v.bit_length() + 8) // 8
                self.raw(b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True))
        elif type(v) is float:
            self.raw(b"G" + struct.pack(">d", v))
        elif type(v) is str:
            data = v.encode()
            self.raw(b"X" + struct.pack("<I", len(data)) + data)
        elif type(v) is bytes:
            self.raw(b"B" + struct.pack("<I", len(v)) + v)
        elif type(v) is tuple:
            self.raw(b"(")
            for item in v:
                self.value(item)
            self.raw(b"t")
        elif type(v) is list:
            self.raw(b"]")
            if v:
                self.raw(b"(")
                for item in v:
                    self.value(item)
                self.raw(b"e")
        elif type(v) is dict:
            self.raw(b"}")
            if v:
                self.raw(b"(")
                for key, item in v.items():
                    self.value(key).value(item)
                self.raw(b"u")
        else:
            raise TypeError(type(v))
        return self

    def call(self, module: str, name: str, *args) -> "Asm":
        return self.glob(module, name).value(tuple(args)).raw(b"R")

    def build(self, state) -> "Asm":
        return self.value(state).raw(b"b")

    def stop(self) -> bytes:
        return bytes(self.out + b".")


def call(module: str, name: str, *args):
    """A sub-expression for ``Asm.value``: ``module.name(*args)``."""
    return lambda asm: asm.call(module, name, *args)


def then_build(expr, state):
    """A sub-expression: ``expr`` followed by BUILD(state)."""
    return lambda asm: asm.value(expr).build(state)


def np_dtype(name: str, state=(3, "<", None, None, None, -1, -1, 0)):
    return then_build(call("numpy", "dtype", name, False, True), state)


def np_array(shape: tuple, dtype, data, fortran: bool = False, module: str = "numpy.core.multiarray"):
    rebuilt = lambda asm: asm.glob(module, "_reconstruct").value((  # noqa: E731
        lambda a: a.glob("numpy", "ndarray"), (0,), b"b")).raw(b"R")
    return then_build(rebuilt, (1, shape, dtype, fortran, data))


def persid(pid: tuple):
    return lambda asm: asm.value(pid).raw(b"Q")


def storage_type(name: str = "FloatStorage"):
    return lambda asm: asm.glob("torch", name)


def tensor(storage, offset: int, size: tuple, stride: tuple, requires_grad: bool = False):
    return call("torch._utils", "_rebuild_tensor_v2", storage, offset, size, stride, requires_grad,
                call("collections", "OrderedDict"))


# ------------------------------------------------------------------------------------ containers

def legacy_save(main: bytes | None = None, data: bytes = b"\x00" * 16, numel: int = 4, header_numel: int | None = None,
                kind: str = "FloatStorage", key: str = "0", location: str = "cuda:0") -> bytes:
    """Legacy ``torch.save`` of one storage (``main``: the object's pickle; default: the storage itself)."""
    out = Asm(2).value(0x1950A86A20F9469CFC6C).stop()
    out += Asm(2).value(1001).stop()
    out += Asm(2).value({"protocol_version": 1001, "little_endian": True,
                         "type_sizes": {"short": 2, "int": 4, "long": 4}}).stop()
    out += main if main is not None else Asm(2).value(persid(("storage", storage_type(kind), key, location, numel,
                                                              None))).stop()
    out += Asm(2).value([key]).stop()
    out += struct.pack("<q", numel if header_numel is None else header_numel) + data
    return out


def load_from_bytes(blob: bytes):
    """A sub-expression: ``torch.storage._load_from_bytes(blob)``."""
    return call("torch.storage", "_load_from_bytes", blob)


def torch_zip(data_pkl: bytes, storages: dict | None = None, prefix: str = "archive", byteorder: bytes = b"little",
              extra: dict | None = None) -> bytes:
    """A ``torch.save``-layout zip: ``<prefix>/data.pkl``, ``<prefix>/data/<key>``, ``byteorder``, ``version``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", data_pkl)
        zf.writestr(f"{prefix}/byteorder", byteorder)
        for key, blob in (storages or {}).items():
            zf.writestr(f"{prefix}/data/{key}", blob)
        for name, blob in (extra or {}).items():
            zf.writestr(f"{prefix}/{name}", blob)
        zf.writestr(f"{prefix}/version", b"3\n")
    return buf.getvalue()


def zip_members(data: bytes) -> dict:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def rezip(members: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    return buf.getvalue()


# ------------------------------------------------------------------------------------ fuzz mutators

_OPCODES = [bytes([op.code.encode("latin1")[0]]) for op in pickletools.opcodes]
_INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 40, (1 << 63) - 1,
                (1 << 64) - 1]
_LENGTH_OPS = {"BINUNICODE": 4, "SHORT_BINUNICODE": 1, "BINUNICODE8": 8, "BINBYTES": 4, "SHORT_BINBYTES": 1,
               "BINBYTES8": 8, "FRAME": 8, "LONG_BINPUT": 4, "LONG_BINGET": 4, "BINPUT": 1, "BINGET": 1,
               "BININT": 4, "BININT1": 1, "BININT2": 2, "LONG1": 1, "LONG4": 4, "BINSTRING": 4}


def opcode_layout(data: bytes) -> list:
    """(position, opcode name, argument start, argument end) of every opcode of a valid pickle."""
    ops = list(pickletools.genops(data))
    out = []
    for i, (op, _, pos) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else len(data)
        out.append((pos, op.name, pos + 1, end))
    return out


def mutate_pickle(data: bytes, layout: list, seed: int) -> bytes:
    """One deterministic mutation of a valid pickle (``layout`` from ``opcode_layout``)."""
    rng = random.Random(seed)
    out = bytearray(data)
    kind = seed % 6
    if kind == 0:                                            # byte flips anywhere (incl. nested storages)
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] = rng.randrange(256)
    elif kind == 1:                                          # truncation
        del out[rng.randrange(len(out)):]
    elif kind == 2:                                          # opcode splice: insert a random opcode (+ junk arg)
        pos = rng.choice(layout)[0]
        out[pos:pos] = rng.choice(_OPCODES) + bytes(rng.randrange(256) for _ in range(rng.randint(0, 9)))
    elif kind == 3:                                          # opcode splice: copy/delete whole opcode runs
        a, b = sorted(rng.sample(range(len(layout)), 2))
        seg = data[layout[a][0]:layout[min(b, a + rng.randint(1, 40))][0]]
        if rng.random() < 0.5:
            pos = rng.choice(layout)[0]
            out[pos:pos] = seg
        else:
            del out[layout[a][0]:layout[a][0] + len(seg)]
    elif kind == 4:                                          # length / index field corruption
        candidates = [op for op in layout if op[1] in _LENGTH_OPS]
        pos, name, start, _ = rng.choice(candidates)
        width = _LENGTH_OPS[name]
        value = rng.choice(_INTERESTING + [rng.randrange(1 << (8 * width))]) % (1 << (8 * width))
        out[start:start + width] = value.to_bytes(width, "little")
    else:                                                    # flips inside a nested legacy storage's pickles
        blobs = [op for op in layout if op[1] in ("BINBYTES", "BINBYTES8", "SHORT_BINBYTES") and op[3] - op[2] > 64]
        _, _, start, end = rng.choice(blobs) if blobs else (0, "", 0, len(data))
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(start, min(end, start + 260))] = rng.randrange(256)
    return bytes(out)


def mutate_zip(data: bytes, seed: int) -> bytes:
    """One deterministic mutation of a valid torch.save zip: mostly of its data.pkl (zip rebuilt, CRC valid)."""
    rng = random.Random(seed)
    kind = seed % 4
    if kind == 3:                                            # raw bytes of the archive itself
        out = bytearray(data)
        if rng.random() < 0.5:
            del out[rng.randrange(len(out)):]
        else:
            for _ in range(rng.randint(1, 6)):
                out[rng.randrange(len(out))] = rng.randrange(256)
        return bytes(out)
    members = zip_members(data)
    pkl = next(n for n in members if n.endswith("/data.pkl"))
    if kind == 2:                                            # a storage member of the wrong size
        keys = [n for n in members if "/data/" in n]
        key = rng.choice(keys)
        blob = members[key]
        members[key] = blob[:rng.randrange(len(blob))] if rng.random() < 0.5 else blob + b"\x00" * rng.randint(1, 64)
        return rezip(members)
    members[pkl] = mutate_pickle(members[pkl], opcode_layout(members[pkl]), rng.randrange(1 << 30))
    return rezip(members)


# ------------------------------------------------------------------------------------ output check

def check_output_types(root) -> int:
    """Number of values in ``root``; raises TypeError for anything the loader must never return."""
    from portrait3d_core.checkpoints import EasyDict, PersistentRecord, Stub

    scalars = (type(None), bool, int, float, str, bytes)
    seen, stack, count = set(), [root], 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        count += 1
        kind = type(obj)
        if kind in scalars or kind in (torch.Size, torch.dtype, torch.device):
            continue
        if kind is torch.Tensor:
            if obj.device.type != "cpu":
                raise TypeError(f"tensor on {obj.device}")
            continue
        if kind in (list, tuple):
            stack.extend(obj)
        elif kind in (dict, EasyDict):
            for key in obj:
                if type(key) not in scalars + (tuple,):
                    raise TypeError(f"dict key of type {type(key).__name__}")
            stack.extend(obj.values())
        elif kind in (set, frozenset):
            continue
        elif kind is PersistentRecord:
            if type(obj.state) is not dict:
                raise TypeError("record state is not a dict")
            stack.append(obj.state)
        elif isinstance(obj, Stub) and kind is not Stub:
            if type(obj.state) is not dict:
                raise TypeError("stub state is not a dict")
            stack.append(obj.state)
        else:
            raise TypeError(f"the loader returned a {kind.__module__}.{kind.__qualname__}")
    return count
