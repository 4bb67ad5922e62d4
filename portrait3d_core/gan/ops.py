"""Pure-PyTorch StyleGAN2 primitives: FIR resampling, modulated convolution, bias + activation.

Semantics follow StyleGAN2-ADA's reference ops (``portrait_gan.md`` §12.4, §13), written from the math:

- ``upfirdn2d``: zero-insertion upsampling by ``up``, zero padding ``(x0, x1, y0, y1)``, then a depthwise FIR with
  the 2-D filter scaled by ``gain`` (the filter is flipped, i.e. a true convolution; our filters are symmetric).
- ``upsample2d``: ×2 with the [1, 3, 3, 1] filter, gain 4, padding (2, 1, 2, 1): output exactly 2H × 2W.
- ``conv2d_resample`` with ``up = 2``: stride-2 transposed convolution (weights used as stored, in/out swapped per
  group), then the FIR with gain 4 and padding ``p + (f + 1)//2 − (k − 1)`` / ``p + (f − 2)//2 − (k − 2)``.
- ``modulated_conv2d``: per-sample styles scale the input channels of the weight; optional demodulation
  ``rsqrt(Σ W'² + 1e-8)`` per output channel; computed as one grouped convolution ("fused"), numerically equivalent
  to the unfused path to ~1e-6 relative.
- ``bias_act``: ``clamp(act(x + b) · gain)``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)


def setup_filter(taps: Sequence[float] = (1, 3, 3, 1)) -> torch.Tensor:
    """Separable FIR taps → normalised 2-D filter ``[k, k]`` (outer product, sum 1)."""
    f = torch.as_tensor(list(taps), dtype=torch.float32)
    f = f[:, None] * f[None, :]
    return f / f.sum()


def upfirdn2d(x: torch.Tensor, f: torch.Tensor, up: int = 1, pad: Sequence[int] = (0, 0, 0, 0),
              gain: float = 1.0) -> torch.Tensor:
    """``[N, C, H, W]`` → upsample by zero insertion, pad ``(x0, x1, y0, y1)`` (≥ 0), depthwise FIR ``f [kh, kw]``."""
    n, c, h, w = x.shape
    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(n, c, h * up, w * up)
    if any(p < 0 for p in pad):
        raise ValueError(f"negative FIR padding {tuple(pad)} is not supported")
    x = F.pad(x, [pad[0], pad[1], pad[2], pad[3]])
    kernel = (f * (gain ** (f.ndim / 2))).to(x.dtype).flip([0, 1])
    kernel = kernel[None, None].expand(c, 1, *kernel.shape)
    return F.conv2d(x, kernel, groups=c)


def upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2) -> torch.Tensor:
    """FIR upsampling ``[N, C, H, W]`` → ``[N, C, up·H, up·W]`` (gain up², StyleGAN2 ``upsample2d`` padding)."""
    fh, fw = f.shape
    pad = ((fw + up - 1) // 2, (fw - up) // 2, (fh + up - 1) // 2, (fh - up) // 2)
    return upfirdn2d(x, f, up=up, pad=pad, gain=up * up)


def conv2d_resample(x: torch.Tensor, w: torch.Tensor, f: Optional[torch.Tensor] = None, up: int = 1,
                    padding: int = 0, groups: int = 1) -> torch.Tensor:
    """2-D convolution (cross-correlation, weights ``[O, I/groups, kh, kw]``) with optional ×``up`` upsampling."""
    if up == 1:
        return F.conv2d(x, w, padding=padding, groups=groups)
    if up != 2 or f is None:
        raise ValueError("only up = 1 or up = 2 with a FIR filter is supported")
    out_total, in_per_group, kh, kw = w.shape
    out_per_group = out_total // groups
    fh, fw = f.shape
    px0 = padding + (fw + up - 1) // 2 - (kw - 1)
    px1 = padding + (fw - up) // 2 - (kw - up)
    py0 = padding + (fh + up - 1) // 2 - (kh - 1)
    py1 = padding + (fh - up) // 2 - (kh - up)
    if min(px0, px1, py0, py1) < 0:
        raise ValueError("unsupported padding for an upsampling convolution")
    wt = w.reshape(groups, out_per_group, in_per_group, kh, kw).transpose(1, 2)
    wt = wt.reshape(groups * in_per_group, out_per_group, kh, kw)
    x = F.conv_transpose2d(x, wt, stride=up, groups=groups)
    return upfirdn2d(x, f, pad=(px0, px1, py0, py1), gain=up * up)


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, *, demodulate: bool = True,
                     up: int = 1, padding: int = 0, resample_filter: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fused modulated convolution.

    x ``[N, I, H, W]``, weight ``[O, I, k, k]``, styles ``[N, I]`` → ``[N, O, H', W']``. Weights are modulated and
    demodulated in fp32, then cast to ``x.dtype``. For half-precision inputs with demodulation, weights and styles
    are first divided by their max-abs (StyleGAN2's overflow guard; the demodulation cancels the scale).
    """
    n = x.shape[0]
    out_c, in_c, kh, kw = weight.shape
    weight = weight.float()
    styles = styles.float()
    if x.dtype == torch.float16 and demodulate:
        weight = weight * (1.0 / math.sqrt(in_c * kh * kw)
                           / weight.abs().amax(dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.abs().amax(dim=1, keepdim=True)
    w = weight.unsqueeze(0) * styles.reshape(n, 1, in_c, 1, 1)
    if demodulate:
        d = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()
        w = w * d.reshape(n, out_c, 1, 1, 1)
    w = w.reshape(n * out_c, in_c, kh, kw).to(x.dtype)
    x = x.reshape(1, n * in_c, *x.shape[2:])
    x = conv2d_resample(x, w, resample_filter, up=up, padding=padding, groups=n)
    return x.reshape(n, out_c, *x.shape[2:])


def bias_act(x: torch.Tensor, b: Optional[torch.Tensor], act: str = "linear", gain: float = 1.0,
             clamp: Optional[float] = None) -> torch.Tensor:
    """``clamp(act(x + b) · gain, −clamp, clamp)`` with ``b`` broadcast over channel dim 1.

    One fresh tensor, then in-place steps (autograd-safe: the sum's backward needs no values, the positive gain
    commutes with leaky ReLU, and the in-place leaky ReLU's saved output is not modified afterwards).
    """
    if act not in ("linear", "lrelu"):
        raise ValueError(f"unsupported activation {act!r}")
    if b is not None:
        x = x + b.to(x.dtype).reshape(1, -1, *([1] * (x.dim() - 2)))
        if gain != 1:
            x.mul_(gain)
    elif gain != 1 or act == "lrelu":
        x = x * gain
    if act == "lrelu":
        x = F.leaky_relu_(x, LRELU_SLOPE)
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``x · rsqrt(mean(x², dim 1) + eps)``."""
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()
