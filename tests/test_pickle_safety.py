"""Pickle safety (issue 9, item 2): hostile checkpoints are refused with ``CheckpointError`` — never a crash, a hang,
another exception type, or code from the file — and real layouts still load exactly as torch.load gives them.

Every hostile load runs in its own forked child process (``pickle_safety_worker.py``): a segfault or abort in the
reader fails the test, it does not kill the test runner. The positive tests compare our reader against
``torch.load`` of files this test wrote itself (trusted).
"""
from __future__ import annotations

import ast
import collections
import io
import json
import os
import re
import select
import subprocess
import sys
import time
import warnings
import zipfile

import numpy as np
import pytest
import torch

import pickle_forge as forge
from conftest import ARTIFACTS, ROOT
from pickle_forge import Asm, call, legacy_save, load_from_bytes, np_array, np_dtype, persid, storage_type, tensor
from portrait3d_core import checkpoints
from portrait3d_core.checkpoints import CheckpointError
from portrait3d_core.decoder import Decoder
from test_gan_convert import EasyDict as OfficialEasyDict
from test_gan_convert import OfficialLayoutPickler, PersistentNode, module_state, stub_class

WORKER = os.path.join(ROOT, "tests", "pickle_safety_worker.py")
MARKER = "PICKLE_SAFETY_PWNED"


# ------------------------------------------------------------------------------------------------ worker processes

class Worker:
    """One fork-server process (see ``pickle_safety_worker.py``); restarted if it ever dies."""

    def __init__(self, cwd: str):
        self.cwd = cwd
        self._start()

    def _start(self):
        self.proc = subprocess.Popen([sys.executable, WORKER], cwd=self.cwd, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)

    def send(self, request: dict) -> None:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float) -> dict:
        ready = select.select([self.proc.stdout], [], [], timeout)[0]
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            code = self.proc.wait()
            self._start()
            raise AssertionError(f"the worker stopped answering (exit {code}): it hung or crashed itself")
        return json.loads(line)

    def ask(self, request: dict, timeout: float = 120.0) -> dict:
        self.send(request)
        return self.receive(timeout)

    def close(self):
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pickle_safety")


@pytest.fixture(scope="module")
def worker(work_dir):
    w = Worker(str(work_dir))
    yield w
    w.close()


# ------------------------------------------------------------------------------------------------ hostile files

def storage4(numel: int = 4, data: bytes = b"\x00" * 16, **kw):
    """``torch.storage._load_from_bytes`` of a legacy float storage (tagged cuda:0)."""
    return load_from_bytes(legacy_save(data=data, numel=numel, **kw))


def pkl(value, proto: int = 2) -> bytes:
    return Asm(proto).value(value).stop()


def evil(module: str, name: str) -> bytes:
    return pkl({"G_ema": call(module, name, f"touch {MARKER}")})


OBJECT_DTYPE = np_dtype("O8", (3, "|", None, None, None, -1, -1, 63))
# The issue's attack: a void dtype whose state declares an object field, then an ndarray over file bytes; .tolist()
# / .item() would dereference a pointer taken from the file.
VOID_WITH_OBJECT_FIELD = np_dtype("V8", (3, "|", None, ("f",), {"f": (OBJECT_DTYPE, 0)}, 8, 1, 63))
F8_STATE = (3, "<", None, None, None, -1, -1, 0)


def _dtype_after_use() -> bytes:
    first = lambda a: a.value(np_dtype("f8")).raw(b"q\x00")                     # noqa: E731  memo 0 = the dtype
    again = lambda a: a.raw(b"h\x00").build((3, ">", None, None, None, -1, -1, 0))  # noqa: E731  now big-endian?
    return pkl({"a": np_array((1,), first, b"\x00" * 8), "b": again})


def _deep_lists(n: int) -> bytes:
    return bytes(Asm(2).raw(b"]" * n + b"a" * (n - 1)).stop())


def _deep_dicts(n: int) -> bytes:
    asm = Asm(2)
    for _ in range(n):
        asm.raw(b"}").value("k")
    return asm.raw(b"}" + b"s" * n).stop()


def _many_stub_classes(n: int) -> bytes:
    asm = Asm(2).raw(b"(")
    for i in range(n):
        asm.glob("training.networks", f"Layer{i}").raw(b")\x81")
    return asm.raw(b"l").stop()


def _self_reference() -> bytes:
    return Asm(2).raw(b"]q\x00h\x00a").stop()


def _zip(data_pkl: bytes, storages: dict | None = None, **kw) -> bytes:
    return forge.torch_zip(data_pkl, {"0": b"\x00" * 16} if storages is None else storages, **kw)


def zpid(numel: int = 4, key: str = "0", kind: str = "FloatStorage"):
    return persid(("storage", storage_type(kind), key, "cuda:0", numel))


