"""Posed → canonical warp of sample points (official ``apply_def=True``; ``portrait_gan.md`` §11.4).

For pose p the posed SMPL mesh V_p (``SMPLModel.posed_vertices``) and the canonical mesh V_c (``shaped_smpl``) share
their faces. Each sample point x [B, N, 3]:
1. finds its nearest candidate face (``face_mask`` faces) on the posed mesh, exactly (``kernels.nearest_triangle``;
   no gradient, as the official kaolin call);
2. is expressed in that face's posed frame (origin v0, e_x = unit(v1 − v0), e_y = unit((v1 − v0) × (v2 − v0)),
   e_z = e_x × e_y) and rebuilt from the same local coordinates in the canonical frame of the face. This rigid map
   is written per face as x' = M_f x + t_f, M_f = E_c^T E_p, t_f = v0_c − M_f v0_p (E = rows e_x, e_y, e_z);
3. moves only when its distance to that face is < ``thickness`` (0.25, strict, Euclidean); otherwise it stays.
Gradients flow to p (through V_p, hence M_f and t_f) and to x (through M_f). Depths stay in ray space; the renderer
applies the warp to coarse and fine samples before the tri-grid lookup and the crop.

``PoseDeformer(smpl, pose)`` (or ``PoseDeformer.from_posed_vertices(smpl, vertices)`` for a given posed mesh)
computes the posed mesh and the per-face maps once; call it on any number of point chunks
(``renderer.render_image(..., deform=...)``). ``deform(points)`` = ``nearest(points)`` (search, no gradient) then
``transfer(points, dist_sq, index)`` (differentiable; also takes a recorded or given face choice).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .._kernels import kernels
from ..errors import InvalidInputError
from .smpl import SMPLModel

THICKNESS = 0.25          # metres; ``thickness`` of the released model


@dataclass
class Deformation:
    points: torch.Tensor       # [B, N, 3] warped (canonical) points
    moved: torch.Tensor        # [B, N] bool, True where the point was warped (distance < thickness)
    dist_sq: torch.Tensor      # [B, N] squared distance to the nearest candidate face (inf beyond the thickness)
    face_index: torch.Tensor   # [B, N] int64 index into ``SMPLModel.candidate_faces`` (-1 beyond the thickness)


def face_frames(triangles: torch.Tensor) -> torch.Tensor:
    """Triangles ``[..., 3, 3]`` → orthonormal frames ``[..., 3, 3]`` with rows e_x, e_y (normal), e_z."""
    v0, v1, v2 = triangles.unbind(-2)
    e1, e2 = v1 - v0, v2 - v0
    tiny = torch.finfo(triangles.dtype).tiny ** 0.5     # degenerate faces: no NaN (never chosen by the search)
    ex = e1 / torch.linalg.vector_norm(e1, dim=-1, keepdim=True).clamp_min(tiny)
    normal = torch.linalg.cross(e1, e2, dim=-1)
    ey = normal / torch.linalg.vector_norm(normal, dim=-1, keepdim=True).clamp_min(tiny)
    ez = torch.linalg.cross(ex, ey, dim=-1)
    return torch.stack([ex, ey, ez], dim=-2)


def face_transforms(posed: torch.Tensor, canonical: torch.Tensor):
    """Per-face rigid maps posed → canonical: ``posed [B, F, 3, 3]``, ``canonical [F, 3, 3]`` →
    (M ``[B, F, 3, 3]``, t ``[B, F, 3]``) with x' = M x + t."""
    m = face_frames(canonical).transpose(-1, -2) @ face_frames(posed)
    t = canonical[..., 0, :] - (m @ posed[..., 0, :].unsqueeze(-1)).squeeze(-1)
    return m, t


