"""Converting the official ``model_512.pkl`` layout without executing pickled code.

The test writes a pickle in the official layout itself (``checkpoints.md`` §2.2–2.4) — no official code is imported:
- ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` records (``type`` 'class', ``version`` 6, a
  ``module_src`` text shared per file, ``class_name``, ``state`` = the module ``__dict__`` with nested ``_modules``),
- plain classes of the original code base (``training.…``, ``smplx.…``, ``torch.nn.modules.…``) as NEWOBJ + BUILD,
- tensors as ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter`` over ``torch.storage._load_from_bytes``
  legacy storages whose location tag is forced to ``cuda:0``,
- ``dnnlib.util.EasyDict`` kwargs and ``numpy.float64`` weight gains, a numpy uint32 array, ``torch.Size`` values.
Global names are emitted by a small pure-Python pickler subclass (marker classes → ``STACK_GLOBAL module name``).

G_ema holds the oracle weights (plus a small stand-in ``renderer.*`` subtree), G holds zeros (so choosing the
wrong network fails), D / D_ema a small stand-in discriminator with official key names.
"""
from __future__ import annotations

import collections
import copyreg
import glob
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import FIXTURES, ROOT
from portrait3d_core.errors import CheckpointError
from portrait3d_core.gan import convert
from portrait3d_core.gan.config import GeneratorConfig
from portrait3d_core.gan.generator import PortraitGenerator

CASES = sorted(glob.glob(os.path.join(FIXTURES, "case_*.safetensors")))

# ------------------------------------------------------------------------------------------------ pickle writer

_GLOBAL_NAMES: dict = {}


def _marker(module: str, name: str, base=object) -> type:
    """A class that this test's pickler writes as the global ``module.name``."""
    cls = type(name, (base,), {})
    _GLOBAL_NAMES[cls] = (module, name)
    return cls


_RECONSTRUCT = _marker("torch_utils.persistence", "_reconstruct_persistent_obj")
EasyDict = _marker("dnnlib.util", "EasyDict", dict)


class PersistentNode:
    """A persistence-decorated object: pickles as ``_reconstruct_persistent_obj(meta)``."""

    def __init__(self, class_name: str, module_src: str, state: dict):
        self.class_name, self.module_src, self.state = class_name, module_src, state


class StubNode:
    """Base of plain (non-persistent) objects of the original code base: NEWOBJ(cls) + BUILD(__dict__)."""


_STUB_CLASSES: dict = {}


def stub_class(full_name: str) -> type:
    if full_name not in _STUB_CLASSES:
        module, name = full_name.rsplit(".", 1)
        _STUB_CLASSES[full_name] = _marker(module, name, StubNode)
    return _STUB_CLASSES[full_name]


class LegacyStorage:
    """One storage as ``torch.storage._load_from_bytes(<legacy torch.save bytes>)``, tagged ``cuda:0``."""

    def __init__(self, tensor: torch.Tensor):
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.save(tensor.detach().contiguous().clone().storage(), buf, _use_new_zipfile_serialization=False)
        data = buf.getvalue()
        cpu, cuda = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"
        assert data.count(cpu) >= 1
        self.data = data.replace(cpu, cuda, 1)


class OfficialLayoutPickler(pickle._Pickler):
    """Pure-Python pickler (protocol 4) emitting the official globals for this test's marker classes."""

    def __init__(self, file):
        super().__init__(file, protocol=4)

    def save_global(self, obj, name=None):
        ref = _GLOBAL_NAMES.get(obj)
        if ref is None:
            return super().save_global(obj, name)
        self.save(ref[0])
        self.save(ref[1])
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)

    def reducer_override(self, obj):
        if isinstance(obj, torch.nn.Parameter):
            return torch._utils._rebuild_parameter, (obj.data, False, collections.OrderedDict())
        if isinstance(obj, torch.Tensor):
            t = obj.detach().contiguous()
            return (torch._utils._rebuild_tensor_v2,
                    (LegacyStorage(t), 0, torch.Size(t.shape), t.stride(), False, collections.OrderedDict()))
        if isinstance(obj, LegacyStorage):
            return torch.storage._load_from_bytes, (obj.data,)
        if isinstance(obj, PersistentNode):
            meta = {"type": "class", "version": 6, "module_src": obj.module_src, "class_name": obj.class_name,
                    "state": obj.state}
            return _RECONSTRUCT, (meta,)
        if isinstance(obj, StubNode):
            return copyreg.__newobj__, (type(obj),), dict(obj.__dict__)
        return NotImplemented


