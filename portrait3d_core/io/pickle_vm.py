"""The pickle virtual machine of the checkpoint reader (protocols 0–5), written for untrusted bytes.

Unlike ``pickle.Unpickler`` it never looks up an attribute or calls a method of an object it built:
- GLOBAL / STACK_GLOBAL ask the ``Policy`` (our inert constructors, markers, stub classes — or a refusal);
- REDUCE only calls our ``Constructor`` objects, with a tuple of arguments;
- NEWOBJ / NEWOBJ_EX / INST / OBJ only create our ``EasyDict`` or stubs (``Policy.instantiate``);
- BUILD only reaches ``build_state`` of our records (stubs, ``EasyDict``/``PlainDict``, numpy dtype/array records);
  BUILD on anything else — a tensor record, a list, a torch object — is refused;
- APPEND(S) only extend real lists, SETITEM(S) only fill real dicts (or our dict records), ADDITEMS real sets;
- PERSID / BINPERSID go to the caller's ``persistent_load`` (storages of a zip or legacy file) or are refused;
- every length field is checked against the bytes left before anything is read; memo, stack and MARK nesting are
  bounded; the extension registry and out-of-band buffers are refused; FRAME is only a size hint.
The result still holds records; ``materialize`` turns them into tensors and plain values.
"""
from __future__ import annotations

import codecs
import pickle
import struct

from .limits import MAX_LINE, MAX_MARKS, MAX_MEMO, MAX_STACK, Malformed, Refused
from .numpy_data import ArrayRecord, DtypeRecord
from .records import Constructor, EasyDict, Marker, PlainDict, Stub

_U8, _U16, _I32, _U32, _U64 = (struct.Struct(f) for f in ("<B", "<H", "<i", "<I", "<Q"))
_F64 = struct.Struct(">d")
_BUILDABLE = (Stub, EasyDict, PlainDict, DtypeRecord, ArrayRecord)
_DICTS = (dict, EasyDict, PlainDict)


class MemorySource:
    """Bounded reads from bytes held in memory."""

    def __init__(self, data: bytes, start: int = 0):
        self._data, self.pos = data, start

    def remaining(self) -> int:
        return len(self._data) - self.pos

    def read(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self._data):
            raise Malformed(f"truncated: {n} bytes needed at byte {self.pos}, {self.remaining()} left")
        out = self._data[self.pos:end]
        self.pos = end
        return out

    def view(self, n: int) -> memoryview:
        """The next ``n`` bytes without copying them."""
        if n < 0 or n > self.remaining():
            raise Malformed(f"truncated: {n} bytes needed at byte {self.pos}, {self.remaining()} left")
        start, self.pos = self.pos, self.pos + n
        return memoryview(self._data)[start:start + n]

    def readline(self) -> bytes:
        end = self._data.find(b"\n", self.pos, self.pos + MAX_LINE)
        if end < 0:
            raise Malformed(f"truncated or over-long text argument at byte {self.pos}")
        return self.read(end + 1 - self.pos)


class FileSource:
    """Bounded reads from a binary file of known size."""

    def __init__(self, fh, size: int):
        self._fh, self._size, self.pos = fh, size, 0

    def remaining(self) -> int:
        return self._size - self.pos

    def read(self, n: int) -> bytes:
        if n < 0 or n > self.remaining():
            raise Malformed(f"truncated: {n} bytes needed at byte {self.pos}, {self.remaining()} left")
        out = self._fh.read(n)
        if len(out) != n:
            raise Malformed(f"truncated: file ended at byte {self.pos + len(out)}")
        self.pos += n
        return out

    def readline(self) -> bytes:
        line = self._fh.readline(min(MAX_LINE, self.remaining()))
        self.pos += len(line)
        if not line.endswith(b"\n"):
            raise Malformed(f"truncated or over-long text argument at byte {self.pos}")
        return line


def _describe(obj) -> str:
    if isinstance(obj, (Constructor, Marker)):
        return repr(obj)
    if isinstance(obj, type):
        return f"the class {getattr(obj, 'qualname', obj.__name__)}"
    name = getattr(type(obj), "qualname", None) if isinstance(obj, Stub) else None
    return f"a {name or type(obj).__name__}"


_OPS: dict = {}


def _op(code: bytes):
    def register(fn):
        _OPS[code[0]] = fn
        return fn
    return register


