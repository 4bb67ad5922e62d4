"""Refinement (Portrait3D stage 6, ``pipeline.md`` §6): render views → img2img clean-up → refit the tri-grid.

6a. ``view_cameras`` + ``render_views``: 7 EG3D yaws h = 2πk/7 × 3 pitches v ∈ {π/2 − 30°, π/2, π/2 + 30°}, each v
    with its own U(−5°, 5°) jitter (seeded here; unseeded numpy in the paper), radius 2.7, f ≈ 6.4848, 512² at
    96 + 96 samples with the GAN background. View index = 3·yaw_index + pitch_index. Images in [0, 1] (SD side).
6b. An ``Img2Img`` callable (ComfyUI KSampler in the nodes, diffusers in the CLI): images → cleaned images.
6c. ``refit``: all levels trainable (ws, decoder, ToRGB frozen); per iteration one view (shuffled per epoch), a
    random 256² window of its 512² ray grid, 48 + 48 samples, no background; L = 1000·mean((I − I*)²·M) with the
    predicted mask M = Σw·1.002 − 0.001 **not detached** (the loss can also fall by lowering opacity; ``detach_opacity``
    keeps the geometry's opacity out of the gradient of M); Adan lr 1.0, clip 5; 19 epochs × 21 views = 399 iterations.

Checkpoints (``refit_checkpoint.safetensors``) hold levels + Adan state + iteration; every random draw of iteration k
is seeded from (seed, k), so a resumed run is bit-identical to an uninterrupted one on the same device.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass, field
import json
from typing import Callable, Optional, Protocol

import torch

from . import cameras
from .decoder import Decoder
from .errors import CheckpointError, InvalidInputError, Portrait3DError
from .fileio import atomic_write
from .optim import Adan, NonFiniteGradientError, adan_state_tensors, load_adan_state_tensors
from .renderer import PORTRAIT3D_RAY_START, BackgroundFn, RenderSettings, render_rays
from .renderer import render_views as render_camera_views
from .trigrid import TriGrid

CHECKPOINT_NAME = "refit_checkpoint.safetensors"
VIEWS_NAME = "refine_views.safetensors"
CHECKPOINT_FORMAT = "portrait3d-refit-checkpoint"
DEFAULT_NEGATIVE = "worst quality, low quality, jpeg artifacts, blurry"


class RefitDivergedError(Portrait3DError):
    """The refit loss or gradient became NaN/inf; the last good checkpoint was kept."""


@dataclass(frozen=True)
class RefineSettings:
    """Every number of the refinement stage. Defaults = ``paper()`` (Portrait3D's stage 6)."""

    # 6a views
    yaw_count: int = 7                             # h = linspace(0, 2π, 8)[:7]
    pitch_offsets_deg: tuple = (-30.0, 0.0, 30.0)  # v = π/2 + offset (EG3D pitch; −30° = camera above)
    pitch_jitter_deg: float = 5.0                  # each view's v gets U(−5°, +5°)
    frontal_view: bool = False                     # add h = v = π/2 (the paper's set has none: nearest is 12.9° off)
    radius: float = cameras.RADIUS
    focal: float = cameras.SDS_FOCAL               # FOV_to_intrinsics(12.447863) ≈ 6.4848
    view_resolution: int = 512
    view_samples: int = 96                         # coarse; the same number of importance samples (96 + 96)
    view_background: bool = True                   # the GAN background (SDEdit sees it)
    # 6b img2img (ComfyUI KSampler / diffusers DDIM)
    img2img_steps: int = 10                        # DDIM steps below t = 200 of a 50-step grid
    denoise: float = 0.2                           # noise to t = 200 of 1000
    cfg: float = 7.5
    # 6c refit
    epochs: int = 19                               # 19 × 21 views = 399 iterations
    patch_resolution: int = 256                    # random window of the view_resolution² ray grid
    fit_samples: int = 48                          # 48 + 48, no background
    loss_scale: float = 1000.0
    detach_opacity: bool = False                   # paper: the mask is not detached
    lr: float = 1.0                                # every level
    betas: tuple = (0.98, 0.92, 0.99)
    eps: float = 1e-8
    weight_decay: float = 2e-5
    max_grad_norm: float = 5.0
    checkpoint_interval: int = 21                  # iterations (one epoch of the paper's view set)
    preview_interval: int = 21

    def __post_init__(self):
        if self.yaw_count < 1 or not self.pitch_offsets_deg:
            raise InvalidInputError("the view set needs at least one yaw and one pitch")
        if self.patch_resolution < 8 or self.view_resolution < 8:
            raise InvalidInputError(f"view and patch resolutions must be >= 8, got {self.view_resolution} / "
                                    f"{self.patch_resolution} (a patch larger than the views uses the whole view)")
        if self.epochs < 1 or self.checkpoint_interval < 1 or self.preview_interval < 1:
            raise InvalidInputError("epochs and the checkpoint/preview intervals must be >= 1")
        if not 0.0 < self.denoise <= 1.0 or self.img2img_steps < 1:
            raise InvalidInputError(f"denoise must be in (0, 1] and steps >= 1, got {self.denoise} / "
                                    f"{self.img2img_steps}")
        if self.view_samples < 2 or self.fit_samples < 2:
            raise InvalidInputError("need at least 2 samples per ray")

    @classmethod
    def paper(cls, **changes) -> "RefineSettings":
        return cls(**changes)

    @classmethod
    def draft(cls, **changes) -> "RefineSettings":
        """CPU-sized: views at 128² with 32 + 32 samples, 64² patches, 3 epochs (63 iterations); same view set,
        img2img and loss."""
        values = dict(view_resolution=128, view_samples=32, patch_resolution=64, fit_samples=32, epochs=3)
        values.update(changes)
        return cls(**values)

    @classmethod
    def preset(cls, name: str, **changes) -> "RefineSettings":
        if name == "paper":
            return cls.paper(**changes)
        if name == "draft":
            return cls.draft(**changes)
        raise InvalidInputError(f"unknown refine preset {name!r}; use 'paper' or 'draft'")

    @property
    def view_count(self) -> int:
        return self.yaw_count * len(self.pitch_offsets_deg) + (1 if self.frontal_view else 0)

    def iterations(self, views: int) -> int:
        return self.epochs * views

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


# --------------------------------------------------------------------------------------------------- 6a views

def view_angles(settings: RefineSettings, seed: int):
    """EG3D (yaw, pitch) radians of the view set → two float64 tensors ``[N]`` (index 3·yaw + pitch)."""
    rng = torch.Generator().manual_seed(int(seed))
    yaws, pitches = [], []
    for i in range(settings.yaw_count):
        for offset in settings.pitch_offsets_deg:
            jitter = (float(torch.rand(1, generator=rng, dtype=torch.float64)) * 2 - 1) * settings.pitch_jitter_deg
            yaws.append(2 * math.pi * i / settings.yaw_count)
            pitches.append(math.pi / 2 + math.radians(offset + jitter))
    if settings.frontal_view:
        yaws.append(math.pi / 2)
        pitches.append(math.pi / 2)
    return torch.tensor(yaws, dtype=torch.float64), torch.tensor(pitches, dtype=torch.float64)


def view_cameras(settings: RefineSettings, seed: int) -> torch.Tensor:
    """Camera labels ``[N, 25]`` of the view set (radius 2.7, look-at (0, 0.0649, 0), f ≈ 6.4848)."""
    yaw, pitch = view_angles(settings, seed)
    return cameras.camera_label(cameras.gan_pose(yaw, pitch, settings.radius), settings.focal)


def view_render_settings(settings: RefineSettings) -> RenderSettings:
    return RenderSettings(ray_start=PORTRAIT3D_RAY_START, ray_end=3.12, coarse_samples=settings.view_samples,
                          fine_samples=settings.view_samples)


def fit_render_settings(settings: RefineSettings) -> RenderSettings:
    return RenderSettings(ray_start=PORTRAIT3D_RAY_START, ray_end=3.12, coarse_samples=settings.fit_samples,
                          fine_samples=settings.fit_samples)


@torch.no_grad()
def render_views(trigrid: TriGrid, decoder: Decoder, camera_labels: torch.Tensor, settings: RefineSettings, *,
                 background: Optional[BackgroundFn] = None, seed: int = 0,
                 progress: Optional[Callable[[int, int], None]] = None,
                 on_chunk: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """The refinement views of a batch-1 tri-grid → images ``[N, 3, H, H]`` in [0, 1] (``image_raw``·½ + ½).

    ``background`` is the GAN background hook (``PortraitGenerator.background_hook()``); ray jitter is seeded.
    """
    _check_trigrid(trigrid)
    rng = torch.Generator(device=trigrid.device).manual_seed(int(seed) + 1)
    result = render_camera_views(trigrid, decoder, camera_labels.to(trigrid.device), settings.view_resolution,
                                 view_render_settings(settings),
                                 background=background if settings.view_background else None, generator=rng,
                                 on_chunk=on_chunk, on_view=progress)
    return (result.image * 0.5 + 0.5).clamp(0, 1).float()


# --------------------------------------------------------------------------------------------------- 6b img2img

class Img2Img(Protocol):
    """Cleans views: images ``[N, 3, H, W]`` in [0, 1] → the same shape and range (batches as memory allows)."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


# --------------------------------------------------------------------------------------------------- 6c refit

def _check_trigrid(trigrid: TriGrid) -> None:
    if trigrid.batch_size != 1:
        raise InvalidInputError(f"refinement works on one portrait at a time; got a tri-grid batch of "
                                f"{trigrid.batch_size} (select one first)")
    if trigrid.ws is None:
        raise InvalidInputError("this tri-grid has no ws; ToRGB needs ws[:, -1] (load a tri-grid file that has 'ws')")


def _iteration_rng(seed: int, iteration: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(iteration) * 7919) % (2**63 - 1))


def view_order(seed: int, epoch: int, views: int) -> list:
    """The shuffled view order of one epoch (batch 1, every view once)."""
    return torch.randperm(views, generator=_iteration_rng(seed, -1 - epoch)).tolist()


def patch_offset(seed: int, iteration: int, resolution: int, patch: int):
    """Top-left (row, col) of iteration ``iteration``'s random patch window."""
    if patch >= resolution:
        return 0, 0
    r = torch.randint(0, resolution - patch + 1, (2,), generator=_iteration_rng(seed, iteration))
    return int(r[0]), int(r[1])


def patch_rays(camera_label: torch.Tensor, resolution: int, patch: int, top: int, left: int):
    """Rays of a ``patch``² window at (top, left) of the ``resolution``² ray grid → origins, directions
    ``[1, patch², 3]``."""
    origins, directions = cameras.rays(camera_label, resolution)
    grid = lambda x: x.reshape(1, resolution, resolution, 3)[:, top:top + patch, left:left + patch]  # noqa: E731
    return grid(origins).reshape(1, -1, 3).contiguous(), grid(directions).reshape(1, -1, 3).contiguous()


def refit_loss(image: torch.Tensor, target: torch.Tensor, weight_sum: torch.Tensor, settings: RefineSettings):
    """1000·mean((I − I*)²·M), M = Σw·1.002 − 0.001 (``[1, 1, h, w]``, detached if ``detach_opacity``)."""
    mask = weight_sum * 1.002 - 0.001
    if settings.detach_opacity:
        mask = mask.detach()
    return settings.loss_scale * ((image - target) ** 2 * mask).mean()


@dataclass
class RefitResult:
    trigrid: TriGrid
    iterations: int
    resumed_from: int
    losses: list = field(default_factory=list)      # (iteration, loss) of the iterations run in this call
    checkpoint_path: Optional[str] = None


def _frozen(decoder: Decoder, device) -> Decoder:
    copy = Decoder(decoder.config).to(device)
    copy.load_state_dict({k: v.detach().clone() for k, v in decoder.state_dict().items()})
    return copy.eval().requires_grad_(False)


def fingerprint(trigrid: TriGrid, decoder: Decoder, targets: torch.Tensor, camera_labels: torch.Tensor,
                settings: RefineSettings, seed: int) -> str:
    """Hash of everything that determines a refit (guards resumes and names checkpoint folders)."""
    from dataclasses import replace

    h = hashlib.sha256()
    tensors = list(trigrid.levels) + [trigrid.ws, targets, camera_labels] + \
        [v for _, v in sorted(decoder.state_dict().items())]
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(replace(settings, checkpoint_interval=1, preview_interval=1).to_json().encode())
    h.update(str(int(seed)).encode())
    return h.hexdigest()[:16]


def _save(path, params, names, optimizer, iteration, key, settings):
    from safetensors.torch import save_file

    tensors = {f"level.{n}": p.detach().cpu().contiguous() for n, p in zip(names, params)}
    tensors.update({k: v.cpu().contiguous() for k, v in adan_state_tensors(optimizer, names).items()})
    tensors["iteration"] = torch.tensor(iteration, dtype=torch.int64)
    meta = {"format": CHECKPOINT_FORMAT, "fingerprint": key, "iteration": str(iteration),
            "settings": settings.to_json()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), overwrite=True)


def _load(path, params, names, optimizer, key) -> int:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: unreadable refit checkpoint ({exc}); delete it to start over") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a refit checkpoint; delete it or use another checkpoint path")
    if meta.get("fingerprint") != key:
        raise CheckpointError(f"{path}: this checkpoint belongs to another refit (different tri-grid, views, "
                              f"settings or seed); delete it or use another checkpoint path")
    with torch.no_grad():
        for n, p in zip(names, params):
            p.copy_(tensors[f"level.{n}"].to(p))
    load_adan_state_tensors(optimizer, names, tensors)
    return int(tensors["iteration"])