def dump_official(obj, path: str) -> None:
    with open(path, "wb") as fh:
        OfficialLayoutPickler(fh).dump(obj)


# ------------------------------------------------------------------------------------------------ module trees

def source_text(name: str, marker_path: str) -> str:
    """Stand-in for an embedded ``module_src``: code that would leave a file behind if anything executed it."""
    return (f"# stand-in for the training-time source of {name}; never executed by the loader\n"
            f"open({marker_path!r}, 'w').write('executed')\n")


BUFFER_NAMES = {"resample_filter", "noise_const", "w_avg", "dataset_label_std"}


def module_state(extra=None) -> dict:
    state = {"training": False, "_parameters": collections.OrderedDict(), "_buffers": collections.OrderedDict(),
             "_non_persistent_buffers_set": set(), "_backward_pre_hooks": collections.OrderedDict(),
             "_backward_hooks": collections.OrderedDict(), "_forward_hooks": collections.OrderedDict(),
             "_forward_pre_hooks": collections.OrderedDict(), "_state_dict_hooks": collections.OrderedDict(),
             "_load_state_dict_pre_hooks": collections.OrderedDict(), "_modules": collections.OrderedDict()}
    state.update(extra or {})
    return state


def generator_class_for(path: str):
    """(kind, class name, source file) of the official object at a module path of the generator."""
    last = path.rsplit(".", 1)[-1]
    if path == "":
        return "persistent", "TriPlaneGenerator", "smpl_triplane.py"
    stubs = {"renderer": "training.volumetric_rendering.renderer.ImportanceRenderer",
             "renderer.ray_marcher": "training.volumetric_rendering.ray_marcher.MipRayMarcher2",
             "renderer.aligned_SMPL": "training.aligned_smpl.AlignedSMPL",
             "renderer.aligned_SMPL.model": "smplx.body_models.SMPL",
             "renderer.aligned_SMPL.model.vertex_joint_selector": "smplx.vertex_joint_selector.VertexJointSelector",
             "decoder": "training.smpl_triplane.OSGDecoder", "pose_branch": "training.smpl_triplane.GPoseBranch",
             "decoder.net": "torch.nn.modules.container.Sequential",
             "pose_branch.net": "torch.nn.modules.container.Sequential",
             "decoder.net.1": "torch.nn.modules.activation.Softplus"}
    if path in stubs:
        return "stub", stubs[path], None
    if path == "superresolution":
        return "persistent", "SuperresolutionHybrid8XDC", "superresolution.py"
    if path == "backbone":
        return "persistent", "Hierarchy3DAwareGenerator", "networks_stylegan2.py"
    names = {"synthesis": "Hierarchy3DAwareSynthesisNetwork", "mapping": "MappingNetwork",
             "bcg_synthesis": "SynthesisNetwork", "conv0": "SynthesisLayer", "conv1": "SynthesisLayer",
             "torgb": "ToRGBLayer", "affine": "FullyConnectedLayer", "embed": "FullyConnectedLayer",
             "block": "SynthesisBlock", "block0": "SynthesisBlock", "block1": "SynthesisBlock"}
    if last in names:
        return "persistent", names[last], "networks_stylegan2.py"
    if last.startswith("b3d"):
        return "persistent", "Aware3DBlock", "networks_stylegan2.py"
    if last.startswith("fc") or path.startswith(("decoder.net.", "pose_branch.net.")):
        return "persistent", "FullyConnectedLayer", "networks_stylegan2.py"
    if last.startswith("b") and last[1:].isdigit():
        return "persistent", "SynthesisBlock", "networks_stylegan2.py"
    raise AssertionError(f"no class rule for {path!r}")


