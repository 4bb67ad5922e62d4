"""Refinement (Portrait3D stage 6): Refine (one node) and its two halves, Render Views and Refit Tri-grid.

The img2img of the Refine node is ComfyUI's own: ``vae.encode`` as VAEEncode, ``comfy.sample.prepare_noise`` +
``comfy.sample.sample`` as KSampler's ``common_ksampler``, ``vae.decode`` as VAEDecode. So Render Views → VAE Encode
→ KSampler (same seed/steps/cfg/sampler/scheduler/denoise) → VAE Decode → Refit Tri-grid gives the same tri-grid.
"""
from __future__ import annotations

import hashlib
import logging
import os

import torch
from comfy_api.latest import io, ui

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
from portrait3d_core import refine

from . import host
from .guidance import model_identity
from .sds import _pil
from .types import (CameraSocket, DecoderSocket, GanSocket, TriGridSocket, expect_cameras, expect_decoder, expect_gan,
                    expect_trigrid)

LOG = logging.getLogger("portrait3d")
CATEGORY = "Portrait3D/optimise"
CHECKPOINT_FOLDER = "portrait3d_refine"     # under ComfyUI's output folder: a re-queued run resumes from here

_PRESET_TOOLTIP = ("paper: Portrait3D's numbers (21 views at 512², 96 + 96 samples, GAN background; refit 19 epochs "
                   "= 399 iterations of 256² patches at 48 + 48 samples). draft: CPU-sized (views 128², 32 + 32 "
                   "samples, 64² patches, 3 epochs).")


def _settings(preset, view_resolution=0, epochs=0, frontal_view=False, detach_opacity=False, **changes):
    if view_resolution:
        changes["view_resolution"] = view_resolution
    if epochs:
        changes["epochs"] = epochs
    return refine.RefineSettings.preset(preset, frontal_view=frontal_view, detach_opacity=detach_opacity, **changes)


def _view_inputs():
    return [
        io.Combo.Input("preset", options=["paper", "draft"], default="paper", tooltip=_PRESET_TOOLTIP),
        io.Int.Input("seed", default=42, min=0, max=2**31 - 2, control_after_generate=False,
                     tooltip="Seeds the ±5° pitch jitter of the views, the ray jitter, the img2img noise and the "
                             "refit's view order and patches (Portrait3D: 42)."),
        io.Int.Input("view_resolution", default=0, min=0, max=1024, step=8,
                     tooltip="0 = the preset's (paper 512, draft 128). Size of the rendered views."),
        io.Boolean.Input("frontal_view", default=False,
                         tooltip="Add an exact frontal view to the 7 × 3 set (the paper's set has none: its nearest "
                                 "view is 12.9° off). The face then gets one more cleaned target."),
    ]


def _refit_inputs():
    return [
        io.Int.Input("epochs", default=0, min=0, max=1000,
                     tooltip="0 = the preset's (paper 19, draft 3). One epoch = every view once (batch 1)."),
        io.Boolean.Input("detach_opacity", default=False,
                         tooltip="Off (paper): the loss is weighted by the predicted opacity with gradients, so it "
                                 "can also fall by making the head more transparent. On: the weight is a constant, "
                                 "only colour errors move the grid (keeps opacity, fits colours less tightly)."),
    ]


def _decoder_and_background(gan, decoder, background: bool):
    if gan is not None:
        generator = expect_gan(gan)
        return generator.decoder_view(), (generator.background_hook() if background else None), generator
    if decoder is not None:
        return expect_decoder(decoder), None, None
    raise ValueError("connect the portrait GAN ('gan'; its decoder/ToRGB render the tri-grid, its background net the "
                     "views) or a decoder")


def _to_image(views01: torch.Tensor) -> torch.Tensor:
    return views01.permute(0, 2, 3, 1).contiguous().float().cpu()