def refit(trigrid: TriGrid, decoder: Decoder, views: torch.Tensor, camera_labels: torch.Tensor,
          settings: RefineSettings = RefineSettings(), *, seed: int = 0,
          progress: Optional[Callable[[int, int], None]] = None,
          preview: Optional[Callable[[int, torch.Tensor], None]] = None,
          checkpoint_path: Optional[str] = None, stop_after: Optional[int] = None) -> RefitResult:
    """Fit a batch-1 tri-grid's levels to target ``views [N, 3, H, H]`` in [0, 1] seen from ``camera_labels
    [N, 25]`` (H = the views' size; the patch is ``settings.patch_resolution``) → ``RefitResult``.

    ``progress(done, total)`` runs after every iteration and may raise to cancel (the last completed iteration is
    checkpointed first). ``preview(iteration, patch [1, 3, p, p] in [0, 1])`` every ``preview_interval``.
    ``checkpoint_path``: resumed when it exists (same fingerprint), written every ``checkpoint_interval``
    iterations, on cancel and at the end. NaN/inf → ``RefitDivergedError``, the last good checkpoint kept.
    """
    _check_trigrid(trigrid)
    if views.dim() != 4 or views.shape[1] != 3 or views.shape[2] != views.shape[3]:
        raise InvalidInputError(f"views must be square images [N, 3, H, H], got {tuple(views.shape)}")
    if camera_labels.dim() != 2 or camera_labels.shape != (views.shape[0], 25):
        raise InvalidInputError(f"need one camera label [25] per view: {views.shape[0]} views, cameras "
                                f"{tuple(camera_labels.shape)} (connect the cameras of the same Render Views)")
    resolution, n_views = views.shape[-1], views.shape[0]
    patch = min(settings.patch_resolution, resolution)
    device = trigrid.device
    decoder = _frozen(decoder, device)
    key = fingerprint(trigrid, decoder, views, camera_labels, settings, seed)
    params = [torch.nn.Parameter(level.detach().clone()) for level in trigrid.levels]
    ws = trigrid.ws.detach().clone()
    model = TriGrid(params, ws, trigrid.box_warp, dict(trigrid.meta))
    names = [f"trigrids_{h}" if h == w else f"trigrids_{h}x{w}" for h, w in trigrid.resolutions]
    optimizer = Adan([{"params": [p], "lr": settings.lr} for p in params], betas=settings.betas, eps=settings.eps,
                     weight_decay=settings.weight_decay, max_grad_norm=settings.max_grad_norm,
                     error_if_nonfinite=True)
    targets = (views.detach().to(device=device, dtype=trigrid.dtype) * 2 - 1)
    labels = camera_labels.detach().to(device=device, dtype=trigrid.dtype)
    render_settings = fit_render_settings(settings)
    iteration = 0
    if checkpoint_path and os.path.isfile(checkpoint_path):
        iteration = _load(checkpoint_path, params, names, optimizer, key)
    resumed_from = last_saved = iteration
    total = settings.iterations(n_views)
    end = total if stop_after is None else min(total, stop_after)
    losses = []

    def save():
        nonlocal last_saved
        if checkpoint_path and iteration != last_saved:
            _save(checkpoint_path, params, names, optimizer, iteration, key, settings)
            last_saved = iteration

    try:
        while iteration < end:
            k = iteration + 1
            epoch, slot = divmod(iteration, n_views)
            view = view_order(seed, epoch, n_views)[slot]
            top, left = patch_offset(seed, k, resolution, patch)
            origins, directions = patch_rays(labels[view:view + 1], resolution, patch, top, left)
            rng = torch.Generator(device=device).manual_seed((int(seed) * 31 + k) % (2**63 - 1))
            out = render_rays(model, decoder, origins, directions, render_settings, generator=rng)
            image = decoder.to_rgb(out.features.permute(0, 2, 1).reshape(1, -1, patch, patch), ws[:, -1])
            weight_sum = out.weight_sum.permute(0, 2, 1).reshape(1, 1, patch, patch)
            target = targets[view:view + 1, :, top:top + patch, left:left + patch]
            loss = refit_loss(image, target, weight_sum, settings)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise RefitDivergedError(f"the refit diverged at iteration {k}: the loss is {value}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            try:
                optimizer.step()
            except NonFiniteGradientError as exc:
                raise RefitDivergedError(f"the refit diverged at iteration {k}: {exc}") from None
            optimizer.zero_grad(set_to_none=True)
            iteration = k
            losses.append((k, value))
            if checkpoint_path and (k % settings.checkpoint_interval == 0 or k == end):
                save()
            if preview is not None and (k % settings.preview_interval == 0 or k == end):
                preview(k, (image.detach() * 0.5 + 0.5).clamp(0, 1))
            if progress is not None:
                progress(k, total)
    except RefitDivergedError as exc:
        where = (f"the last good checkpoint (iteration {last_saved}) is kept in {checkpoint_path}"
                 if checkpoint_path and last_saved else "no checkpoint was written")
        raise RefitDivergedError(f"{exc}; {where}. Check the cleaned views for NaN/black images, or lower the "
                                 f"learning rate.") from None
    except BaseException:
        save()
        raise
    out_trigrid = TriGrid([p.detach().clone() for p in params], ws, trigrid.box_warp, dict(trigrid.meta))
    return RefitResult(out_trigrid, iteration, resumed_from, losses, checkpoint_path)


# --------------------------------------------------------------------------------------------------- all of it

@dataclass
class RefineResult:
    trigrid: TriGrid
    views: torch.Tensor            # [N, 3, H, H] rendered, [0, 1]
    cleaned: torch.Tensor          # [N, 3, H, H] after img2img, [0, 1]
    cameras: torch.Tensor          # [N, 25]
    refit: RefitResult


def refine(trigrid: TriGrid, decoder: Decoder, img2img: Img2Img, settings: RefineSettings = RefineSettings(), *,
           background: Optional[BackgroundFn] = None, seed: int = 0, checkpoint_dir: Optional[str] = None,
           progress: Optional[Callable[[int, int], None]] = None,
           preview: Optional[Callable[[int, torch.Tensor], None]] = None) -> RefineResult:
    """``render_views`` → ``img2img`` → ``refit`` with one progress count over the three phases (N + N + iterations).

    With ``checkpoint_dir`` the rendered and cleaned views are kept there (a resumed run skips both) and the refit
    checkpoints there.
    """
    labels = view_cameras(settings, seed)
    n = labels.shape[0]
    total = 2 * n + settings.iterations(n)
    report = (lambda done: progress(done, total)) if progress is not None else (lambda done: None)
    views_path = os.path.join(checkpoint_dir, VIEWS_NAME) if checkpoint_dir else None
    if views_path and os.path.isfile(views_path):
        from safetensors.torch import load_file

        saved = load_file(views_path)
        views, cleaned = saved["views"], saved["cleaned"]
        report(2 * n)
    else:
        views = render_views(trigrid, decoder, labels, settings, background=background, seed=seed,
                             progress=lambda done, _t: report(done))
        cleaned = img2img(views).float().cpu()
        if tuple(cleaned.shape) != tuple(views.shape):
            raise InvalidInputError(f"img2img returned images {tuple(cleaned.shape)} for views {tuple(views.shape)}")
        report(2 * n)
        if views_path:
            from safetensors.torch import save_file

            tensors = {"views": views.cpu().contiguous(), "cleaned": cleaned.contiguous(), "cameras": labels}
            atomic_write(views_path, lambda tmp: save_file(tensors, tmp), overwrite=True)
    result = refit(trigrid, decoder, cleaned, labels, settings, seed=seed,
                   progress=lambda done, _t: report(2 * n + done), preview=preview,
                   checkpoint_path=os.path.join(checkpoint_dir, CHECKPOINT_NAME) if checkpoint_dir else None)
    return RefineResult(result.trigrid, views.cpu(), cleaned, labels, result)
