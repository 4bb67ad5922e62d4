"""Score distillation (SDS) of a pyramid tri-grid with a text-conditioned diffusion model (``pipeline.md`` §5).

One iteration: draw a camera (radius 2.7, azimuth U[−180°, 180°), polar U[60°, 105°]) → render 128² at 48 + 48
samples without background → bilinear 512² → encoder (with gradients) → t ~ U{20 … 400}, ε ~ N(0, I) →
ε̂ = ε_u + 100·(ε_c − ε_u) with the view-blended text embedding → g = (1 − ᾱ_t)(ε̂ − ε) →
L = ½ Σ (z − sg(z − g))² + λ_ent(k)·entropy(ray weights) → backward → Adan over the 7 levels (ws, decoder and
ToRGB frozen). EMA of the levels once per 100 iterations; the result is the EMA (Portrait3D's ``df.pth``).

``run_sds`` checkpoints tri-grid + optimiser + EMA + RNG state + iteration atomically, so a crashed or cancelled
run resumes from its last checkpoint exactly (bit-identical on CPU for a seed).

The two switch points for faster renders: ``trainable_trigrid`` (how the optimised levels are held) and
``training_render_settings`` (how the training view is rendered).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional, Sequence

import torch

from . import cameras
from .decoder import Decoder
from .errors import CheckpointError, InvalidInputError, Portrait3DError
from .fileio import atomic_write
from .guidance import Guidance, ViewConditioning, resize_for_encoder
from .optim import (EMA, Adan, NonFiniteGradientError, adan_state_tensors, generator_state,
                    load_adan_state_tensors, set_generator_state)
from .renderer import PORTRAIT3D_RAY_START, RenderSettings, render_rays
from .trigrid import TriGrid

CHECKPOINT_NAME = "sds_checkpoint.safetensors"
CHECKPOINT_FORMAT = "portrait3d-sds-checkpoint"
PAPER_LEVEL_LRS = (1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.1)   # 5e-3 × [200, 200, 200, 200, 200, 40, 20], R = 8 … 512


class SDSDivergedError(Portrait3DError):
    """The SDS loss or gradient became NaN/inf; the last good checkpoint was kept."""


# --------------------------------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class SDSSettings:
    """Every number of the SDS stage. Defaults = ``paper()`` (Portrait3D's stage 5)."""

    iterations: int = 2000                     # 20 epochs × 100
    render_resolution: int = 128
    coarse_samples: int = 48
    fine_samples: int = 48
    encode_resolution: int = 512               # renders are resized to this before the encoder (SD1.5: 512)
    encoder: str = "vae"                       # "vae": the model's VAE; "taesd": the tiny TAESD encoder
    guidance_scale: float = 100.0
    t_min: int = 20                            # t_range [0.02, 0.4] × 1000, inclusive
    t_max: int = 400
    polar_min_deg: float = 60.0
    polar_max_deg: float = 105.0
    azimuth_min_deg: float = -180.0
    azimuth_max_deg: float = 180.0
    radius: float = cameras.RADIUS
    focal: float = cameras.DREAMFUSION_FOCAL   # fov 12.447863° with the code's 3.14159 and √2 hack → 6.484789
    lambda_entropy: float = 1e-3
    entropy_ramp: float = 0.5                  # λ_k = λ·min(1, k / (ramp·iterations)) (= 2k/2000 in the paper)
    level_lrs: tuple = PAPER_LEVEL_LRS         # aligned to the finest levels (see ``level_lrs_for``)
    betas: tuple = (0.98, 0.92, 0.99)
    eps: float = 1e-8
    weight_decay: float = 2e-5
    max_grad_norm: float = 5.0
    ema_decay: float = 0.95
    ema_interval: int = 100                    # one EMA update per "epoch" of 100 iterations
    checkpoint_interval: int = 100
    preview_interval: int = 25

    def __post_init__(self):
        if self.iterations < 1:
            raise InvalidInputError(f"iterations must be >= 1, got {self.iterations}")
        if not 0 < self.t_min <= self.t_max < 1000:
            raise InvalidInputError(f"need 0 < t_min <= t_max < 1000, got {self.t_min} … {self.t_max}")
        if self.render_resolution < 8 or self.encode_resolution < 8 or self.encode_resolution % 8:
            raise InvalidInputError(f"render resolution must be >= 8 and the encode resolution a multiple of 8, got "
                                    f"{self.render_resolution} / {self.encode_resolution}")
        if self.encoder not in ("vae", "taesd"):
            raise InvalidInputError(f"encoder must be 'vae' or 'taesd', got {self.encoder!r}")
        if not 0 <= self.polar_min_deg <= self.polar_max_deg <= 180:
            raise InvalidInputError(f"polar range must lie in [0, 180]°, got {self.polar_min_deg} … "
                                    f"{self.polar_max_deg}")
        if self.guidance_scale < 0 or self.ema_interval < 1 or self.checkpoint_interval < 1:
            raise InvalidInputError("guidance_scale must be >= 0 and the EMA/checkpoint intervals >= 1")
        if not self.level_lrs:
            raise InvalidInputError("level_lrs needs at least one learning rate")

    @classmethod
    def paper(cls, **changes) -> "SDSSettings":
        """Portrait3D's numbers (``pipeline.md`` §5)."""
        return cls(**changes)

    @classmethod
    def draft(cls, **changes) -> "SDSSettings":
        """A much cheaper schedule (see the README's SDS section for the measurements behind it): 500 iterations
        (5 EMA epochs), the TAESD encoder instead of the KL VAE, encoding at 256² (UNet 4× fewer pixels) and
        32 + 32 samples per ray. Renders and t-range, CFG, optimiser and entropy schedule are the paper's."""
        values = dict(iterations=500, encoder="taesd", encode_resolution=256, coarse_samples=32, fine_samples=32,
                      checkpoint_interval=100)
        values.update(changes)
        return cls(**values)

    @classmethod
    def preset(cls, name: str, **changes) -> "SDSSettings":
        if name == "paper":
            return cls.paper(**changes)
        if name == "draft":
            return cls.draft(**changes)
        raise InvalidInputError(f"unknown SDS preset {name!r}; use 'paper' or 'draft'")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def level_lrs_for(settings: SDSSettings, n_levels: int) -> list:
    """Per-level LRs for a pyramid of ``n_levels`` (coarse → fine), aligned to the finest level: the paper's 7
    levels get [1, 1, 1, 1, 1, 0.2, 0.1]; 4 levels (8 … 64) get [1, 1, 0.2, 0.1]; more levels repeat the first."""
    lrs = list(settings.level_lrs)
    if n_levels <= len(lrs):
        return lrs[len(lrs) - n_levels:]
    return [lrs[0]] * (n_levels - len(lrs)) + lrs


def training_render_settings(settings: SDSSettings) -> RenderSettings:
    """Renderer settings of the training view: 48 + 48 samples, rays 2.35 … 3.12, crop 0.1, random jitter."""
    return RenderSettings(ray_start=PORTRAIT3D_RAY_START, ray_end=3.12, coarse_samples=settings.coarse_samples,
                          fine_samples=settings.fine_samples)


def trainable_trigrid(trigrid: TriGrid):
    """A tri-grid whose levels are fresh leaf Parameters (copies; ws detached) → (TriGrid, [Parameter, …]).

    Copies are made here, so tensors created in ComfyUI's inference mode can join the autograd graph.
    """
    params = [torch.nn.Parameter(level.detach().clone()) for level in trigrid.levels]
    ws = None if trigrid.ws is None else trigrid.ws.detach().clone()
    return TriGrid(params, ws, trigrid.box_warp, dict(trigrid.meta)), params


def frozen_decoder(decoder: Decoder) -> Decoder:
    """A private frozen copy of the decoder set (plain tensors, even if the input was made in inference mode)."""
    copy = Decoder(decoder.config).to(next(decoder.parameters()).device)
    copy.load_state_dict({k: v.detach().clone() for k, v in decoder.state_dict().items()})
    return copy.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------- views

def view_weights(azimuth_deg: float) -> dict:
    """Text-embedding blend weights for an azimuth in [−180, 180] (``pipeline.md`` §5.4):
    |a| < 90: r·front + (1 − r)·side, r = 1 − |a|/90; otherwise r·side + (1 − r)·back, r = 1 − (|a| − 90)/90."""
    a = float(azimuth_deg)
    if not -180.0 <= a <= 180.0:
        raise InvalidInputError(f"azimuth must be in [-180, 180] degrees, got {a}")
    if -90.0 <= a < 90.0:
        r = 1.0 - abs(a) / 90.0
        return {"front": r, "side": 1.0 - r, "back": 0.0}
    r = 1.0 - (abs(a) - 90.0) / 90.0
    return {"front": 0.0, "side": r, "back": 1.0 - r}


def blended_conditioning(guidance: Guidance, conditioning: ViewConditioning, azimuth_deg: float):
    """The positive conditioning of one view: front/side or side/back blended by azimuth."""
    w = view_weights(azimuth_deg)
    if w["back"] == 0.0:
        return guidance.mix([conditioning.front, conditioning.side], [w["front"], w["side"]])
    return guidance.mix([conditioning.side, conditioning.back], [w["side"], w["back"]])


@dataclass(frozen=True)
class IterationDraws:
    """The random choices of one iteration. Tensor draws left ``None`` are drawn from the tensor generator
    (tests replay a recorded run by giving them)."""

    azimuth_deg: float
    polar_deg: float
    t: int
    depths: Optional[tuple] = None              # (coarse [1, R, N, 1], fine [1, R, n, 1])
    posterior_noise: Optional[torch.Tensor] = None
    noise: Optional[torch.Tensor] = None


def draw_iteration(settings: SDSSettings, rng: torch.Generator) -> IterationDraws:
    """Camera and timestep from the scalar generator (CPU): azimuth, polar uniform; t uniform integer."""
    u = torch.rand(2, generator=rng, dtype=torch.float64)
    azimuth = settings.azimuth_min_deg + float(u[0]) * (settings.azimuth_max_deg - settings.azimuth_min_deg)
    polar = settings.polar_min_deg + float(u[1]) * (settings.polar_max_deg - settings.polar_min_deg)
    t = int(torch.randint(settings.t_min, settings.t_max + 1, (1,), generator=rng))
    return IterationDraws(azimuth, polar, t)


def sds_rays(settings: SDSSettings, azimuth_deg: float, polar_deg: float, device, dtype=torch.float32):
    """Training rays of one camera (dreamfusion convention, unnormalised) → origins, directions ``[1, H·W, 3]``."""
    cam2world = cameras.sds_pose(azimuth_deg, polar_deg, settings.radius).to(device=device, dtype=dtype)
    return cameras.dreamfusion_rays(cam2world, settings.render_resolution, settings.focal)


# --------------------------------------------------------------------------------------------------- losses

def entropy_loss(weights: torch.Tensor) -> torch.Tensor:
    """Mean binary entropy (bits) of per-sample ray weights clamped to [1e−5, 1 − 1e−5]."""
    w = weights.clamp(1e-5, 1 - 1e-5)
    return (-w * torch.log2(w) - (1 - w) * torch.log2(1 - w)).mean()


def entropy_weight(settings: SDSSettings, iteration: int) -> float:
    """λ at 1-based ``iteration``: λ_ent·min(1, k / (ramp·iterations)) (the official step is counted before use)."""
    ramp = settings.entropy_ramp * settings.iterations
    return settings.lambda_entropy * (min(1.0, iteration / ramp) if ramp > 0 else 1.0)


def sds_gradient(eps_hat: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """g = w(t)·(ε̂ − ε), w(t) = 1 − ᾱ_t, NaNs zeroed (``pipeline.md`` §5.5). ``alpha_bar [B]``."""
    w = (1 - alpha_bar).to(eps_hat).reshape(-1, *([1] * (eps_hat.dim() - 1)))
    return torch.nan_to_num(w * (eps_hat - noise))


def sds_loss(latents: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """½ Σ (z − sg(z − g))² / B: a loss whose gradient on z is g."""
    target = (latents - grad).detach()
    return 0.5 * ((latents - target) ** 2).sum() / latents.shape[0]


# --------------------------------------------------------------------------------------------------- one step

@dataclass
class IterationResult:
    image: torch.Tensor            # [1, 3, h, h] in [0, 1] (detached)
    weights_sum: torch.Tensor      # [1, 1, h, h]
    latents: torch.Tensor          # [1, C, H/f, W/f] (detached)
    noise: torch.Tensor
    eps_hat: torch.Tensor
    grad: torch.Tensor             # the SDS gradient on the latents
    loss_sds: float
    loss_entropy: float
    lambda_entropy: float
    loss: float


@dataclass
class SDSProblem:
    """Everything fixed during a run."""

    trigrid: TriGrid               # levels = the optimised parameters
    decoder: Decoder
    guidance: Guidance
    conditioning: ViewConditioning
    settings: SDSSettings


def render_training_view(problem: SDSProblem, draws: IterationDraws, generator: Optional[torch.Generator]):
    """The training render with gradients → (image ``[1, 3, h, h]`` in [0, 1], per-sample weights, Σw)."""
    s, trigrid = problem.settings, problem.trigrid
    origins, directions = sds_rays(s, draws.azimuth_deg, draws.polar_deg, trigrid.device, trigrid.dtype)
    out = render_rays(trigrid, problem.decoder, origins, directions, training_render_settings(s),
                      generator=generator, return_weights=True, depths=draws.depths)
    h = s.render_resolution
    features = out.features.permute(0, 2, 1).reshape(1, -1, h, h)
    rgb = problem.decoder.to_rgb(features, trigrid.ws[:, -1])
    image = (0.5 * rgb + 0.5).clamp(0, 1)
    return image, out.weights, out.weight_sum.permute(0, 2, 1).reshape(1, 1, h, h)


def sds_iteration(problem: SDSProblem, iteration: int, draws: IterationDraws,
                  generator: Optional[torch.Generator] = None) -> IterationResult:
    """Forward + backward of one iteration (1-based ``iteration``); leaves the gradients on the levels."""
    s, guidance = problem.settings, problem.guidance
    image, weights, weights_sum = render_training_view(problem, draws, generator)
    latents = guidance.encode(resize_for_encoder(image, s.encode_resolution), generator, draws.posterior_noise)
    noise = draws.noise
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    noise = noise.to(latents)
    t = torch.tensor([draws.t], dtype=torch.long)
    positive = blended_conditioning(guidance, problem.conditioning, draws.azimuth_deg)
    with torch.no_grad():
        eps_hat = guidance.predict_noise(latents.detach(), noise, t, positive, problem.conditioning.negative,
                                         s.guidance_scale)
        grad = sds_gradient(eps_hat, noise, guidance.alphas_cumprod(t).to(latents.device))
    loss_sds = sds_loss(latents, grad)
    loss_ent = entropy_loss(weights)
    lam = entropy_weight(s, iteration)
    loss = loss_sds + lam * loss_ent
    loss.backward()
    return IterationResult(image.detach(), weights_sum.detach(), latents.detach(), noise, eps_hat, grad,
                           float(loss_sds.detach()), float(loss_ent.detach()), lam, float(loss.detach()))


def make_optimizer(params: Sequence[torch.nn.Parameter], settings: SDSSettings) -> Adan:
    """Adan with one group per level and the per-level LRs."""
    lrs = level_lrs_for(settings, len(params))
    return Adan([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)], betas=settings.betas, eps=settings.eps,
                weight_decay=settings.weight_decay, max_grad_norm=settings.max_grad_norm, error_if_nonfinite=True)


# --------------------------------------------------------------------------------------------------- run

@dataclass
class SDSResult:
    trigrid: TriGrid               # the EMA tri-grid (what Portrait3D's df.pth holds; stage 6 starts here)
    trigrid_last: TriGrid          # the raw parameters after the last iteration
    iterations: int                # iterations completed in total
    resumed_from: int              # 0 for a fresh run
    losses: list = field(default_factory=list)   # per iteration run in this call: (iteration, loss_sds, loss)
    checkpoint_path: Optional[str] = None


def level_names(trigrid: TriGrid) -> list:
    return [f"trigrids_{h}" if h == w else f"trigrids_{h}x{w}" for h, w in trigrid.resolutions]


def fingerprint(trigrid: TriGrid, decoder: Decoder, settings: SDSSettings, seed: int, extra: str = "") -> str:
    """A short hash of everything that determines a run (tri-grid, decoder, settings, seed, plus ``extra`` for
    the diffusion model and prompts); names the checkpoint folder and guards resumes."""
    h = hashlib.sha256()
    for t in list(trigrid.levels) + ([trigrid.ws] if trigrid.ws is not None else []):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    for k, v in sorted(decoder.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(replace(settings, checkpoint_interval=1, preview_interval=1).to_json().encode())   # cadence only
    h.update(str(int(seed)).encode())
    h.update(extra.encode())
    return h.hexdigest()[:16]


class _Run:
    """State of one run: parameters, optimiser, EMA, generators, iteration counter; saves and restores it."""

    def __init__(self, problem: SDSProblem, params, seed: int, key: str):
        self.problem, self.params, self.key = problem, params, key
        self.names = level_names(problem.trigrid)
        self.optimizer = make_optimizer(params, problem.settings)
        self.ema = EMA(params, problem.settings.ema_decay)
        device = problem.trigrid.device
        self.rng = torch.Generator().manual_seed(int(seed))                       # cameras, t (CPU)
        self.tensor_rng = torch.Generator(device=device).manual_seed(int(seed) + 1)  # jitter, posterior, ε
        self.iteration = 0

    def state(self) -> dict:
        tensors = {f"level.{n}": p.detach().cpu().contiguous() for n, p in zip(self.names, self.params)}
        tensors.update({k: v.cpu().contiguous() for k, v in adan_state_tensors(self.optimizer, self.names).items()})
        tensors.update({k: v.cpu().contiguous() for k, v in self.ema.state_tensors(self.names).items()})
        tensors["rng.scalars"] = generator_state(self.rng)
        tensors["rng.tensors"] = generator_state(self.tensor_rng)
        tensors["iteration"] = torch.tensor(self.iteration, dtype=torch.int64)
        return tensors

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        tensors = self.state()
        meta = {"format": CHECKPOINT_FORMAT, "fingerprint": self.key, "iteration": str(self.iteration),
                "settings": self.problem.settings.to_json(), "levels": ",".join(self.names)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), overwrite=True)

    def load(self, path: str) -> None:
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: unreadable SDS checkpoint ({exc}); delete it to start over") from None
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: not an SDS checkpoint")
        if meta.get("fingerprint") != self.key:
            raise CheckpointError(f"{path}: this checkpoint belongs to another run (different tri-grid, settings, "
                                  f"prompt or seed); delete it or use another checkpoint folder")
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(tensors[f"level.{n}"].to(p))
        load_adan_state_tensors(self.optimizer, self.names, tensors)
        self.ema.load_state_tensors(self.names, tensors)
        set_generator_state(self.rng, tensors["rng.scalars"])
        set_generator_state(self.tensor_rng, tensors["rng.tensors"])
        self.iteration = int(tensors["iteration"])

    def ema_trigrid(self) -> TriGrid:
        tg = self.problem.trigrid
        return TriGrid([s.detach().clone() for s in self.ema.shadow], tg.ws, tg.box_warp, dict(tg.meta))

    def last_trigrid(self) -> TriGrid:
        tg = self.problem.trigrid
        return TriGrid([p.detach().clone() for p in self.params], tg.ws, tg.box_warp, dict(tg.meta))


ProgressFn = Callable[[int, int], None]
PreviewFn = Callable[[int, torch.Tensor], None]


def run_sds(trigrid: TriGrid, decoder: Decoder, guidance: Guidance, conditioning: ViewConditioning,
            settings: SDSSettings = SDSSettings(), *, seed: int = 0, checkpoint_dir: Optional[str] = None,
            run_key: str = "", progress: Optional[ProgressFn] = None, preview: Optional[PreviewFn] = None,
            stop_after: Optional[int] = None) -> SDSResult:
    """Optimise a batch-1 tri-grid with SDS → ``SDSResult`` (EMA and raw tri-grids).

    Args:
        trigrid, decoder: the portrait and its decoder/ToRGB (frozen; copied, never modified).
        guidance, conditioning: the diffusion model and the run's view conditionings (computed once).
        seed: seeds the camera/timestep generator (CPU) and the tensor generator (on the tri-grid's device).
        checkpoint_dir: where ``sds_checkpoint.safetensors`` is written every ``checkpoint_interval`` iterations,
            when cancelled, and at the end; an existing checkpoint of the same run is resumed.
        run_key: identifies the diffusion model and prompts in the checkpoint's fingerprint.
        progress: ``progress(done, total)`` after every iteration; it may raise to cancel (the state at the end of
            the last completed iteration is checkpointed first).
        preview: ``preview(iteration, image [1, 3, h, h])`` every ``preview_interval`` iterations: the training view,
            flipped back to the GAN camera's orientation (``cameras.dreamfusion_rays`` renders mirror images).
        stop_after: stop (with a checkpoint) after this many iterations in total — for tests and staged runs.
    """
    if trigrid.batch_size != 1:
        raise InvalidInputError(f"SDS optimises one portrait at a time; got a tri-grid batch of {trigrid.batch_size} "
                                f"(select one first)")
    if trigrid.ws is None:
        raise InvalidInputError("this tri-grid has no ws; ToRGB needs ws[:, -1] (load a tri-grid file that has 'ws')")
    decoder = frozen_decoder(decoder).to(trigrid.device)
    model_trigrid, params = trainable_trigrid(trigrid)
    key = fingerprint(trigrid, decoder, settings, seed, run_key)
    problem = SDSProblem(model_trigrid, decoder, guidance, conditioning, settings)
    run = _Run(problem, params, seed, key)
    path = None
    if checkpoint_dir:
        path = os.path.join(checkpoint_dir, CHECKPOINT_NAME)
        if os.path.isfile(path):
            run.load(path)
    resumed_from = run.iteration
    last_saved = run.iteration
    total = settings.iterations
    end = total if stop_after is None else min(total, stop_after)
    losses = []

    def save():
        nonlocal last_saved
        if path and run.iteration != last_saved:
            run.save(path)
            last_saved = run.iteration

    try:
        while run.iteration < end:
            k = run.iteration + 1
            draws = draw_iteration(settings, run.rng)
            run.optimizer.zero_grad(set_to_none=True)
            result = sds_iteration(problem, k, draws, run.tensor_rng)
            if not math.isfinite(result.loss):
                raise SDSDivergedError(f"SDS diverged at iteration {k}: the loss is {result.loss}")
            try:
                run.optimizer.step()
            except NonFiniteGradientError as exc:
                raise SDSDivergedError(f"SDS diverged at iteration {k}: {exc}") from None
            run.optimizer.zero_grad(set_to_none=True)
            run.iteration = k
            if k % settings.ema_interval == 0 or k == total:
                run.ema.update()
            losses.append((k, result.loss_sds, result.loss))
            if path and (k % settings.checkpoint_interval == 0 or k == end):
                save()
            if preview is not None and (k % settings.preview_interval == 0 or k == end):
                preview(k, result.image.flip(-1))
            if progress is not None:
                progress(k, total)
    except SDSDivergedError as exc:
        where = f"the last good checkpoint (iteration {last_saved}) is kept in {path}" if path and last_saved else \
            "no checkpoint was written"
        raise SDSDivergedError(f"{exc}; {where}. Lower the guidance scale or the learning rates, or change the "
                               f"seed.") from None
    except BaseException:
        save()          # cancelled or crashed between iterations: keep the state of the last completed one
        raise
    return SDSResult(run.ema_trigrid(), run.last_trigrid(), run.iteration, resumed_from, losses, path)


# --------------------------------------------------------------------------------------------------- previews

@torch.no_grad()
def preview_views(trigrid: TriGrid, decoder: Decoder, settings: SDSSettings, views: int = 8,
                  resolution: Optional[int] = None, generator: Optional[torch.Generator] = None,
                  progress: Optional[ProgressFn] = None) -> torch.Tensor:
    """Portrait3D's validation views: polar 90°, azimuth k·360°/views → images ``[views, 3, h, h]`` in [0, 1],
    oriented like the GAN camera's images (the SDS rays' mirror image flipped back)."""
    h = int(resolution or settings.render_resolution)
    s = replace(settings, render_resolution=h)
    images = []
    for k in range(views):
        azimuth = 360.0 * k / views
        azimuth = azimuth - 360.0 if azimuth > 180 else azimuth
        problem = SDSProblem(trigrid, decoder, None, None, s)
        image, _, _ = render_training_view(problem, IterationDraws(azimuth, 90.0, 0), generator)
        images.append(image.flip(-1))
        if progress is not None:
            progress(k + 1, views)
    return torch.cat(images)
