"""Toy guidances for SDS tests: closed-form "denoisers" with known answers (no diffusion model)."""
from __future__ import annotations

import torch

from portrait3d_core.guidance import ViewConditioning, mix_tensors
from portrait3d_core.trigrid import TriGrid


def sd_alphas_cumprod(steps: int = 1000) -> torch.Tensor:
    """ᾱ of the SD1.5 schedule (scaled linear betas 0.00085 … 0.012)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


class TargetGuidance:
    """Latents = pixels (2x − 1, downscale 1). Conditionings are target latents; the "denoiser" is the ideal one for
    a point distribution at the target z*: ε(x_t; z*) = (x_t − √ᾱ z*) / √(1 − ᾱ) = ε + √(ᾱ/(1 − ᾱ))·(z − z*).
    A ``None`` negative predicts the true noise (no pull). So SDS's g = (1 − ᾱ)(ε̂ − ε) pulls z toward z*."""

    latent_channels = 3
    downscale = 1

    def __init__(self):
        self._alphas = sd_alphas_cumprod()
        self.captured = []          # gradients reaching the latents (when capture is on)
        self.capture = False
        self.poison_from_call = None    # encode returns inf from this call on (divergence tests)
        self.calls = 0

    def encode(self, images, generator=None, posterior_noise=None):
        self.calls += 1
        z = images * 2 - 1
        if self.poison_from_call is not None and self.calls >= self.poison_from_call:
            z = z * float("inf")
        if self.capture:
            z.register_hook(lambda g: self.captured.append(g.detach().clone()))
        return z

    def alphas_cumprod(self, t):
        return self._alphas[t]

    def mix(self, conds, weights):
        return mix_tensors(conds, weights)

    def denoiser(self, x_t, a, target):
        return (x_t - a.sqrt() * target) / (1 - a).sqrt()

    def predict_noise(self, latents, noise, t, positive, negative, guidance_scale):
        a = self.alphas_cumprod(t).reshape(-1, 1, 1, 1)
        x_t = a.sqrt() * latents + (1 - a).sqrt() * noise
        eps_c = self.denoiser(x_t, a, positive)
        eps_u = noise if negative is None else self.denoiser(x_t, a, negative)
        return eps_u + guidance_scale * (eps_c - eps_u)


def colour_targets(resolution: int, front=(0.9, 0.2, 0.2), side=(0.2, 0.8, 0.3), back=(0.2, 0.3, 0.9)):
    """Solid-colour target latents per view class (the blend by azimuth is then a colour wheel)."""
    def solid(rgb):
        return (torch.tensor(rgb).reshape(1, 3, 1, 1) * 2 - 1).expand(1, 3, resolution, resolution).contiguous()

    return ViewConditioning(None, solid(front), solid(side), solid(back))


def small_trigrid(seed: int = 0, sizes=(8, 16, 32), scale: float = 0.1) -> TriGrid:
    g = torch.Generator().manual_seed(seed)
    levels = [torch.randn(1, 3, 36, r, r, generator=g) * scale for r in sizes]
    return TriGrid(levels, torch.randn(1, 14, 512, generator=g))


def small_decoder(seed: int = 0):
    from portrait3d_core.decoder import Decoder

    torch.manual_seed(seed)
    return Decoder().eval().requires_grad_(False)


def gradient_targets(resolution: int, top=(0.9, 0.3, 0.2), bottom=(0.2, 0.4, 0.8)):
    """One vertical two-colour gradient as the target of every view class: a 3D object layered in colour along y
    renders it from every camera of the SDS distribution (so the error can go to ~0)."""
    y = torch.linspace(0, 1, resolution).reshape(1, 1, resolution, 1)
    top_c, bottom_c = torch.tensor(top).reshape(1, 3, 1, 1), torch.tensor(bottom).reshape(1, 3, 1, 1)
    image = (top_c * (1 - y) + bottom_c * y).expand(1, 3, resolution, resolution).contiguous()
    z = image * 2 - 1
    return ViewConditioning(None, z, z.clone(), z.clone())