def build_tree(state: dict, class_for, sources: dict, root_attrs: dict, extra_nodes=(), parameters=None):
    """Nested official-layout objects holding ``state`` (params/buffers split by name)."""
    nodes: dict = {}

    def node(path: str):
        if path in nodes:
            return nodes[path]
        kind, cls_name, src = class_for(path)
        attrs = {}
        if cls_name == "FullyConnectedLayer":
            attrs = {"in_features": 0, "out_features": 0, "activation": "linear",
                     "weight_gain": np.float64(0.5), "bias_gain": 1.0}
        if path == "":
            attrs = dict(root_attrs)
        if path == "renderer":
            attrs = {"plane_axes": torch.eye(3).repeat(3, 1, 1)}
        if path == "renderer.aligned_SMPL":
            attrs = {"faces": np.arange(12, dtype=np.uint32).reshape(4, 3), "dtype": torch.float32}
        if kind == "persistent":
            attrs.setdefault("_init_args", ())
            attrs.setdefault("_init_kwargs", EasyDict())
            obj = PersistentNode(cls_name, sources[src], module_state(attrs))
            st = obj.state
        else:
            obj = stub_class(cls_name)()
            obj.__dict__.update(module_state(attrs))
            st = obj.__dict__
        nodes[path] = (obj, st)
        if path:
            parent, _, name = path.rpartition(".")
            node(parent)[1]["_modules"][name] = obj
        return nodes[path]

    node("")
    for path in extra_nodes:
        node(path)
    for key, value in state.items():
        path, _, name = key.rpartition(".")
        st = node(path)[1]
        is_param = (name not in BUFFER_NAMES) if parameters is None else parameters(key)
        if is_param:
            st["_parameters"][name] = torch.nn.Parameter(value.clone(), requires_grad=False)
        else:
            st["_buffers"][name] = value.clone()
    return node("")[0]


def generator_tree(state: dict, init_kwargs: dict, sources: dict):
    # Tree order must follow the official registration order so that the walk reproduces the key order.
    order = ["dataset_label_std", "renderer.", "backbone.", "superresolution.", "decoder.", "torgb.",
             "bcg_synthesis.", "pose_branch."]
    ordered = collections.OrderedDict()
    for prefix in order:
        for key in sorted((k for k in state if k.startswith(prefix)), key=list(state).index):
            ordered[key] = state[key]
    kw = EasyDict(init_kwargs)
    kw["mapping_kwargs"] = EasyDict(init_kwargs["mapping_kwargs"])
    kw["sr_kwargs"] = EasyDict(init_kwargs["sr_kwargs"])
    rendering = dict(init_kwargs["rendering_kwargs"], density_noise=0.0)
    root_attrs = {"_init_args": (), "_init_kwargs": kw, "z_dim": init_kwargs["z_dim"], "c_dim": 25,
                  "w_dim": init_kwargs["w_dim"], "img_resolution": init_kwargs["img_resolution"],
                  "img_channels": 3, "trigrid_channel": 12, "decode_channel": 32, "batch_size": 4,
                  "neural_rendering_resolution": np.int64(32), "rendering_kwargs": rendering,
                  "_last_planes": None, "explicitly_symmetry": True,
                  "avg_c": torch.zeros(1, 25), "plane_shapes": {4: torch.Size([4, 3, 36, 8, 8])}}
    smpl_params = {"renderer.aligned_SMPL.model.betas"}
    return build_tree(ordered, generator_class_for, sources, root_attrs,
                      extra_nodes=("renderer.ray_marcher", "decoder.net.1"),
                      parameters=lambda k: (k in smpl_params) if k.startswith("renderer.")
                      else k.rsplit(".", 1)[-1] not in BUFFER_NAMES)


SMPL_STAND_IN = {   # small stand-in for the licensed SMPL subtree (real shapes are much larger)
    "renderer.shaped_smpl": torch.randn(4, 10, 3, generator=torch.Generator().manual_seed(3)),
    "renderer.face_mask": torch.tensor([True, False, True]),
    "renderer.aligned_SMPL.faces": torch.arange(9).reshape(3, 3),
    "renderer.aligned_SMPL.model.betas": torch.zeros(4, 10),
    "renderer.aligned_SMPL.model.vertex_joint_selector.extra_joints_idxs": torch.arange(5),
}

