"""The portrait GAN: loader and Tri-grid Synthesis (random portraits from seeds)."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from portrait3d_core.checkpoints import guess_file_kind
from portrait3d_core.gan.convert import load_generator
from portrait3d_core.gan.sample import synthesize_trigrids

from . import host
from .types import CameraSocket, DecoderSocket, GanSocket, TriGridSocket, expect_cameras, expect_gan

CATEGORY = "Portrait3D/gan"


def _gan_files():
    files = host.model_files(lambda name, path: guess_file_kind(path) == "gan")
    return files or ["(no model_512.pkl in models/portrait3d)"]


class LoadPortraitGAN(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Portrait3D_LoadGAN",
            display_name="Load Portrait GAN (Portrait3D)",
            category=CATEGORY,
            description="Loads 3DPortraitGAN-Pyramid (G_ema) from the official model_512.pkl — read safely and "
                        "converted once to .safetensors beside it (or in the user folder's portrait3d_cache when "
                        "the models folder is read-only) — or from an already converted *.generator.safetensors.",
            inputs=[io.Combo.Input("gan_file", options=_gan_files(),
                                   tooltip="model_512.pkl from the Portrait3D release in ComfyUI/models/portrait3d "
                                           "(the first load converts it; later loads are fast).")],
            outputs=[GanSocket.Output(display_name="gan")],
        )

    @classmethod
    def execute(cls, gan_file: str) -> io.NodeOutput:
        generator = load_generator(host.model_path(gan_file), cache_dir=host.writable_cache_dir())
        return io.NodeOutput(generator)


class TriGridSynthesis(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Portrait3D_TriGridSynthesis",
            display_name="Tri-grid Synthesis (Portrait3D)",
            category=CATEGORY,
            description="Random 3D portraits: seed → latent z → mapping (truncation ψ) → pyramid tri-grid, plus the "
                        "GAN's decoder and a preview (neural render with the GAN background + super-resolution).",
            inputs=[
                GanSocket.Input("gan", tooltip="From Load Portrait GAN."),
                io.Int.Input("seed", default=0, min=0, max=2**32 - 1, control_after_generate=True,
                             tooltip="z = RandomState(seed).randn(z_dim), as the official scripts draw it. "
                                     "Same seed and settings ⇒ the same tri-grid."),
                io.Int.Input("batch_size", default=1, min=1, max=16,
                             tooltip="Portraits to make, with seeds seed, seed+1, …"),
                io.Float.Input("truncation_psi", default=0.7, min=0.0, max=1.5, step=0.01,
                               tooltip="Truncation ψ: lower = closer to the average portrait, higher = more varied "
                                       "(the paper's examples use 0.7; 1 = no truncation)."),
                io.Int.Input("truncation_cutoff", default=14, min=1, max=64,
                             tooltip="Number of ws truncated (14 = all ws of the released model)."),
                io.Boolean.Input("preview", default=True,
                                 tooltip="Render the preview (neural render + super-resolution to 512²)."),
                CameraSocket.Input("conditioning_camera", optional=True,
                                   tooltip="Camera that conditions the mapping (default: the frontal camera, as "
                                           "in Portrait3D)."),
            ],
            outputs=[TriGridSocket.Output(display_name="trigrid"), DecoderSocket.Output(display_name="decoder"),
                     io.Image.Output(display_name="preview")],
        )

    @classmethod
    def execute(cls, gan, seed, batch_size, truncation_psi, truncation_cutoff, preview,
                conditioning_camera=None) -> io.NodeOutput:
        generator = expect_gan(gan)
        c_cond = None if conditioning_camera is None else expect_cameras(conditioning_camera, "conditioning_camera")[:1]
        seeds = [(seed + i) % 2**32 for i in range(batch_size)]
        progress = host.Progress(2 * batch_size)
        cutoff = min(truncation_cutoff, generator.num_ws)
        host.on_compute_device(None, generator)
        trigrid = synthesize_trigrids(generator, seeds, truncation_psi, cutoff, c_cond,
                                      progress=lambda done, total: progress(done, 2 * batch_size))
        images = []
        if preview:
            from portrait3d_core.gan.sample import frontal_label

            with torch.no_grad():
                for i in range(batch_size):
                    out = generator.render_trigrid(trigrid.select(i), frontal_label(),
                                                   settings=generator.render_settings().portrait3d(),
                                                   progress=progress.check_cancel)
                    images.append(out["image"])
                    progress(batch_size + i + 1, 2 * batch_size)
            image = host.to_image(torch.cat(images))
        else:
            image = torch.zeros(batch_size, 64, 64, 3)
        return io.NodeOutput(host.to_storage(trigrid), generator.decoder_view(), image)
