"""Fork server for the pickle-safety tests: every load runs in its own child process.

The worker imports torch and the package once, then reads one JSON request per line on stdin and answers one JSON
line on stdout. For each load it forks a child that runs the loader, checks the returned types
(``pickle_forge.check_output_types``), exercises the result the way the converter does (``state_dict_of``,
``plain``) and exits with a code:

    0  valid load            3  CheckpointError (printed)            4  any other exception (a bug)
    5  an invalid type left the loader      negative: killed by that signal (a crash)      "timeout": a hang

so a segfault or abort in the reader fails a test instead of killing the test runner. Children run on one thread
and under an address-space limit (an allocation bomb becomes a MemoryError, not a machine-wide OOM).

Requests:
    {"op": "load", "path": P, "mode": M}                         → {"exit": …, "output": …}
    {"op": "fuzz", "kind": "pickle"|"zip", "base": P, "mode": M, "start": a, "stop": b}
                                                                  → {"counts": {…}, "failures": [[seed, exit, out]]}
modes: ``tensors``/``networks`` (load_pickle with that policy), ``any``, ``zip`` (load_torch_zip), ``torchscript``.
"""
from __future__ import annotations

import json
import os
import resource
import select
import signal
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT_S = 30.0
EXTRA_ADDRESS_SPACE = 3 << 30


def _vm_size() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _loaders():
    from portrait3d_core import checkpoints as ck

    return {"tensors": lambda p: ck.load_pickle(p, ck.TENSOR_ONLY),
            "networks": lambda p: ck.load_pickle(p, ck.NETWORKS),
            "any": lambda p: ck.load_any(p, ck.NETWORKS),
            "zip": lambda p: ck.load_torch_zip(p),
            "torchscript": lambda p: ck.read_torchscript_tensors(p)}


def _exercise(result) -> None:
    """What consumers do with a load: walk module trees into state dicts, turn kwargs into JSON data."""
    from portrait3d_core import checkpoints as ck
    from portrait3d_core.gan.convert import plain

    plain(result)
    values = list(result.values()) if isinstance(result, dict) else [result]
    for value in values:
        if isinstance(value, (ck.PersistentRecord, ck.Stub)):
            for tensor in ck.state_dict_of(value).values():
                if hasattr(tensor, "sum"):
                    tensor.sum()


def run_child(path: str, mode: str, timeout: float = TIMEOUT_S):
    """(exit code or "timeout", printed text) of loading ``path`` in a forked child."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # child
        os.close(read_end)
        code, text = 0, "OK"
        try:
            import torch

            torch.set_num_threads(1)
            limit = _vm_size() + EXTRA_ADDRESS_SPACE
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            from pickle_forge import check_output_types
            from portrait3d_core.errors import CheckpointError

            try:
                result = LOADERS[mode](path)
            except CheckpointError as exc:
                code, text = 3, f"CheckpointError: {exc}"
            else:
                try:
                    text = f"OK {check_output_types(result)} values"
                except TypeError as exc:
                    code, text = 5, f"invalid output: {exc}"
                else:
                    _exercise(result)
        except BaseException as exc:               # noqa: BLE001 — the report is the point
            code, text = 4, f"{type(exc).__name__}: {exc}"
        os.write(write_end, text.encode("utf-8", "replace")[:4000])
        os._exit(code)
    os.close(write_end)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_end], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return "timeout", b"".join(chunks).decode("utf-8", "replace")
            data = os.read(read_end, 65536)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(read_end)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode("utf-8", "replace")


def fuzz(kind: str, base: str, mode: str, start: int, stop: int) -> dict:
    import pickle_forge as forge

    with open(base, "rb") as fh:
        data = fh.read()
    layout = forge.opcode_layout(data) if kind == "pickle" else None
    counts: dict = {}
    failures = []
    with tempfile.TemporaryDirectory(prefix="p3d-fuzz-") as tmp:
        path = os.path.join(tmp, "case.pth" if kind == "zip" else "case.pkl")
        for seed in range(start, stop):
            blob = forge.mutate_pickle(data, layout, seed) if kind == "pickle" else forge.mutate_zip(data, seed)
            with open(path, "wb") as fh:
                fh.write(blob)
            code, text = run_child(path, mode)
            label = {0: "valid", 3: "CheckpointError"}.get(code, f"failure {code}")
            counts[label] = counts.get(label, 0) + 1
            if code not in (0, 3):
                failures.append([seed, code, text[:500]])
    return {"counts": counts, "failures": failures}


def main() -> None:
    for entry in (ROOT, HERE):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    global LOADERS
    LOADERS = _loaders()
    import pickle_forge  # noqa: F401  (imported before forking: children start fast)
    from portrait3d_core.gan import convert  # noqa: F401

    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "load":
            code, text = run_child(request["path"], request["mode"])
            answer = {"exit": code, "output": text}
        else:
            answer = fuzz(request["kind"], request["base"], request["mode"], request["start"], request["stop"])
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


LOADERS: dict = {}

if __name__ == "__main__":
    main()
