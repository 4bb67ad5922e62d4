"""Refinement cost on CPU: one refit iteration and one img2img view at the paper's sizes.

Refit: a random 7-level tri-grid (8 … 512, 36 channels), the released decoder shapes, a 256² patch of a 512² view at
48 + 48 samples, loss + backward + Adan (``refine.refit``, one warm-up iteration at a 32² patch first).
img2img: a random-weight SD1.5-shaped diffusers UNet (859.5 M parameters, cross-attention 768) + the SD AutoencoderKL
shapes, DDIM over the 50-step grid from t = 200 (10 steps ≤ 200, CFG 7.5 → batch 2), 512² view → 64² latent →
512² (what the Refine node runs through ComfyUI; random weights, so only the cost is meaningful).
Peak memory = the process's peak RSS.

    flock /work/wt/heavy.lock .venv/bin/python benchmarks/bench_refine.py

Last line: ``refit_iter_s=<float> img2img_view_s=<float> peak_gib=<float>``.
"""
from __future__ import annotations

import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from portrait3d_core import refine  # noqa: E402
from portrait3d_core.decoder import Decoder  # noqa: E402
from portrait3d_core.trigrid import TriGrid  # noqa: E402


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def refit_iteration_s() -> float:
    g = torch.Generator().manual_seed(0)
    levels = [torch.randn(1, 3, 36, r, r, generator=g) * 0.5 for r in (8, 16, 32, 64, 128, 256, 512)]
    trigrid = TriGrid(levels, torch.randn(1, 14, 512, generator=g))
    torch.manual_seed(0)
    decoder = Decoder().eval().requires_grad_(False)
    labels = refine.view_cameras(refine.RefineSettings(), 0)[:1]
    views = torch.rand(1, 3, 512, 512, generator=g)
    warm = refine.RefineSettings(patch_resolution=32, epochs=1)
    refine.refit(trigrid, decoder, views, labels, warm, seed=0)
    settings = refine.RefineSettings(epochs=1)                    # paper: 256² patch, 48 + 48 samples
    t0 = time.perf_counter()
    refine.refit(trigrid, decoder, views, labels, settings, seed=0)
    return time.perf_counter() - t0


@torch.no_grad()
def img2img_view_s() -> float:
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768).eval()
    vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512).eval()
    n = sum(p.numel() for p in unet.parameters()) / 1e6
    print(f"img2img UNet: random SD1.5-shaped diffusers UNet2DConditionModel, {n:.1f} M params; KL VAE", flush=True)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(50)
    steps = [t for t in scheduler.timesteps if int(t) <= 200]
    text = torch.randn(2, 77, 768)
    image = torch.rand(1, 3, 512, 512) * 2 - 1
    t0 = time.perf_counter()
    z = vae.encode(image).latent_dist.sample() * 0.18215
    z = scheduler.add_noise(z, torch.randn_like(z), torch.tensor([200]))
    for t in steps:
        eps = unet(torch.cat([z, z]), t, encoder_hidden_states=text).sample
        eps_u, eps_c = eps.chunk(2)
        z = scheduler.step(eps_u + 7.5 * (eps_c - eps_u), t, z).prev_sample
    vae.decode(z / 0.18215)
    elapsed = time.perf_counter() - t0
    print(f"img2img: {len(steps)} DDIM steps at 64² latent + VAE encode/decode 512²: {elapsed:.1f} s", flush=True)
    return elapsed


def main() -> None:
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU", flush=True)
    refit_s = refit_iteration_s()
    print(f"refit: one iteration (256² patch, 48 + 48 samples, 7 levels 8 … 512): {refit_s:.2f} s; "
          f"399 iterations ≈ {399 * refit_s / 60:.1f} min", flush=True)
    view_s = img2img_view_s()
    print(f"21 views ≈ {21 * view_s / 60:.1f} min of img2img")
    print(f"refit_iter_s={refit_s:.3f} img2img_view_s={view_s:.3f} peak_gib={peak_gib():.3f}")


if __name__ == "__main__":
    main()