def _deflate_bomb() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pkl({"x": tensor(zpid(1 << 24), 0, (1 << 24,), (1,))}))
        zf.writestr("archive/data/0", b"\x00" * (4 << 24), compress_type=zipfile.ZIP_DEFLATED)
    return buf.getvalue()


def _torchscript_zip(data_pkl: bytes) -> bytes:
    return forge.torch_zip(data_pkl, {}, extra={"code/__torch__.py": b"class M(Module):\n  pass\n",
                                                 "constants.pkl": pkl(())})


# name → (loader mode, file bytes, expected text in the CheckpointError)
ATTACKS = {
    # numpy: the dtype-setstate attack and its variants
    "dtype_setstate_void_object_field": ("networks", lambda: pkl({"G_ema": np_array((1,), VOID_WITH_OBJECT_FIELD,
                                                                                    b"A" * 8)}), "'V8' refused"),
    "dtype_setstate_numpy2_names": ("networks", lambda: pkl({"G_ema": np_array(
        (1,), VOID_WITH_OBJECT_FIELD, b"A" * 8, module="numpy._core.multiarray")}), "'V8' refused"),
    "dtype_object_via_descr": ("networks", lambda: pkl(np_array((1,), OBJECT_DTYPE, b"A" * 8)), "'O8' refused"),
    "dtype_object_via_fields": ("networks", lambda: pkl(np_array((1,), np_dtype(
        "f8", (3, "<", None, ("f",), {"f": (OBJECT_DTYPE, 0)}, 8, 1, 0)), b"A" * 8)), "structured"),
    "dtype_object_via_flags": ("networks", lambda: pkl(np_array((1,), np_dtype(
        "f8", (3, "<", None, None, None, -1, -1, 63)), b"A" * 8)), "flags 63"),
    "dtype_object_via_subarray": ("networks", lambda: pkl(np_array((1,), np_dtype(
        "f8", (3, "<", (OBJECT_DTYPE, (1,)), None, None, 8, 8, 0)), b"A" * 8)), "subarray"),
    "dtype_itemsize_mismatch": ("networks", lambda: pkl(np_array((1,), np_dtype(
        "f4", (3, "<", None, None, None, 16, -1, 0)), b"A" * 16)), "itemsize 16"),
    "dtype_state_set_after_use": ("networks", _dtype_after_use, "after it was used"),
    "dtype_string_kind": ("networks", lambda: pkl(np_array((1,), np_dtype("U3", (3, "<", None, None, None, 12, 4, 8)),
                                                           b"A" * 12)), "'U3' refused"),
    "ndarray_over_too_few_bytes": ("networks", lambda: pkl(np_array((1000,), np_dtype("f8"), b"A" * 8)),
                                   "needs 8000 bytes but the file holds 8"),
    "ndarray_huge_shape": ("networks", lambda: pkl(np_array((1 << 40, 1 << 40), np_dtype("f4"), b"A" * 16)),
                           "but the file holds 16"),
    "ndarray_negative_shape": ("networks", lambda: pkl(np_array((-1,), np_dtype("f4"), b"")), "shape"),
    "ndarray_object_data": ("networks", lambda: pkl(np_array((2,), np_dtype("f8"), [1, 2])), "object array"),
    "ndarray_subclass_global": ("networks", lambda: pkl(call("numpy.ma.core", "_mareconstruct")), "numpy.ma.core"),
    "scalar_object_dtype": ("networks", lambda: pkl(call("numpy.core.multiarray", "scalar", OBJECT_DTYPE,
                                                         b"A" * 8)), "'O8' refused"),
    "scalar_short_data": ("networks", lambda: pkl(call("numpy.core.multiarray", "scalar", np_dtype("f8"), b"A")),
                          "needs 8 bytes"),
    # tensors and storages
    "tensor_stride_past_storage": ("tensors", lambda: pkl({"t": tensor(storage4(), 0, (4,), (2,))}),
                                   "past its end"),
    "tensor_offset_past_storage": ("tensors", lambda: pkl({"t": tensor(storage4(), 3, (2,), (1,))}),
                                   "past its end"),
    "tensor_huge_expanded_view": ("tensors", lambda: pkl({"t": tensor(storage4(), 0, (1 << 20, 1 << 20), (0, 0))}),
                                  "overlapping strides"),
    "tensor_negative_stride": ("tensors", lambda: pkl({"t": tensor(storage4(), 3, (4,), (-1,))}), "stride"),
    "build_on_rebuilt_tensor": ("tensors", lambda: pkl({"t": forge.then_build(tensor(storage4(), 0, (4,), (1,)),
                                                                              {"_cdata": 1})}), "BUILD"),
    "build_on_torch_size": ("tensors", lambda: pkl(forge.then_build(call("torch", "Size", (1, 2)), {"x": 1})),
                            "BUILD"),
    "build_on_dtype_constant": ("tensors", lambda: pkl(forge.then_build(lambda a: a.glob("torch", "float32"),
                                                                        {"is_floating_point": 1})), "BUILD"),
    "setitem_on_tensor": ("tensors", lambda: pkl(lambda a: a.value(tensor(storage4(), 0, (4,), (1,)))
                                                 .value(0).value(1.0).raw(b"s")), "SETITEM on a TensorRecord"),
    "append_on_storage": ("tensors", lambda: pkl(lambda a: a.value(storage4()).value(1).raw(b"a")),
                          "APPEND on a StorageRecord"),
    "storage_numel_exceeds_bytes": ("tensors", lambda: pkl({"t": storage4(numel=1000, data=b"\x00" * 16)}),
                                    "numel larger than the data"),
    "storage_header_disagrees": ("tensors", lambda: pkl({"t": storage4(numel=4, header_numel=1000)}),
                                 "data header says 1000"),
    "storage_bool_requires_grad": ("tensors", lambda: pkl({"t": tensor(storage4(kind="BoolStorage", data=b"\x01" * 4),
                                                                       0, (4,), (1,), True)}),
                                   "cannot require gradients"),
    "reduce_on_marker": ("tensors", lambda: pkl(call("numpy", "ndarray", (2,))), "calling"),
    # structure
    "deep_nesting_lists": ("tensors", lambda: _deep_lists(50_000), "nested deeper"),
    "deep_nesting_dicts": ("tensors", lambda: _deep_dicts(20_000), "nested deeper"),
    "deep_marks": ("tensors", lambda: Asm(2).raw(b"(" * 20_000).stop(), "marks"),
    "self_reference": ("tensors", _self_reference, "self-referencing"),
    "huge_length_field": ("tensors", lambda: Asm(4).raw(b"\x8e" + (1 << 63).to_bytes(8, "little")).stop(),
                          "truncated"),
    "extension_registry": ("tensors", lambda: Asm(2).raw(b"\x82\x01").stop(), "extension registry"),
    "out_of_band_buffer": ("tensors", lambda: Asm(5).raw(b"\x97").stop(), "out-of-band"),
    "persistent_id_in_plain_pickle": ("tensors", lambda: pkl(persid(("storage",))), "persistent id"),
    # globals that would run code
    "global_os_system": ("networks", lambda: evil("os", "system"), "'os.system'"),
    "global_posix_system": ("networks", lambda: evil("posix", "system"), "'posix.system'"),
    "global_builtins_eval": ("networks", lambda: evil("builtins", "eval"), "'builtins.eval'"),
    "global_builtins_exec": ("networks", lambda: evil("builtins", "exec"), "'builtins.exec'"),
    "global_py2_eval": ("networks", lambda: evil("__builtin__", "eval"), "'__builtin__.eval'"),
    "global_subprocess_popen": ("networks", lambda: evil("subprocess", "Popen"), "'subprocess.Popen'"),
    "global_builtins_getattr": ("networks", lambda: pkl(call("builtins", "getattr", (1,), "__class__")),
                                "'builtins.getattr'"),
    "global_torch_load": ("networks", lambda: evil("torch", "load"), "'torch.load'"),
    "global_numpy_load": ("networks", lambda: evil("numpy", "load"), "'numpy.load'"),
    "global_copyreg_reconstructor": ("networks", lambda: evil("copyreg", "_reconstructor"),
                                     "'copyreg._reconstructor'"),
    "global_from_numpy_rebuild": ("tensors", lambda: evil("torch._utils", "_rebuild_device_tensor_from_numpy"),
                                  "_rebuild_device_tensor_from_numpy"),
    "global_stub_called": ("networks", lambda: pkl(call("training.networks", "SynthesisLayer", f"touch {MARKER}")),
                           "calling"),
    "global_stub_class_build": ("networks", lambda: pkl(forge.then_build(
        lambda a: a.glob("training.networks", "SynthesisLayer"), {"x": 1})), "BUILD"),
    "global_stub_outside_networks": ("tensors", lambda: pkl(lambda a: a.glob("training.networks", "Layer")
                                                            .raw(b")\x81")), "'training.networks.Layer'"),
    "too_many_stub_classes": ("networks", lambda: _many_stub_classes(600), "more than 512 distinct classes"),
    # the same attacks inside a torch.save zip's data.pkl
    "zip_os_system": ("zip", lambda: _zip(evil("os", "system")), "'os.system'"),
    "zip_builtins_getattr": ("zip", lambda: _zip(pkl(call("builtins", "getattr", (1,), "__class__"))),
                             "'builtins.getattr'"),
    "zip_dtype_setstate_void_object_field": ("zip", lambda: _zip(pkl(np_array((1,), VOID_WITH_OBJECT_FIELD,
                                                                              b"A" * 8))), "'V8' refused"),
    "zip_dtype_object_via_flags": ("zip", lambda: _zip(pkl(np_array((1,), np_dtype(
        "f8", (3, "<", None, None, None, -1, -1, 63)), b"A" * 8))), "flags 63"),
    "zip_ndarray_huge_shape": ("zip", lambda: _zip(pkl(np_array((1 << 40,), np_dtype("f4"), b"A" * 16))),
                               "but the file holds 16"),
    "zip_storage_numel_exceeds_bytes": ("zip", lambda: _zip(pkl({"t": tensor(zpid(1000), 0, (1000,), (1,))})),
                                        "declares 1000 elements (4000 bytes) but the archive holds 16 bytes"),
    "zip_stride_past_storage": ("zip", lambda: _zip(pkl({"t": tensor(zpid(4), 0, (4,), (3,))})), "past its end"),
    "zip_offset_past_storage": ("zip", lambda: _zip(pkl({"t": tensor(zpid(4), 4, (1,), (1,))})), "past its end"),
    "zip_build_on_rebuilt_tensor": ("zip", lambda: _zip(pkl(forge.then_build(tensor(zpid(4), 0, (4,), (1,)),
                                                                             {"_cdata": 1}))), "BUILD"),
    "zip_setitem_on_tensor": ("zip", lambda: _zip(pkl(lambda a: a.value(tensor(zpid(4), 0, (4,), (1,)))
                                                      .value(0).value(1.0).raw(b"s"))), "SETITEM"),
    "zip_missing_storage": ("zip", lambda: _zip(pkl(tensor(zpid(4, key="7"), 0, (4,), (1,)))), "missing"),
    "zip_storage_key_traversal": ("zip", lambda: _zip(pkl(tensor(zpid(4, key="../0"), 0, (4,), (1,)))),
                                  "storage key"),
    "zip_storage_type_refused": ("zip", lambda: _zip(pkl(tensor(persid(("storage", lambda a: a.glob(
        "torch.cuda", "FloatStorage"), "0", "cuda:0", 4)), 0, (4,), (1,)))), "'torch.cuda.FloatStorage'"),
    "zip_deep_nesting": ("zip", lambda: _zip(_deep_lists(50_000)), "nested deeper"),
    "zip_deflate_bomb": ("zip", _deflate_bomb, "unpacks"),
    "zip_not_an_archive_record": ("zip", lambda: forge.rezip({"x/y.txt": b"hello"}), "no data.pkl"),
    "torchscript_os_system": ("torchscript", lambda: _torchscript_zip(evil("os", "system")), "'os.system'"),
    "torchscript_dtype_setstate": ("torchscript", lambda: _torchscript_zip(pkl(np_array(
        (1,), VOID_WITH_OBJECT_FIELD, b"A" * 8))), "'V8' refused"),
    # the same attacks inside a nested legacy storage (torch.storage._load_from_bytes)
    "legacy_os_system": ("tensors", lambda: pkl(load_from_bytes(legacy_save(main=evil("os", "system")))),
                         "'os.system'"),
    "legacy_dtype_setstate": ("tensors", lambda: pkl(load_from_bytes(legacy_save(main=pkl(np_array(
        (1,), VOID_WITH_OBJECT_FIELD, b"A" * 8))))), "'V8' refused"),
    "legacy_build_on_storage": ("tensors", lambda: pkl(load_from_bytes(legacy_save(main=pkl(forge.then_build(
        persid(("storage", storage_type(), "0", "cuda:0", 4, None)), {"x": 1}))))), "BUILD"),
    "legacy_deep_nesting": ("tensors", lambda: pkl(load_from_bytes(legacy_save(main=Asm(2).raw(b"(").value(persid((
        "storage", storage_type(), "0", "cuda:0", 4, None))).raw(b"]" * 50_000 + b"a" * 49_999 + b"t").stop()))),
        "nested deeper"),
    "legacy_nested_twice": ("tensors", lambda: pkl(load_from_bytes(legacy_save(main=pkl(load_from_bytes(
        legacy_save()))))), "nested inside another"),
    "legacy_storage_view": ("tensors", lambda: pkl(load_from_bytes(legacy_save(main=pkl(persid((
        "storage", storage_type(), "0", "cuda:0", 4, ("1", 0, 2))))))), "views"),
    "legacy_key_list_mismatch": ("tensors", lambda: pkl(load_from_bytes(_legacy_wrong_keys())), "key list"),
    "legacy_bad_magic": ("tensors", lambda: pkl(load_from_bytes(b"\x80\x02K\x01." + legacy_save()[15:])),
                         "magic number"),
    "legacy_file_on_disk_os_system": ("any", lambda: legacy_save(main=evil("os", "system")), "'os.system'"),
}


