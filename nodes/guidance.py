"""ComfyUI's MODEL / CONDITIONING / VAE as a ``portrait3d_core.guidance.Guidance`` (``comfyui_host.md`` §3.1–3.2).

The SDS loop runs inside a custom ``comfy.samplers.Sampler`` started by ``CFGGuider.sample``, so ComfyUI loads and
patches the model (LoRAs, model patches, hooks), processes the conditionings and applies its CFG (including
``sampler_cfg_function`` / post-CFG hooks) exactly as for KSampler. Each iteration the guider is called on the
noised latent at σ(t) and returns the CFG x0; for a model whose noising is x = a(σ)·z + b(σ)·ε (EPS/v: a = 1,
b = σ; flow: a = 1 − σ, b = σ) the predicted noise is ε̂ = (x − a·x̂0)/b and ᾱ = a²/(a² + b²), which gives
Portrait3D's g = (1 − ᾱ_t)(ε̂ − ε) (for EPS: w(σ) = (1 − ᾱ)/σ on z − x̂0).

The encoder runs with gradients: its weights are de-inferenced once (ComfyUI loads them in inference mode) and it
is called directly — ``VAE.encode`` would fall back to a tiled encode under ``torch.inference_mode`` on OOM and the
gradients would silently vanish.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Optional

import torch

import comfy.model_management
import comfy.samplers
import folder_paths
from portrait3d_core.guidance import GuidanceError, ViewConditioning, mix_tensors

LOG = logging.getLogger("portrait3d")
VIEW_KEYS = {"front": "positive", "side": "p3d_side", "back": "p3d_back", "negative": "negative"}


def ensure_trainable(module: torch.nn.Module) -> int:
    """Replace inference-mode parameters/buffers by plain copies (values unchanged) so autograd can save them.
    Idempotent; returns how many tensors were replaced. Call outside ``torch.inference_mode``."""
    replaced = 0
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
                    replaced += 1
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    sub._buffers[name] = b.clone()
                    replaced += 1
    return replaced


class _PosteriorSample(torch.nn.Module):
    """Stand-in for DiagonalGaussianRegularizer: a posterior *sample* (Portrait3D) from our generator."""

    def __init__(self, generator, noise):
        super().__init__()
        self.generator, self.noise = generator, noise

    def forward(self, moments):
        mean, logvar = torch.chunk(moments, 2, dim=1)
        std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
        noise = self.noise
        if noise is None:
            gen = self.generator if self.generator is not None and self.generator.device == mean.device else None
            noise = torch.randn(mean.shape, generator=gen, device=mean.device, dtype=mean.dtype)
        return mean + std * noise.to(mean), None


@contextmanager
def _sampling_posterior(first_stage, generator, noise):
    from comfy.ldm.models.autoencoder import DiagonalGaussianRegularizer

    reg = getattr(first_stage, "regularization", None)
    if not isinstance(reg, DiagonalGaussianRegularizer):
        yield
        return
    first_stage.regularization = _PosteriorSample(generator, noise)
    try:
        yield
    finally:
        first_stage.regularization = reg


def _tensor_digest(h, t: torch.Tensor, n: int = 4096) -> None:
    flat = t.detach().reshape(-1)
    h.update(str(tuple(t.shape)).encode())
    h.update(flat[:n].float().cpu().numpy().tobytes())
    h.update(flat[-n:].float().cpu().numpy().tobytes())


def model_identity(model, vae, conds: dict) -> str:
    """A stable description of the diffusion side of a run (model weights sample, patches/LoRA strengths, encoder
    weights sample, conditioning tensors) for the checkpoint fingerprint."""
    import hashlib

    h = hashlib.sha256()
    inner = model.model
    h.update(type(inner).__name__.encode())
    h.update(type(inner.model_sampling).__name__.encode())
    params = list(inner.diffusion_model.parameters())
    for p in (params[0], params[len(params) // 2], params[-1]):
        _tensor_digest(h, p)
    for key in sorted(model.patches):
        h.update(key.encode())
        for patch in model.patches[key]:
            h.update(repr(patch[0]).encode())
            if torch.is_tensor(patch[1]):
                _tensor_digest(h, patch[1], 256)
    if vae is not None:
        vparams = list(vae.first_stage_model.parameters())
        _tensor_digest(h, vparams[0])
        _tensor_digest(h, vparams[-1])
    for name in sorted(conds):
        for entry in conds[name]:
            if torch.is_tensor(entry[0]):
                _tensor_digest(h, entry[0], 1 << 20)
            pooled = entry[1].get("pooled_output") if isinstance(entry[1], dict) else None
            if torch.is_tensor(pooled):
                _tensor_digest(h, pooled)
    return h.hexdigest()[:16]


def find_taesd_encoder() -> Optional[str]:
    """``models/vae_approx/taesd_encoder.*`` (the SD1.x TAESD encoder ComfyUI uses for previews), if present."""
    for name in folder_paths.get_filename_list("vae_approx"):
        if os.path.basename(name).startswith("taesd_encoder."):
            return folder_paths.get_full_path("vae_approx", name)
    return None


class _TinyEncoder:
    """A TAESD encoder from vae_approx; its output is already in the SD1.x model's latent space."""

    def __init__(self, path: str):
        import comfy.taesd.taesd
        import comfy.utils

        self.device = comfy.model_management.vae_device()
        self.dtype = comfy.model_management.vae_dtype(self.device)
        encoder = comfy.taesd.taesd.Encoder(4)
        with torch.inference_mode(False):
            state = {k: v.clone() for k, v in comfy.utils.load_torch_file(path, safe_load=True).items()}
            encoder.load_state_dict(state)
        self.encoder = encoder.to(self.device, self.dtype).eval().requires_grad_(False)

    def __call__(self, images):
        return self.encoder(images.to(self.device, self.dtype)).float()