class PoseDeformer:
    """The warp for one pose: ``deformer(points [B, N, 3]) -> [B, N, 3]`` (``deform`` also returns the details).

    Args:
        smpl: the generator's ``SMPLModel``.
        pose: ``[B, 6]`` (or ``[1, 6]`` for any batch) neck + head axis-angle, radians; may require grad.
        thickness: warp only points nearer than this to the posed mesh.
        backend: nearest-triangle backend (``kernels.nearest_triangle``).
    """

    def __init__(self, smpl: SMPLModel, pose: torch.Tensor, thickness: float = THICKNESS, backend: str = "auto"):
        if not torch.is_tensor(pose) or pose.dim() != 2 or pose.shape[1] != 6:
            raise InvalidInputError(f"pose must be a [B, 6] tensor (neck and head axis-angle, radians), got "
                                    f"{tuple(pose.shape) if torch.is_tensor(pose) else type(pose).__name__}")
        if not bool(torch.isfinite(pose).all()):
            raise InvalidInputError("pose contains NaN or inf")
        self._setup(smpl, smpl.posed_vertices(pose), thickness, backend)

    @classmethod
    def from_posed_vertices(cls, smpl: SMPLModel, posed_vertices: torch.Tensor, thickness: float = THICKNESS,
                            backend: str = "auto") -> "PoseDeformer":
        """The warp for a given posed mesh ``[B, V, 3]`` (same topology as ``smpl``; e.g. an external fit)."""
        if posed_vertices.dim() != 3 or tuple(posed_vertices.shape[1:]) != (smpl.num_vertices, 3):
            raise InvalidInputError(f"posed vertices must be [B, {smpl.num_vertices}, 3], got "
                                    f"{tuple(posed_vertices.shape)}")
        self = cls.__new__(cls)
        self._setup(smpl, posed_vertices, thickness, backend)
        return self

    def _setup(self, smpl: SMPLModel, posed_vertices: torch.Tensor, thickness: float, backend: str) -> None:
        if not thickness > 0:
            raise InvalidInputError(f"thickness must be positive, got {thickness}")
        self.smpl, self.thickness, self.backend = smpl, float(thickness), backend
        self.posed_vertices = posed_vertices                                  # [B, V, 3]
        self.posed_triangles = posed_vertices[:, smpl.candidate_faces]        # [B, F', 3, 3]
        canonical = smpl.canonical_triangles(posed_vertices.dtype).to(posed_vertices.device)
        self.maps, self.offsets = face_transforms(self.posed_triangles, canonical)
        self._search = self.posed_triangles.detach()

    @property
    def batch_size(self) -> int:
        return self.posed_vertices.shape[0]

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        return self.deform(points).points

    def deform(self, points: torch.Tensor) -> Deformation:
        """Warp points ``[B, N, 3]`` (B = the pose batch, or any B for a single pose)."""
        dist_sq, index = self.nearest(points)
        return self.transfer(points, dist_sq, index)

    def nearest(self, points: torch.Tensor):
        """Exact nearest candidate face of the posed mesh within the thickness: (squared distance ``[B, N]``, inf
        beyond; face index ``[B, N]`` into ``smpl.candidate_faces``, -1 beyond). No gradient."""
        self._check(points)
        search = self._search.to(device=points.device, dtype=points.dtype)
        if search.shape[0] != points.shape[0]:
            search = search.expand(points.shape[0], -1, -1, -1)
        return kernels.nearest_triangle(points.detach(), search, max_distance=self.thickness, backend=self.backend)

    def transfer(self, points: torch.Tensor, dist_sq: torch.Tensor, index: torch.Tensor) -> Deformation:
        """Move points ``[B, N, 3]`` from their face's posed frame to its canonical frame where sqrt(dist_sq) <
        thickness (``index`` from ``nearest``, or any given face choice); differentiable in the pose and points."""
        self._check(points)
        b, dev, dtype = points.shape[0], points.device, points.dtype
        moved = (torch.sqrt(dist_sq) < self.thickness).to(dev) & (index >= 0).to(dev)
        face = index.clamp_min(0).to(dev)
        maps = self.maps.to(device=dev, dtype=dtype).reshape(self.batch_size, -1, 9).expand(b, -1, -1)
        offsets = self.offsets.to(device=dev, dtype=dtype).expand(b, -1, -1)
        m = torch.gather(maps, 1, face.unsqueeze(-1).expand(-1, -1, 9)).reshape(b, -1, 3, 3)
        t = torch.gather(offsets, 1, face.unsqueeze(-1).expand(-1, -1, 3))
        warped = (m @ points.unsqueeze(-1)).squeeze(-1) + t
        shift = torch.where(moved.unsqueeze(-1), warped - points, torch.zeros_like(points))
        return Deformation(points + shift, moved, dist_sq, index)

    def _check(self, points: torch.Tensor) -> None:
        if not torch.is_tensor(points) or points.dim() != 3 or points.shape[-1] != 3:
            raise InvalidInputError(f"points must be [B, N, 3], got "
                                    f"{tuple(points.shape) if torch.is_tensor(points) else type(points).__name__}")
        if self.batch_size not in (1, points.shape[0]):
            raise InvalidInputError(f"{points.shape[0]} point sets for a pose batch of {self.batch_size}")


def deform_points(points: torch.Tensor, pose: torch.Tensor, smpl: SMPLModel, thickness: float = THICKNESS,
                  backend: str = "auto") -> Deformation:
    """One-shot warp of points ``[B, N, 3]`` for pose ``[B, 6]`` (see ``PoseDeformer``)."""
    return PoseDeformer(smpl, pose, thickness, backend).deform(points)


def require_smpl(smpl: Optional[SMPLModel]) -> SMPLModel:
    """``smpl`` or a clear error when the checkpoint has no SMPL buffers."""
    if smpl is None:
        raise InvalidInputError("posed rendering needs the SMPL buffers (renderer.*) of the official model_512.pkl; "
                                "this generator was loaded without them. Convert the official checkpoint (its SMPL "
                                "data is kept), or render without a pose (canonical)")
    return smpl
