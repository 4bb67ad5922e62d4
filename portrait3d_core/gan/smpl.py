"""The SMPL body of the generator's renderer, posed at the neck and the head (``portrait_gan.md`` §11).

Everything comes from the checkpoint's own ``renderer.*`` buffers (``checkpoints.md`` §3.1; batch rows are
identical, row 0 is used): ``aligned_SMPL.model.{v_template, shapedirs, posedirs, J_regressor, parents,
lbs_weights, betas, global_orient, transl}``, ``shaped_smpl`` (the canonical mesh), ``align_points`` (the canonical
neck), ``face_mask`` (candidate faces), ``aligned_SMPL.faces`` and ``aligned_SMPL.smpl_joint_regressor``.

Posing (``AlignedSMPL.generate_posed_smpl``): a 23-joint body pose that is zero except body-pose slot 11 (SMPL joint
12, the neck) = p[0:3] and slot 14 (joint 15, the head) = p[3:6], axis-angle in radians; the model's own betas,
global orientation and translation (zeros in the released model); linear blend skinning with pose blend shapes;
then minus ``align_points`` (the neck of the *unposed* shaped mesh, reused, not recomputed). Differentiable in p.

``SMPLModel.from_buffers(generator.renderer)`` returns None when a checkpoint carries no SMPL buffers (canonical
rendering never needs them); ``PortraitGenerator.smpl`` is the cached accessor.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from ..errors import CheckpointError, InvalidInputError

NECK_JOINT = 12           # SMPL joint index (body-pose slot 11) driven by p[0:3]
HEAD_JOINT = 15           # SMPL joint index (body-pose slot 14) driven by p[3:6]
POSE_DIM = 6

_MODEL = "aligned_SMPL.model."
REQUIRED_KEYS = (
    "shaped_smpl", "align_points", "face_mask", "aligned_SMPL.faces", "aligned_SMPL.smpl_joint_regressor",
    _MODEL + "v_template", _MODEL + "shapedirs", _MODEL + "posedirs", _MODEL + "J_regressor", _MODEL + "parents",
    _MODEL + "lbs_weights",
)
OPTIONAL_KEYS = (_MODEL + "betas", _MODEL + "global_orient", _MODEL + "transl",
                 _MODEL + "vertex_joint_selector.extra_joints_idxs")


def rodrigues(axis_angle: torch.Tensor) -> torch.Tensor:
    """Axis-angle ``[..., 3]`` (radians) → rotation matrices ``[..., 3, 3]``.

    R = I + a·K + b·K², K = [v]×, a = sin θ / θ, b = (1 − cos θ) / θ² = 2 sin²(θ/2) / θ² (no cancellation). Below
    θ² = eps the Taylor series 1 − θ²/6 and 1/2 − θ²/24 are used, so R(0) = I exactly and the gradient at 0 is the
    skew map (no NaN).
    """
    x, y, z = axis_angle.unbind(-1)
    theta2 = x * x + y * y + z * z
    small = theta2 < torch.finfo(axis_angle.dtype).eps
    safe2 = torch.where(small, torch.ones_like(theta2), theta2)
    theta = safe2.sqrt()
    half_sin = torch.sin(theta / 2)
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, 2 * half_sin * half_sin / safe2)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*axis_angle.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)
    return eye + a[..., None, None] * k + b[..., None, None] * (k @ k)


def _has(module, key: str) -> bool:
    try:
        module.get_buffer(key)
        return True
    except AttributeError:
        return False


class SMPLModel:
    """Neck/head-posable SMPL from the ``renderer.*`` buffers (views, no copies).

    Attributes (V = 6890 vertices, J = 24 joints, F = 13 776 faces for the released model):
        shaped_vertices ``[V, 3]``: the canonical mesh (``shaped_smpl`` row 0: T-pose, betas 0, neck at the origin).
        faces ``[F, 3]`` int64; face_mask ``[F]`` bool (faces whose canonical vertices lie strictly inside the
        tri-grid box; the deformation searches only these); candidate_faces ``[F', 3]``.
        joint_regressor ``[30, V]`` (``smpl_joint_regressor``; row 12 is the neck); extra_joints_idxs ``[21]`` or None.
        align_point ``[3]``: the canonical neck subtracted from every posed mesh.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], source: str = "checkpoint"):
        t = dict(tensors)
        self.source = source
        self.v_template = t[_MODEL + "v_template"]
        self.shapedirs = t[_MODEL + "shapedirs"]
        self.posedirs = t[_MODEL + "posedirs"]
        self.J_regressor = t[_MODEL + "J_regressor"]
        self.parents = [int(i) for i in t[_MODEL + "parents"].tolist()]
        self.lbs_weights = t[_MODEL + "lbs_weights"]
        self.faces = t["aligned_SMPL.faces"]
        self.face_mask = t["face_mask"].bool()
        self.joint_regressor = t["aligned_SMPL.smpl_joint_regressor"]
        self.shaped_vertices = t["shaped_smpl"][0]
        self.align_point = t["align_points"].reshape(-1, 3)[0]
        self.extra_joints_idxs = t.get(_MODEL + "vertex_joint_selector.extra_joints_idxs")
        first = lambda k: None if t.get(k) is None else t[k].reshape(t[k].shape[0], -1)[0]  # noqa: E731
        self.betas = first(_MODEL + "betas")
        self.global_orient = first(_MODEL + "global_orient")
        self.transl = first(_MODEL + "transl")
        self._validate()
        self.candidate_faces = self.faces[self.face_mask]
        self._rest = {}

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_buffers(cls, buffers, prefix: str = "", source: str = "checkpoint") -> Optional["SMPLModel"]:
        """From a module holding the ``renderer.*`` subtree (``PortraitGenerator.renderer``) or a dict of tensors
        keyed by the official names (with ``prefix``, e.g. ``"renderer."``). None when the SMPL buffers are absent;
        ``CheckpointError`` when only some are present or their shapes disagree."""
        get = (lambda k: buffers.get(prefix + k)) if isinstance(buffers, Mapping) else \
            (lambda k: buffers.get_buffer(k) if _has(buffers, k) else None)
        found = {k: get(k) for k in REQUIRED_KEYS + OPTIONAL_KEYS}
        present = [k for k in REQUIRED_KEYS if found[k] is not None]
        if not present:
            return None
        missing = [k for k in REQUIRED_KEYS if found[k] is None]
        if missing:
            raise CheckpointError(f"{source}: the SMPL buffers of the renderer are incomplete (missing "
                                  f"{', '.join('renderer.' + k for k in missing)}); posed rendering needs all of "
                                  f"them (re-convert the official model_512.pkl)")
        return cls({k: v for k, v in found.items() if v is not None}, source)

    def _validate(self) -> None:
        v = self.v_template.shape[0]
        j = self.J_regressor.shape[0]
        expect = {
            "v_template": (self.v_template, (v, 3)),
            "shapedirs": (self.shapedirs, (v, 3, self.shapedirs.shape[-1])),
            "posedirs": (self.posedirs, (9 * (j - 1), 3 * v)),
            "J_regressor": (self.J_regressor, (j, v)),
            "lbs_weights": (self.lbs_weights, (v, j)),
            "faces": (self.faces, (self.faces.shape[0], 3)),
            "face_mask": (self.face_mask, (self.faces.shape[0],)),
            "smpl_joint_regressor": (self.joint_regressor, (self.joint_regressor.shape[0], v)),
            "shaped_smpl": (self.shaped_vertices, (v, 3)),
        }
        for name, (tensor, shape) in expect.items():
            if tuple(tensor.shape) != shape:
                raise CheckpointError(f"{self.source}: SMPL buffer '{name}' has shape {tuple(tensor.shape)}, expected "
                                      f"{shape}")
        if len(self.parents) != j or j <= HEAD_JOINT or self.parents[0] >= 0 or \
                any(not 0 <= p < i for i, p in enumerate(self.parents) if i > 0):
            raise CheckpointError(f"{self.source}: SMPL 'parents' {self.parents} is not a kinematic tree over {j} "
                                  f"joints with the neck ({NECK_JOINT}) and head ({HEAD_JOINT})")
        if self.faces.numel() and (int(self.faces.min()) < 0 or int(self.faces.max()) >= v):
            raise CheckpointError(f"{self.source}: SMPL faces index vertices outside 0 … {v - 1}")
        if self.joint_regressor.shape[0] <= NECK_JOINT:
            raise CheckpointError(f"{self.source}: smpl_joint_regressor has no neck row {NECK_JOINT}")

    # ------------------------------------------------------------------------------------------ geometry
    @property
    def num_vertices(self) -> int:
        return self.v_template.shape[0]

    @property
    def num_joints(self) -> int:
        return self.J_regressor.shape[0]

    @property
    def device(self) -> torch.device:
        return self.v_template.device

    def regress_joints(self, vertices: torch.Tensor) -> torch.Tensor:
        """The 30 ``smpl_joint_regressor`` joints of meshes ``[..., V, 3]`` → ``[..., 30, 3]`` (row 12 = neck)."""
        return torch.einsum("kv,...vc->...kc", self.joint_regressor.to(vertices.dtype), vertices)

    def _rest_pose(self, dtype: torch.dtype):
        """(shaped vertices ``[V, 3]``, joints ``[J, 3]``, relative joints ``[J, 3]``) in ``dtype`` (cached)."""
        hit = self._rest.get(dtype)
        if hit is None:
            v_shaped = self.v_template.to(dtype)
            if self.betas is not None:
                v_shaped = v_shaped + torch.einsum("l,vcl->vc", self.betas.to(dtype), self.shapedirs.to(dtype))
            joints = self.J_regressor.to(dtype) @ v_shaped
            parents = torch.tensor(self.parents[1:], device=joints.device)
            rel = torch.cat([joints[:1], joints[1:] - joints[parents]])
            hit = self._rest[dtype] = (v_shaped, joints, rel)
        return hit

    def full_pose(self, pose: torch.Tensor) -> torch.Tensor:
        """Pose parameters ``[B, 6]`` → axis-angle of all joints ``[B, J, 3]`` (root = global_orient, neck = p[0:3],
        head = p[3:6], others zero)."""
        b = pose.shape[0]
        full = pose.new_zeros(b, self.num_joints, 3)
        if self.global_orient is not None:
            full = full + torch.nn.functional.pad(self.global_orient.to(pose.dtype).reshape(1, 1, 3),
                                                  (0, 0, 0, self.num_joints - 1))
        index = torch.tensor([NECK_JOINT, HEAD_JOINT], device=pose.device)
        return full.index_copy(1, index, pose.reshape(b, 2, 3))

    def posed_vertices(self, pose: torch.Tensor) -> torch.Tensor:
        """Neck/head pose ``[B, 6]`` (radians) → posed, neck-aligned vertices ``[B, V, 3]`` in the pose's dtype.

        LBS: v = Σ_j w_vj (G_j (v_shaped + P(R) − J_j) + …), written as per-joint rigid transforms
        A_j = [G_R | G_t − G_R J_j] blended by the skinning weights; pose blend shapes P = (R_{1:} − I) · posedirs.
        """
        if pose.dim() != 2 or pose.shape[1] != POSE_DIM:
            raise InvalidInputError(f"pose parameters must be [B, {POSE_DIM}] (neck and head axis-angle), got "
                                    f"{tuple(pose.shape)}")
        dtype = pose.dtype if pose.is_floating_point() else torch.float32
        pose = pose.to(dtype=dtype, device=self.device)
        b = pose.shape[0]
        v_shaped, joints, rel = self._rest_pose(dtype)
        rot = rodrigues(self.full_pose(pose))                                        # [B, J, 3, 3]
        eye = torch.eye(3, dtype=dtype, device=pose.device)
        pose_feature = (rot[:, 1:] - eye).reshape(b, -1)
        v_posed = v_shaped + (pose_feature @ self.posedirs.to(dtype)).reshape(b, -1, 3)
        g_rot, g_t = [rot[:, 0]], [rel[0].expand(b, 3)]
        for i in range(1, self.num_joints):
            parent = self.parents[i]
            g_rot.append(g_rot[parent] @ rot[:, i])
            g_t.append((g_rot[parent] @ rel[i].reshape(3, 1)).squeeze(-1) + g_t[parent])
        g_rot = torch.stack(g_rot, 1)                                                # [B, J, 3, 3]
        a_t = torch.stack(g_t, 1) - (g_rot @ joints.unsqueeze(-1)).squeeze(-1)       # [B, J, 3]
        weights = self.lbs_weights.to(dtype)
        t_rot = (weights @ g_rot.reshape(b, -1, 9)).reshape(b, -1, 3, 3)             # [B, V, 3, 3]
        t_t = weights @ a_t                                                          # [B, V, 3]
        verts = (t_rot @ v_posed.unsqueeze(-1)).squeeze(-1) + t_t
        if self.transl is not None:
            verts = verts + self.transl.to(dtype)
        return verts - self.align_point.to(dtype)

    def posed_triangles(self, pose: torch.Tensor) -> torch.Tensor:
        """Candidate faces of the posed mesh ``[B, F', 3, 3]``."""
        return self.posed_vertices(pose)[:, self.candidate_faces]

    def canonical_triangles(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Candidate faces of the canonical mesh ``[F', 3, 3]``."""
        return self.shaped_vertices.to(dtype)[self.candidate_faces]