def _legacy_wrong_keys() -> bytes:
    blob = legacy_save()
    return blob.replace(Asm(2).value(["0"]).stop(), Asm(2).value(["1"]).stop())


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_pickle_safety_attack_is_refused_in_a_subprocess(worker, work_dir, name):
    mode, build, expected = ATTACKS[name]
    path = work_dir / f"{name}.{'pth' if mode in ('zip', 'torchscript', 'any') else 'pkl'}"
    path.write_bytes(build())
    answer = worker.ask({"op": "load", "path": str(path), "mode": mode})
    assert answer["exit"] == 3, f"{name}: exit {answer['exit']} (3 = CheckpointError), output: {answer['output']}"
    assert answer["output"].startswith("CheckpointError: ") and str(path) in answer["output"], answer["output"]
    assert expected in answer["output"], f"{name}: refused for another reason: {answer['output']}"
    assert not (work_dir / MARKER).exists(), "the file ran code"


def test_pickle_safety_refusals_are_checkpoint_errors_in_process(tmp_path):
    """The same refusals in this process (after the subprocess runs proved they cannot crash): one exception type."""
    for name in ("dtype_setstate_void_object_field", "tensor_stride_past_storage", "zip_os_system",
                 "legacy_dtype_setstate", "deep_nesting_lists"):
        mode, build, expected = ATTACKS[name]
        path = tmp_path / name
        path.write_bytes(build())
        loader = {"networks": lambda p: checkpoints.load_pickle(p, checkpoints.NETWORKS),
                  "tensors": checkpoints.load_pickle, "zip": checkpoints.load_torch_zip}[mode]
        with pytest.raises(CheckpointError, match=re.escape(expected)):
            loader(str(path))


