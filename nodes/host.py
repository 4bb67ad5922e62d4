"""Glue to the ComfyUI host: model folders, progress + cancel, tensor conversions. No method math here."""
from __future__ import annotations

import json
import logging
import os

import torch

import comfy.model_management
import comfy.utils
import folder_paths

MODEL_FOLDER = "portrait3d"
MODEL_EXTENSIONS = {".safetensors", ".pkl", ".pth", ".pt", ".ckpt"}


def register_model_folder() -> None:
    """Register ``models/portrait3d`` (extra_model_paths.yaml entries under ``portrait3d:`` are kept)."""
    default = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    entry = folder_paths.folder_names_and_paths.get(MODEL_FOLDER)
    if entry is None:
        folder_paths.folder_names_and_paths[MODEL_FOLDER] = ([default], set(MODEL_EXTENSIONS))
        return
    paths, extensions = entry
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[MODEL_FOLDER] = (paths, set(extensions) | MODEL_EXTENSIONS)


def model_files(accept=None) -> list:
    """Files in the portrait3d model folders (relative names), optionally filtered by ``accept(name, full_path)``."""
    names = folder_paths.get_filename_list(MODEL_FOLDER)
    if accept is None:
        return names
    return [n for n in names if accept(n, folder_paths.get_full_path(MODEL_FOLDER, n))]


def model_path(name: str) -> str:
    path = folder_paths.get_full_path(MODEL_FOLDER, name)
    if path is None:
        folders = ", ".join(folder_paths.get_folder_paths(MODEL_FOLDER))
        raise FileNotFoundError(f"'{name}' is not in the portrait3d model folders ({folders}); put the file there and "
                                f"refresh the node list")
    return path


def writable_cache_dir() -> str:
    """Where converted files go when the model folder is read-only."""
    path = os.path.join(folder_paths.get_user_directory(), "portrait3d_cache")
    os.makedirs(path, exist_ok=True)
    return path


def compute_device() -> torch.device:
    """ComfyUI's compute device (CUDA when available and not --cpu)."""
    return comfy.model_management.get_torch_device()


BACKEND_ROUTE = "/portrait3d/backend"
_ROUTES = {}


def backend_report() -> dict:
    """The compute device and the sampling backends ``auto`` uses on it (the first call on CUDA compiles and runs
    the Triton check; logged once)."""
    from portrait3d_core._kernels import kernels

    if "report" not in _ROUTES:
        report = kernels.backend_report(compute_device())
        triton = f" (triton {report['triton']})" if report["trigrid_sampling"] == "triton" else ""
        why = f"; Triton not used: {report['reason']}" if report["reason"] else ""
        logging.getLogger("portrait3d").info(
            "[Portrait3D] compute device %s; tri-grid sampling backend: %s%s; nearest-triangle search: %s%s",
            report["device"], report["trigrid_sampling"], triton, report["nearest_triangle"], why)
        _ROUTES["report"] = report
    return _ROUTES["report"]


def register_routes() -> None:
    """``GET /portrait3d/backend`` → ``backend_report()`` as JSON (once per server)."""
    if _ROUTES.get("registered"):
        return
    try:
        import server as comfy_server  # ComfyUI's server module (it brings aiohttp's ``web``)
    except ImportError:  # not inside a ComfyUI server (e.g. imported by tests)
        return
    PromptServer, web = comfy_server.PromptServer, comfy_server.web
    if getattr(PromptServer, "instance", None) is None:
        return

    @PromptServer.instance.routes.get(BACKEND_ROUTE)
    async def _backend(request):
        import asyncio

        report = await asyncio.get_running_loop().run_in_executor(None, backend_report)
        return web.json_response(report)

    _ROUTES["registered"] = True


def on_compute_device(trigrid, *modules):
    """The tri-grid on the compute device (a copy if it was elsewhere); modules are moved in place."""
    device = compute_device()
    for module in modules:
        if module is not None:
            module.to(device)
    return trigrid if trigrid is None or trigrid.device == device else trigrid.to(device)


def to_storage(trigrid):
    """Tri-grids travel between nodes on ComfyUI's intermediate device (the CPU unless --gpu-only)."""
    device = comfy.model_management.intermediate_device()
    return trigrid if trigrid.device == device else trigrid.to(device)


class Progress:
    """ComfyUI progress bar over ``total`` steps; every call is also a cancel point."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(max(1, total))

    @staticmethod
    def check_cancel(*_args) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()

    def __call__(self, done: int, total: int | None = None) -> None:
        self.check_cancel()
        self.bar.update_absolute(done, total)


def provenance(hidden) -> dict:
    """ComfyUI's hidden ``prompt`` / ``extra_pnginfo`` (``cls.hidden`` of an output node) as ``{key: JSON string}``
    for the core writers, the way core SaveImage / SaveGLB embed them; {} under ``--disable-metadata``."""
    from comfy.cli_args import args

    if args.disable_metadata or hidden is None:
        return {}
    out = {}
    if hidden.prompt is not None:
        out["prompt"] = json.dumps(hidden.prompt)
    for key, value in (hidden.extra_pnginfo or {}).items():
        out[str(key)] = json.dumps(value)
    return out


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MESH_EXTENSIONS = (".glb", ".gltf", ".obj", ".ply", ".stl", ".fbx")


def output_entries(paths) -> dict:
    """UI entries ``{filename, subfolder, type: "output"}`` for files in the output folder, as core save nodes report
    them (so API clients find every file in ``/history``): meshes under ``"3d"`` (the key of core SaveGLB), images
    under ``"images"``, every other file (.mtl, .mrc, tri-grids) under ``"files"``."""
    out_dir = folder_paths.get_output_directory()
    groups = {}
    for path in paths:
        subfolder, filename = os.path.split(os.path.relpath(path, out_dir))
        ext = os.path.splitext(filename)[1].lower()
        key = "3d" if ext in MESH_EXTENSIONS else "images" if ext in IMAGE_EXTENSIONS else "files"
        groups.setdefault(key, []).append({"filename": filename, "subfolder": subfolder.replace(os.sep, "/"),
                                           "type": "output"})
    return groups


def output_relpath(path: str) -> str:
    """A file in the output folder as the ``/``-separated relative path Preview3D's ``model_file`` takes."""
    return os.path.relpath(path, folder_paths.get_output_directory()).replace(os.sep, "/")


def to_image(rgb: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` in [−1, 1] → ComfyUI IMAGE ``[B, H, W, 3]`` in [0, 1]."""
    return (rgb * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).contiguous().float().cpu()


def to_mask(x: torch.Tensor) -> torch.Tensor:
    """``[B, 1, H, W]`` → ComfyUI MASK ``[B, H, W]``."""
    return x[:, 0].contiguous().float().cpu()


def gray_to_image(x: torch.Tensor) -> torch.Tensor:
    """``[B, 1, H, W]`` in [0, 1] → IMAGE ``[B, H, W, 3]``."""
    return x.clamp(0, 1).permute(0, 2, 3, 1).repeat(1, 1, 1, 3).contiguous().float().cpu()


def parse_colour(text: str):
    """``"#RRGGBB"`` → (r, g, b) in [0, 1], or a clear error."""
    value = text.strip().lstrip("#")
    if len(value) != 6 or any(ch not in "0123456789abcdefABCDEF" for ch in value):
        raise ValueError(f"background colour {text!r} is not a #RRGGBB hex colour (e.g. #ffffff)")
    return tuple(int(value[i:i + 2], 16) / 255.0 for i in (0, 2, 4))