def _from_image(images: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[-1] < 3:
        raise ValueError("'images' must be a ComfyUI IMAGE batch [N, H, W, 3]")
    return images[..., :3].permute(0, 3, 1, 2).float()


def _checkpoint_dir(key: str) -> str:
    return os.path.join(folder_paths.get_output_directory(), CHECKPOINT_FOLDER, key)


def comfy_img2img(model, vae, positive, negative, seed, steps, cfg, sampler_name, scheduler, denoise, images,
                  views_per_batch=0, step_callback=None) -> torch.Tensor:
    """IMAGE ``[N, H, W, 3]`` → cleaned IMAGE, as VAE Encode → KSampler → VAE Decode with these settings.

    Noise comes from ``comfy.sample.prepare_noise`` over the whole batch (KSampler's draw), so splitting into
    ``views_per_batch`` only bounds memory. ``step_callback(views_done_before, batch, step, total_steps)``.
    """
    latent = vae.encode(images[:, :, :, :3])
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed, None)
    n = latent.shape[0]
    size = n if views_per_batch <= 0 else views_per_batch
    out = []
    for start in range(0, n, size):
        stop = min(n, start + size)

        def callback(step, x0, x, total_steps, _start=start, _count=stop - start):
            if step_callback is not None:
                step_callback(_start, _count, step, total_steps)

        samples = comfy.sample.sample(model, noise[start:stop], steps, cfg, sampler_name, scheduler, positive,
                                      negative, latent[start:stop], denoise=denoise, callback=callback,
                                      disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        decoded = vae.decode(samples)
        if decoded.dim() == 5:
            decoded = decoded.reshape(-1, decoded.shape[-3], decoded.shape[-2], decoded.shape[-1])
        out.append(decoded.float().cpu())
    return torch.cat(out)


class RenderViews(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Portrait3D_RenderViews",
            display_name="Render Views (Portrait3D)",
            category=CATEGORY,
            description="The 21 refinement views of Portrait3D (7 yaws × 3 pitches π/2 − 30°, π/2, π/2 + 30°, ±5° "
                        "jitter, radius 2.7, f 6.4848) with the GAN background, as an IMAGE batch for any img2img "
                        "graph (KSampler at denoise ≈ 0.2, a face detailer, an upscaler …); then Refit Tri-grid.",
            inputs=[
                TriGridSocket.Input("trigrid", tooltip="The portrait (first item of a batch)."),
                GanSocket.Input("gan", tooltip="The portrait GAN: decoder/ToRGB and the background network."),
                *_view_inputs(),
                io.Boolean.Input("background", default=True,
                                 tooltip="Composite the GAN background (paper: on; the diffusion model sees it)."),
            ],
            outputs=[io.Image.Output(display_name="views", tooltip="N views, index 3·yaw + pitch (+ frontal last)."),
                     CameraSocket.Output(display_name="cameras", tooltip="The camera of every view, for Refit.")],
        )

    @classmethod
    def execute(cls, trigrid, gan, preset, seed, view_resolution, frontal_view, background) -> io.NodeOutput:
        trigrid = expect_trigrid(trigrid).select(0)
        settings = _settings(preset, view_resolution, frontal_view=frontal_view, view_background=background)
        decoder, hook, generator = _decoder_and_background(gan, None, background)
        labels = refine.view_cameras(settings, seed)
        progress = host.Progress(labels.shape[0])
        trigrid = host.on_compute_device(trigrid, generator)
        views = refine.render_views(trigrid, decoder, labels, settings, background=hook, seed=seed,
                                    progress=progress, on_chunk=progress.check_cancel)
        return io.NodeOutput(_to_image(views), labels)


def _refit(trigrid, decoder, views01, labels, settings, seed, folder, bar, offset, total):
    def progress(done, _total):
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(offset + done, total)

    def preview(done, image):
        bar.update_absolute(offset + done, total, ("JPEG", _pil(image), 512))

    path = os.path.join(folder, refine.CHECKPOINT_NAME)
    if os.path.isfile(path):
        LOG.info("[Portrait3D] refit: resuming from the checkpoint in %s", folder)
    with torch.inference_mode(False), torch.enable_grad():
        result = refine.refit(trigrid, decoder, views01.clone(), labels.clone(), settings, seed=seed,
                              progress=progress, preview=preview, checkpoint_path=path)
    LOG.info("[Portrait3D] refit: %d iterations done (resumed from %d), checkpoint %s", result.iterations,
             result.resumed_from, path)
    return result


class RefitTriGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Portrait3D_RefitTriGrid",
            display_name="Refit Tri-grid (Portrait3D)",
            category=CATEGORY,
            description="Fits all tri-grid levels to cleaned views (Portrait3D stage 6c): random 256² patches, "
                        "loss 1000·mean((render − view)²·opacity), Adan lr 1.0, no background. Checkpoints to "
                        "output/portrait3d_refine/ so a cancelled run resumes when re-queued.",
            inputs=[
                TriGridSocket.Input("trigrid", tooltip="The tri-grid the views were rendered from (copied)."),
                io.Image.Input("images", tooltip="The cleaned views, in the order of Render Views."),
                CameraSocket.Input("cameras", tooltip="The cameras output of Render Views."),
                io.Combo.Input("preset", options=["paper", "draft"], default="paper", tooltip=_PRESET_TOOLTIP),
                io.Int.Input("seed", default=42, min=0, max=2**31 - 2, control_after_generate=False,
                             tooltip="Seeds the view order, patches and ray jitter (use Render Views' seed to match "
                                     "the one-node Refine)."),
                *_refit_inputs(),
                GanSocket.Input("gan", optional=True, tooltip="The portrait GAN (its decoder/ToRGB render)."),
                DecoderSocket.Input("decoder", optional=True, tooltip="Decoder + ToRGB instead of a GAN."),
            ],
            outputs=[TriGridSocket.Output(display_name="trigrid", tooltip="The refitted tri-grid.")],
        )

    @classmethod
    def execute(cls, trigrid, images, cameras, preset, seed, epochs, detach_opacity, gan=None,
                decoder=None) -> io.NodeOutput:
        trigrid = expect_trigrid(trigrid).select(0)
        labels = expect_cameras(cameras)
        views = _from_image(images)
        settings = _settings(preset, views.shape[-1], epochs, detach_opacity=detach_opacity)
        decoder, _, generator = _decoder_and_background(gan, decoder, False)
        trigrid = host.on_compute_device(trigrid, generator, decoder)
        key = refine.fingerprint(trigrid, decoder, views, labels, settings, seed)
        total = settings.iterations(views.shape[0])
        bar = comfy.utils.ProgressBar(total)
        result = _refit(trigrid, decoder, views.to(trigrid.device), labels, settings, seed, _checkpoint_dir(key),
                        bar, 0, total)
        out = result.trigrid
        out.meta.update(refit_iterations=str(result.iterations))
        return io.NodeOutput(host.to_storage(out))


