"""The pyramid tri-grid backbone: ``Hierarchy3DAwareGenerator`` (``portrait_gan.md`` §12.3).

- 2-D branch: StyleGAN2 "skip" synthesis at ``backbone_resolution`` (256) with 108 channels everywhere
  (3 planes × 36) and 108-channel ToRGBs; block ``b_r`` uses ws[2i − 1 … 2i + 1] (b4: ws[0:2]).
- After each 2-D block ``b_r``, an ``Aware3DBlock`` ``b3d_r`` takes the block's running image ``[N, 108, r, r]``
  viewed as ``[N·3, 36, r, r]``, adds the previous level's output (same shape), and runs a roll-out 'b' synthesis
  block (×2 up conv, conv, ToRGB, all 36 → 36 via ``aware3d``, all styled by the last w of the 2-D block's slice)
  → level ``[N·3, 36, 2r, 2r]``.
- Output: one tensor ``[N, 3, 36, 2r, 2r]`` per r = 4 … 256, i.e. spatial sizes 8 … 512.

Keys: ``backbone.synthesis.b{r}.*``, ``backbone.synthesis.b3d{r}.block.*`` (interleaved b4, b3d4, b8, …),
``backbone.mapping.*``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .stylegan2 import MappingNetwork, SynthesisBlock, _check_noise_mode


class Aware3DBlock(nn.Module):
    """One pyramid level: ``(planes [N·3, C, r, r], w [N, w_dim]) -> [N·3, C, 2r, 2r]``."""

    def __init__(self, plane_channels: int, w_dim: int, resolution: int, conv_clamp: Optional[float] = None):
        super().__init__()
        self.resolution = resolution   # output size (2r)
        self.block = SynthesisBlock(plane_channels, plane_channels, w_dim, resolution, plane_channels,
                                    conv_clamp=conv_clamp, rollout=True)

    def forward(self, planes: torch.Tensor, w: torch.Tensor, noise_mode: str = "const") -> torch.Tensor:
        ws = w.unsqueeze(1).expand(-1, 3, -1)
        _, img = self.block(planes, None, ws, noise_mode)
        return img


class Hierarchy3DAwareSynthesisNetwork(nn.Module):
    """ws ``[N, num_ws, w_dim]`` → list of pyramid levels ``[N, 3, 36, 2r, 2r]`` (r = 4 … resolution)."""

    def __init__(self, w_dim: int, resolution: int, plane_channels: int = 36, conv_clamp: Optional[float] = None):
        super().__init__()
        self.w_dim, self.resolution, self.plane_channels = w_dim, resolution, plane_channels
        self.block_resolutions = [2 ** i for i in range(2, resolution.bit_length())]
        channels = 3 * plane_channels
        self.num_ws = 0
        for r in self.block_resolutions:
            block = SynthesisBlock(0 if r == 4 else channels, channels, w_dim, r, channels, conv_clamp=conv_clamp)
            setattr(self, f"b{r}", block)
            setattr(self, f"b3d{r}", Aware3DBlock(plane_channels, w_dim, 2 * r, conv_clamp=conv_clamp))
            self.num_ws += block.num_conv
        self.num_ws += 1

    def forward(self, ws: torch.Tensor, noise_mode: str = "const") -> list:
        _check_noise_mode(noise_mode)
        if ws.dim() != 3 or ws.shape[1] != self.num_ws or ws.shape[2] != self.w_dim:
            raise ValueError(f"ws must be [N, {self.num_ws}, {self.w_dim}], got {tuple(ws.shape)}")
        n = ws.shape[0]
        x = img = previous = None
        levels = []
        index = 0
        for r in self.block_resolutions:
            block = getattr(self, f"b{r}")
            block_ws = ws[:, index:index + block.num_conv + block.num_torgb]
            index += block.num_conv
            x, img = block(x, img, block_ws, noise_mode)
            planes = img.reshape(n * 3, self.plane_channels, r, r)
            if previous is not None:
                planes = planes + previous
            previous = getattr(self, f"b3d{r}")(planes, block_ws[:, -1], noise_mode)
            levels.append(previous.reshape(n, 3, self.plane_channels, 2 * r, 2 * r))
        return levels


class Hierarchy3DAwareGenerator(nn.Module):
    """Container with the official ``synthesis`` / ``mapping`` names."""

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, resolution: int, plane_channels: int = 36,
                 mapping_layers: int = 2, mapping_lr_multiplier: float = 0.01, conv_clamp: Optional[float] = None):
        super().__init__()
        self.synthesis = Hierarchy3DAwareSynthesisNetwork(w_dim, resolution, plane_channels, conv_clamp)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, c_dim, w_dim, self.num_ws, mapping_layers, mapping_lr_multiplier)
