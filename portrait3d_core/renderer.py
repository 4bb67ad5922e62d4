"""Volume rendering of a pyramid tri-grid (EG3D ``ImportanceRenderer`` + ``MipRayMarcher2`` semantics).

Per ray: stratified coarse depths → decode → crop → march → importance depths from the smoothed coarse weights
(no gradient) → decode → merge and sort → march. ``portrait_gan.md`` §4, §6. Rays are processed in chunks so a
512² render at 96 + 96 samples stays within a few hundred MB (inference) whatever the resolution.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import cameras
from .decoder import Decoder
from .errors import InvalidInputError
from .occupancy import OccupancyGrid, OccupancySettings, occupancy_for
from .trigrid import TriGrid

MODEL_RAY_START = 2.3850000000000002   # the released model's rendering_kwargs (2.25 + 0.45·(1 − 0.7))
MODEL_RAY_END = 3.12
PORTRAIT3D_RAY_START = 2.35            # every Portrait3D stage overrides ray_start to this
CROPPED_SIGMA = -1000.0


@dataclass(frozen=True)
class RenderSettings:
    """Sampling settings. Defaults are the model config's (48 + 48 samples, ray range 2.385 … 3.12)."""

    ray_start: float = MODEL_RAY_START
    ray_end: float = MODEL_RAY_END
    coarse_samples: int = 48
    fine_samples: int = 48
    deterministic: bool = False        # zero jitter + det=True inverse CDF (reproduces the official samples)
    crop: Optional[float] = 0.1        # triplane_crop as a fraction of box_warp; None disables the crop
    chunk_samples: int = 1 << 19       # samples per chunk (rays per chunk = this // samples per ray)
    grad_chunk_samples: int = 1 << 21  # the same with autograd on (its saved tensors dominate memory anyway;
                                       # fewer chunks = fewer full-size tri-grid gradients to zero and add)
    backend: str = "auto"              # tri-grid sampling backend (see ``kernels.sample_trigrid``)
    # ``fast`` mode (opt-in; never in oracle tests): occupancy-grid empty-space skipping, early ray termination,
    # importance samples only on rays that hit. Equal to the exact render to PSNR >= 40 dB (README, render section).
    fast: bool = False
    occupancy: OccupancySettings = OccupancySettings()
    stop_transmittance: float = 1e-3   # a ray stops once its transmittance falls below this
    fast_block: int = 8                # coarse samples per early-termination step

    def __post_init__(self):
        if not (self.ray_end > self.ray_start > 0):
            raise InvalidInputError(f"need 0 < ray_start < ray_end, got {self.ray_start} … {self.ray_end}")
        if self.coarse_samples < 2 or self.fine_samples < 0:
            raise InvalidInputError("need at least 2 coarse samples and a non-negative number of fine samples")
        if not (0 <= self.stop_transmittance < 1) or self.fast_block < 1:
            raise InvalidInputError("need 0 <= stop_transmittance < 1 and fast_block >= 1")

    def portrait3d(self, **changes) -> "RenderSettings":
        """These settings with Portrait3D's ray_start 2.35 (plus any other changes)."""
        return replace(self, ray_start=PORTRAIT3D_RAY_START, **changes)


@dataclass
class RayOutput:
    features: torch.Tensor           # [B, R, C] composited decoder features
    depth: torch.Tensor              # [B, R, 1] expected depth (distance along the unit ray)
    weight_sum: torch.Tensor         # [B, R, 1] opacity Σw
    weights: Optional[torch.Tensor] = None   # [B, R, S-1, 1] per-interval weights (when asked for)


@dataclass
class RenderResult:
    image: torch.Tensor              # [B, 3, H, W] torgb output, nominally [-1, 1] (official ``image_raw``)
    features: torch.Tensor           # [B, 32, H, W] after background compositing (input to torgb / SR)
    features_raw: torch.Tensor       # [B, 32, H, W] before background compositing
    depth: torch.Tensor              # [B, 1, H, W]
    weight_sum: torch.Tensor         # [B, 1, H, W]
    background: Optional[torch.Tensor] = None  # [B, 32, H, W] background features, when composited

    @property
    def mask(self) -> torch.Tensor:
        """Official ``image_mask`` = Σw·1.002 − 0.001, ``[B, 1, H, W]``."""
        return self.weight_sum * 1.002 - 0.001


