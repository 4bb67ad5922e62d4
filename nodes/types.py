"""Custom socket types of the Portrait3D nodes and the checks that give clear errors when wiring is wrong.

Values travelling on the sockets:
- ``PORTRAIT3D_TRIGRID``: ``portrait3d_core.trigrid.TriGrid`` (levels [B, 3, 36, R, R], ws, box_warp, meta).
- ``PORTRAIT3D_DECODER``: ``portrait3d_core.decoder.Decoder`` (decoder + ToRGB + pose branch).
- ``PORTRAIT3D_CAMERA``: float tensor ``[N, 25]`` of camera labels (cam2world | normalised intrinsics).
- ``PORTRAIT3D_GAN``: ``portrait3d_core.gan.generator.PortraitGenerator`` (3DPortraitGAN-Pyramid G_ema).
"""
from __future__ import annotations

import torch
from comfy_api.latest import io

from portrait3d_core.decoder import Decoder
from portrait3d_core.trigrid import TriGrid

TriGridSocket = io.Custom("PORTRAIT3D_TRIGRID")
DecoderSocket = io.Custom("PORTRAIT3D_DECODER")
CameraSocket = io.Custom("PORTRAIT3D_CAMERA")
GanSocket = io.Custom("PORTRAIT3D_GAN")


def expect_trigrid(value, name: str = "trigrid") -> TriGrid:
    if not isinstance(value, TriGrid):
        raise ValueError(f"'{name}' must come from a Portrait3D tri-grid output (Load Tri-grid, Tri-grid Synthesis…), "
                         f"got {type(value).__name__}")
    return value


def expect_decoder(value, name: str = "decoder") -> Decoder:
    if not isinstance(value, Decoder):
        raise ValueError(f"'{name}' must come from Load Decoder (or a GAN loader), got {type(value).__name__}")
    return value


def expect_cameras(value, name: str = "camera") -> torch.Tensor:
    if not torch.is_tensor(value) or value.dim() != 2 or value.shape[1] != 25:
        raise ValueError(f"'{name}' must be Portrait3D camera labels [N, 25] (from a Portrait3D Camera node)")
    return value


def expect_gan(value, name: str = "gan"):
    from portrait3d_core.gan.generator import PortraitGenerator

    if not isinstance(value, PortraitGenerator):
        raise ValueError(f"'{name}' must come from Load Portrait GAN, got {type(value).__name__}")
    return value
