"""StyleGAN2 mapping and synthesis modules with the official parameter/buffer names (``portrait_gan.md`` §12).

Key layout per module (state-dict order = parameters, buffers, children):
- ``SynthesisLayer``: ``weight [O, I, k, k]``, ``noise_strength []``, ``bias [O]``, ``resample_filter [4, 4]``,
  ``noise_const [R, R]``, ``affine.{weight, bias}``.
- ``ToRGBLayer``: ``weight [O, I, 1, 1]``, ``bias [O]``, ``affine.{weight, bias}``.
- ``SynthesisBlock``: ``const [1, C, 4, 4]`` (first block only), ``resample_filter``, ``conv0`` (×2 up, not in the
  first block), ``conv1``, ``torgb`` ("skip" architecture: the running image is FIR-upsampled and summed).
- ``SynthesisNetwork``: ``b4 … b<res>``; ``MappingNetwork``: ``w_avg``, ``embed``, ``fc0 … fc<n-1>``.

``rollout=True`` layers are the tri-grid backbone's 3-D-aware variant (roll-out 'b', §12.3): the input
``[N·3, C, H, W]`` is expanded to ``3C`` channels by ``aware3d`` and each plane gets its own style vector (the
affine produces ``3 · 3C`` values per sample).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from ..layers import FullyConnected
from .ops import (LRELU_GAIN, bias_act, modulated_conv2d, normalize_2nd_moment, setup_filter, upsample2d)

NOISE_MODES = ("const", "random", "none")


def aware3d(x: torch.Tensor) -> torch.Tensor:
    """Mimic3D axis-mean pooling (§12.3): ``[N·3, C, R, R]`` (rows 3n + k = plane k) → ``[N·3, 3C, R, R]``.

    With planes P0, P1, P2 indexed [c, row, col]:
    out0 = [P0; A; B], A[row] = mean over rows of P1 (indexed by P1's column), B[col] = mean over cols of P2;
    out1 = [C; P1; D], C[col] = mean over cols of P0, D[row] = mean over rows of P2;
    out2 = [E; F; P2], E[row] = mean over rows of P0, F[col] = mean over cols of P1.
    """
    n3, c, h, w = x.shape
    if n3 % 3 or h != w:
        raise ValueError(f"aware3d needs [N*3, C, R, R], got {tuple(x.shape)}")
    planes = x.reshape(n3 // 3, 3, c, h, w)
    p0, p1, p2 = planes.unbind(1)
    out = x.new_empty(n3 // 3, 3, 3, c, h, w)          # [N, out plane, source block, C, R, R]
    for k in range(3):
        out[:, k, k] = planes[:, k]
    out[:, 0, 1] = p1.mean(-2).unsqueeze(-1)           # A: varies with row
    out[:, 0, 2] = p2.mean(-1).unsqueeze(-2)           # B: varies with column
    out[:, 1, 0] = p0.mean(-1).unsqueeze(-2)           # C: varies with column
    out[:, 1, 2] = p2.mean(-2).unsqueeze(-1)           # D: varies with row
    out[:, 2, 0] = p0.mean(-2).unsqueeze(-1)           # E: varies with row
    out[:, 2, 1] = p1.mean(-1).unsqueeze(-2)           # F: varies with column
    return out.reshape(n3, 3 * c, h, w)


def _check_noise_mode(noise_mode: str) -> None:
    if noise_mode not in NOISE_MODES:
        raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")


class SynthesisLayer(nn.Module):
    """Modulated 3×3 conv (+ optional ×2 up) → noise → bias → lrelu·√2 → optional clamp."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, kernel_size: int = 3,
                 up: int = 1, conv_clamp: Optional[float] = None, rollout: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.w_dim = in_channels, out_channels, w_dim
        self.resolution, self.up, self.padding = resolution, up, kernel_size // 2
        self.conv_clamp, self.rollout = conv_clamp, rollout
        conv_in = 3 * in_channels if rollout else in_channels
        self.affine = FullyConnected(w_dim, 3 * conv_in if rollout else conv_in, bias_init=1.0)
        self.register_buffer("resample_filter", setup_filter())
        self.weight = nn.Parameter(torch.randn(out_channels, conv_in, kernel_size, kernel_size))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "const", gain: float = 1.0):
        styles = self.affine(w)
        if self.rollout:
            styles = styles.reshape(x.shape[0], -1)
            x = aware3d(x)
        x = modulated_conv2d(x, self.weight, styles, demodulate=True, up=self.up, padding=self.padding,
                             resample_filter=self.resample_filter)
        if noise_mode == "const":       # in place on the fresh conv output (its backward needs no values)
            x = x.add_((self.noise_const * self.noise_strength).to(x.dtype))
        elif noise_mode == "random":
            noise = torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device, dtype=x.dtype)
            x = x.add_(noise * self.noise_strength.to(x.dtype))
        else:
            _check_noise_mode(noise_mode)
        clamp = None if self.conv_clamp is None else self.conv_clamp * gain
        return bias_act(x, self.bias, "lrelu", gain=LRELU_GAIN * gain, clamp=clamp)

    def extra_repr(self) -> str:
        return (f"in={self.in_channels}, out={self.out_channels}, res={self.resolution}, up={self.up}, "
                f"rollout={self.rollout}")