# --------------------------------------------------------------------------------------------------- samples

def stratified_depths(batch: int, n_rays: int, settings: RenderSettings, device, dtype=torch.float32,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Coarse depths ``[B, R, N, 1]``: linspace(start, end, N) + U[0, 1)·(end − start)/(N − 1) (no jitter if det)."""
    n = settings.coarse_samples
    depths = torch.linspace(settings.ray_start, settings.ray_end, n, device=device, dtype=dtype)
    depths = depths.reshape(1, 1, n, 1).repeat(batch, n_rays, 1, 1)
    if not settings.deterministic:
        delta = (settings.ray_end - settings.ray_start) / (n - 1)
        depths = depths + torch.rand(depths.shape, generator=generator, device=device, dtype=dtype) * delta
    return depths


def _sample_pdf(bins: torch.Tensor, weights: torch.Tensor, n: int, deterministic: bool,
                generator: Optional[torch.Generator], eps: float = 1e-5) -> torch.Tensor:
    """Inverse-CDF sampling. bins ``[R, K+2]``, weights ``[R, K]`` → ``[R, n]`` (EG3D ``sample_pdf``)."""
    n_rays, n_bins = weights.shape
    weights = weights + eps
    pdf = weights / weights.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, -1)], -1)
    if deterministic:
        u = torch.linspace(0, 1, n, device=bins.device, dtype=bins.dtype).expand(n_rays, n).contiguous()
    else:
        u = torch.rand(n_rays, n, generator=generator, device=bins.device, dtype=bins.dtype)
    inds = torch.searchsorted(cdf, u, right=True)
    below = (inds - 1).clamp_min(0)
    above = inds.clamp_max(n_bins)
    idx = torch.stack([below, above], -1).reshape(n_rays, 2 * n)
    cdf_g = torch.gather(cdf, 1, idx).reshape(n_rays, n, 2)
    bins_g = torch.gather(bins, 1, idx).reshape(n_rays, n, 2)
    denom = cdf_g[..., 1] - cdf_g[..., 0]
    denom = torch.where(denom < eps, torch.ones_like(denom), denom)
    return bins_g[..., 0] + (u - cdf_g[..., 0]) / denom * (bins_g[..., 1] - bins_g[..., 0])


@torch.no_grad()
def importance_depths(depths: torch.Tensor, weights: torch.Tensor, n: int, deterministic: bool = False,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Fine depths ``[B, R, n, 1]`` from coarse depths ``[B, R, S, 1]`` and weights ``[B, R, S-1, 1]`` (no grad)."""
    b, r, s, _ = depths.shape
    z = depths.reshape(b * r, s)
    w = weights.reshape(b * r, 1, -1).float()
    w = F.max_pool1d(w, 2, 1, padding=1)
    w = F.avg_pool1d(w, 2, 1).reshape(b * r, -1).to(z.dtype) + 0.01
    mids = 0.5 * (z[:, :-1] + z[:, 1:])
    return _sample_pdf(mids, w[:, 1:-1], n, deterministic, generator).reshape(b, r, n, 1)


def march(colors: torch.Tensor, densities: torch.Tensor, depths: torch.Tensor, depth_range: Optional[tuple] = None):
    """MipRayMarcher2. colors ``[B, R, S, C]``, raw densities ``[B, R, S, 1]``, sorted depths ``[B, R, S, 1]`` →
    (features ``[B, R, C]``, depth ``[B, R, 1]``, weights ``[B, R, S-1, 1]``). The depth is clamped to
    ``depth_range`` (default: the depths' min … max)."""
    deltas = depths[:, :, 1:] - depths[:, :, :-1]
    colors_mid = (colors[:, :, :-1] + colors[:, :, 1:]) / 2
    densities_mid = F.softplus((densities[:, :, :-1] + densities[:, :, 1:]) / 2 - 1)
    depths_mid = (depths[:, :, :-1] + depths[:, :, 1:]) / 2
    alpha = 1 - torch.exp(-densities_mid * deltas)
    shifted = torch.cat([torch.ones_like(alpha[:, :, :1]), 1 - alpha + 1e-10], -2)
    weights = alpha * torch.cumprod(shifted, -2)[:, :, :-1]
    features = torch.sum(weights * colors_mid, -2)
    weight_total = weights.sum(2)
    depth = torch.sum(weights * depths_mid, -2) / weight_total
    depth = torch.nan_to_num(depth, float("inf"))
    lo, hi = (torch.min(depths), torch.max(depths)) if depth_range is None else depth_range
    depth = torch.clamp(depth, lo, hi)
    return features, depth, weights


# --------------------------------------------------------------------------------------------------- queries

def crop_mask(points: torch.Tensor, box_warp: float, crop: Optional[float]) -> Optional[torch.Tensor]:
    """``[B, N, 3]`` → bool ``[B, N, 1]``, True where a sample is cropped (|x| or |z| > box/2 − crop·box)."""
    if crop is None:
        return None
    limit = box_warp / 2 - crop * box_warp
    return ((points[..., 0].abs() > limit) | (points[..., 2].abs() > limit)).unsqueeze(-1)


DeformFn = Callable[[torch.Tensor], torch.Tensor]


def query(trigrid: TriGrid, decoder: Decoder, points: torch.Tensor, *, crop: Optional[float] = 0.1,
          kernel_levels=None, backend: str = "auto", deform: Optional[DeformFn] = None):
    """World points ``[B, N, 3]`` → (raw σ ``[B, N, 1]`` with cropped samples at −1000, features ``[B, N, 32]``).

    ``deform(points) -> points`` (posed rendering: posed → canonical warp) moves the points before the lookup and
    the crop test.
    """
    if deform is not None:
        points = deform(points)
    sampled = trigrid.sample(points, kernel_levels=kernel_levels, backend=backend)
    sigma, feats = decoder(sampled)
    mask = crop_mask(points, trigrid.box_warp, crop)
    if mask is not None:
        sigma = sigma.masked_fill(mask, CROPPED_SIGMA)
    return sigma, feats


def density(trigrid: TriGrid, decoder: Decoder, points: torch.Tensor, *, crop: Optional[float] = 0.1,
            backend: str = "auto") -> torch.Tensor:
    """Volume density softplus(σ − 1) at world points ``[B, N, 3]`` → ``[B, N, 1]`` (0 where cropped)."""
    sigma, _ = query(trigrid, decoder, points, crop=crop, backend=backend)
    return F.softplus(sigma - 1)


# --------------------------------------------------------------------------------------------------- rays

def _render_chunk(trigrid, decoder, levels, origins, directions, settings, generator, want_weights, depths=None,
                  deform=None):
    b, r, _ = origins.shape

    def run(depths):
        s = depths.shape[2]
        points = (origins.unsqueeze(-2) + depths * directions.unsqueeze(-2)).reshape(b, r * s, 3)
        sigma, feats = query(trigrid, decoder, points, crop=settings.crop, kernel_levels=levels,
                             backend=settings.backend, deform=deform)
        return feats.reshape(b, r, s, -1), sigma.reshape(b, r, s, 1)

    if depths is None:
        depths_c = stratified_depths(b, r, settings, origins.device, origins.dtype, generator)
    else:
        depths_c = depths[0]
    colors_c, sigma_c = run(depths_c)
    if settings.fine_samples > 0:
        if depths is None:
            _, _, weights_c = march(colors_c, sigma_c, depths_c)
            depths_f = importance_depths(depths_c, weights_c, settings.fine_samples, settings.deterministic,
                                         generator)
        else:
            depths_f = depths[1]
        colors_f, sigma_f = run(depths_f)
        depths = torch.cat([depths_c, depths_f], -2)
        colors = torch.cat([colors_c, colors_f], -2)
        sigmas = torch.cat([sigma_c, sigma_f], -2)
        depths, order = torch.sort(depths, dim=-2)
        colors = torch.gather(colors, -2, order.expand(-1, -1, -1, colors.shape[-1]))
        sigmas = torch.gather(sigmas, -2, order)
    else:
        depths, colors, sigmas = depths_c, colors_c, sigma_c
    features, depth, weights = march(colors, sigmas, depths)
    return RayOutput(features, depth, weights.sum(2), weights if want_weights else None)


def _transmittance(sigma: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
    """Raw σ ``[H, S]`` and depths ``[H, S]`` → transmittance before each sample ``[H, S]`` (the marcher's)."""
    density = F.softplus((sigma[:, :-1] + sigma[:, 1:]) / 2 - 1)
    keep = torch.exp(-density * (depths[:, 1:] - depths[:, :-1])) + 1e-10
    return torch.cat([torch.ones_like(keep[:, :1]), torch.cumprod(keep, -1)], -1)


def _assemble(n_rows: int, pieces: list, channels: int, fill: float, like: torch.Tensor) -> torch.Tensor:
    """Rows ``[n_rows, channels]`` holding the evaluated values of ``pieces`` = [(row index, values)], ``fill``
    elsewhere (differentiable w.r.t. the values)."""
    out = like.new_full((n_rows, channels), fill)
    if not pieces:
        return out
    index = torch.cat([p[0] for p in pieces])
    return out.index_put((index,), torch.cat([p[1] for p in pieces]))


def _fast_chunk(trigrid, decoder, levels, grid: OccupancyGrid, origins, directions, settings, generator,
                want_weights, depths=None, deform=None) -> RayOutput:
    """``fast`` mode for one chunk of rays ``[B, R, 3]``: only samples in occupied cells, before the ray's
    transmittance falls below ``settings.stop_transmittance``, and only on rays with an occupied coarse sample
    ("hit") are decoded; the others count as empty (σ = −1000). Same depth draws as the exact path.

    The coarse pass runs in steps of ``fast_block`` samples without autograd (it only decides what to evaluate).
    With autograd on, every evaluated coarse and fine sample of an item is then decoded again in ONE tri-grid
    lookup, so the backward pass builds one tri-grid gradient per item, not one per step.
    """
    b, r, _ = origins.shape
    n_c, n_f, block = settings.coarse_samples, settings.fine_samples, settings.fast_block
    n_feat = decoder.config.out_features
    stop = settings.stop_transmittance
    grad = torch.is_grad_enabled()

    def points_of(d):
        p = origins.unsqueeze(-2) + d * directions.unsqueeze(-2)
        return p if deform is None else deform(p.reshape(b, -1, 3)).reshape(p.shape)

    def evaluate(i, p):
        item_levels = levels if b == 1 else [level[i:i + 1] for level in levels]
        sigma, feats = query(trigrid, decoder, p.unsqueeze(0), crop=settings.crop, kernel_levels=item_levels,
                             backend=settings.backend)
        return sigma[0], feats[0]

    depths_c = stratified_depths(b, r, settings, origins.device, origins.dtype, generator) if depths is None \
        else depths[0]
    with torch.no_grad():
        pts_c = points_of(depths_c)
        occ_c = grid.lookup(pts_c.reshape(b, -1, 3)).reshape(b, r, n_c)
    hit = occ_c.any(-1)
    items = []
    for i in range(b):                                   # coarse pass, no autograd
        rays = hit[i].nonzero()[:, 0]
        occ, z_c = occ_c[i, rays], depths_c[i, rays, :, 0]
        sig = z_c.new_full((rays.numel(), n_c), CROPPED_SIGMA)
        evaluated = torch.zeros_like(occ)
        alive = torch.ones(rays.numel(), dtype=torch.bool, device=origins.device)
        feats_c = None if grad else z_c.new_zeros(rays.numel(), n_c, n_feat)
        with torch.no_grad():
            for s0 in range(0, n_c, block):
                s1 = min(n_c, s0 + block)
                ev = occ[:, s0:s1] & alive[:, None]
                hr, hs = ev.nonzero(as_tuple=True)
                if hr.numel():
                    sigma, feats = evaluate(i, pts_c[i, rays[hr], s0 + hs])
                    sig[hr, s0 + hs] = sigma[:, 0]
                    if feats_c is not None:
                        feats_c[hr, s0 + hs] = feats
                    evaluated[:, s0:s1] = ev
                if s1 < n_c and stop > 0:
                    alive &= _transmittance(sig[:, :s1], z_c[:, :s1])[:, -1] > stop
                    if not bool(alive.any()):
                        break
        items.append(dict(rays=rays, sig=sig, feats_c=feats_c, evaluated_c=evaluated))

    lo, hi = depths_c.min(), depths_c.max()
    if n_f > 0:
        if depths is None:
            weights_c = depths_c.new_zeros(b, r, n_c - 1, 1)
            with torch.no_grad():
                for i, item in enumerate(items):
                    z_c = depths_c[i, item["rays"], :, 0]
                    t = _transmittance(item["sig"], z_c)
                    alpha = 1 - torch.exp(-F.softplus((item["sig"][:, :-1] + item["sig"][:, 1:]) / 2 - 1)
                                          * (z_c[:, 1:] - z_c[:, :-1]))
                    weights_c[i, item["rays"], :, 0] = alpha * t[:, :-1]
            depths_f = importance_depths(depths_c, weights_c, n_f, settings.deterministic, generator)
        else:
            depths_f = depths[1]
        hi = torch.maximum(hi, depths_f.max())
        with torch.no_grad():
            pts_f = points_of(depths_f)
            occ_f = grid.lookup(pts_f.reshape(b, -1, 3)).reshape(b, r, n_f)
        far = 2 * hi + 1
    out_feat = origins.new_zeros(b, r, n_feat)
    out_depth = hi.expand(b, r, 1).clone()
    out_wsum = origins.new_zeros(b, r, 1)
    out_weights = origins.new_zeros(b, r, n_c + n_f - 1, 1) if want_weights else None
    rows = []
    for i, item in enumerate(items):
        rays = item["rays"]
        n_hit = rays.numel()
        if n_hit == 0:
            continue
        z_c = depths_c[i, rays]
        hr_c, hs_c = item["evaluated_c"].nonzero(as_tuple=True)
        if n_f > 0:
            z_f = depths_f[i, rays, :, 0]
            with torch.no_grad():
                ev_f = occ_f[i, rays]
                if stop > 0:
                    live_c = _transmittance(item["sig"], z_c[..., 0]) > stop
                    before = torch.searchsorted(z_c[..., 0].contiguous(), z_f.contiguous(), right=True) - 1
                    ev_f = ev_f & torch.gather(live_c, 1, before.clamp_min(0))
            hr_f, hs_f = ev_f.nonzero(as_tuple=True)
            points = [pts_c[i, rays[hr_c], hs_c], pts_f[i, rays[hr_f], hs_f]]
        else:
            points = [pts_c[i, rays[hr_c], hs_c]]
        if grad:                                         # one differentiable lookup of every evaluated sample
            sigma, feats = evaluate(i, torch.cat(points))
            k = hr_c.numel()
            sigma_c = _assemble(n_hit * n_c, [(hr_c * n_c + hs_c, sigma[:k])], 1, CROPPED_SIGMA, z_c)
            colors_c = _assemble(n_hit * n_c, [(hr_c * n_c + hs_c, feats[:k])], n_feat, 0.0, z_c)
            sigma_c, colors_c = sigma_c.reshape(n_hit, n_c, 1), colors_c.reshape(n_hit, n_c, n_feat)
            sigma, feats = sigma[k:], feats[k:]
        else:
            sigma_c, colors_c = item["sig"].unsqueeze(-1), item["feats_c"]
            if n_f > 0 and hr_f.numel():
                sigma, feats = evaluate(i, points[1])
        if n_f > 0:
            pieces = [(hr_f * n_f + hs_f, sigma)] if hr_f.numel() else []
            fpieces = [(hr_f * n_f + hs_f, feats)] if hr_f.numel() else []
            sigma_f = _assemble(n_hit * n_f, pieces, 1, CROPPED_SIGMA, z_f).reshape(n_hit, n_f, 1)
            colors_f = _assemble(n_hit * n_f, fpieces, n_feat, 0.0, z_f).reshape(n_hit, n_f, n_feat)
            z_f = torch.where(ev_f, z_f, far).unsqueeze(-1)          # skipped fine samples sort past the end
            z_all, order = torch.sort(torch.cat([z_c, z_f], -2), dim=-2)
            colors = torch.gather(torch.cat([colors_c, colors_f], -2), -2, order.expand(-1, -1, n_feat))
            sigmas = torch.gather(torch.cat([sigma_c, sigma_f], -2), -2, order)
        else:
            z_all, colors, sigmas = z_c, colors_c, sigma_c
        features, depth, weights = march(colors.unsqueeze(0), sigmas.unsqueeze(0), z_all.unsqueeze(0), (lo, hi))
        rows.append(((torch.full_like(rays, i), rays), features[0], depth[0], weights[0]))

    def put(out, k):
        for row in rows:
            out = out.index_put(row[0], row[k] if k < 3 else row[3].sum(1) if k == 3 else row[3])
        return out

    return RayOutput(put(out_feat, 1), put(out_depth, 2), put(out_wsum, 3), put(out_weights, 4) if want_weights
                     else None)


def render_rays(trigrid: TriGrid, decoder: Decoder, origins: torch.Tensor, directions: torch.Tensor,
                settings: RenderSettings = RenderSettings(), *, generator: Optional[torch.Generator] = None,
                return_weights: bool = False, progress: Optional[Callable[[int, int], None]] = None,
                depths: Optional[tuple] = None, deform: Optional[DeformFn] = None) -> RayOutput:
    """Render rays ``[B, R, 3]`` (unit directions; Portrait3D's SDS uses unnormalised ones) → ``RayOutput``
    (chunked over rays).

    ``progress(done, total)`` is called after each chunk and may raise to cancel. ``depths`` = (coarse
    ``[B, R, N, 1]``, fine ``[B, R, n, 1]``) replaces the random depth draws (to replay a recorded run).
    ``deform`` warps every coarse and fine sample before lookup and crop (see ``query``); depths stay in ray space.
    """
    if origins.shape != directions.shape or origins.dim() != 3 or origins.shape[-1] != 3:
        raise InvalidInputError(f"ray origins/directions must both be [B, R, 3], got {tuple(origins.shape)} "
                                f"and {tuple(directions.shape)}")
    if origins.shape[0] != trigrid.batch_size:
        raise InvalidInputError(f"{origins.shape[0]} camera(s) for a tri-grid batch of {trigrid.batch_size}")
    levels = trigrid.kernel_levels()
    per_ray = settings.coarse_samples + settings.fine_samples
    grad = torch.is_grad_enabled() and (any(level.requires_grad for level in trigrid.levels)
                                        or any(p.requires_grad for p in decoder.parameters()))
    chunk_samples = settings.grad_chunk_samples if grad else settings.chunk_samples
    if settings.fast and not grad:
        chunk_samples *= 4           # most samples of a fast chunk are never decoded
    chunk = max(1, chunk_samples // (per_ray * origins.shape[0]))
    n_rays = origins.shape[1]
    grid = None
    if settings.fast:
        grid = occupancy_for(trigrid, decoder, settings.occupancy, crop=settings.crop, backend=settings.backend)
    outputs = []
    for start in range(0, n_rays, chunk):
        stop = min(n_rays, start + chunk)
        chunk_depths = None if depths is None else tuple(d[:, start:stop] for d in depths)
        if grid is not None:
            outputs.append(_fast_chunk(trigrid, decoder, levels, grid, origins[:, start:stop],
                                       directions[:, start:stop], settings, generator, return_weights,
                                       chunk_depths, deform))
        else:
            outputs.append(_render_chunk(trigrid, decoder, levels, origins[:, start:stop],
                                         directions[:, start:stop], settings, generator, return_weights,
                                         chunk_depths, deform))
        if progress is not None:
            progress(stop, n_rays)
    cat = lambda name: torch.cat([getattr(o, name) for o in outputs], 1)  # noqa: E731
    return RayOutput(cat("features"), cat("depth"), cat("weight_sum"), cat("weights") if return_weights else None)


# --------------------------------------------------------------------------------------------------- images

BackgroundFn = Callable[[TriGrid, int, int], torch.Tensor]


def composite_background(features: torch.Tensor, weight_sum: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """features ``[B, C, H, W]`` + (1 − Σw)·background (bilinear antialiased resize to H×W) in feature space."""
    h, w = features.shape[-2:]
    if background.shape[-2:] != (h, w):
        background = F.interpolate(background, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return features + (1 - weight_sum) * background


def render_image(trigrid: TriGrid, decoder: Decoder, c: torch.Tensor, resolution: int,
                 settings: RenderSettings = RenderSettings(), *, background: Optional[BackgroundFn] = None,
                 generator: Optional[torch.Generator] = None,
                 progress: Optional[Callable[[int, int], None]] = None,
                 deform: Optional[DeformFn] = None) -> RenderResult:
    """Render camera labels ``[B, 25]`` at ``resolution``² → ``RenderResult``.

    ``background(trigrid, H, W)`` may return background features ``[B, 32, h, w]`` (the GAN background hook).
    Without one, empty space decodes to zero features, i.e. torgb's bias colour (the SDS-side look).
    ``deform(points [B, N, 3]) -> points`` warps the samples (posed rendering, ``gan.deform.PoseDeformer``).
    """
    if trigrid.ws is None:
        raise InvalidInputError("this tri-grid has no ws; ToRGB needs ws[:, -1] (load a tri-grid file that has 'ws')")
    origins, directions = cameras.rays(c.to(trigrid.dtype), resolution)
    out = render_rays(trigrid, decoder, origins.to(trigrid.device), directions.to(trigrid.device), settings,
                      generator=generator, progress=progress, deform=deform)
    b = c.shape[0]

    def image(x):
        return x.permute(0, 2, 1).reshape(b, x.shape[-1], resolution, resolution)

    features_raw, depth, weight_sum = image(out.features), image(out.depth), image(out.weight_sum)
    features, bg = features_raw, None
    if background is not None:
        bg = background(trigrid, resolution, resolution)
        features = composite_background(features_raw, weight_sum, bg)
    rgb = decoder.to_rgb(features, trigrid.ws[:, -1])
    return RenderResult(rgb, features, features_raw, depth, weight_sum, bg)


def render_views(trigrid: TriGrid, decoder: Decoder, c: torch.Tensor, resolution: int,
                 settings: RenderSettings = RenderSettings(), *, background: Optional[BackgroundFn] = None,
                 generator: Optional[torch.Generator] = None,
                 on_chunk: Optional[Callable[[int, int], None]] = None,
                 on_view: Optional[Callable[[int, int], None]] = None) -> RenderResult:
    """Render every tri-grid of a batch of B from each of the N cameras ``c [N, 25]``, one view at a time (bounded
    memory) → a result of B·N views, **item-major**: view ``b·N + n`` is tri-grid b seen from camera n.

    ``on_chunk(done, total)`` runs after each ray chunk and ``on_view(done, B·N)`` after each view; either may raise
    to cancel.
    """
    n_views, total = c.shape[0], trigrid.batch_size * c.shape[0]
    results = []
    for b in range(trigrid.batch_size):
        item = trigrid if trigrid.batch_size == 1 else trigrid.select(b)
        for i in range(n_views):
            results.append(render_image(item, decoder, c[i:i + 1], resolution, settings, background=background,
                                        generator=generator, progress=on_chunk))
            if on_view is not None:
                on_view(len(results), total)
    cat = lambda name: torch.cat([getattr(r, name) for r in results])  # noqa: E731
    bg = torch.cat([r.background for r in results]) if background is not None else None
    return RenderResult(cat("image"), cat("features"), cat("features_raw"), cat("depth"), cat("weight_sum"), bg)


def over_colour(result: RenderResult, decoder: Decoder, colour) -> torch.Tensor:
    """The render composited over a solid colour ``(r, g, b)`` in [0, 1] → ``[B, 3, H, W]`` in [−1, 1].

    ToRGB is affine (``M·F + b``) and F is opacity-weighted, so the object's own colour is ``M·F + b·Σw``; empty
    space (which alone would show the bias ``b``) is replaced by the colour: ``image − (1 − Σw)·b + (1 − Σw)·colour``.
    """
    alpha = result.weight_sum.clamp(0, 1)
    bias = decoder.torgb.bias.to(result.image)[None, :, None, None]
    target = (torch.as_tensor(colour, dtype=result.image.dtype, device=result.image.device) * 2 - 1)[None, :, None, None]
    return result.image + (1 - alpha) * (target - bias)


def normalized_depth(depth: torch.Tensor, weight_sum: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """ControlNet-style depth ``[B, 1, H, W]`` in [0, 1]: near = 1, far = 0, background (Σw < threshold) = 0.

    Normalised per image over its foreground depth range.
    """
    fg = weight_sum > threshold
    out = torch.zeros_like(depth)
    for b in range(depth.shape[0]):
        if not bool(fg[b].any()):
            continue
        d = depth[b][fg[b]]
        near, far = d.min(), d.max()
        scaled = (far - depth[b]) / (far - near).clamp_min(1e-6)
        out[b] = torch.where(fg[b], 0.1 + 0.9 * scaled.clamp(0, 1), torch.zeros_like(scaled))
    return out
