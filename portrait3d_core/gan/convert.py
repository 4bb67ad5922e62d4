"""Convert the official ``model_512.pkl`` to safetensors + JSON, and load generators from either form.

Reading (``checkpoints.md`` §2, §6): the pickle goes through the restricted unpickler (``checkpoints.load_pickle``
with the ``NETWORKS`` policy): persistence records become inert records (their embedded source is never run),
classes of the original code base become inert stubs, tensors are rebuilt by torch's own functions and CUDA-tagged
storages land on the CPU. Anything outside the allow-list is refused. The module trees of ``G_ema`` and ``D_ema``
are walked into official state dicts; ``G_ema``'s ``_init_kwargs``, ``rendering_kwargs`` and
``neural_rendering_resolution`` are kept as plain JSON data.

Output (three files, written atomically, never replacing an existing file unless asked):
- ``<stem>.generator.safetensors``: the ``G_ema`` state dict under its official key names (all tensors, including
  the ``renderer.*`` SMPL buffers when present; they are licensed SMPL data, keep the file private). Its safetensors
  metadata repeats the manifest, so this file alone is loadable.
- ``<stem>.discriminator.safetensors``: the whole ``D_ema`` state dict (102 tensors in the released model), official
  key names (used for pose prediction at inversion).
- ``<stem>.portrait3d.json``: the manifest: format tag, source file name/size/SHA-256, the generator config
  (``GeneratorConfig``), the recovered ``_init_kwargs``, ``rendering_kwargs``, ``neural_rendering_resolution``,
  class names and tensor counts of both networks. It is written last: its presence marks a complete conversion.

``load_generator(path, cache_dir=None)`` accepts the manifest, the generator safetensors, or the official pickle.
For a pickle it looks for a matching conversion beside the pickle (then in ``cache_dir``), and otherwise converts and
caches it beside the pickle; when that folder is read-only or holds other files under those names, it caches in
``cache_dir`` (file names there carry the start of the source's SHA-256), and without a usable ``cache_dir`` it loads
in memory only. A conversion is reused only when its manifest records the full SHA-256 of the pickle (streamed over
the whole file), so an edited or replaced pickle is converted again. User files are never overwritten.

CLI: ``python -m portrait3d_core.gan.convert model_512.pkl [--out DIR] [--overwrite]``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .. import checkpoints
from ..errors import CheckpointError, InvalidInputError
from ..fileio import atomic_write
from .config import FORMAT_NAME, FORMAT_VERSION, GeneratorConfig, infer_literals
from .generator import PortraitGenerator

GENERATOR_SUFFIX = ".generator.safetensors"
DISCRIMINATOR_SUFFIX = ".discriminator.safetensors"
MANIFEST_SUFFIX = ".portrait3d.json"
GENERATOR_CLASS = "TriPlaneGenerator"
PERSISTENCE_VERSION = 6
_EXPECTED = ("a 3DPortraitGAN-Pyramid training snapshot (model_512.pkl: a pickled dict with 'G_ema' and 'D_ema' "
             "networks)")


# --------------------------------------------------------------------------------------------------- reading

@dataclass
class OfficialCheckpoint:
    """What ``model_512.pkl`` holds, as plain data."""

    generator_state: dict
    discriminator_state: Optional[dict]
    init_kwargs: dict
    rendering_kwargs: dict
    neural_rendering_resolution: Optional[int]
    config: GeneratorConfig
    generator_class: str
    discriminator_class: Optional[str]
    discriminator_init_kwargs: Optional[dict]
    source: str


def plain(value: Any, where: str = "value") -> Any:
    """Loaded kwargs → JSON-able data (EasyDict → dict, tensors (incl. former numpy arrays) → lists).

    The loader already turned numpy scalars into Python numbers and numpy arrays into tensors."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return value
    if torch.is_tensor(value):
        return value.detach().cpu().tolist()
    if isinstance(value, torch.Size):
        return list(value)
    if isinstance(value, dict):
        return {str(k): plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, where) for v in value]
    return repr(value)


def _class_name(obj) -> Optional[str]:
    if isinstance(obj, checkpoints.PersistentRecord):
        return obj.class_name
    if isinstance(obj, checkpoints.Stub):
        return obj.qualname
    return None