D_STAND_IN = collections.OrderedDict([   # official D_ema key names, tiny shapes
    ("b8.fromrgb.weight", torch.randn(4, 7, 1, 1)), ("b8.fromrgb.bias", torch.zeros(4)),
    ("b8.conv0.weight", torch.randn(4, 4, 3, 3)), ("b8.resample_filter", torch.ones(4, 4) / 16),
    ("b4.fc.weight", torch.randn(4, 64)), ("b4.out.weight", torch.randn(4, 4)),
    ("mapping.embed.weight", torch.randn(4, 31)), ("mapping.w_avg", torch.zeros(4)),
    ("pose_branch.net.0.weight", torch.randn(8, 16)), ("pose_branch.net.4.bias", torch.zeros(6)),
])


def discriminator_class_for(path: str):
    if path == "":
        return "stub", "training.dual_discriminator.PoseShapeAwareDualDiscriminator", None
    if path == "pose_branch":
        return "stub", "training.dual_discriminator.DPoseBranch", None
    if path == "pose_branch.net":
        return "stub", "torch.nn.modules.container.Sequential", None
    last = path.rsplit(".", 1)[-1]
    names = {"b8": "DiscriminatorBlock", "b4": "DiscriminatorEpilogue", "mapping": "MappingNetwork",
             "fromrgb": "Conv2dLayer", "conv0": "Conv2dLayer"}
    return "persistent", names.get(last, "FullyConnectedLayer"), "networks_stylegan2.py"


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def oracle():
    with open(os.path.join(FIXTURES, "generator_config.json"), encoding="utf-8") as fh:
        cfg = json.load(fh)
    with safe_open(os.path.join(FIXTURES, "generator_state_dict.safetensors"), framework="pt") as fh:
        state = {k: fh.get_tensor(k) for k in fh.keys()}
    # The official key order (safetensors stores keys sorted): the order our own model produces.
    with torch.device("meta"):
        order = list(PortraitGenerator(GeneratorConfig.from_oracle_config(cfg)).state_dict())
    return cfg, collections.OrderedDict((k, state[k]) for k in order)


@pytest.fixture(scope="module")
def official_pickle(tmp_path_factory, oracle):
    """``model_512.pkl`` in the official layout, plus the path of the file its embedded source would create."""
    cfg, state = oracle
    folder = tmp_path_factory.mktemp("official")
    marker = str(folder / "module_src_was_executed")
    sources = {name: source_text(name, marker)
               for name in ("smpl_triplane.py", "networks_stylegan2.py", "superresolution.py")}
    g_state = collections.OrderedDict(list(state.items())[:1] + list(SMPL_STAND_IN.items())
                                      + list(state.items())[1:])
    g_ema = generator_tree(g_state, cfg["init_kwargs"], sources)
    g = generator_tree({k: torch.zeros_like(v) for k, v in g_state.items()}, cfg["init_kwargs"], sources)
    d_attrs = {"_init_kwargs": EasyDict(c_dim=25, img_resolution=512, channel_base=18432, channel_max=144)}
    d_ema = build_tree(D_STAND_IN, discriminator_class_for, sources, d_attrs)
    d = build_tree({k: v * 0 for k, v in D_STAND_IN.items()}, discriminator_class_for, sources, d_attrs)
    snapshot = {"training_set_kwargs": {"class_name": "training.dataset.ImageFolderDataset", "path": "360PHQ-512.zip",
                                        "resolution": 512, "use_labels": True, "max_size": None, "xflip": True},
                "G": g, "D": d, "G_ema": g_ema, "D_ema": d_ema, "augment_pipe": None}
    path = str(folder / "model_512.pkl")
    dump_official(snapshot, path)
    return path, marker, g_state


def run_case(G: PortraitGenerator, case_path: str):
    """Our outputs for one oracle case (mapping, tri-grid, full synthesis) vs its stored tensors."""
    with safe_open(case_path, framework="pt") as fh:
        case = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = fh.metadata() or {}
    with torch.no_grad():
        ws = G.mapping(case["input.z"], case["input.c_cond"])
        res = G.synthesis(ws, case["input.c_render"], int(meta.get("neural_rendering_resolution", 32)),
                          settings=G.render_settings(deterministic=True))
    pairs = {"mapping.ws": ws, "out.image": res["image"], "out.image_raw": res["image_raw"],
             "out.image_depth": res["image_depth"], "out.image_mask": res["image_mask"],
             "out.image_background": res["image_background"], "render.feature_image": res["feature_image"]}
    pairs.update({f"trigrid.{lv.shape[-1]}": lv for lv in res["trigrid"].levels})
    for name, got in pairs.items():
        ref = case[name]
        assert got.shape == ref.shape, name
        diff = float((got - ref).abs().max())
        assert diff <= 1e-4 * max(1.0, float(ref.abs().max())), f"{name}: max|Δ| {diff}"