# ------------------------------------------------------------------------------------------------ fuzzing

def small_official_snapshot() -> dict:
    """A small snapshot in the official layout (records, stubs, EasyDict, numpy values, cuda:0 legacy storages)."""
    g = torch.Generator().manual_seed(0)
    src = "# stand-in module source; never executed\n"
    fc = PersistentNode("FullyConnectedLayer", src, module_state({
        "in_features": 4, "out_features": 3, "activation": "lrelu", "weight_gain": np.float64(0.5),
        "bias_gain": 1.0, "_init_args": (), "_init_kwargs": OfficialEasyDict(in_features=4, out_features=3)}))
    fc.state["_parameters"]["weight"] = torch.nn.Parameter(torch.randn(3, 4, generator=g), requires_grad=False)
    fc.state["_parameters"]["bias"] = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    seq = stub_class("torch.nn.modules.container.Sequential")()
    seq.__dict__.update(module_state())
    seq._modules["0"] = fc
    decoder = stub_class("training.smpl_triplane.OSGDecoder")()
    decoder.__dict__.update(module_state({"activation": "sigmoid"}))
    decoder._modules["net"] = seq
    smpl = stub_class("training.aligned_smpl.AlignedSMPL")()
    smpl.__dict__.update(module_state({"faces": np.arange(12, dtype=np.uint32).reshape(4, 3),
                                       "dtype": torch.float32}))
    root = PersistentNode("TriPlaneGenerator", src, module_state({
        "_init_args": (), "_init_kwargs": OfficialEasyDict(z_dim=8, mapping_kwargs=OfficialEasyDict(num_layers=2)),
        "rendering_kwargs": {"box_warp": 0.7, "depth_resolution": 48}, "neural_rendering_resolution": np.int64(32),
        "avg_c": torch.zeros(1, 5), "plane_shapes": {4: torch.Size([1, 3, 4, 8, 8])}, "_last_planes": None}))
    root.state["_buffers"]["w_avg"] = torch.randn(4, generator=g)
    root.state["_modules"]["decoder"] = decoder
    root.state["_modules"]["smpl"] = smpl
    return {"training_set_kwargs": {"resolution": 512, "xflip": True}, "G_ema": root, "augment_pipe": None}