def _tensor_state(obj, source: str, what: str) -> dict:
    state = checkpoints.state_dict_of(obj)
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{source}: {what} holds non-tensor parameters ({', '.join(bad[:4])}); the file is not "
                              f"{_EXPECTED} or it is corrupted")
    if not state:
        raise CheckpointError(f"{source}: {what} has no parameters; expected {_EXPECTED}")
    return {k: v.detach() for k, v in state.items()}


def check_generator_state(state: dict, config: GeneratorConfig, source: str) -> None:
    """Keys, shapes and dtypes must be exactly those of ``config`` (``renderer.*`` optional)."""
    with torch.device("meta"):
        expected = {k: v for k, v in PortraitGenerator(config).state_dict().items()}
    got = {k: v for k, v in state.items() if not k.startswith("renderer.")}
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{source}: the generator's parameters do not match the 3DPortraitGAN-Pyramid layout "
                              f"(missing {missing[:4]}{'…' if len(missing) > 4 else ''}, unexpected "
                              f"{extra[:4]}{'…' if len(extra) > 4 else ''})")
    for key, ref in expected.items():
        if tuple(got[key].shape) != tuple(ref.shape) or got[key].dtype != ref.dtype:
            raise CheckpointError(f"{source}: '{key}' has shape {tuple(got[key].shape)} {got[key].dtype}, expected "
                                  f"{tuple(ref.shape)} {ref.dtype}")
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{source}: '{key}' contains NaN or inf values; the file is corrupted")


def read_official_pickle(path) -> OfficialCheckpoint:
    """Read ``model_512.pkl`` safely (no pickled code runs) into an ``OfficialCheckpoint``."""
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise CheckpointError(f"{source}: file not found; expected {_EXPECTED}")
    if os.path.getsize(source) == 0:
        raise CheckpointError(f"{source}: the file is empty; expected {_EXPECTED}")
    with open(source, "rb") as fh:
        head = fh.read(4)
    if head[:2] == b"PK":
        raise CheckpointError(f"{source}: this is a torch.save archive (e.g. decoder_512.ckpt), not {_EXPECTED}")
    if head[:1] != b"\x80":
        raise CheckpointError(f"{source}: not a pickle file (bad header {head!r}); expected {_EXPECTED}")
    try:
        data = checkpoints.load_pickle(source, checkpoints.NETWORKS)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} (expected {_EXPECTED})") from None
    if not isinstance(data, dict) or "G_ema" not in data:
        found = (f"a dict with keys {sorted(map(str, data))[:6]}" if isinstance(data, dict)
                 else f"a {type(data).__name__}")
        raise CheckpointError(f"{source}: found {found}; expected {_EXPECTED}")
    g = data["G_ema"]
    g_class = _class_name(g)
    if not isinstance(g, checkpoints.PersistentRecord) or g_class != GENERATOR_CLASS:
        raise CheckpointError(f"{source}: 'G_ema' is {g_class or type(g).__name__}, expected a persistent "
                              f"{GENERATOR_CLASS} (3DPortraitGAN-Pyramid)")
    if g.version != PERSISTENCE_VERSION:
        warnings.warn(f"{source}: persistence format version {g.version} (expected {PERSISTENCE_VERSION}); "
                      f"reading it anyway")
    g_attrs = checkpoints.state_of(g)
    init_kwargs = g_attrs.get("_init_kwargs")
    if not isinstance(init_kwargs, dict):
        raise CheckpointError(f"{source}: 'G_ema' has no constructor kwargs (_init_kwargs); expected {_EXPECTED}")
    init_kwargs = plain(init_kwargs)
    rendering_kwargs = plain(g_attrs.get("rendering_kwargs") or init_kwargs.get("rendering_kwargs") or {})
    nrr = g_attrs.get("neural_rendering_resolution")
    nrr = None if nrr is None else int(plain(nrr))
    g_state = _tensor_state(g, source, "'G_ema'")
    literals = infer_literals(g_state, source)
    try:
        config = GeneratorConfig.from_init_kwargs(init_kwargs, neural_rendering_resolution=nrr,
                                                  rendering_kwargs=rendering_kwargs, **literals)
    except InvalidInputError as exc:
        raise CheckpointError(f"{source}: unsupported generator settings: {exc}") from None
    check_generator_state(g_state, config, source)
    d = data.get("D_ema")
    d_state = d_class = d_kwargs = None
    if d is not None:
        d_state = _tensor_state(d, source, "'D_ema'")
        d_class = _class_name(d)
        d_kwargs = plain(checkpoints.state_of(d).get("_init_kwargs"))
    else:
        warnings.warn(f"{source}: no 'D_ema' network; the discriminator (pose prediction) will be unavailable")
    return OfficialCheckpoint(g_state, d_state, init_kwargs, rendering_kwargs, nrr, config, g_class, d_class,
                              d_kwargs, source)