def same_state(G: PortraitGenerator, state: dict) -> None:
    ours = {k: v for k, v in G.state_dict().items() if not k.startswith("renderer.")}
    ref = {k: v for k, v in state.items() if not k.startswith("renderer.")}
    assert set(ours) == set(ref)
    for k, v in ref.items():
        assert torch.equal(ours[k], v), k


# ------------------------------------------------------------------------------------------------ tests

def test_pickle_uses_the_official_globals(official_pickle):
    """Sanity check of the test's own writer: the globals and storage tags of the official layout."""
    path, _, _ = official_pickle
    import pickletools

    with open(path, "rb") as fh:
        data = fh.read()
    ops = list(pickletools.genops(data))
    strings = [arg for op, arg, _ in ops if isinstance(arg, str)]
    for name in ("torch_utils.persistence", "_reconstruct_persistent_obj", "torch._utils", "_rebuild_tensor_v2",
                 "_rebuild_parameter", "torch.storage", "_load_from_bytes", "dnnlib.util", "EasyDict",
                 "training.smpl_triplane", "OSGDecoder", "smplx.body_models", "torch.nn.modules.container"):
        assert name in strings, name
    assert b"cuda:0" in data and data[:2] == b"\x80\x04"


def test_convert_reproduces_oracle_case(official_pickle, oracle, tmp_path):
    assert CASES, f"no case_*.safetensors in {FIXTURES}"
    path, marker, g_state = official_pickle
    cfg, state = oracle
    paths = convert.convert_checkpoint(path, str(tmp_path))
    assert set(paths) == {"generator", "discriminator", "manifest"}
    assert not os.path.exists(marker), "embedded module_src was executed"
    with open(paths["manifest"], encoding="utf-8") as fh:
        manifest = json.load(fh)
    gen = manifest["generator"]
    assert gen["class_name"] == "TriPlaneGenerator" and gen["smpl_buffers"] is True
    assert gen["num_tensors"] == len(g_state)
    assert gen["neural_rendering_resolution"] == 32
    assert gen["rendering_kwargs"]["density_noise"] == 0.0
    kwargs = dict(gen["init_kwargs"])
    assert kwargs == cfg["init_kwargs"]                      # EasyDicts came back as plain dicts
    assert GeneratorConfig.from_dict(gen["config"]) == GeneratorConfig.from_oracle_config(cfg).replace(
        rendering_kwargs=gen["config"]["rendering_kwargs"])
    with safe_open(paths["generator"], framework="pt") as fh:
        assert set(fh.keys()) == set(g_state)
        for k in SMPL_STAND_IN:
            assert torch.equal(fh.get_tensor(k), SMPL_STAND_IN[k]), k
        for k in ("backbone.mapping.w_avg", "superresolution.block1.torgb.weight", "pose_branch.net.2.bias"):
            assert torch.equal(fh.get_tensor(k), state[k]), k
    with safe_open(paths["discriminator"], framework="pt") as fh:
        assert set(fh.keys()) == set(D_STAND_IN)
        assert torch.equal(fh.get_tensor("b4.fc.weight"), D_STAND_IN["b4.fc.weight"])
    assert manifest["discriminator"]["class_name"].endswith("PoseShapeAwareDualDiscriminator")
    assert manifest["discriminator"]["num_tensors"] == len(D_STAND_IN)
    G = convert.load_generator(paths["manifest"])
    assert any(k.startswith("renderer.") for k in G.state_dict())   # SMPL subtree kept as buffers
    run_case(G, CASES[0])
    same_state(convert.load_generator(paths["generator"]), G.state_dict())   # the safetensors alone loads too
    d_state = convert.load_discriminator_state(paths["manifest"])
    assert list(d_state) and set(d_state) == set(D_STAND_IN)
    with pytest.raises(CheckpointError, match="already exists"):      # never overwrites
        convert.convert_checkpoint(path, str(tmp_path))


