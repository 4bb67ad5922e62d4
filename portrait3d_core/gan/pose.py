"""Generator pose prediction with explicit left/right symmetry (``portrait_gan.md`` §10.3, §11.2).

A camera is "left" when −π/2 ≤ atan2(c[11], c[3]) ≤ π/2 (the t_x ≥ 0 side). Left cameras are mirrored
(``cameras.flip_label``: flat entries 1, 2, 3, 4, 8 negated) before the pose branch runs on ``z ⊕ c``, and the
prediction is mirrored back by negating pose components 1, 2, 4, 5 (the y and z axis-angle components of the
neck and head rotations).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..cameras import flip_label

POSE_FLIP_INDICES = (1, 2, 4, 5)


@dataclass
class PosePrediction:
    pose: torch.Tensor          # [N, 6] neck + head axis-angle (radians)
    raw: torch.Tensor           # [N, 6] branch output before mirroring back
    branch_c: torch.Tensor      # [N, 25] camera label the branch saw (mirrored for left cameras)
    is_left: torch.Tensor       # [N] bool


def is_left_camera(c: torch.Tensor) -> torch.Tensor:
    """Camera labels ``[N, 25]`` → bool ``[N]``."""
    angle = torch.atan2(c[:, 11], c[:, 3])
    return (angle >= -math.pi / 2) & (angle <= math.pi / 2)


def flip_pose(p: torch.Tensor) -> torch.Tensor:
    """Mirror pose parameters ``[N, 6]`` across x = 0."""
    out = p.clone()
    out[:, list(POSE_FLIP_INDICES)] *= -1
    return out


def predict_pose(pose_branch, z: torch.Tensor, c: torch.Tensor, explicitly_symmetry: bool = True) -> PosePrediction:
    """Run ``pose_branch`` on ``z ⊕ c`` (symmetrised when ``explicitly_symmetry``)."""
    if not explicitly_symmetry:
        raw = pose_branch(torch.cat([z, c], dim=1))
        return PosePrediction(raw, raw, c, torch.zeros(c.shape[0], dtype=torch.bool, device=c.device))
    left = is_left_camera(c)
    branch_c = torch.where(left[:, None], flip_label(c), c)
    raw = pose_branch(torch.cat([z, branch_c], dim=1))
    pose = torch.where(left[:, None], flip_pose(raw), raw)
    return PosePrediction(pose, raw, branch_c, left)
