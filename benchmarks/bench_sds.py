"""SDS iteration cost on CPU, split into render forward / render backward / encode (fwd + bwd) / UNet / optimiser.

Real sizes: a random 7-level tri-grid (8 … 512, 36 channels), the released decoder shapes, a random-weight
SD1.5-shaped diffusers UNet (859.5 M parameters, cross-attention 768), the SD AutoencoderKL (paper) or TAESD
(AutoencoderTiny, draft) — random weights, so only the cost is meaningful. One timed iteration per preset after a
small warm-up. Peak memory = the process's peak RSS.

    flock /work/wt/heavy.lock .venv/bin/python benchmarks/bench_sds.py

Last line: ``sds_iter_s_paper=<float> sds_iter_s_draft=<float> peak_gib=<float>``.
"""
from __future__ import annotations

import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from portrait3d_core import sds  # noqa: E402
from portrait3d_core.decoder import Decoder  # noqa: E402
from portrait3d_core.guidance import DiffusersGuidance, ViewConditioning, resize_for_encoder  # noqa: E402
from portrait3d_core.trigrid import TriGrid  # noqa: E402


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def build_models():
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768)     # SD1.5 shapes
    kl = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                 down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
    tiny = diffusers.AutoencoderTiny()
    alphas = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    return unet, kl, tiny, alphas


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def one_iteration(guidance, trigrid, params, decoder, settings, optimizer, ema, conditioning):
    problem = sds.SDSProblem(trigrid, decoder, guidance, conditioning, settings)
    gen = torch.Generator().manual_seed(0)
    draws = sds.draw_iteration(settings, gen)
    times = {}
    (image, weights, _), times["render_fwd"] = timed(lambda: sds.render_training_view(problem, draws, gen))
    x = resize_for_encoder(image, settings.encode_resolution)
    latents, t_enc_fwd = timed(lambda: guidance.encode(x, gen))
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.tensor([draws.t])
    positive = sds.blended_conditioning(guidance, conditioning, draws.azimuth_deg)
    eps_hat, times["unet"] = timed(lambda: guidance.predict_noise(latents, noise, t, positive, conditioning.negative,
                                                                  settings.guidance_scale))
    grad = sds.sds_gradient(eps_hat, noise, guidance.alphas_cumprod(t))
    (grad_image,), t_enc_bwd = timed(lambda: torch.autograd.grad(latents, image, grad, retain_graph=False))
    times["encode"] = t_enc_fwd + t_enc_bwd
    loss_ent = sds.entropy_loss(weights) * sds.entropy_weight(settings, 1)
    _, times["render_bwd"] = timed(lambda: torch.autograd.backward([image, loss_ent], [grad_image, None]))

    def step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update()
    _, times["optimiser"] = timed(step)
    return times


def run_preset(name, unet, kl, tiny, alphas, text_emb):
    settings = sds.SDSSettings.preset(name)
    if settings.encoder == "taesd":
        guidance = DiffusersGuidance(unet, None, None, alphas, tiny_vae=tiny)
    else:
        guidance = DiffusersGuidance(unet, None, None, alphas, vae=kl)
    gen = torch.Generator().manual_seed(1)
    levels = [torch.randn(1, 3, 36, r, r, generator=gen) * 0.5 for r in (8, 16, 32, 64, 128, 256, 512)]
    trigrid, params = sds.trainable_trigrid(TriGrid(levels, torch.randn(1, 14, 512, generator=gen)))
    decoder = Decoder().eval().requires_grad_(False)
    optimizer = sds.make_optimizer(params, settings)
    from portrait3d_core.optim import EMA

    ema = EMA(params, settings.ema_decay)
    conditioning = ViewConditioning(*(text_emb.clone() for _ in range(4)))
    times = one_iteration(guidance, trigrid, params, decoder, settings, optimizer, ema, conditioning)
    total = sum(times.values())
    print(f"{name:5s}: " + "  ".join(f"{k} {v:6.2f} s" for k, v in times.items()) + f"  | total {total:6.2f} s "
          f"(encode {settings.encode_resolution}², {settings.encoder}, {settings.coarse_samples}+"
          f"{settings.fine_samples} samples; {settings.iterations} iterations ≈ {total * settings.iterations / 3600:.1f} h)",
          flush=True)
    return total