# --------------------------------------------------------------------------------------------------- writing

def file_sha256(path, chunk: int = 1 << 22) -> str:
    """SHA-256 of the whole file (hex), streamed in 4 MiB chunks: the identity of a converted source."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _cache_stem(stem: str, source_sha: str) -> str:
    """File stem of a conversion in the cache folder (the manifest inside holds the full hash)."""
    return f"{stem}-{source_sha[:16]}"


def output_paths(directory: str, stem: str) -> dict:
    return {"generator": os.path.join(directory, stem + GENERATOR_SUFFIX),
            "discriminator": os.path.join(directory, stem + DISCRIMINATOR_SUFFIX),
            "manifest": os.path.join(directory, stem + MANIFEST_SUFFIX)}


def _manifest(ckpt: OfficialCheckpoint, paths: dict, source_sha: str) -> dict:
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "source": {"name": os.path.basename(ckpt.source), "size": os.path.getsize(ckpt.source),
                   "sha256": source_sha},
        "generator": {
            "file": os.path.basename(paths["generator"]), "class_name": ckpt.generator_class,
            "num_tensors": len(ckpt.generator_state),
            "smpl_buffers": any(k.startswith("renderer.") for k in ckpt.generator_state),
            "config": ckpt.config.to_dict(), "init_kwargs": ckpt.init_kwargs,
            "rendering_kwargs": ckpt.rendering_kwargs,
            "neural_rendering_resolution": ckpt.neural_rendering_resolution,
        },
        "discriminator": None if ckpt.discriminator_state is None else {
            "file": os.path.basename(paths["discriminator"]), "class_name": ckpt.discriminator_class,
            "num_tensors": len(ckpt.discriminator_state), "init_kwargs": ckpt.discriminator_init_kwargs,
        },
    }


def _save_tensors(path: str, state: dict, metadata: dict, overwrite: bool) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), overwrite=overwrite)


def write_converted(ckpt: OfficialCheckpoint, directory: str, stem: str, *, overwrite: bool = False,
                    source_sha: Optional[str] = None) -> dict:
    """Write the three files for ``ckpt`` into ``directory``; returns their paths.

    Without ``overwrite`` an existing file raises ``FileExistsError`` before anything is written.
    """
    paths = output_paths(directory, stem)
    if ckpt.discriminator_state is None:
        paths.pop("discriminator")
    if not overwrite:
        taken = [p for p in paths.values() if os.path.exists(p)]
        if taken:
            raise FileExistsError(taken[0])
    source_sha = source_sha or file_sha256(ckpt.source)
    manifest = _manifest(ckpt, paths, source_sha)
    text = json.dumps(manifest, indent=1, sort_keys=True)
    os.makedirs(directory, exist_ok=True)

    def write_json(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")

    written = []
    try:
        _save_tensors(paths["generator"], ckpt.generator_state, {"format": FORMAT_NAME, "manifest": text},
                      overwrite)
        written.append(paths["generator"])
        if ckpt.discriminator_state is not None:
            _save_tensors(paths["discriminator"], ckpt.discriminator_state,
                          {"format": "portrait3d-discriminator", "manifest": text}, overwrite)
            written.append(paths["discriminator"])
        atomic_write(paths["manifest"], write_json, overwrite=overwrite)   # last: marks a complete conversion
    except BaseException:
        if not overwrite:               # remove only what this call created
            for p in written:
                try:
                    os.remove(p)
                except OSError:
                    pass
        raise
    return paths


def convert_checkpoint(path, out_dir: Optional[str] = None, *, overwrite: bool = False) -> dict:
    """``model_512.pkl`` → ``<stem>.generator.safetensors``, ``<stem>.discriminator.safetensors``,
    ``<stem>.portrait3d.json`` in ``out_dir`` (default: beside the pickle). Returns the paths."""
    source = os.fspath(path)
    directory = out_dir or os.path.dirname(os.path.abspath(source))
    stem = os.path.splitext(os.path.basename(source))[0]
    taken = [p for p in output_paths(directory, stem).values() if os.path.exists(p)]
    if taken and not overwrite:
        raise CheckpointError(f"{taken[0]}: already exists; not overwriting it (choose another --out folder or "
                              f"pass --overwrite)")
    ckpt = read_official_pickle(source)
    try:
        return write_converted(ckpt, directory, stem, overwrite=overwrite)
    except FileExistsError as exc:
        raise CheckpointError(f"{exc.filename or exc}: already exists; not overwriting it (choose another --out "
                              f"folder or pass --overwrite)") from None


# --------------------------------------------------------------------------------------------------- loading

def read_manifest(path: str) -> dict:
    """The manifest of a converted model: from the ``.portrait3d.json`` or the generator safetensors metadata."""
    source = os.fspath(path)
    try:
        if checkpoints.is_safetensors(source):
            from safetensors import safe_open

            with safe_open(source, framework="pt") as fh:
                meta = fh.metadata() or {}
            text = meta.get("manifest")
            if text is None:
                raise CheckpointError(f"{source}: a safetensors file without a Portrait3D generator manifest; expected "
                                      f"a converted '*{GENERATOR_SUFFIX}' (or the official model_512.pkl)")
            manifest = json.loads(text)
        else:
            with open(source, "r", encoding="utf-8") as fh:
                manifest = json.load(fh)
    except CheckpointError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{source}: not a readable Portrait3D generator manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{source}: not a Portrait3D converted generator (format tag "
                              f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{source}: converted with a newer format version {manifest['format_version']}; "
                              f"update comfyui-portrait3d")
    return manifest


def _load_state(path: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: broken safetensors file ({exc})") from None


def _generator_from(state: dict, config: GeneratorConfig, source: str, device) -> PortraitGenerator:
    check_generator_state(state, config, source)
    return PortraitGenerator.from_state_dict(state, config, device)


def _load_converted(path: str, device) -> PortraitGenerator:
    source = os.fspath(path)
    manifest = read_manifest(source)
    if checkpoints.is_safetensors(source):
        generator_file = source
    else:
        generator_file = os.path.join(os.path.dirname(os.path.abspath(source)), manifest["generator"]["file"])
        if not os.path.isfile(generator_file):
            raise CheckpointError(f"{source}: its generator file {generator_file} is missing")
    try:
        config = GeneratorConfig.from_dict(manifest["generator"]["config"])
    except (KeyError, TypeError, InvalidInputError) as exc:
        raise CheckpointError(f"{source}: invalid generator config in the manifest ({exc})") from None
    return _generator_from(_load_state(generator_file), config, generator_file, device)


def _writable(directory: str) -> bool:
    return os.path.isdir(directory) and os.access(directory, os.W_OK)


def _matching_conversion(paths: dict, source_sha: str) -> bool:
    if not (os.path.isfile(paths["manifest"]) and os.path.isfile(paths["generator"])):
        return False
    try:
        manifest = read_manifest(paths["manifest"])
    except CheckpointError:
        return False
    source = manifest.get("source")
    return isinstance(source, dict) and source.get("sha256") == source_sha


def cached_conversion(path, cache_dir: Optional[str] = None, source_sha: Optional[str] = None) -> Optional[dict]:
    """Paths of an existing conversion of the pickle ``path`` (beside it, then in ``cache_dir``), or None.

    A conversion matches only when its manifest records the full SHA-256 of ``path`` (``source_sha`` if known)."""
    source = os.fspath(path)
    source_sha = source_sha or file_sha256(source)
    stem = os.path.splitext(os.path.basename(source))[0]
    candidates = [output_paths(os.path.dirname(os.path.abspath(source)), stem)]
    if cache_dir:
        candidates.append(output_paths(cache_dir, _cache_stem(stem, source_sha)))
    for paths in candidates:
        if _matching_conversion(paths, source_sha):
            return paths
    return None


def ensure_converted(path, cache_dir: Optional[str] = None):
    """Convert the pickle ``path`` once and cache it; returns (paths or None, ``OfficialCheckpoint`` or None).

    Returns the paths of an existing matching conversion without reading the pickle. When nothing can be written,
    returns ``(None, checkpoint)`` so the caller can use the data in memory.
    """
    source = os.fspath(path)
    source_sha = file_sha256(source)
    found = cached_conversion(source, cache_dir, source_sha)
    if found is not None:
        return found, None
    ckpt = read_official_pickle(source)
    stem = os.path.splitext(os.path.basename(source))[0]
    targets = [(os.path.dirname(os.path.abspath(source)), stem)]
    if cache_dir:
        targets.append((cache_dir, _cache_stem(stem, source_sha)))
    for directory, name in targets:
        if not _writable(directory) and not (directory == cache_dir and not os.path.exists(directory)):
            continue
        try:
            return write_converted(ckpt, directory, name, source_sha=source_sha), ckpt
        except FileExistsError:
            continue          # someone else's files under our names: never replace them
        except OSError as exc:  # read-only file system, permissions, disk full
            warnings.warn(f"could not cache the converted model in {directory}: {exc}")
            continue
    warnings.warn(f"{source}: no writable place to cache the converted model (pass a writable cache_dir); "
                  f"using it from memory")
    return None, ckpt


def load_generator(path, cache_dir: Optional[str] = None, *, device="cpu") -> PortraitGenerator:
    """Load a ``PortraitGenerator`` (eval mode, frozen) from our converted files or the official pickle.

    ``path``: a ``*.portrait3d.json`` manifest, a ``*.generator.safetensors`` file, or ``model_512.pkl`` (converted
    and cached on first use, see the module docstring). Errors are ``CheckpointError`` naming the file.
    """
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise CheckpointError(f"{source}: file not found")
    if os.path.getsize(source) == 0:
        raise CheckpointError(f"{source}: the file is empty")
    if checkpoints.is_safetensors(source) or source.endswith(".json"):
        return _load_converted(source, device)
    paths, ckpt = ensure_converted(source, cache_dir)
    if paths is not None:
        del ckpt                      # free the in-memory copy before reading the cached files
        return _load_converted(paths["manifest"], device)
    return _generator_from(ckpt.generator_state, ckpt.config, source, device)


def load_discriminator_state(path, cache_dir: Optional[str] = None) -> dict:
    """The ``D_ema`` state dict (official key names) from a converted model or the official pickle."""
    source = os.fspath(path)
    if checkpoints.is_safetensors(source) or source.endswith(".json"):
        manifest = read_manifest(source)
        directory = os.path.dirname(os.path.abspath(source))
    else:
        paths, ckpt = ensure_converted(source, cache_dir)
        if paths is None:
            if ckpt.discriminator_state is None:
                raise CheckpointError(f"{source}: has no 'D_ema' network")
            return ckpt.discriminator_state
        manifest = read_manifest(paths["manifest"])
        directory = os.path.dirname(paths["manifest"])
    if not manifest.get("discriminator"):
        raise CheckpointError(f"{source}: the converted model has no discriminator (the pickle had no 'D_ema')")
    return _load_state(os.path.join(directory, manifest["discriminator"]["file"]))


# --------------------------------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m portrait3d_core.gan.convert",
        description="Convert the official 3DPortraitGAN-Pyramid model_512.pkl to safetensors + JSON without "
                    "executing any code from the pickle.")
    parser.add_argument("checkpoint", help="path to model_512.pkl")
    parser.add_argument("--out", default=None, help="output folder (default: beside the checkpoint)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = parser.parse_args(argv)
    try:
        paths = convert_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for role, p in paths.items():
        print(f"{role}: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