class ComfyGuidance:
    """``Guidance`` over a running ``CFGGuider`` (``model_wrap`` inside ``Sampler.sample``) and a ComfyUI VAE."""

    def __init__(self, model_wrap, extra_args: dict, vae, tiny_encoder: Optional[_TinyEncoder] = None):
        self.guider = model_wrap
        self.extra_args = extra_args
        self.inner = model_wrap.inner_model                       # comfy BaseModel (patched, on its device)
        self.sampling = self.inner.model_sampling
        self.vae, self.tiny = vae, tiny_encoder
        self.latent_channels = int(self.inner.latent_format.latent_channels)
        self.downscale = 8 if tiny_encoder is not None else int(vae.downscale_ratio)
        if tiny_encoder is None:
            ensure_trainable(vae.first_stage_model)
        one = torch.ones(1, 1, 1, 1)
        self._probe = lambda sigma: (  # x = a·z + b·ε
            float(self.sampling.noise_scaling(sigma, torch.zeros_like(one), one)),
            float(self.sampling.noise_scaling(sigma, one, torch.zeros_like(one))))

    def view_conditioning(self) -> ViewConditioning:
        conds = self.guider.conds
        return ViewConditioning(*(conds[VIEW_KEYS[k]] for k in ("negative", "front", "side", "back")))

    # ------------------------------------------------------------------------------------------ latents
    def encode(self, images, generator=None, posterior_noise=None):
        if self.tiny is not None:
            return self.tiny(images).to(self.device)
        vae = self.vae
        comfy.model_management.load_models_gpu([vae.patcher])
        ensure_trainable(vae.first_stage_model)     # a reload in inference mode elsewhere re-creates the weights
        x = vae.process_input(images).to(vae.vae_dtype).to(vae.device)
        with _sampling_posterior(vae.first_stage_model, generator, posterior_noise):
            raw = vae.first_stage_model.encode(x)
        return self.inner.process_latent_in(raw.float().to(self.device))

    @property
    def device(self):
        return self.guider.model_patcher.load_device

    def _sigma(self, t):
        return self.sampling.sigma(t.to(self.sampling.sigmas.device).float()).float()

    def alphas_cumprod(self, t):
        sigma = self._sigma(t)
        out = []
        for s in sigma.reshape(-1):
            a, b = self._probe(s.reshape(1))
            out.append(a * a / (a * a + b * b))
        return torch.tensor(out, dtype=torch.float32)

    # ------------------------------------------------------------------------------------------ conditioning
    def mix(self, conds, weights):
        picked = [(c, w) for c, w in zip(conds, weights) if w != 0]
        if not picked:
            raise GuidanceError("view blending needs a non-zero weight")
        if len(picked) == 1:
            return picked[0][0]
        lengths = {len(c) for c, _ in picked}
        if len(lengths) != 1:
            raise GuidanceError("the front/side/back conditionings must have the same number of entries to be "
                                "blended by view (e.g. one CLIP Text Encode each)")
        out = []
        for entries in zip(*(c for c, _ in picked)):
            ws = [w for _, w in picked]
            base = dict(entries[0])
            model_conds = dict(base.get("model_conds", {}))
            for key, value in model_conds.items():
                values = [e.get("model_conds", {}).get(key) for e in entries]
                tensors = [getattr(v, "cond", None) for v in values]
                if all(torch.is_tensor(t) and t.shape == tensors[0].shape for t in tensors):
                    model_conds[key] = value._copy_with(mix_tensors(tensors, ws))
            base["model_conds"] = model_conds
            raw = [e.get("cross_attn") for e in entries]
            if all(torch.is_tensor(t) and t.shape == raw[0].shape for t in raw):
                base["cross_attn"] = mix_tensors(raw, ws)
            out.append(base)
        return out

    # ------------------------------------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict_noise(self, latents, noise, t, positive, negative, guidance_scale):
        sigma = self._sigma(t).to(self.device)
        a, b = self._probe(sigma.cpu())
        z = latents.detach().to(self.device)
        x = self.sampling.noise_scaling(sigma, noise.to(z), z)
        self.guider.conds["positive"], self.guider.conds["negative"] = positive, negative
        self.guider.cfg = guidance_scale
        x0 = self.guider(x, sigma, **self.extra_args).float()
        return ((x.float() - a * x0) / b).to(latents.device)


class SDSSampler(comfy.samplers.Sampler):
    """Runs ``run(ComfyGuidance)`` inside ``CFGGuider.sample`` and keeps its return value in ``result``."""

    def __init__(self, run, vae, tiny_encoder=None):
        self.run, self.vae, self.tiny = run, vae, tiny_encoder
        self.result = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        guidance = ComfyGuidance(model_wrap, extra_args, self.vae, self.tiny)
        self.result = self.run(guidance)
        return latent_image if latent_image is not None else torch.zeros_like(noise)


def run_with_guider(model, conds: dict, cfg: float, latent_shape, seed: int, run, vae, tiny_encoder=None):
    """Start ComfyUI's guider with the view conditionings and run ``run(guidance)`` inside it → its result."""
    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({VIEW_KEYS[k]: v for k, v in conds.items()})
    guider.set_cfg(cfg)
    sampler = SDSSampler(run, vae, tiny_encoder)
    zeros = torch.zeros(latent_shape)
    guider.sample(zeros, zeros.clone(), sampler, sigmas=torch.tensor([1.0, 0.0]), seed=seed)
    return sampler.result
