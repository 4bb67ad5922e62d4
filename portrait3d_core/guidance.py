"""Diffusion guidance for score distillation: the ``Guidance`` protocol and its diffusers adapter.

A guidance turns an image into model latents **with gradients** and predicts the noise of a noised latent with
classifier-free guidance over a positive and a negative conditioning. Everything SDS-specific (timestep draw,
w(t), the loss) lives in ``sds.py``; this file only speaks to a diffusion model.

Adapters:
- ``DiffusersGuidance`` (here): a diffusers UNet2DConditionModel + AutoencoderKL (or AutoencoderTiny = TAESD) +
  CLIP text encoder; used by the command line and the tests. Needs ``pip install diffusers transformers``
  (the ``[cli]`` extra).
- ``nodes/guidance.py::ComfyGuidance``: ComfyUI's MODEL / CONDITIONING / VAE through ``CFGGuider``.

Conventions: images ``[B, 3, H, W]`` in [0, 1]; latents are in the diffusion model's space (SD1.5: VAE latents
× 0.18215); ``t`` is the discrete training timestep (0 … 999); predicted noise is in the ε-parameterisation of
``x_t = √ᾱ_t·z + √(1 − ᾱ_t)·ε``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F

from .errors import InvalidInputError, Portrait3DError

VIEW_CLASSES = ("front", "side", "back")
VIEW_PREFIXES = {"front": "front view ", "side": "side view ", "back": "back view "}   # pipeline.md §5.4


@dataclass(frozen=True)
class ViewConditioning:
    """Conditionings computed once per run: the negative (Portrait3D: the empty prompt) and one per view class.

    Values are adapter-specific (a ``[1, 77, C]`` tensor for diffusers, a CONDITIONING list for ComfyUI).
    """

    negative: Any
    front: Any
    side: Any
    back: Any

    def view(self, name: str):
        return getattr(self, name)


def view_prompts(prompt: str) -> dict:
    """``{"front": "front view <prompt>", "side": …, "back": …}`` (Portrait3D's view-dependent prompts)."""
    text = prompt.strip()
    if not text:
        raise InvalidInputError("the SDS prompt is empty: describe the portrait (e.g. 'a portrait of a smiling "
                                "woman with red hair')")
    return {name: VIEW_PREFIXES[name] + text for name in VIEW_CLASSES}


@runtime_checkable
class Guidance(Protocol):
    """What SDS needs from a diffusion model."""

    #: the model's latent channels and pixel → latent downscale factor (SD1.5: 4, 8)
    latent_channels: int
    downscale: int

    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator] = None,
               posterior_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] → latents ``[B, C, H/f, W/f]``, differentiable w.r.t. ``images``.

        A VAE with a Gaussian posterior draws its sample from ``generator`` (or uses ``posterior_noise``).
        """

    def alphas_cumprod(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ at integer timesteps ``t [B]`` → float32 ``[B]``."""

    def mix(self, conds: Sequence[Any], weights: Sequence[float]) -> Any:
        """The weighted sum of conditionings (view blending); zero weights are skipped."""

    def predict_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, positive: Any,
                      negative: Any, guidance_scale: float) -> torch.Tensor:
        """Noise ``latents`` with ``noise`` at ``t`` and return the CFG-combined predicted noise
        ``ε_u + s·(ε_c − ε_u)`` (same shape as ``latents``, no gradient)."""


class GuidanceError(Portrait3DError):
    """The diffusion model cannot be used for SDS (wrong kind, missing files or packages)."""