class ToRGBLayer(nn.Module):
    """Modulated 1×1 conv without demodulation, styles ``affine(w) / √(in·k²)``; + bias, optional clamp.

    Roll-out quirk: the gain uses the per-plane ``in_channels`` (1/√36) although the fan-in is 3·in (108).
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, kernel_size: int = 1,
                 conv_clamp: Optional[float] = None, rollout: bool = False):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.conv_clamp, self.rollout = conv_clamp, rollout
        conv_in = 3 * in_channels if rollout else in_channels
        self.affine = FullyConnected(w_dim, 3 * conv_in if rollout else conv_in, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, conv_in, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        if self.rollout:
            styles = styles.reshape(x.shape[0], -1)
            x = aware3d(x)
        x = modulated_conv2d(x, self.weight, styles, demodulate=False)
        return bias_act(x, self.bias, clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution of a "skip" StyleGAN2 synthesis network: ``(x, img, ws) -> (x, img)``.

    ``ws [N, num_conv + 1, w_dim]``: conv0 (if any), conv1, torgb in that order.
    ``use_fp16`` runs the convolutions in half precision, only for CUDA tensors (the image stays fp32).
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int,
                 conv_clamp: Optional[float] = None, use_fp16: bool = False, rollout: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.resolution = in_channels, out_channels, resolution
        self.use_fp16 = use_fp16
        self.register_buffer("resample_filter", setup_filter())
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn(1, out_channels, resolution, resolution))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=2, conv_clamp=conv_clamp,
                                        rollout=rollout)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp,
                                    rollout=rollout)
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp, rollout=rollout)
        self.num_conv = 1 if in_channels == 0 else 2
        self.num_torgb = 1

    def forward(self, x: Optional[torch.Tensor], img: Optional[torch.Tensor], ws: torch.Tensor,
                noise_mode: str = "const"):
        w_iter = iter(ws.unbind(1))
        half = self.use_fp16 and ws.device.type == "cuda"
        dtype = torch.float16 if half else torch.float32
        if self.in_channels == 0:
            x = self.const.to(dtype).expand(ws.shape[0], -1, -1, -1)
            x = self.conv1(x, next(w_iter), noise_mode)
        else:
            x = x.to(dtype)
            x = self.conv0(x, next(w_iter), noise_mode)
            x = self.conv1(x, next(w_iter), noise_mode)
        if img is not None:
            img = upsample2d(img, self.resample_filter)
        y = self.torgb(x, next(w_iter)).float()
        img = y if img is None else img + y
        return x, img

    def extra_repr(self) -> str:
        return f"in={self.in_channels}, out={self.out_channels}, res={self.resolution}"


class SynthesisNetwork(nn.Module):
    """Plain StyleGAN2 "skip" synthesis (the background network): ``ws [N, num_ws, w_dim] -> [N, C, R, R]``."""

    def __init__(self, w_dim: int, img_resolution: int, img_channels: int, channel_base: int, channel_max: int,
                 conv_clamp: Optional[float] = None):
        super().__init__()
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        self.block_resolutions = [2 ** i for i in range(2, img_resolution.bit_length())]
        channels = {r: min(channel_base // r, channel_max) for r in self.block_resolutions}
        self.num_ws = 0
        for r in self.block_resolutions:
            block = SynthesisBlock(channels[r // 2] if r > 4 else 0, channels[r], w_dim, r, img_channels,
                                   conv_clamp=conv_clamp)
            setattr(self, f"b{r}", block)
            self.num_ws += block.num_conv
        self.num_ws += 1   # the last block's torgb

    def forward(self, ws: torch.Tensor, noise_mode: str = "const") -> torch.Tensor:
        _check_noise_mode(noise_mode)
        if ws.dim() != 3 or ws.shape[1] != self.num_ws or ws.shape[2] != self.w_dim:
            raise ValueError(f"ws must be [N, {self.num_ws}, {self.w_dim}], got {tuple(ws.shape)}")
        x = img = None
        index = 0
        for r in self.block_resolutions:
            block = getattr(self, f"b{r}")
            x, img = block(x, img, ws[:, index:index + block.num_conv + block.num_torgb], noise_mode)
            index += block.num_conv
        return img


class MappingNetwork(nn.Module):
    """z ``[N, z_dim]``, conditioning ``[N, c_dim]`` → ws ``[N, num_ws, w_dim]``.

    Both inputs are normalised by their second moment (the label after the ``embed`` FC), concatenated, passed
    through ``num_layers`` lrelu FCs with lr multiplier 0.01, broadcast, and truncated toward ``w_avg``:
    ``ws[:, :cutoff] = lerp(w_avg, ws, ψ)``.
    """

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: int, num_layers: int = 2,
                 lr_multiplier: float = 0.01):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws, self.num_layers = z_dim, c_dim, w_dim, num_ws, num_layers
        self.embed = FullyConnected(c_dim, w_dim)
        dims = [z_dim + w_dim] + [w_dim] * num_layers
        for i in range(num_layers):
            setattr(self, f"fc{i}", FullyConnected(dims[i], dims[i + 1], activation="lrelu",
                                                   lr_multiplier=lr_multiplier))
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1.0,
                truncation_cutoff: Optional[int] = None) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must be [N, {self.z_dim}], got {tuple(z.shape)}")
        if c.dim() != 2 or c.shape[1] != self.c_dim or c.shape[0] != z.shape[0]:
            raise ValueError(f"the conditioning must be [{z.shape[0]}, {self.c_dim}], got {tuple(c.shape)}")
        x = torch.cat([normalize_2nd_moment(z.float()), normalize_2nd_moment(self.embed(c.float()))], dim=1)
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        ws = x.unsqueeze(1).repeat(1, self.num_ws, 1)
        if truncation_psi != 1:
            w_avg = self.w_avg.to(ws.dtype)
            if truncation_cutoff is None:
                ws = torch.lerp(w_avg, ws, truncation_psi)
            else:
                ws = torch.cat([torch.lerp(w_avg, ws[:, :truncation_cutoff], truncation_psi),
                                ws[:, truncation_cutoff:]], dim=1)
        return ws
