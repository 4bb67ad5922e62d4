"""Score Distillation (SDS): optimise a tri-grid toward a text prompt with the user's own diffusion model."""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
from comfy_api.latest import io, ui
from PIL import Image

import comfy.model_management
import comfy.utils
import folder_paths
from portrait3d_core import sds
from portrait3d_core.guidance import view_prompts

from . import host
from .guidance import find_taesd_encoder, model_identity, run_with_guider, _TinyEncoder
from .types import DecoderSocket, GanSocket, TriGridSocket, expect_decoder, expect_gan, expect_trigrid

LOG = logging.getLogger("portrait3d")
CATEGORY = "Portrait3D/optimise"
CHECKPOINT_FOLDER = "portrait3d_sds"       # under ComfyUI's output folder: survives restarts, so crashes resume


def _encode_text(clip, text: str):
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)


def _conditionings(clip, text, negative_text, front, side, back, negative):
    given = [front, side, back]
    if clip is None:
        if any(c is None for c in given) or negative is None:
            raise ValueError("connect a CLIP (the prompt is then encoded as 'front view …', 'side view …', "
                             "'back view …') or all of positive_front, positive_side, positive_back and negative")
        return {"front": front, "side": side, "back": back, "negative": negative}
    prompts = view_prompts(text)
    conds = {name: (given[i] if given[i] is not None else _encode_text(clip, prompts[name]))
             for i, name in enumerate(("front", "side", "back"))}
    conds["negative"] = negative if negative is not None else _encode_text(clip, negative_text)
    return conds