def test_load_generator_from_pickle_caches_beside_it(official_pickle, tmp_path, monkeypatch):
    src, marker, _ = official_pickle
    folder = tmp_path / "models"
    folder.mkdir()
    path = str(folder / "model_512.pkl")
    shutil.copy(src, path)
    G = convert.load_generator(path)
    run_case(G, CASES[0])
    expected = convert.output_paths(str(folder), "model_512")
    assert all(os.path.isfile(p) for p in expected.values())
    mtimes = {p: os.stat(p).st_mtime_ns for p in expected.values()}
    calls = []
    monkeypatch.setattr(convert, "read_official_pickle", lambda *a, **k: calls.append(a) or pytest.fail("re-read"))
    convert.load_generator(path)                                     # second load: from the cache
    assert not calls and {p: os.stat(p).st_mtime_ns for p in expected.values()} == mtimes
    assert not os.path.exists(marker)


def test_conversion_cache_is_keyed_by_full_sha256(official_pickle, oracle, tmp_path):
    """A pickle edited in the middle (same size, same first and last MiB) is converted again, not served stale."""
    src, _, _ = official_pickle
    folder = tmp_path / "models"
    folder.mkdir()
    path = folder / "model_512.pkl"
    shutil.copy(src, path)
    cache = str(tmp_path / "cache")
    convert.load_generator(str(path), cache_dir=cache)
    with open(convert.output_paths(str(folder), "model_512")["manifest"], encoding="utf-8") as fh:
        recorded = json.load(fh)["source"]
    assert recorded["sha256"] == convert.file_sha256(str(path)) and len(recorded["sha256"]) == 64
    data = bytearray(path.read_bytes())
    middle = lambda at: (1 << 20) < at < len(data) - (1 << 20)   # noqa: E731  (first/last MiB unchanged)
    key = next(k for k, v in oracle[1].items() if v.numel() >= 64 and bool(v.abs().sum())
               and middle(data.find(v.numpy().tobytes())))
    at = data.find(oracle[1][key].numpy().tobytes())
    data[at:at + 4] = torch.tensor([123.0]).numpy().tobytes()
    path.write_bytes(bytes(data))
    G = convert.load_generator(str(path), cache_dir=cache)        # stale files beside it stay; new one in the cache
    assert float(G.state_dict()[key].flatten()[0]) == 123.0
    cached = [f for f in os.listdir(cache) if f.endswith(".portrait3d.json")]
    assert cached == [f"model_512-{convert.file_sha256(str(path))[:16]}.portrait3d.json"]


def test_read_only_folder_and_user_files_are_respected(official_pickle, oracle, tmp_path, monkeypatch):
    src, _, _ = official_pickle
    ro = tmp_path / "readonly"
    ro.mkdir()
    path = str(ro / "model_512.pkl")
    shutil.copy(src, path)
    cache = str(tmp_path / "cache")
    os.chmod(str(ro), 0o555)
    if os.geteuid() == 0:      # root ignores permission bits: make the folder look read-only to the loader
        real = convert._writable
        monkeypatch.setattr(convert, "_writable", lambda d: False if os.path.abspath(d) == str(ro) else real(d))
    try:
        G = convert.load_generator(path, cache_dir=cache)
        assert sorted(os.listdir(str(ro))) == ["model_512.pkl"]
        cached = [f for f in os.listdir(cache) if f.endswith(".portrait3d.json")]
        assert len(cached) == 1 and cached[0].startswith("model_512-")
        same_state(G, oracle[1])
    finally:
        os.chmod(str(ro), 0o755)
    # A user's own file under our name beside the pickle: never replaced, the conversion goes to the cache.
    other = tmp_path / "userfiles"
    other.mkdir()
    path2 = str(other / "model_512.pkl")
    shutil.copy(src, path2)
    user_file = other / "model_512.portrait3d.json"
    user_file.write_text("my notes\n")
    cache2 = str(tmp_path / "cache2")
    convert.load_generator(path2, cache_dir=cache2)
    assert user_file.read_text() == "my notes\n"
    assert not (other / "model_512.generator.safetensors").exists()
    assert any(f.endswith(".portrait3d.json") for f in os.listdir(cache2))
    # Nowhere to write: loads from memory with a warning.
    other3 = tmp_path / "nowhere"
    other3.mkdir()
    path3 = str(other3 / "model_512.pkl")
    shutil.copy(src, path3)
    monkeypatch.setattr(convert, "_writable", lambda d: False)
    with pytest.warns(UserWarning, match="no writable place"):
        G3 = convert.load_generator(path3)
    assert sorted(os.listdir(str(other3))) == ["model_512.pkl"]
    assert isinstance(G3, PortraitGenerator)


