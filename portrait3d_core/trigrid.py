"""``TriGrid``: the pyramid tri-grid of a portrait, and its files.

A level is ``[B, 3, 36, H, W]`` = 3 planes × (12 features × 3 depth slices, channel ``3·c + d``), as stored in the
official files (``portrait_gan.md`` §1). The released model has 7 square levels, R = 8 … 512. ``ws``
``[B, num_ws, w_dim]`` carries the styles (ToRGB uses ``ws[:, -1]``, the GAN background ``ws[:, :12]``).

Files read: official ``trigrid.pkl`` / ``inversion_trigrid.pkl`` (plain pickle, through the restricted unpickler),
``df.pth``, ``epoch_*.pth`` and gallery ``*_pyramid_trigrid.pth`` (``{'model': {'trigrids_8', …, 'ws'}}``), and our
safetensors format (same key names ``trigrids_<R>`` / ``trigrids_<H>x<W>`` and ``ws``, plus metadata).

Metadata of our files (all strings): ``format``, ``format_version``, ``box_warp``, then ``meta`` — ``description``
(the user's text about the portrait), ``source`` — and the provenance ``prompt`` / ``workflow`` (ComfyUI's API and
editor graphs as JSON, which the ComfyUI editor loads when the file is dropped on it).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from . import checkpoints
from ._kernels import kernels
from .errors import CheckpointError, InvalidInputError
from .fileio import PROVENANCE_KEYS, atomic_write

CHANNELS = 36
DEPTH = 3
BOX_WARP = 0.7
FORMAT_NAME = "portrait3d-trigrid"
FORMAT_VERSION = "1"
PER_ITEM_META = ("seed",)    # meta of a batch that holds one comma-separated value per item
_LEVEL_KEY = re.compile(r"^trigrids_(\d+)(?:x(\d+))?$")


@dataclass(eq=False)
class TriGrid:
    """Pyramid tri-grid. Treated as immutable: optimisation stages build new instances."""

    levels: list
    ws: Optional[torch.Tensor] = None
    box_warp: float = BOX_WARP
    meta: dict = field(default_factory=dict)
    _kernel_cache: Optional[list] = field(default=None, init=False, repr=False)
    _kernel_cache_versions: Optional[tuple] = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.levels = list(self.levels)
        if not self.levels:
            raise InvalidInputError("a tri-grid needs at least one level")
        first = self.levels[0]
        for i, level in enumerate(self.levels):
            if not torch.is_tensor(level) or level.dim() != 5 or level.shape[1] != 3:
                shape = tuple(level.shape) if torch.is_tensor(level) else type(level).__name__
                raise InvalidInputError(f"tri-grid level {i} has shape {shape}; expected [B, 3, 36, H, W]")
            if level.shape[2] != first.shape[2] or level.shape[2] % DEPTH:
                raise InvalidInputError(f"tri-grid level {i} has {level.shape[2]} channels; every level needs the "
                                        f"same multiple of {DEPTH} (36 in the released model)")
            if level.shape[0] != first.shape[0]:
                raise InvalidInputError(f"tri-grid level {i} has batch {level.shape[0]}, level 0 has {first.shape[0]}")
            if level.dtype != first.dtype or level.device != first.device:
                raise InvalidInputError("all tri-grid levels must share one dtype and device")
        if self.ws is not None:
            if self.ws.dim() != 3 or self.ws.shape[0] != first.shape[0]:
                raise InvalidInputError(f"ws must be [B, num_ws, w_dim] with B = {first.shape[0]}, "
                                        f"got {tuple(self.ws.shape)}")
        if not (self.box_warp > 0):
            raise InvalidInputError(f"box_warp must be positive, got {self.box_warp}")

    # ---------------------------------------------------------------------------------------------- properties
    @property
    def batch_size(self) -> int:
        return self.levels[0].shape[0]

    @property
    def resolutions(self) -> list:
        """``[(H, W), …]`` per level."""
        return [tuple(level.shape[-2:]) for level in self.levels]

    @property
    def features(self) -> int:
        """Feature channels per sample (12 in the released model)."""
        return self.levels[0].shape[2] // DEPTH

    @property
    def dtype(self) -> torch.dtype:
        return self.levels[0].dtype

    @property
    def device(self) -> torch.device:
        return self.levels[0].device

    def describe(self) -> str:
        sizes = ", ".join(f"{h}" if h == w else f"{h}x{w}" for h, w in self.resolutions)
        ws = "no ws" if self.ws is None else f"ws {tuple(self.ws.shape[1:])}"
        return f"TriGrid(batch {self.batch_size}, levels [{sizes}], {ws}, box_warp {self.box_warp})"

    # ---------------------------------------------------------------------------------------------- ops
    def kernel_levels(self) -> list:
        """Levels in the kernels' layout ``[B, 3, H, W, 3, 12]``; cached unless they carry gradients (and
        rebuilt after an in-place change of a level)."""
        needs_grad = torch.is_grad_enabled() and any(level.requires_grad for level in self.levels)
        if needs_grad:
            return [kernels.to_kernel_layout(level, DEPTH) for level in self.levels]
        versions = tuple(None if level.is_inference() else level._version for level in self.levels)
        if self._kernel_cache is None or versions != self._kernel_cache_versions:
            self._kernel_cache_versions = versions
            with torch.no_grad():
                self._kernel_cache = [kernels.to_kernel_layout(level, DEPTH) for level in self.levels]
        return self._kernel_cache

    def sample(self, points: torch.Tensor, *, kernel_levels=None, backend: str = "auto") -> torch.Tensor:
        """World points ``[B, M, 3]`` → features ``[B, M, 12]`` (mean over levels, then planes)."""
        levels = self.kernel_levels() if kernel_levels is None else kernel_levels
        coords = points * (2.0 / self.box_warp)
        return kernels.sample_trigrid(levels, coords, layout="kernel", backend=backend)

    def to(self, device=None, dtype=None) -> "TriGrid":
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return TriGrid([move(level) for level in self.levels], move(self.ws), self.box_warp, dict(self.meta))

    def detach(self) -> "TriGrid":
        return TriGrid([level.detach() for level in self.levels], None if self.ws is None else self.ws.detach(),
                       self.box_warp, dict(self.meta))

    def select(self, index: int) -> "TriGrid":
        """One sample of the batch as a batch-1 tri-grid (per-item meta such as ``seed="3,4"`` narrowed to it)."""
        sl = slice(index, index + 1)
        meta = dict(self.meta)
        for key in PER_ITEM_META:
            parts = str(meta.get(key, "")).split(",")
            if self.batch_size > 1 and len(parts) == self.batch_size:
                meta[key] = parts[index]
        return TriGrid([level[sl] for level in self.levels], None if self.ws is None else self.ws[sl],
                       self.box_warp, meta)

    # ---------------------------------------------------------------------------------------------- files
    def state_dict(self) -> dict:
        """Official key names: ``trigrids_<R>`` (``trigrids_<H>x<W>`` when not square) and ``ws``."""
        out = {}
        for level in self.levels:
            h, w = level.shape[-2:]
            key = f"trigrids_{h}" if h == w else f"trigrids_{h}x{w}"
            if key in out:
                raise InvalidInputError(f"two levels share the size {h}x{w}; cannot name them in a file")
            out[key] = level.detach().contiguous()
        if self.ws is not None:
            out["ws"] = self.ws.detach().contiguous()
        return out

    def save(self, path: str, *, overwrite: bool = False, provenance: Optional[dict] = None) -> str:
        """Write our safetensors format atomically (never replaces an existing file unless ``overwrite``).

        ``provenance`` ({key: str}, e.g. ComfyUI's ``prompt`` / ``workflow`` JSON) replaces any provenance the
        tri-grid carried from an earlier file.
        """
        from safetensors.torch import save_file

        tensors = {k: v.cpu() for k, v in self.state_dict().items()}
        meta = {str(k): str(v) for k, v in self.meta.items()}
        if provenance:
            for key in PROVENANCE_KEYS:
                meta.pop(key, None)
            meta.update({str(k): str(v) for k, v in provenance.items()})
        meta.update(format=FORMAT_NAME, format_version=FORMAT_VERSION, box_warp=repr(float(self.box_warp)))
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), overwrite=overwrite)


def _sort_key(key: str):
    m = _LEVEL_KEY.match(key)
    h = int(m.group(1))
    return (h * int(m.group(2) or h), h)


def trigrid_from_state(state: dict, *, source: str = "tri-grid", box_warp: float = BOX_WARP,
                       meta: Optional[dict] = None) -> TriGrid:
    """Build from a dict with ``trigrids_*`` keys (and optionally ``ws``); ``{'model': {...}}`` is unwrapped."""
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: expected a dict of tensors with 'trigrids_8' … 'trigrids_512' and 'ws', "
                              f"found {type(state).__name__}")
    keys = sorted((k for k in state if isinstance(k, str) and _LEVEL_KEY.match(k)), key=_sort_key)
    if not keys:
        found = ", ".join(list(map(str, state))[:6]) or "nothing"
        raise CheckpointError(f"{source}: not a pyramid tri-grid file: no 'trigrids_<R>' tensors (found {found}). "
                              f"Expected an official trigrid.pkl / df.pth / epoch_*.pth / *_pyramid_trigrid.pth or "
                              f"a Portrait3D .safetensors tri-grid.")
    levels = []
    for key in keys:
        value = state[key]
        if not torch.is_tensor(value) or value.dim() != 5 or value.shape[1:3] != (3, CHANNELS):
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise CheckpointError(f"{source}: '{key}' has shape {shape}; expected [B, 3, {CHANNELS}, R, R]")
        m = _LEVEL_KEY.match(key)
        h, w = int(m.group(1)), int(m.group(2) or m.group(1))
        if tuple(value.shape[-2:]) != (h, w):
            raise CheckpointError(f"{source}: '{key}' has spatial size {tuple(value.shape[-2:])}, expected ({h}, {w})")
        levels.append(value.detach().float().contiguous())
    ws = state.get("ws")
    if ws is not None:
        if not torch.is_tensor(ws) or ws.dim() != 3:
            raise CheckpointError(f"{source}: 'ws' must be a [B, num_ws, w_dim] tensor")
        ws = ws.detach().float().contiguous()
    for key, tensor in zip(keys + (["ws"] if ws is not None else []), levels + ([ws] if ws is not None else [])):
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{source}: '{key}' contains NaN or inf values; the file is corrupted")
    try:
        return TriGrid(levels, ws, box_warp, dict(meta or {}))
    except InvalidInputError as exc:
        raise CheckpointError(f"{source}: {exc}") from None


def load_trigrid(path: str) -> TriGrid:
    """Read any supported tri-grid file (format detected from the content, not the name)."""
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise CheckpointError(f"{source}: tri-grid file not found")
    if os.path.getsize(source) == 0:
        raise CheckpointError(f"{source}: the file is empty")
    if checkpoints.is_safetensors(source):
        from safetensors import safe_open
        from safetensors import SafetensorError

        try:
            with safe_open(source, framework="pt") as fh:
                meta = fh.metadata() or {}
                state = {k: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{source}: broken safetensors file ({exc})") from None
        box_warp = float(meta.get("box_warp", BOX_WARP))
        extra = _upgrade_meta({k: v for k, v in meta.items() if k not in ("format", "format_version", "box_warp")})
        return trigrid_from_state(state, source=source, box_warp=box_warp, meta=extra)
    state = checkpoints.load_any(source, checkpoints.TENSOR_ONLY)
    return trigrid_from_state(state, source=source, meta={"source": os.path.basename(source)})


def _upgrade_meta(meta: dict) -> dict:
    """Earlier files kept the user's text as ``prompt``, the key that now holds ComfyUI's API graph (JSON)."""
    text = meta.get("prompt")
    if text is not None and "description" not in meta:
        try:
            graph = json.loads(text)
        except ValueError:
            graph = None
        if not isinstance(graph, dict):
            meta = dict(meta)
            meta["description"] = meta.pop("prompt")
    return meta


def read_metadata(path: str) -> dict:
    """Metadata of one of our safetensors tri-grids ({} for official files)."""
    if not checkpoints.is_safetensors(path):
        return {}
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    return header.get("__metadata__", {})


def stack(trigrids: Sequence[TriGrid]) -> TriGrid:
    """Concatenate batch-compatible tri-grids along the batch dimension."""
    first = trigrids[0]
    if any(t.resolutions != first.resolutions or t.box_warp != first.box_warp for t in trigrids):
        raise InvalidInputError("tri-grids with different level sizes or box_warp cannot be batched")
    ws = None if first.ws is None else torch.cat([t.ws for t in trigrids])
    return TriGrid([torch.cat(ls) for ls in zip(*(t.levels for t in trigrids))], ws, first.box_warp, dict(first.meta))
