"""``SuperresolutionHybrid8XDC`` (``portrait_gan.md`` §9): raw image + feature image → 4× image.

- Inputs whose size differs from ``input_resolution`` (128) are bilinearly resized to it (antialiased when
  ``sr_antialias``), both the 3-channel image and the 32-channel features.
- block0: synthesis block 32 → 256 channels at 2× (256²), block1: 256 → 128 at 4× (512²); "skip" architecture
  (the input image is FIR-upsampled and summed with each block's ToRGB).
- Every layer is styled by ``ws[:, -1]`` (repeated for the three layers of each block); conv clamp 256 whenever
  ``sr_num_fp16_res > 0`` (the released model); noise mode 'none'. Half precision only on CUDA and only when
  enabled (``use_fp16``); otherwise fp32.

Keys: ``superresolution.block{0,1}.*``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .stylegan2 import SynthesisBlock


class SuperresolutionHybrid8XDC(nn.Module):
    def __init__(self, channels: int = 32, input_resolution: int = 128, block_channels: Sequence[int] = (256, 128),
                 w_dim: int = 512, img_channels: int = 3, conv_clamp: Optional[float] = 256.0,
                 use_fp16: bool = False, antialias: bool = True, noise_mode: str = "none"):
        super().__init__()
        self.input_resolution, self.antialias, self.noise_mode = input_resolution, antialias, noise_mode
        c0, c1 = block_channels
        self.block0 = SynthesisBlock(channels, c0, w_dim, 2 * input_resolution, img_channels,
                                     conv_clamp=conv_clamp, use_fp16=use_fp16)
        self.block1 = SynthesisBlock(c0, c1, w_dim, 4 * input_resolution, img_channels,
                                     conv_clamp=conv_clamp, use_fp16=use_fp16)

    def set_fp16(self, enabled: bool) -> None:
        """Half-precision convolutions on CUDA (the official GPU behaviour); CPU always runs fp32."""
        self.block0.use_fp16 = self.block1.use_fp16 = bool(enabled)

    def forward(self, rgb: torch.Tensor, x: torch.Tensor, ws: torch.Tensor,
                noise_mode: Optional[str] = None) -> torch.Tensor:
        """rgb ``[N, 3, h, h]``, features ``[N, C, h, h]``, ws ``[N, *, w_dim]`` (last used) → ``[N, 3, 4R, 4R]``."""
        noise_mode = self.noise_mode if noise_mode is None else noise_mode
        ws = ws[:, -1:, :].expand(-1, 3, -1)
        size = self.input_resolution
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=self.antialias)
        if rgb.shape[-2:] != (size, size):
            rgb = F.interpolate(rgb, size=(size, size), mode="bilinear", align_corners=False, antialias=self.antialias)
        x, rgb = self.block0(x, rgb, ws, noise_mode)
        x, rgb = self.block1(x, rgb, ws, noise_mode)
        return rgb
