"""Conversion between the official tri-grid level layout and the kernels' layout.

Official (as stored in the released files): ``[B, 3, C*D, H, W]``, channel ``k = D*c + d`` (C-major, depth-minor).
Kernel layout: ``[B, 3, H, W, D, C]`` contiguous: the C features of one trilinear corner are contiguous, and the
two depth slices / two x-neighbours of a cell sit next to each other in memory.
"""
from __future__ import annotations

import torch


def to_kernel_layout(level: torch.Tensor, depth: int = 3) -> torch.Tensor:
    """``[B, 3, C*D, H, W]`` → contiguous ``[B, 3, H, W, D, C]`` (differentiable)."""
    b, p, cd, h, w = level.shape
    return level.reshape(b, p, cd // depth, depth, h, w).permute(0, 1, 4, 5, 3, 2).contiguous()


def from_kernel_layout(level: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W, D, C]`` → ``[B, 3, C*D, H, W]`` (differentiable; a view-free copy)."""
    b, p, h, w, d, c = level.shape
    return level.permute(0, 1, 5, 4, 2, 3).reshape(b, p, c * d, h, w)