def _pil(image01: torch.Tensor) -> Image.Image:
    array = (image01[0].permute(1, 2, 0).clamp(0, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def checkpoint_dir(key: str) -> str:
    return os.path.join(folder_paths.get_output_directory(), CHECKPOINT_FOLDER, key)


class ScoreDistillation(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Portrait3D_SDS",
            display_name="Score Distillation (Portrait3D)",
            category=CATEGORY,
            description="Optimises the 7 tri-grid levels with score distillation sampling from your diffusion "
                        "model (Portrait3D stage 5): random 360° cameras, view-dependent prompts ('front/side/back "
                        "view …'), CFG, Adan and an EMA of the tri-grid (the output). Checkpoints to "
                        "output/portrait3d_sds/<run key>/ so a cancelled or crashed run resumes when re-queued.",
            inputs=[
                TriGridSocket.Input("trigrid", tooltip="The portrait to optimise (e.g. from Tri-grid Synthesis or "
                                                       "inversion); it is copied, never modified."),
                io.Model.Input("model", tooltip="An SD1.5-class MODEL (LoRAs and model patches apply). Portrait3D "
                                                "used Realistic Vision 5.1."),
                io.Vae.Input("vae", tooltip="The VAE whose encoder turns renders into latents (with gradients)."),
                io.String.Input("text", multiline=True, default="a portrait of a smiling woman with red hair",
                                tooltip="What the portrait should become; 'front view ', 'side view ' and "
                                        "'back view ' are prefixed per view class."),
                io.Combo.Input("preset", options=["paper", "draft"], default="paper",
                               tooltip="paper: Portrait3D's recipe (2000 iterations, VAE encoder at 512², 48 + 48 "
                                       "samples). draft: ≈ 4× cheaper (500 iterations, TAESD encoder when available, "
                                       "256² encode, 32 + 32 samples)."),
                io.Int.Input("iterations", default=0, min=0, max=100000,
                             tooltip="0 = the preset's (paper 2000, draft 500). One EMA update per 100."),
                io.Float.Input("guidance_scale", default=100.0, min=0.0, max=500.0, step=0.5,
                               tooltip="Classifier-free guidance scale of SDS (Portrait3D: 100)."),
                io.Int.Input("t_min", default=20, min=1, max=999,
                             tooltip="Smallest diffusion timestep drawn (Portrait3D: 20 = 0.02 × 1000)."),
                io.Int.Input("t_max", default=400, min=1, max=999,
                             tooltip="Largest diffusion timestep drawn (Portrait3D: 400)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 2, control_after_generate=False,
                             tooltip="Seeds cameras, timesteps, ray jitter and noise: same seed and inputs on the "
                                     "same device ⇒ the same result."),
                io.Int.Input("render_resolution", default=128, min=32, max=512, step=8,
                             tooltip="Training render size (Portrait3D: 128); the render is resized to the encoder "
                                     "resolution of the preset."),
                io.Int.Input("checkpoint_interval", default=100, min=1, max=10000,
                             tooltip="Iterations between checkpoints (each ≈ 6 × the tri-grid size on disk)."),
                io.Int.Input("preview_interval", default=25, min=1, max=10000,
                             tooltip="Iterations between live previews of the training view on the node."),
                GanSocket.Input("gan", optional=True,
                                tooltip="The portrait GAN whose decoder/ToRGB render the tri-grid (or connect a "
                                        "decoder)."),
                DecoderSocket.Input("decoder", optional=True,
                                    tooltip="Decoder + ToRGB matching the tri-grid (instead of a GAN)."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Encodes the view prompts and the negative prompt (or connect conditionings)."),
                io.String.Input("negative_text", default="", optional=True,
                                tooltip="Negative prompt for CFG (Portrait3D: empty)."),
                io.Conditioning.Input("positive_front", optional=True,
                                      tooltip="Own conditioning for front views (replaces 'front view <text>')."),
                io.Conditioning.Input("positive_side", optional=True,
                                      tooltip="Own conditioning for side views (replaces 'side view <text>')."),
                io.Conditioning.Input("positive_back", optional=True,
                                      tooltip="Own conditioning for back views (replaces 'back view <text>')."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Own negative conditioning (replaces negative_text)."),
            ],
            outputs=[TriGridSocket.Output(display_name="trigrid",
                                          tooltip="The EMA of the optimised tri-grid (Portrait3D's df.pth)."),
                     io.Image.Output(display_name="views",
                                     tooltip="8 views of the result at the render resolution (azimuth k·45°).")],
        )

    @classmethod
    def validate_inputs(cls, t_min, t_max, **_):
        if t_min > t_max:
            return f"t_min ({t_min}) must not be larger than t_max ({t_max})"
        return True

    @classmethod
    def execute(cls, trigrid, model, vae, text, preset, iterations, guidance_scale, t_min, t_max, seed,
                render_resolution, checkpoint_interval, preview_interval, gan=None, decoder=None, clip=None,
                negative_text="", positive_front=None, positive_side=None, positive_back=None,
                negative=None) -> io.NodeOutput:
        trigrid = expect_trigrid(trigrid).select(0)
        if gan is not None:
            decoder = expect_gan(gan).decoder_view()
        elif decoder is not None:
            decoder = expect_decoder(decoder)
        else:
            raise ValueError("connect the portrait GAN ('gan') or a decoder: SDS needs the decoder/ToRGB that "
                             "render this tri-grid")
        changes = dict(guidance_scale=guidance_scale, t_min=t_min, t_max=t_max, render_resolution=render_resolution,
                       checkpoint_interval=checkpoint_interval, preview_interval=preview_interval)
        if iterations:
            changes["iterations"] = iterations
        settings = sds.SDSSettings.preset(preset, **changes)
        with torch.inference_mode(False), torch.enable_grad():
            return cls._run(trigrid, decoder, model, vae, clip, text, negative_text, positive_front, positive_side,
                            positive_back, negative, settings, seed)

    @classmethod
    def _run(cls, trigrid, decoder, model, vae, clip, text, negative_text, front, side, back, negative, settings,
             seed):
        conds = _conditionings(clip, text, negative_text, front, side, back, negative)
        tiny = None
        if settings.encoder == "taesd":
            import comfy.taesd.taesd

            if isinstance(vae.first_stage_model, comfy.taesd.taesd.TAESD):
                pass                                   # the connected VAE already is TAESD
            elif type(model.model.latent_format).__name__ == "SD15" and (path := find_taesd_encoder()):
                tiny = _TinyEncoder(path)
            else:
                LOG.warning("[Portrait3D] SDS draft: no TAESD encoder (models/vae_approx/taesd_encoder.*) for this "
                            "model; encoding with the connected VAE instead")
        device = host.compute_device()
        trigrid = host.on_compute_device(trigrid)
        decoder = decoder.to(device)
        key = sds.fingerprint(trigrid, decoder, settings, seed, model_identity(model, vae, conds) +
                              ("taesd" if tiny is not None else ""))
        folder = checkpoint_dir(key)
        total = settings.iterations
        bar = comfy.utils.ProgressBar(total)

        def progress(done, total_):
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update_absolute(done, total_)

        def preview(done, image):
            bar.update_absolute(done, total, ("JPEG", _pil(image), 512))

        def run(guidance):
            if os.path.isfile(os.path.join(folder, sds.CHECKPOINT_NAME)):
                LOG.info("[Portrait3D] SDS: resuming from the checkpoint in %s", folder)
            result = sds.run_sds(trigrid, decoder, guidance, guidance.view_conditioning(), settings, seed=seed,
                                 checkpoint_dir=folder, run_key=key, progress=progress, preview=preview)
            LOG.info("[Portrait3D] SDS: %d iterations done (resumed from %d), checkpoint %s", result.iterations,
                     result.resumed_from, result.checkpoint_path)
            return result

        latent_channels = int(model.model.latent_format.latent_channels)
        side = settings.encode_resolution // 8
        result = run_with_guider(model, conds, settings.guidance_scale, (1, latent_channels, side, side), seed, run,
                                 vae, tiny)
        views = sds.preview_views(result.trigrid, sds.frozen_decoder(decoder), settings,
                                  generator=torch.Generator(device=device).manual_seed(seed))
        images = views.permute(0, 2, 3, 1).contiguous().float().cpu()
        out = result.trigrid
        out.meta.update(sds_prompt=text, sds_iterations=str(result.iterations), sds_run=key)
        return io.NodeOutput(host.to_storage(out), images, ui=ui.PreviewImage(images, cls=cls))
