"""3DPortraitGAN-Pyramid generator (Portrait3D's GAN prior), re-implemented from ``portrait_gan.md``.

Public API (imported lazily so ``python -m portrait3d_core.gan.convert`` stays clean):

- ``load_generator(path, cache_dir=None, device="cpu") -> PortraitGenerator``: our converted files or the official
  ``model_512.pkl`` (converted once, cached; ``convert.py``). ``load_discriminator_state(path)``: ``D_ema`` tensors.
- ``PortraitGenerator`` (``generator.py``): ``mapping(z, c, p, truncation_psi, truncation_cutoff) -> ws``,
  ``pose(z, c)``, ``trigrid(ws) -> TriGrid``, ``decoder_view() -> Decoder``, ``background_hook()`` for
  ``renderer.render_image``, ``synthesis(ws, c, resolution) -> dict``, ``superresolve(...)``.
- ``GeneratorConfig`` (``config.py``): sizes; ``full_512()``, ``from_oracle_config(json)``, JSON round trip.
- ``convert_checkpoint(pkl, out_dir)``: the converter behind the CLI.
- Posed rendering: ``PortraitGenerator.smpl`` (``smpl.SMPLModel`` or None), ``PortraitGenerator.deformer(pose)``
  (``deform.PoseDeformer``), ``synthesis(ws, c, pose=p)`` / ``render_trigrid(trigrid, c, pose=p)``.
- Initial pose: ``load_discriminator(path)`` (``discriminator.PoseDiscriminator`` or None) and
  ``predict_initial_pose(discriminator, image, mask, camera_label) -> [B, 6]``.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "GeneratorConfig": "config",
    "PortraitGenerator": "generator",
    "PosePrediction": "pose",
    "load_generator": "convert",
    "load_discriminator_state": "convert",
    "convert_checkpoint": "convert",
    "read_official_pickle": "convert",
    "SMPLModel": "smpl",
    "PoseDeformer": "deform",
    "PoseDiscriminator": "discriminator",
    "PosePredictSettings": "discriminator",
    "load_discriminator": "discriminator",
    "predict_initial_pose": "discriminator",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
