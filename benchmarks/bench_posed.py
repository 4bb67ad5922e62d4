"""Benchmark: posed (SMPL-warped, official ``apply_def=True``) vs canonical 128² render on CPU.

Run from the repository root: ``.venv/bin/python benchmarks/bench_posed.py [--threads N] [--repeats K]``.

The full-size 512 generator with random weights synthesises one tri-grid; it is rendered at 128² with the inversion
sampling (96 + 96 samples per ray, ray_start 2.35; ``pipeline.md`` §3.1) and the GAN background, without
super-resolution, once canonically and once posed (p = neck (0.2, 0.3, −0.1), head (−0.25, 0.35, 0.15) rad).

SMPL stand-in: the licensed SMPL model is absent, so a synthetic body with SMPL's sizes is built here: 6890
vertices, 13 776 faces, 24 joints with SMPL's kinematic tree, head / neck / torso / arm ellipsoid surfaces at
human scale around the neck (≈ 5 000 candidate faces inside the ±0.35 m box, like the real head box) and smooth
neck/head skinning. Its geometry is a surface (unlike the oracle's triangle soup), so the nearest-triangle search
sees realistic neighbourhoods. Also reported: the time split of one posed render (posed mesh + per-face maps,
nearest-triangle search, gather/transfer) and the search's points per second.

Last line: ``posed_render128_s=<float> canonical_render128_s=<float>`` (min over repeats).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from portrait3d_core import cameras  # noqa: E402
from portrait3d_core._kernels import kernels  # noqa: E402
from portrait3d_core.gan.config import GeneratorConfig, smpl_buffer_specs  # noqa: E402
from portrait3d_core.gan.deform import PoseDeformer  # noqa: E402
from portrait3d_core.gan.generator import PortraitGenerator  # noqa: E402
from portrait3d_core.gan.smpl import SMPLModel  # noqa: E402

SMPL_PARENTS = [-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21]
# Rest joints (m, pelvis at the origin, y up), roughly SMPL's neutral T-pose.
JOINTS = np.array([
    [0, 0, 0], [0.07, -0.09, 0], [-0.07, -0.09, 0], [0, 0.11, 0], [0.11, -0.47, 0], [-0.11, -0.47, 0],
    [0, 0.24, 0], [0.11, -0.87, -0.03], [-0.11, -0.87, -0.03], [0, 0.29, 0.02], [0.12, -0.93, 0.1],
    [-0.12, -0.93, 0.1], [0, 0.5, 0], [0.08, 0.41, 0], [-0.08, 0.41, 0], [0, 0.59, 0.04], [0.18, 0.44, 0],
    [-0.18, 0.44, 0], [0.43, 0.44, -0.02], [-0.43, 0.44, -0.02], [0.68, 0.44, -0.02], [-0.68, 0.44, -0.02],
    [0.77, 0.44, -0.02], [-0.77, 0.44, -0.02]], dtype=np.float64)
# (centre, radii, rings, segments) of the body parts' ellipsoid surfaces.
PARTS = [((0, 0.65, 0.03), (0.08, 0.11, 0.1), 36, 40),     # head
         ((0, 0.52, 0), (0.055, 0.08, 0.055), 12, 24),      # neck
         ((0, 0.22, 0), (0.17, 0.3, 0.11), 36, 56),         # torso
         ((0.36, 0.43, -0.01), (0.2, 0.055, 0.055), 12, 24),   # arms
         ((-0.36, 0.43, -0.01), (0.2, 0.055, 0.055), 12, 24)]
N_VERTS, N_FACES = 6890, 13776


def ellipsoid(centre, radii, rings, segments, offset):
    """UV ellipsoid: vertices [(rings − 1)·segments + 2, 3], faces (indices shifted by ``offset``)."""
    theta = np.linspace(0, math.pi, rings + 1)[1:-1]
    phi = np.linspace(0, 2 * math.pi, segments, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    ring = np.stack([np.sin(t) * np.cos(p), np.cos(t), np.sin(t) * np.sin(p)], -1).reshape(-1, 3)
    verts = np.concatenate([[[0, 1, 0]], ring, [[0, -1, 0]]]) * radii + centre
    faces = []
    top, bottom = 0, len(verts) - 1
    idx = lambda r, s: 1 + r * segments + s % segments  # noqa: E731
    for s in range(segments):
        faces.append((top, idx(0, s + 1), idx(0, s)))
        faces.append((bottom, idx(rings - 2, s), idx(rings - 2, s + 1)))
        for r in range(rings - 2):
            faces.append((idx(r, s), idx(r, s + 1), idx(r + 1, s)))
            faces.append((idx(r, s + 1), idx(r + 1, s + 1), idx(r + 1, s)))
    return verts, np.asarray(faces) + offset


def synthetic_smpl_buffers(seed: int = 0) -> dict:
    """``renderer.*`` buffers (batch 1) of a synthetic SMPL-sized body (see the module docstring)."""
    rng = np.random.default_rng(seed)
    verts, faces = [], []
    for centre, radii, rings, segments in PARTS:
        v, f = ellipsoid(np.array(centre), np.array(radii), rings, segments, sum(len(x) for x in verts))
        verts.append(v)
        faces.append(f)
    verts.append(JOINTS)                                   # joint markers (regressed exactly, in no face)
    marker0 = sum(len(x) for x in verts[:-1])
    verts = np.concatenate(verts)
    faces = np.concatenate(faces)
    n_pad_v = N_VERTS - len(verts)
    pad_v = rng.uniform([-0.2, -1.2, -0.1], [0.2, -0.6, 0.1], size=(n_pad_v, 3))   # legs: far below the box
    n_pad_f = N_FACES - len(faces)
    base = len(verts)
    pad_f = np.stack([base + (np.arange(n_pad_f) + k) % n_pad_v for k in range(3)], 1)
    verts = np.concatenate([verts, pad_v]).astype(np.float32)
    faces = np.concatenate([faces, pad_f]).astype(np.int64)
    assert verts.shape == (N_VERTS, 3) and faces.shape == (N_FACES, 3), (verts.shape, faces.shape)

    y, x = verts[:, 1], np.abs(verts[:, 0])
    sig = lambda u: 0.5 * (1 + np.tanh(u / 2))  # noqa: E731
    weights = np.zeros((N_VERTS, 24), np.float32)
    head = sig((y - 0.59) / 0.015) * (x < 0.16)
    neck = (sig((y - 0.45) / 0.02) * (x < 0.16)) * (1 - head)
    arms = (x >= 0.16) * (y > 0.3)
    weights[:, 15] = head
    weights[:, 12] = neck
    weights[:, 16] = arms * (verts[:, 0] > 0)
    weights[:, 17] = arms * (verts[:, 0] < 0)
    weights[:, 9] = np.clip(1 - weights.sum(1), 0, 1) * (y > -0.5)
    weights[:, 0] = 1 - weights.sum(1)
    j_regressor = np.zeros((24, N_VERTS), np.float32)
    j_regressor[np.arange(24), marker0 + np.arange(24)] = 1
    joint30 = np.zeros((30, N_VERTS), np.float32)
    joint30[:24] = j_regressor
    b = {
        "renderer.aligned_SMPL.model.v_template": torch.from_numpy(verts),
        "renderer.aligned_SMPL.model.shapedirs": torch.from_numpy(rng.normal(0, 1e-3, (N_VERTS, 3, 10)).astype(np.float32)),
        "renderer.aligned_SMPL.model.posedirs": torch.from_numpy(rng.normal(0, 1e-4, (207, 3 * N_VERTS)).astype(np.float32)),
        "renderer.aligned_SMPL.model.J_regressor": torch.from_numpy(j_regressor),
        "renderer.aligned_SMPL.model.parents": torch.tensor(SMPL_PARENTS, dtype=torch.int64),
        "renderer.aligned_SMPL.model.lbs_weights": torch.from_numpy(weights),
        "renderer.aligned_SMPL.faces": torch.from_numpy(faces),
        "renderer.aligned_SMPL.smpl_joint_regressor": torch.from_numpy(joint30),
    }
    for key, shape, dtype in smpl_buffer_specs(1):   # zero betas / orientation / translation / body pose, masks
        b.setdefault(key, torch.zeros(shape, dtype=getattr(torch, dtype)))
    b["renderer.aligned_SMPL.model.faces_tensor"] = b["renderer.aligned_SMPL.faces"].clone()
    b["renderer.aligned_SMPL.model.vertex_joint_selector.extra_joints_idxs"] = torch.arange(21)
    # canonical mesh = unposed LBS minus the neck, as the official constructor computes it
    b["renderer.shaped_smpl"] = torch.from_numpy(verts)[None]
    probe = SMPLModel.from_buffers(b, prefix="renderer.")
    unposed = probe.posed_vertices(torch.zeros(1, 6)) + probe.align_point
    neck = probe.regress_joints(unposed)[:, 12:13]
    b["renderer.align_points"] = neck.reshape(1, 1, 3)
    b["renderer.shaped_smpl"] = unposed - neck
    shaped = b["renderer.shaped_smpl"][0]
    inside = (shaped.abs() < 0.35).all(-1)
    b["renderer.face_mask"] = inside[b["renderer.aligned_SMPL.faces"]].all(-1)
    b["renderer.head_face_mask"] = b["renderer.face_mask"] & (shaped[b["renderer.aligned_SMPL.faces"]][..., 1] > 0.06).all(-1)
    return b


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), times, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions per render (min reported)")
    parser.add_argument("--resolution", type=int, default=128)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, numba BVH search "
          f"({'on' if kernels.nearest_triangle_cpu.AVAILABLE else 'missing: reference path'})")

    G = PortraitGenerator(GeneratorConfig.full_512()).eval().requires_grad_(False)
    buffers = synthetic_smpl_buffers()
    G.load_state_dict({**G.state_dict(), **buffers})
    smpl = G.smpl
    print(f"synthetic SMPL: {smpl.num_vertices} vertices, {smpl.faces.shape[0]} faces, "
          f"{smpl.candidate_faces.shape[0]} candidate faces in the box")

    c = cameras.camera_label(cameras.gan_pose(math.pi / 2 + 0.3, math.pi / 2 - 0.1), cameras.GAN_FOCAL)
    pose = torch.tensor([[0.2, 0.3, -0.1, -0.25, 0.35, 0.15]])
    settings = G.render_settings(coarse_samples=96, fine_samples=96).portrait3d()
    res = args.resolution
    with torch.no_grad():
        ws = G.mapping(torch.randn(1, G.config.z_dim), c, truncation_psi=0.7)
        trigrid = G.trigrid(ws)
        G.render_trigrid(trigrid, c, 32, settings=settings, pose=pose, super_resolution=False)   # warm-up / JIT

        def render(p):
            return G.render_trigrid(trigrid, c, res, settings=settings, pose=p, super_resolution=False)

        t_can, all_can, out_can = timed(lambda: render(None), args.repeats)
        t_pos, all_pos, out_pos = timed(lambda: render(pose), args.repeats)

        # time split of one posed render (same chunks as the renderer)
        split = {"mesh + face maps": 0.0, "nearest-triangle search": 0.0, "transfer": 0.0}
        n_points = [0]
        t0 = time.perf_counter()
        deformer = PoseDeformer(smpl, pose, G.config.thickness)
        split["mesh + face maps"] += time.perf_counter() - t0
        search = kernels.nearest_triangle

        def timed_search(*a, **k):
            t = time.perf_counter()
            out = search(*a, **k)
            split["nearest-triangle search"] += time.perf_counter() - t
            n_points[0] += a[0].shape[1]
            return out

        def hook(points):
            t = time.perf_counter()
            out = deformer(points)
            split["transfer"] += time.perf_counter() - t
            return out

        kernels.nearest_triangle = timed_search
        try:
            t1 = time.perf_counter()
            G.render_trigrid(trigrid, c, res, settings=settings, deform=hook, super_resolution=False)
            t_split = time.perf_counter() - t1
        finally:
            kernels.nearest_triangle = search
        split["transfer"] -= split["nearest-triangle search"]
    moved = (out_pos["image_raw"] - out_can["image_raw"]).abs().max().item()
    print(f"\n{res}² render, 96 + 96 samples, background, no SR ({res * res * 192 / 1e6:.2f} M samples):")
    print(f"  canonical {t_can:.2f} s (runs {', '.join(f'{t:.2f}' for t in all_can)})")
    print(f"  posed     {t_pos:.2f} s (runs {', '.join(f'{t:.2f}' for t in all_pos)}) → ×{t_pos / t_can:.2f}; "
          f"posed vs canonical image_raw max|Δ| {moved:.3f}")
    print(f"  one posed render split ({t_split:.2f} s total): " +
          ", ".join(f"{k} {v:.2f} s" for k, v in split.items()) +
          f"; search {n_points[0] / max(split['nearest-triangle search'], 1e-9) / 1e6:.2f} M points/s")
    print(f"posed_render128_s={t_pos:.3f} canonical_render128_s={t_can:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
