"""Where the detected landmarks (the two eye centres) sit on the SMPL template (``pipeline.md`` §2.5).

World frame of the GAN (``pipeline.md`` §0.2): neutral SMPL template, zero pose, neck joint at the origin, y up,
face toward +z, metres; the person's left is +x.

- With the checkpoint's SMPL (``PortraitGenerator.smpl``, built from its ``renderer.*`` buffers): the eye vertices of
  ``shaped_vertices`` named by the model's own ``vertex_joint_selector.extra_joints_idxs`` (SMPL's face keypoints in
  the order nose, right eye, left eye, right ear, left ear), else the standard SMPL vertex ids 6260 / 2800.
- Without it: ``FALLBACK`` below, an anthropometric estimate (not SMPL data): eyes 6.2 cm apart, 3.5 cm above the
  head joint (which the spec puts 0.0649 m above the neck) and 8.5 cm in front of the neck axis. With it the
  frontal crop spans ≈ ±0.21 m around the look-at point, the spec's ±0.207 m (§2.1), for the usual eye spacing
  of the Haar face box (eyes ≈ 0.49 box widths apart).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CheckpointError

SMPL_EYE_VERTICES = (6260, 2800)      # right, left eye vertex of the 6890-vertex SMPL mesh
FACE_KEYPOINTS_EYES = (1, 2)          # positions of the right/left eye in extra_joints_idxs (nose, reye, leye, …)


@dataclass(frozen=True)
class TemplateLandmarks:
    """3D eye centres of the template (world frame, metres) and where they came from."""
    eye_right: tuple     # person's right eye (−x side)
    eye_left: tuple      # person's left eye (+x side)
    source: str

    def tensor(self) -> torch.Tensor:
        """``[2, 3]`` float64: right eye, left eye."""
        return torch.tensor([self.eye_right, self.eye_left], dtype=torch.float64)


FALLBACK = TemplateLandmarks(eye_right=(-0.031, 0.0999, 0.085), eye_left=(0.031, 0.0999, 0.085),
                             source="fallback template (anthropometric estimate, no SMPL given)")


def from_smpl(smpl) -> TemplateLandmarks:
    """The eye vertices of the checkpoint's canonical SMPL mesh (``SMPLModel``)."""
    vertices = smpl.shaped_vertices.detach().to(torch.float64).cpu()
    idx = smpl.extra_joints_idxs
    if idx is not None and idx.numel() > max(FACE_KEYPOINTS_EYES):
        ids = [int(idx[i]) for i in FACE_KEYPOINTS_EYES]
        how = "extra_joints_idxs"
    else:
        ids = list(SMPL_EYE_VERTICES)
        how = "SMPL vertex ids 6260/2800"
    if max(ids) >= vertices.shape[0]:
        raise CheckpointError(f"{smpl.source}: the SMPL eye vertices {ids} are outside the {vertices.shape[0]}-vertex "
                              f"mesh; align without the GAN (fallback template) or re-convert the checkpoint")
    a, b = vertices[ids[0]], vertices[ids[1]]
    if not bool(torch.isfinite(vertices[ids]).all()) or float((a - b).norm()) < 1e-3:
        raise CheckpointError(f"{smpl.source}: the SMPL eye vertices {ids} are degenerate")
    right, left = (a, b) if float(a[0]) <= float(b[0]) else (b, a)
    return TemplateLandmarks(tuple(right.tolist()), tuple(left.tolist()), f"checkpoint SMPL ({how})")


def template(smpl=None) -> TemplateLandmarks:
    return FALLBACK if smpl is None else from_smpl(smpl)