class Refine(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Portrait3D_Refine",
            display_name="Refine (Portrait3D)",
            category=CATEGORY,
            description="Portrait3D's last quality step: renders 21 views, cleans each with a light img2img pass "
                        "of your diffusion model (noise to t = 200 of 1000, ~10 DDIM steps, CFG 7.5) and refits the "
                        "tri-grid to the cleaned views. Same as Render Views → VAE Encode → KSampler → VAE Decode → "
                        "Refit Tri-grid. Resumes when re-queued after a cancel.",
            inputs=[
                TriGridSocket.Input("trigrid", tooltip="The portrait (e.g. from Score Distillation); copied."),
                GanSocket.Input("gan", tooltip="The portrait GAN: decoder/ToRGB and the background network."),
                io.Model.Input("model", tooltip="The SD1.5-class MODEL for img2img (Portrait3D: Realistic Vision)."),
                io.Conditioning.Input("positive", tooltip="The prompt (Portrait3D: the raw prompt, no view prefix)."),
                io.Vae.Input("vae", tooltip="Encodes the views and decodes the cleaned latents."),
                *_view_inputs(),
                io.Int.Input("steps", default=10, min=1, max=200,
                             tooltip="Sampler steps actually run (KSampler semantics: with denoise 0.2, 10 steps = "
                                     "the last 10 of a 50-step schedule, as Portrait3D's DDIM)."),
                io.Float.Input("denoise", default=0.2, min=0.01, max=1.0, step=0.01,
                               tooltip="How much noise is added: 0.2 ≈ t = 200 of 1000 (Portrait3D)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=30.0, step=0.1, tooltip="CFG scale (Portrait3D: 7.5)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="ddim",
                               tooltip="ddim = Portrait3D's DDIM (eta 0)."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="ddim_uniform",
                               tooltip="ddim_uniform = the DDIM timestep grid."),
                io.Int.Input("views_per_batch", default=0, min=0, max=64,
                             tooltip="Views per sampling call (0 = all; lower it if memory runs out — the result is "
                                     "the same)."),
                *_refit_inputs(),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative conditioning (or connect a CLIP and use negative_text)."),
                io.Clip.Input("clip", optional=True, tooltip="Encodes negative_text when no negative is connected."),
                io.String.Input("negative_text", default=refine.DEFAULT_NEGATIVE, optional=True,
                                tooltip="Portrait3D's SDEdit negative prompt."),
            ],
            outputs=[TriGridSocket.Output(display_name="trigrid", tooltip="The refined tri-grid."),
                     io.Image.Output(display_name="views", tooltip="The rendered views (before img2img)."),
                     io.Image.Output(display_name="cleaned_views", tooltip="The views after img2img (the targets).")],
        )

    @classmethod
    def execute(cls, trigrid, gan, model, positive, vae, preset, seed, view_resolution, frontal_view, steps,
                denoise, cfg, sampler_name, scheduler, views_per_batch, epochs, detach_opacity, negative=None,
                clip=None, negative_text=refine.DEFAULT_NEGATIVE) -> io.NodeOutput:
        trigrid = expect_trigrid(trigrid).select(0)
        if negative is None:
            if clip is None:
                raise ValueError("connect a negative conditioning, or a CLIP to encode negative_text")
            negative = clip.encode_from_tokens_scheduled(clip.tokenize(negative_text))
        settings = _settings(preset, view_resolution, epochs, frontal_view, detach_opacity, img2img_steps=steps,
                             denoise=denoise, cfg=cfg)
        decoder, hook, generator = _decoder_and_background(gan, None, True)
        trigrid = host.on_compute_device(trigrid, generator)
        labels = refine.view_cameras(settings, seed)
        n = labels.shape[0]
        iterations = settings.iterations(n)
        total = n + n * steps + iterations
        bar = comfy.utils.ProgressBar(total)
        extra = f"{model_identity(model, vae, {'positive': positive, 'negative': negative})}|{sampler_name}|" \
                f"{scheduler}|{steps}|{denoise}|{cfg}"
        key = hashlib.sha256((refine.fingerprint(trigrid, decoder, torch.zeros(0), labels, settings, seed) +
                              extra).encode()).hexdigest()[:16]
        folder = _checkpoint_dir(key)
        views_path = os.path.join(folder, refine.VIEWS_NAME)
        if os.path.isfile(views_path):
            from safetensors.torch import load_file

            LOG.info("[Portrait3D] refine: reusing the stored views and cleaned views in %s", folder)
            stored = load_file(views_path)
            views, cleaned = stored["views"], stored["cleaned"]
        else:
            def view_done(done, _total):
                comfy.model_management.throw_exception_if_processing_interrupted()
                bar.update_absolute(done, total)

            views = refine.render_views(trigrid, decoder, labels, settings, background=hook, seed=seed,
                                        progress=view_done, on_chunk=host.Progress.check_cancel)

            def step_done(before, count, step, total_steps):
                comfy.model_management.throw_exception_if_processing_interrupted()
                bar.update_absolute(n + before * steps + count * min(step + 1, steps), total)

            cleaned_image = comfy_img2img(model, vae, positive, negative, seed, steps, cfg, sampler_name, scheduler,
                                          denoise, _to_image(views), views_per_batch, step_done)
            cleaned = _from_image(cleaned_image).contiguous()
            from safetensors.torch import save_file

            from portrait3d_core.fileio import atomic_write

            tensors = {"views": views.cpu().contiguous(), "cleaned": cleaned, "cameras": labels}
            atomic_write(views_path, lambda tmp: save_file(tensors, tmp), overwrite=True)
        bar.update_absolute(n + n * steps, total)
        # the targets go through an IMAGE round trip exactly as on the split path (Render Views → … → Refit)
        result = _refit(trigrid, decoder, cleaned.to(trigrid.device), labels, settings, seed,
                        _checkpoint_dir(refine.fingerprint(trigrid, decoder, cleaned, labels, settings, seed)),
                        bar, n + n * steps, total)
        out = result.trigrid
        out.meta.update(refit_iterations=str(result.iterations))
        views_image, cleaned_image = _to_image(views), _to_image(cleaned)
        return io.NodeOutput(host.to_storage(out), views_image, cleaned_image,
                             ui=ui.PreviewImage(cleaned_image, cls=cls))