def test_cli_converts(official_pickle, tmp_path):
    path, marker, _ = official_pickle
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "portrait3d_core.gan.convert", path, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" not in proc.stderr
    names = sorted(os.listdir(str(out)))
    assert names == ["model_512.discriminator.safetensors", "model_512.generator.safetensors",
                     "model_512.portrait3d.json"]
    again = subprocess.run([sys.executable, "-m", "portrait3d_core.gan.convert", path, "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert not os.path.exists(marker)


# ------------------------------------------------------------------------------------------------ refusals

class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _malicious_pickles(marker: str) -> dict:
    cmd = f"touch {marker}"
    code = f"open({marker!r}, 'w').write('pwned')"
    return {
        "os.system": pickle.dumps({"G_ema": _Evil(os.system, cmd)}, protocol=4),
        "builtins.eval": pickle.dumps({"G_ema": _Evil(eval, code)}, protocol=4),
        "builtins.exec": pickle.dumps(_Evil(exec, code), protocol=2),
        "subprocess.Popen": pickle.dumps(_Evil(subprocess.Popen, ["touch", marker]), protocol=4),
        # hidden deep inside an otherwise valid persistence record's state
        "nested": _nested_evil(marker),
    }


def _nested_evil(marker: str) -> bytes:
    buf = io.BytesIO()
    state = module_state({"_init_kwargs": EasyDict(z_dim=_Evil(os.system, f"touch {marker}"))})
    OfficialLayoutPickler(buf).dump({"G_ema": PersistentNode("TriPlaneGenerator", "", state)})
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "builtins.exec", "subprocess.Popen", "nested"])
def test_malicious_pickle_is_refused_without_running_anything(tmp_path, kind):
    marker = str(tmp_path / "pwned")
    path = tmp_path / "model_512.pkl"
    path.write_bytes(_malicious_pickles(marker)[kind])
    with pytest.raises(CheckpointError, match="refused") as info:
        convert.load_generator(str(path), cache_dir=str(tmp_path / "cache"))
    assert str(path) in str(info.value)
    assert not os.path.exists(marker), "the pickle ran code"
    assert sorted(os.listdir(str(tmp_path))) == ["model_512.pkl"]


def test_corrupted_truncated_and_foreign_files(official_pickle, tmp_path):
    src, _, _ = official_pickle
    with open(src, "rb") as fh:
        data = fh.read()
    cases = {
        "truncated.pkl": (data[: len(data) // 2], "truncated or corrupted"),
        "empty.pkl": (b"", "empty"),
        "noise.pkl": (bytes(range(256)) * 8, "not a pickle"),
        "foreign.pkl": (pickle.dumps({"weights": [1, 2, 3]}, protocol=4), "G_ema"),
        "list.pkl": (pickle.dumps([1, 2, 3], protocol=2), "G_ema"),
        "zip.pkl": (b"PK\x03\x04" + b"\x00" * 64, "torch.save archive"),
    }
    for name, (payload, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(CheckpointError, match=message) as info:
            convert.load_generator(str(path))
        assert str(path) in str(info.value), name
    # A persistence record of another network in G_ema
    buf = io.BytesIO()
    OfficialLayoutPickler(buf).dump({"G_ema": PersistentNode("StyleGAN2Generator", "", module_state())})
    (tmp_path / "other.pkl").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="TriPlaneGenerator"):
        convert.load_generator(str(tmp_path / "other.pkl"))
    with pytest.raises(CheckpointError, match="not found"):
        convert.load_generator(str(tmp_path / "missing.pkl"))
    leftovers = [f for f in os.listdir(str(tmp_path)) if f.endswith((".safetensors", ".json"))]
    assert not leftovers