class Numpy1Pickler(OfficialLayoutPickler):
    """Writes numpy's globals under their numpy 1.x names (``numpy.core.multiarray``)."""

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", None)
        if module == "numpy._core.multiarray":
            self.save("numpy.core.multiarray")
            self.save(obj.__name__)
            self.write(b"\x93")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def dump_snapshot(path, numpy1: bool = False) -> None:
    with open(path, "wb") as fh:
        (Numpy1Pickler if numpy1 else OfficialLayoutPickler)(fh).dump(small_official_snapshot())


FUZZ_PICKLE_CASES = int(os.environ.get("P3D_FUZZ_PICKLE_CASES", 3000))
FUZZ_ZIP_CASES = int(os.environ.get("P3D_FUZZ_ZIP_CASES", 400))


def _fuzz(work_dir, kind: str, base: str, mode: str, cases: int) -> dict:
    workers = [Worker(str(work_dir)) for _ in range(2)]
    try:
        start = time.perf_counter()
        half = cases // 2
        for w, (a, b) in zip(workers, ((0, half), (half, cases))):
            w.send({"op": "fuzz", "kind": kind, "base": base, "mode": mode, "start": a, "stop": b})
        answers = [w.receive(timeout=600) for w in workers]
        seconds = time.perf_counter() - start
    finally:
        for w in workers:
            w.close()
    counts = collections.Counter()
    for answer in answers:
        counts.update(answer["counts"])
    failures = [f for answer in answers for f in answer["failures"]]
    report = {"kind": kind, "cases": cases, "seconds": round(seconds, 1), "counts": dict(counts)}
    print(f"\nfuzz {kind}: {cases} mutations in {seconds:.1f} s: {dict(counts)}")
    os.makedirs(ARTIFACTS, exist_ok=True)
    with open(os.path.join(ARTIFACTS, f"pickle_safety_fuzz_{kind}.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh)
    assert not failures, f"{len(failures)} mutations crashed, hung or raised another exception type: {failures[:5]}"
    assert sum(counts.values()) == cases
    return counts


def test_pickle_safety_fuzz_official_layout_pickle(work_dir):
    base = work_dir / "fuzz_base.pkl"
    dump_snapshot(base)
    loaded = checkpoints.load_pickle(str(base), checkpoints.NETWORKS)      # the base itself is valid
    assert checkpoints.state_dict_of(loaded["G_ema"])
    counts = _fuzz(work_dir, "pickle", str(base), "networks", FUZZ_PICKLE_CASES)
    assert counts["CheckpointError"] > FUZZ_PICKLE_CASES // 2 and counts["valid"] > 0


def test_pickle_safety_fuzz_torch_zip(work_dir):
    base = work_dir / "fuzz_base.pth"
    g = torch.Generator().manual_seed(1)
    torch.save({"model": {"trigrids_8": torch.randn(1, 3, 4, 8, 8, generator=g), "ws": torch.randn(1, 14, 8)},
                "params": {"box_warp": 0.7, "stats": [np.float64(0.5)]}, "view": torch.arange(10)[2:8:2]}, base)
    checkpoints.load_torch_zip(str(base))
    counts = _fuzz(work_dir, "zip", str(base), "zip", FUZZ_ZIP_CASES)
    assert counts["CheckpointError"] > FUZZ_ZIP_CASES // 2 and counts["valid"] > 0


# ------------------------------------------------------------------------------------------------ real layouts

def _as_cuda(fn):
    """Run ``fn`` with torch.save tagging every storage ``cuda:0`` (as files saved from a GPU are)."""
    original = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:0"
    try:
        return fn()
    finally:
        torch.serialization.location_tag = original


def assert_same_load(ours, ref, where="root"):
    """Our reader's value equals torch.load's: same structure, tensors equal in dtype/shape/stride/offset/values."""
    if torch.is_tensor(ref):
        assert torch.is_tensor(ours) and ours.device.type == "cpu", where
        assert (ours.dtype, ours.shape, ours.stride(), ours.storage_offset()) == \
            (ref.dtype, ref.shape, ref.stride(), ref.storage_offset()), where
        torch.testing.assert_close(ours, ref.detach().cpu(), rtol=0, atol=0, equal_nan=True, msg=where)
        assert ours.requires_grad == (ref.requires_grad and not isinstance(ref, torch.nn.Parameter)), where
    elif isinstance(ref, np.ndarray):
        assert torch.is_tensor(ours) and ours.tolist() == ref.tolist(), where
    elif isinstance(ref, np.generic):
        assert type(ours) in (int, float, bool) and ours == ref.item(), where
    elif isinstance(ref, dict):
        assert type(ours) is dict and list(ours) == list(ref), where
        for key in ref:
            assert_same_load(ours[key], ref[key], f"{where}.{key}")
    elif isinstance(ref, (list, tuple)) and not isinstance(ref, torch.Size):
        assert type(ours) is type(ref) and len(ours) == len(ref), where
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_same_load(a, b, f"{where}[{i}]")
    else:
        assert ours == ref and type(ours) is type(ref), where


def test_pickle_safety_gallery_zip_loads_like_torch_load_cuda_on_cpu(tmp_path):
    g = torch.Generator().manual_seed(2)
    state = {f"trigrids_{r}": torch.randn(1, 3, 36, r, r, generator=g) for r in (8, 16, 32)}
    state["ws"] = torch.randn(1, 14, 512, generator=g)
    path = tmp_path / "007_pyramid_trigrid.pth"
    _as_cuda(lambda: torch.save({"model": state}, path))
    with zipfile.ZipFile(path) as zf:
        assert b"cuda:0" in zf.read("007_pyramid_trigrid/data.pkl")
    ours = checkpoints.load_torch_zip(str(path))
    assert_same_load(ours, torch.load(path, map_location="cpu", weights_only=True))


def test_pickle_safety_decoder_ckpt_loads_like_torch_load(tmp_path):
    path = tmp_path / "decoder_512.ckpt"
    params = {"z_dim": 512, "c_dim": 25, "w_dim": 512, "img_resolution": 512, "img_channels": 3,
              "rendering_kwargs": {"box_warp": 0.7, "ray_start": 2.385, "sr_antialias": True}, "thickness": 0.25}
    _as_cuda(lambda: torch.save({"params": params, "state_dict": Decoder().state_dict()}, path))
    ours = checkpoints.load_torch_zip(str(path))
    assert_same_load(ours, torch.load(path, map_location="cpu", weights_only=True))
    assert set(ours["state_dict"]) == set(Decoder().state_dict())


def test_pickle_safety_dtypes_views_numpy_and_legacy_files(tmp_path):
    base = torch.randn(6, 4)
    obj = {"f32": base, "view": base[1:5, ::2], "t": base.t(), "f16": base.half(), "bf16": base.bfloat16(),
           "f64": base.double(), "i64": torch.arange(5), "i32": torch.arange(5, dtype=torch.int32),
           "i8": torch.tensor([-3, 4], dtype=torch.int8), "u8": torch.tensor([0, 255], dtype=torch.uint8),
           "bool": torch.tensor([True, False, True]), "u16": torch.tensor([1, 65535]).to(torch.uint16),
           "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5), "grad": torch.ones(2, requires_grad=True),
           "param": torch.nn.Parameter(torch.ones(3)), "np_f64": np.float64(0.5), "np_i64": np.int64(-7),
           "np_bool": np.bool_(True), "np_u32": np.arange(6, dtype=np.uint32).reshape(2, 3),
           "np_big": np.arange(4, dtype=">i4"), "np_fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
           "size": torch.Size([2, 3]), "dtype": torch.float16, "device": torch.device("cuda", 1),
           "plain": [1, 2.5, "x", None, (1, b"y"), {3: True}], "od": collections.OrderedDict(b=1, a=2)}
    zip_path, legacy_path = tmp_path / "all.pth", tmp_path / "legacy.pth"
    _as_cuda(lambda: torch.save(obj, zip_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _as_cuda(lambda: torch.save(obj, legacy_path, _use_new_zipfile_serialization=False))
    ref = torch.load(zip_path, map_location="cpu", weights_only=False)        # trusted: written just above
    for path in (zip_path, legacy_path):
        ours = checkpoints.load_any(str(path))
        assert_same_load(ours, ref)
        assert ours["view"].untyped_storage().data_ptr() == ours["f32"].untyped_storage().data_ptr()
    ours["view"].add_(1)                                                        # writable, shared with its base
    assert torch.equal(ours["view"], ours["f32"][1:5, ::2])


def test_pickle_safety_big_endian_archive_is_byteswapped(tmp_path):
    values = [1.5, -2.0, 3.25]
    data = pkl({"f": tensor(zpid(3), 0, (3,), (1,)), "i": tensor(zpid(2, "1", "LongStorage"), 0, (2,), (1,))})
    storages = {"0": np.array(values, dtype=">f4").tobytes(), "1": np.array([7, -9], dtype=">i8").tobytes()}
    path = tmp_path / "big.pth"
    path.write_bytes(forge.torch_zip(data, storages, byteorder=b"big"))
    out = checkpoints.load_torch_zip(str(path))
    assert out["f"].tolist() == values and out["i"].tolist() == [7, -9]


def test_pickle_safety_official_layout_numpy1_and_numpy2_names(tmp_path):
    p1, p2 = tmp_path / "np1.pkl", tmp_path / "np2.pkl"
    dump_snapshot(p1, numpy1=True)
    dump_snapshot(p2)
    assert b"numpy.core.multiarray" in p1.read_bytes() and b"numpy._core.multiarray" in p2.read_bytes()
    a, b = (checkpoints.load_pickle(str(p), checkpoints.NETWORKS) for p in (p1, p2))
    forge.check_output_types(a)
    sa, sb = (checkpoints.state_dict_of(x["G_ema"]) for x in (a, b))
    assert list(sa) == ["w_avg", "decoder.net.0.weight", "decoder.net.0.bias"] == list(sb)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0)
    fc = checkpoints.state_of(checkpoints.state_of(checkpoints.state_of(a["G_ema"])["_modules"]["decoder"])
                              ["_modules"]["net"])["_modules"]["0"]
    assert fc.class_name == "FullyConnectedLayer" and checkpoints.state_of(fc)["weight_gain"] == 0.5
    attrs = checkpoints.state_of(a["G_ema"])
    assert attrs["neural_rendering_resolution"] == 32 and type(attrs["neural_rendering_resolution"]) is int
    assert attrs["_init_kwargs"]["mapping_kwargs"].num_layers == 2
    faces = checkpoints.state_of(checkpoints.state_of(a["G_ema"])["_modules"]["smpl"])["faces"]
    assert faces.tolist() == np.arange(12).reshape(4, 3).tolist()


class _VGGish(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(collections.OrderedDict(
            conv1=torch.nn.Conv2d(3, 4, 3), relu1=torch.nn.ReLU(), conv2=torch.nn.Conv2d(4, 2, 1)))
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))

    def forward(self, x):
        return self.layers(x - self.mean) * torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)


def test_pickle_safety_torchscript_tensors_without_running_code(tmp_path, monkeypatch):
    module = _VGGish()
    scripted, traced = tmp_path / "vgg16.pt", tmp_path / "traced.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                     # TorchScript is deprecated in recent torch
        torch.jit.save(torch.jit.script(module), str(scripted))
        torch.jit.save(torch.jit.trace(module, torch.zeros(1, 3, 8, 8)), str(traced))

    def forbidden(*args, **kwargs):
        raise AssertionError("TorchScript code was loaded")
    monkeypatch.setattr(torch.jit, "load", forbidden)
    monkeypatch.setattr(torch._C, "import_ir_module", forbidden)
    monkeypatch.setattr(torch._C, "import_ir_module_from_buffer", forbidden)
    for path in (scripted, traced):
        tensors = checkpoints.read_torchscript_tensors(str(path))
        for key, value in module.state_dict().items():
            torch.testing.assert_close(tensors[key], value, rtol=0, atol=0)
        assert "layers.conv1.weight" in tensors and all(not t.requires_grad for t in tensors.values())
    constants = [v for k, v in checkpoints.read_torchscript_tensors(str(traced)).items() if k.startswith("CONSTANTS.")]
    assert any(c.flatten().tolist() == [1.0, 2.0] for c in constants)
    plain = tmp_path / "plain.pth"
    torch.save({"a": torch.ones(1)}, plain)
    with pytest.raises(CheckpointError, match="not a TorchScript archive"):
        checkpoints.read_torchscript_tensors(str(plain))


def test_pickle_safety_weights_only_guard_names_versions_and_advisories(tmp_path, monkeypatch):
    from portrait3d_core.io import torch_guard

    for version in ("2.5.1", "2.6.0", "2.9.1+cu128", "2.10.0a0+git1234", "2.10.0.dev20251101", "1.13.1"):
        problem = torch_guard.weights_only_problem(version)
        assert problem and "CVE-2025-32434" in problem and "CVE-2026-24747" in problem, version
        assert "GHSA-53q9-r3pm-6pq6" in problem and "GHSA-63cw-57p8-fm3p" in problem and ">= 2.10.0" in problem
    for version in ("2.10.0", "2.10.0+cpu", "2.13.0+cpu", "2.11.0.dev20260101", "3.0.0"):
        assert torch_guard.weights_only_problem(version) is None, version
    path = tmp_path / "trusted.pth"
    torch.save({"w": torch.ones(2)}, path)
    monkeypatch.setattr(torch, "__version__", "2.9.1")
    with pytest.raises(CheckpointError, match="CVE-2026-24747") as info:
        torch_guard.weights_only_load(str(path), str(path))
    assert str(path) in str(info.value)
    monkeypatch.setattr(torch, "__version__", "2.10.0+cpu")
    assert torch.equal(torch_guard.weights_only_load(str(path), str(path))["w"], torch.ones(2))


UNRESTRICTED_LOADS = ("torch.load", "pickle.load", "pickle.loads", "jit.load", "Unpickler", "np.load", "numpy.load",
                      "serialization.load", "_pickle.load", "dill.load", "joblib.load")


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def test_pickle_safety_no_unrestricted_loads_in_package():
    """No call in the package deserializes a file with torch/pickle/numpy loaders, except the guarded gate."""
    allowed = {os.path.join("portrait3d_core", "io", "torch_guard.py")}
    offenders = []
    files = [os.path.join(ROOT, "__init__.py")]
    for folder in ("portrait3d_core", "nodes", "kernels"):
        for dirpath, _, names in os.walk(os.path.join(ROOT, folder)):
            files += [os.path.join(dirpath, n) for n in names if n.endswith(".py")]
    for path in files:
        rel = os.path.relpath(path, ROOT)
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), rel)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = _dotted(node.func)
                if any(name == n or name.endswith("." + n) for n in UNRESTRICTED_LOADS) and rel not in allowed:
                    offenders.append(f"{rel}:{node.lineno}: {name}(...)")
    assert not offenders, "unrestricted loads outside io/torch_guard.py:\n" + "\n".join(offenders)