class PickleVM:
    """Runs one pickle from ``source`` under ``policy``; ``load()`` returns its (record-holding) value."""

    def __init__(self, source, policy, persistent_load=None):
        self.src, self.policy, self.persistent_load = source, policy, persistent_load
        self.stack: list = []
        self.marks: list = []
        self.memo: dict = {}
        self.result = None

    def load(self):
        read, ops = self.src.read, _OPS
        while True:
            at = self.src.pos
            code = read(1)[0]
            handler = ops.get(code)
            if handler is None:
                raise Malformed(f"unknown or unsupported pickle opcode 0x{code:02x} at byte {at}")
            if handler(self):
                return self.result

    # -------------------------------------------------------------------------------- stack helpers

    def _base(self) -> int:
        return self.marks[-1] if self.marks else 0

    def push(self, value) -> None:
        if len(self.stack) >= MAX_STACK:
            raise Refused(f"more than {MAX_STACK} values on the pickle stack")
        self.stack.append(value)

    def pop(self):
        if len(self.stack) <= self._base():
            raise Malformed("pickle stack underflow")
        return self.stack.pop()

    def top(self):
        if len(self.stack) <= self._base():
            raise Malformed("pickle stack underflow")
        return self.stack[-1]

    def pop_mark(self) -> list:
        if not self.marks:
            raise Malformed("pickle MARK missing")
        base = self.marks.pop()
        items = self.stack[base:]
        del self.stack[base:]
        return items

    def memo_put(self, index: int) -> None:
        if index < 0:
            raise Malformed("negative memo index")
        if index not in self.memo and len(self.memo) >= MAX_MEMO:
            raise Refused(f"more than {MAX_MEMO} memoized objects")
        self.memo[index] = self.top()

    def memo_get(self, index: int) -> None:
        try:
            self.push(self.memo[index])
        except KeyError:
            raise Malformed(f"memo entry {index} missing") from None

    def _n(self, fmt: struct.Struct) -> int:
        return fmt.unpack(self.src.read(fmt.size))[0]

    def _line(self) -> bytes:
        return self.src.readline()[:-1]

    # -------------------------------------------------------------------------------- framing and control

    @_op(pickle.PROTO)
    def _proto(self):
        if self._n(_U8) > 5:
            raise Malformed("unsupported pickle protocol")

    @_op(pickle.FRAME)
    def _frame(self):
        if self._n(_U64) > self.src.remaining():
            raise Malformed("truncated: pickle frame longer than the data left")

    @_op(pickle.STOP)
    def _stop(self):
        self.result = self.pop()
        return True

    @_op(pickle.MARK)
    def _mark(self):
        if len(self.marks) >= MAX_MARKS:
            raise Refused(f"pickle nesting deeper than {MAX_MARKS} marks")
        self.marks.append(len(self.stack))

    @_op(pickle.POP)
    def _pop(self):
        if len(self.stack) > self._base():
            self.stack.pop()
        else:
            self.pop_mark()

    @_op(pickle.POP_MARK)
    def _pop_mark(self):
        self.pop_mark()

    @_op(pickle.DUP)
    def _dup(self):
        self.push(self.top())

    # -------------------------------------------------------------------------------- numbers and constants

    @_op(pickle.NONE)
    def _none(self):
        self.push(None)

    @_op(pickle.NEWTRUE)
    def _true(self):
        self.push(True)

    @_op(pickle.NEWFALSE)
    def _false(self):
        self.push(False)

    @_op(pickle.INT)
    def _int(self):
        line = self._line()
        self.push(False if line == b"00" else True if line == b"01" else int(line, 0))

    @_op(pickle.BININT)
    def _binint(self):
        self.push(self._n(_I32))

    @_op(pickle.BININT1)
    def _binint1(self):
        self.push(self._n(_U8))

    @_op(pickle.BININT2)
    def _binint2(self):
        self.push(self._n(_U16))

    @_op(pickle.LONG)
    def _long(self):
        line = self._line()
        self.push(int(line[:-1] if line.endswith(b"L") else line, 0))

    @_op(pickle.LONG1)
    def _long1(self):
        self.push(int.from_bytes(self.src.read(self._n(_U8)), "little", signed=True))

    @_op(pickle.LONG4)
    def _long4(self):
        self.push(int.from_bytes(self.src.read(self._length(_I32)), "little", signed=True))

    @_op(pickle.FLOAT)
    def _float(self):
        self.push(float(self._line()))

    @_op(pickle.BINFLOAT)
    def _binfloat(self):
        self.push(self._n(_F64))

    def _length(self, fmt: struct.Struct) -> int:
        n = self._n(fmt)
        if n < 0:
            raise Malformed("negative length field")
        if n > self.src.remaining():
            raise Malformed(f"truncated: a length field asks for {n} bytes, {self.src.remaining()} left")
        return n

    # -------------------------------------------------------------------------------- strings and bytes

    @_op(pickle.STRING)
    def _string(self):
        data = self._line()
        if len(data) < 2 or data[:1] != data[-1:] or data[:1] not in (b'"', b"'"):
            raise Malformed("the STRING opcode argument must be quoted")
        self.push(codecs.escape_decode(data[1:-1])[0].decode("ascii"))

    @_op(pickle.BINSTRING)
    def _binstring(self):
        self.push(self.src.read(self._length(_I32)).decode("ascii"))

    @_op(pickle.SHORT_BINSTRING)
    def _short_binstring(self):
        self.push(self.src.read(self._n(_U8)).decode("ascii"))

    @_op(pickle.UNICODE)
    def _unicode(self):
        self.push(str(self._line(), "raw-unicode-escape"))

    @_op(pickle.BINUNICODE)
    def _binunicode(self):
        self.push(str(self.src.read(self._length(_U32)), "utf-8", "surrogatepass"))

    @_op(pickle.SHORT_BINUNICODE)
    def _short_binunicode(self):
        self.push(str(self.src.read(self._n(_U8)), "utf-8", "surrogatepass"))

    @_op(pickle.BINUNICODE8)
    def _binunicode8(self):
        self.push(str(self.src.read(self._length(_U64)), "utf-8", "surrogatepass"))

    @_op(pickle.BINBYTES)
    def _binbytes(self):
        self.push(self.src.read(self._length(_U32)))

    @_op(pickle.SHORT_BINBYTES)
    def _short_binbytes(self):
        self.push(self.src.read(self._n(_U8)))

    @_op(pickle.BINBYTES8)
    def _binbytes8(self):
        self.push(self.src.read(self._length(_U64)))

    @_op(pickle.BYTEARRAY8)
    def _bytearray8(self):
        self.push(bytearray(self.src.read(self._length(_U64))))

    @_op(pickle.NEXT_BUFFER)
    def _next_buffer(self):
        raise Refused("out-of-band pickle buffers refused")

    @_op(pickle.READONLY_BUFFER)
    def _readonly_buffer(self):
        raise Refused("out-of-band pickle buffers refused")

    # -------------------------------------------------------------------------------- containers

    @_op(pickle.EMPTY_TUPLE)
    def _empty_tuple(self):
        self.push(())

    @_op(pickle.TUPLE)
    def _tuple(self):
        self.push(tuple(self.pop_mark()))

    @_op(pickle.TUPLE1)
    def _tuple1(self):
        self.push((self.pop(),))

    @_op(pickle.TUPLE2)
    def _tuple2(self):
        b, a = self.pop(), self.pop()
        self.push((a, b))

    @_op(pickle.TUPLE3)
    def _tuple3(self):
        c, b, a = self.pop(), self.pop(), self.pop()
        self.push((a, b, c))

    @_op(pickle.EMPTY_LIST)
    def _empty_list(self):
        self.push([])

    @_op(pickle.LIST)
    def _list(self):
        self.push(self.pop_mark())

    def _target(self, kinds: tuple, what: str):
        target = self.top()
        if type(target) not in kinds:
            raise Refused(f"{what} on {_describe(target)} refused")
        return target

    @_op(pickle.APPEND)
    def _append(self):
        value = self.pop()
        self._target((list,), "APPEND").append(value)

    @_op(pickle.APPENDS)
    def _appends(self):
        items = self.pop_mark()
        self._target((list,), "APPENDS").extend(items)

    @_op(pickle.EMPTY_DICT)
    def _empty_dict(self):
        self.push({})

    @_op(pickle.DICT)
    def _dict(self):
        items = self.pop_mark()
        if len(items) % 2:
            raise Malformed("DICT with an odd number of items")
        self.push({items[i]: items[i + 1] for i in range(0, len(items), 2)})

    @_op(pickle.SETITEM)
    def _setitem(self):
        value, key = self.pop(), self.pop()
        self._target(_DICTS, "SETITEM")[key] = value

    @_op(pickle.SETITEMS)
    def _setitems(self):
        items = self.pop_mark()
        if len(items) % 2:
            raise Malformed("SETITEMS with an odd number of items")
        target = self._target(_DICTS, "SETITEMS")
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    @_op(pickle.EMPTY_SET)
    def _empty_set(self):
        self.push(set())

    @_op(pickle.ADDITEMS)
    def _additems(self):
        items = self.pop_mark()
        self._target((set,), "ADDITEMS").update(items)

    @_op(pickle.FROZENSET)
    def _frozenset(self):
        self.push(frozenset(self.pop_mark()))

    # -------------------------------------------------------------------------------- memo

    @_op(pickle.GET)
    def _get(self):
        self.memo_get(int(self._line()))

    @_op(pickle.BINGET)
    def _binget(self):
        self.memo_get(self._n(_U8))

    @_op(pickle.LONG_BINGET)
    def _long_binget(self):
        self.memo_get(self._n(_U32))

    @_op(pickle.PUT)
    def _put(self):
        self.memo_put(int(self._line()))

    @_op(pickle.BINPUT)
    def _binput(self):
        self.memo_put(self._n(_U8))

    @_op(pickle.LONG_BINPUT)
    def _long_binput(self):
        self.memo_put(self._n(_U32))

    @_op(pickle.MEMOIZE)
    def _memoize(self):
        self.memo_put(len(self.memo))

    # -------------------------------------------------------------------------------- globals and objects

    def _global(self, module, name):
        if type(module) is not str or type(name) is not str:
            raise Malformed("STACK_GLOBAL names must be strings")
        return self.policy.resolve(module, name)

    @_op(pickle.GLOBAL)
    def _global_op(self):
        module = self._line().decode("utf-8")
        name = self._line().decode("utf-8")
        self.push(self._global(module, name))

    @_op(pickle.STACK_GLOBAL)
    def _stack_global(self):
        name, module = self.pop(), self.pop()
        self.push(self._global(module, name))

    @_op(pickle.REDUCE)
    def _reduce(self):
        args, func = self.pop(), self.pop()
        if not isinstance(func, Constructor):
            raise Refused(f"calling {_describe(func)} refused (only the reader's own constructors can be called)")
        if type(args) is not tuple:
            raise Malformed(f"REDUCE arguments of {func!r} are not a tuple")
        try:
            self.push(func(*args))
        except TypeError as exc:
            raise Malformed(f"{func!r} called with unexpected arguments ({exc})") from None

    @_op(pickle.NEWOBJ)
    def _newobj(self):
        args, cls = self.pop(), self.pop()
        self.push(self.policy.instantiate(cls, args))

    @_op(pickle.NEWOBJ_EX)
    def _newobj_ex(self):
        kwargs, args, cls = self.pop(), self.pop(), self.pop()
        self.push(self.policy.instantiate(cls, args, kwargs))

    @_op(pickle.INST)
    def _inst(self):
        module = self._line().decode("utf-8")
        name = self._line().decode("utf-8")
        cls = self._global(module, name)
        self.push(self.policy.instantiate(cls, self.pop_mark()))

    @_op(pickle.OBJ)
    def _obj(self):
        items = self.pop_mark()
        if not items:
            raise Malformed("OBJ without a class")
        self.push(self.policy.instantiate(items[0], items[1:]))

    @_op(pickle.BUILD)
    def _build(self):
        state = self.pop()
        inst = self.top()
        if not isinstance(inst, _BUILDABLE):
            raise Refused(f"BUILD (setting the state of) {_describe(inst)} refused")
        inst.build_state(state)

    @_op(pickle.PERSID)
    def _persid(self):
        self._persistent(self._line().decode("ascii"))

    @_op(pickle.BINPERSID)
    def _binpersid(self):
        self._persistent(self.pop())

    def _persistent(self, pid):
        if self.persistent_load is None:
            raise Refused("a persistent id (external storage reference) in a plain pickle refused")
        self.push(self.persistent_load(pid))

    @_op(pickle.EXT1)
    def _ext1(self):
        raise Refused("the pickle extension registry (EXT1/2/4) refused")

    _OPS[pickle.EXT2[0]] = _ext1
    _OPS[pickle.EXT4[0]] = _ext1