def mix_tensors(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``Σ wᵢ·xᵢ`` over the non-zero weights, in the given order (exactly ``r·a + (1 − r)·b`` for two)."""
    out = None
    for x, w in zip(tensors, weights):
        if w == 0:
            continue
        term = x * w
        out = term if out is None else out + term
    if out is None:
        raise InvalidInputError("view blending needs at least one non-zero weight")
    return out


# --------------------------------------------------------------------------------------------------- diffusers

def _import_diffusers():
    try:
        import diffusers  # noqa: F401  (imports torchvision; the setup's shim makes that work on CPU torch)
        import transformers  # noqa: F401
    except ImportError as exc:
        raise GuidanceError(f"the diffusers adapter needs diffusers and transformers ({exc}); install them with "
                            f"`pip install 'portrait3d[cli]'` or `pip install diffusers transformers`") from None
    import diffusers
    import transformers

    return diffusers, transformers


class DiffusersGuidance:
    """``Guidance`` over diffusers modules. All modules are frozen; gradients flow only through the encoder's
    activations to the input image.

    Args:
        unet: ``UNet2DConditionModel`` (ε-prediction).
        text_encoder, tokenizer: CLIP text model and tokenizer (for ``view_conditioning``).
        alphas_cumprod: ``[T]`` ᾱ of the training schedule (``DDIMScheduler(...).alphas_cumprod``).
        vae: ``AutoencoderKL`` (posterior **sample** × ``scaling_factor``, as Portrait3D), or
        tiny_vae: ``AutoencoderTiny`` (TAESD; its latents are already in the model's space); exactly one of them.
        scheduler: optional scheduler whose ``add_noise`` noises the latents (default: the ᾱ formula).
        dtype: compute dtype of the UNet/VAE (fp16 on CUDA = mixed precision; latents and losses stay fp32).
    """

    latent_channels = 4
    downscale = 8

    def __init__(self, unet, text_encoder, tokenizer, alphas_cumprod: torch.Tensor, *, vae=None, tiny_vae=None,
                 scheduler=None, dtype: Optional[torch.dtype] = None):
        if (vae is None) == (tiny_vae is None):
            raise GuidanceError("give exactly one encoder: vae (AutoencoderKL) or tiny_vae (AutoencoderTiny/TAESD)")
        self.unet, self.text_encoder, self.tokenizer = unet, text_encoder, tokenizer
        self.vae, self.tiny_vae, self.scheduler = vae, tiny_vae, scheduler
        for module in (unet, text_encoder, vae, tiny_vae):
            if module is not None:
                module.eval().requires_grad_(False)
        self.device = next(unet.parameters()).device
        self.dtype = dtype or next(unet.parameters()).dtype
        self._alphas = alphas_cumprod.detach().to(self.device, torch.float32)
        self.latent_channels = int(unet.config.in_channels)

    @classmethod
    def from_pretrained(cls, path: str, *, device=None, dtype: Optional[torch.dtype] = None,
                        tiny_vae_path: Optional[str] = None) -> "DiffusersGuidance":
        """Load a diffusers Stable Diffusion folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
        ``scheduler/``). fp16 on CUDA unless ``dtype`` says otherwise; ``tiny_vae_path`` = a diffusers
        AutoencoderTiny folder (e.g. taesd) to encode with instead of the KL VAE."""
        import os

        diffusers, transformers = _import_diffusers()
        if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "unet", "config.json")):
            raise GuidanceError(f"{path}: not a diffusers Stable Diffusion folder (no unet/config.json); save one "
                                f"with StableDiffusionPipeline.save_pretrained")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        load = dict(torch_dtype=dtype)
        unet = diffusers.UNet2DConditionModel.from_pretrained(path, subfolder="unet", **load).to(device)
        text_encoder = transformers.CLIPTextModel.from_pretrained(path, subfolder="text_encoder").to(device)
        tokenizer = transformers.CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        scheduler = diffusers.DDIMScheduler.from_pretrained(path, subfolder="scheduler")
        if tiny_vae_path:
            tiny = diffusers.AutoencoderTiny.from_pretrained(tiny_vae_path, **load).to(device)
            return cls(unet, text_encoder, tokenizer, scheduler.alphas_cumprod, tiny_vae=tiny, scheduler=scheduler,
                       dtype=dtype)
        vae = diffusers.AutoencoderKL.from_pretrained(path, subfolder="vae", **load).to(device)
        return cls(unet, text_encoder, tokenizer, scheduler.alphas_cumprod, vae=vae, scheduler=scheduler, dtype=dtype)

    # ------------------------------------------------------------------------------------------ text
    @torch.no_grad()
    def text_embedding(self, prompt: str) -> torch.Tensor:
        """CLIP last hidden state ``[1, 77, C]`` (padding to max length, truncation), float32."""
        tokens = self.tokenizer([prompt], padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(tokens.input_ids.to(device))[0].float().to(self.device)

    def view_conditioning(self, prompt: str, negative: str = "") -> ViewConditioning:
        """The four embeddings of a run, each computed once (Portrait3D: negative = "")."""
        views = view_prompts(prompt)
        return ViewConditioning(self.text_embedding(negative), *(self.text_embedding(views[v]) for v in VIEW_CLASSES))

    def mix(self, conds, weights):
        return mix_tensors(conds, weights)

    # ------------------------------------------------------------------------------------------ latents
    def encode(self, images, generator=None, posterior_noise=None):
        x = images.to(self.dtype) * 2 - 1
        if self.tiny_vae is not None:
            return self.tiny_vae.encode(x).latents.float()
        dist = self.vae.encode(x).latent_dist
        if posterior_noise is None:
            posterior_noise = torch.randn(dist.mean.shape, generator=generator, device=dist.mean.device,
                                          dtype=dist.mean.dtype)
        sample = dist.mean + dist.std * posterior_noise.to(dist.mean)
        return sample.float() * float(self.vae.config.scaling_factor)

    def alphas_cumprod(self, t):
        return self._alphas[t.to(self._alphas.device)]

    def add_noise(self, latents, noise, t):
        if self.scheduler is not None:
            return self.scheduler.add_noise(latents, noise, t)
        a = self.alphas_cumprod(t).to(latents).reshape(-1, *([1] * (latents.dim() - 1)))
        return a.sqrt() * latents + (1 - a).sqrt() * noise

    @torch.no_grad()
    def noise_predictions(self, latents_noisy, t, conds: Sequence[torch.Tensor]) -> list:
        """ε of the UNet for each conditioning, in one batch (``[uncond, cond]`` order as the official code)."""
        n = len(conds)
        x = torch.cat([latents_noisy] * n).to(self.dtype)
        tt = torch.cat([t.reshape(-1)] * n).to(self.device)
        emb = torch.cat([c.expand(latents_noisy.shape[0], -1, -1) for c in conds]).to(self.dtype)
        out = self.unet(x, tt, encoder_hidden_states=emb).sample.float()
        return list(out.chunk(n))

    @torch.no_grad()
    def predict_noise(self, latents, noise, t, positive, negative, guidance_scale):
        noisy = self.add_noise(latents.detach(), noise, t.to(self.device))
        eps_uncond, eps_cond = self.noise_predictions(noisy, t, [negative, positive])
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def resize_for_encoder(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bilinear (align_corners False) resize of ``[B, 3, h, w]`` to ``resolution``² (Portrait3D: 128 → 512)."""
    if images.shape[-2:] == (resolution, resolution):
        return images
    return F.interpolate(images, (resolution, resolution), mode="bilinear", align_corners=False)