def saved_bytes(fn) -> tuple:
    """(result, bytes of the tensors autograd saves for backward while ``fn`` runs) — the activation memory."""
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def memory_estimate(unet, kl) -> None:
    """Measured activation sizes (fp32 on CPU) → the paper preset's CUDA budget with fp16 UNet/VAE."""
    gen = torch.Generator().manual_seed(1)
    settings = sds.SDSSettings.paper()
    levels = [torch.randn(1, 3, 36, r, r, generator=gen) * 0.5 for r in (8, 16, 32, 64, 128, 256, 512)]
    trigrid, params = sds.trainable_trigrid(TriGrid(levels, torch.randn(1, 14, 512, generator=gen)))
    problem = sds.SDSProblem(trigrid, Decoder().eval().requires_grad_(False), None, None, settings)
    (image, _, _), render_b = saved_bytes(lambda: sds.render_training_view(problem, sds.draw_iteration(
        settings, gen), gen))
    x = resize_for_encoder(image.detach().requires_grad_(True), 512) * 2 - 1
    _, enc_b = saved_bytes(lambda: kl.encode(x).latent_dist.mean)
    with torch.no_grad():
        pass
    z = torch.randn(2, 4, 64, 64, requires_grad=True)
    _, unet_b = saved_bytes(lambda: unet(z, torch.tensor([100, 100]), encoder_hidden_states=torch.randn(2, 77, 768)).sample)
    gib = 2 ** 30
    level_b = sum(p.numel() for p in params) * 4
    weights = {"UNet fp16": sum(p.numel() for p in unet.parameters()) * 2,
               "VAE encoder fp16": sum(p.numel() for p in kl.encoder.parameters()) * 2 + 2 * 8 * 4,
               "CLIP-L text fp16": 123.1e6 * 2}
    state = 7 * level_b                     # params, grads, 4 Adan moments, EMA shadow (fp32)
    budget = (sum(weights.values()) + state + render_b + enc_b / 2 + unet_b / 2 * 0.25)
    print("activation sizes (saved for backward, fp32, measured): "
          f"render 128² × 96 {render_b / gib:.2f} GiB, KL encoder 512² {enc_b / gib:.2f} GiB, "
          f"UNet 64² batch 2 with grad {unet_b / gib:.2f} GiB (SDS runs it without grad)")
    print("paper preset on CUDA, estimate: weights " + ", ".join(f"{k} {v / gib:.2f}" for k, v in weights.items()) +
          f" GiB; tri-grid + grad + Adan + EMA {state / gib:.2f} GiB; render activations {render_b / gib:.2f} GiB "
          f"(fp32); encoder activations fp16 {enc_b / 2 / gib:.2f} GiB; UNet transient (no grad, ≤ 1/4 of its "
          f"with-grad size, fp16) {unet_b / 8 / gib:.2f} GiB → total ≈ {budget / gib:.1f} GiB (< 12 GiB)")


def main() -> None:
    torch.set_grad_enabled(True)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU", flush=True)
    (unet, kl, tiny, alphas), t_build = timed(build_models)
    n = sum(p.numel() for p in unet.parameters()) / 1e6
    print(f"random SD1.5-shaped UNet {n:.1f} M params, KL VAE, TAESD built in {t_build:.0f} s", flush=True)
    text_emb = torch.randn(1, 77, 768)
    # warm-up: numba kernels compile (cached on disk) and allocator settles, on a tiny render
    warm = sds.SDSSettings.draft(render_resolution=16, encode_resolution=64)
    w_guidance = DiffusersGuidance(unet, None, None, alphas, tiny_vae=tiny)
    tg, params = sds.trainable_trigrid(TriGrid([torch.randn(1, 3, 36, r, r) for r in (8, 16)], torch.randn(1, 14, 512)))
    from portrait3d_core.optim import EMA

    one_iteration(w_guidance, tg, params, Decoder().eval().requires_grad_(False), warm,
                  sds.make_optimizer(params, warm), EMA(params), ViewConditioning(*(text_emb for _ in range(4))))
    paper = run_preset("paper", unet, kl, tiny, alphas, text_emb)
    draft = run_preset("draft", unet, kl, tiny, alphas, text_emb)
    peak = peak_gib()                       # the SDS iterations' peak, before the activation measurement below
    memory_estimate(unet, kl)
    print(f"draft / paper per iteration: {draft / paper:.3f}; whole run: "
          f"{draft * sds.SDSSettings.draft().iterations / (paper * sds.SDSSettings.paper().iterations):.3f}")
    print(f"sds_iter_s_paper={paper:.3f} sds_iter_s_draft={draft:.3f} peak_gib={peak:.3f}")


if __name__ == "__main__":
    main()
