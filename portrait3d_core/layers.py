"""StyleGAN2-style building blocks with the official parameter names and equalised-learning-rate gains.

Parameters are stored unscaled, as in the official checkpoints; gains are applied in ``forward``
(``portrait_gan.md`` §12.4).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LRELU_GAIN = math.sqrt(2.0)


class FullyConnected(nn.Module):
    """Equalised-LR linear layer: ``y = act(x @ (W * lr_mul / sqrt(in)).T + b * lr_mul)``.

    ``activation`` is ``"linear"`` or ``"lrelu"`` (slope 0.2, gain sqrt 2). Keys: ``weight [out, in]``, ``bias [out]``.
    """

    def __init__(self, in_features: int, out_features: int, activation: str = "linear", lr_multiplier: float = 1.0,
                 bias_init: float = 0.0, bias: bool = True):
        super().__init__()
        if activation not in ("linear", "lrelu"):
            raise ValueError(f"unsupported activation {activation!r}")
        self.in_features, self.out_features, self.activation = in_features, out_features, activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = None if self.bias is None else self.bias.to(x.dtype) * self.bias_gain
        if self.activation == "linear":
            return torch.addmm(b.unsqueeze(0), x, w.t()) if b is not None else x.matmul(w.t())
        x = x.matmul(w.t())
        if b is not None:
            x = x + b
        return F.leaky_relu(x, 0.2) * LRELU_GAIN

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, activation={self.activation}"
