"""Mesh export benchmark on the demo head tri-grid at the real 7-level shapes (8 … 512).

Prints, per lattice resolution (default 256³ and 512³): lattice + marching-cubes extraction time, vertex colours,
UV unwrap (xatlas) and texture bake time (2048²), GLB encoding, and the peak resident memory of each stage
(sampled every 20 ms) plus the process peak.

    .venv/bin/python benchmarks/bench_export.py                     # 256 and 512 (≈ 5–8 min on 2 busy cores)
    .venv/bin/python benchmarks/bench_export.py --resolutions 256 --mrc
    .venv/bin/python benchmarks/bench_export.py --threshold-sweep   # mesh silhouette vs renderer mask IoU

``--threshold-sweep`` reproduces the evidence for ``mesh.DEFAULT_DENSITY_THRESHOLD``: meshes at several density
levels (256³) against the renderer's mask Σw > 0.5 (256², 96 + 96 deterministic samples, ray_start 2.35) from the
front, the side and the back-45° view, and the per-portrait ``calibrate_threshold`` result.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from portrait3d_core import mesh as M  # noqa: E402
from portrait3d_core import mesh_export as E  # noqa: E402
from portrait3d_core import mesh_texture as T  # noqa: E402
from portrait3d_core.demo_assets import analytic_trigrid, demo_decoder  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


class PeakRSS:
    """Peak resident memory while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.start = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())
        return False


def row(name: str, probe: PeakRSS, extra: str = "") -> None:
    print(f"  {name:<22} {probe.seconds:7.1f} s   peak RSS {probe.peak:6.0f} MB (+{probe.peak - probe.start:4.0f})   "
          f"{extra}", flush=True)


def bench_resolution(tg, dec, resolution: int, texture_size: int, out_dir: str) -> None:
    print(f"\n== {resolution}³ lattice (voxel {0.7 / (resolution - 1) * 1000:.2f} mm), texture {texture_size}² ==")
    with PeakRSS() as p:
        mesh = M.extract_mesh(tg, dec, resolution=resolution)
    st = mesh.stats
    row("extract (lattice+MC)", p, f"{st['faces'] if 'faces' in st else mesh.num_faces} faces, "
        f"{mesh.num_vertices} verts, watertight {st['watertight']}, euler {st['euler']}, evaluated "
        f"{st['evaluated_points'] / 1e6:.1f} M of {st['lattice_points'] / 1e6:.1f} M points "
        f"(stride {st['coarse_stride']})")
    with PeakRSS() as p:
        coloured = M.add_vertex_colours(mesh, tg, dec)
    row("vertex colours", p)
    work = coloured
    if work.num_faces > E.TEXTURE_MAX_FACES:
        with PeakRSS() as p:
            v, f = M.decimate(work.vertices.astype(np.float64), work.faces, E.TEXTURE_MAX_FACES)
            work = M.MeshData(v.astype(np.float32), f, M.vertex_normals(v, f))
            work = M.add_vertex_colours(work, tg, dec)
        row("decimate for texture", p, f"→ {work.num_faces} faces")
    with PeakRSS() as p:
        unwrapped = T.unwrap(work, texture_size)
    row("uv unwrap (xatlas)", p, f"{unwrapped.stats['uv_charts']} charts, utilisation "
        f"{unwrapped.stats['uv_utilization']:.2f}")
    with PeakRSS() as p:
        baked = T.bake_texture(unwrapped, tg, dec, texture_size)
    row("texture bake", p, f"coverage {baked.stats['texture_coverage']:.2f}")
    with PeakRSS() as p:
        data = E.glb_bytes(baked, {"benchmark": True}, "texture")
        with open(os.path.join(out_dir, f"bench_{resolution}.glb"), "wb") as fh:
            fh.write(data)
    row("glb encode + write", p, f"{len(data) / 2 ** 20:.1f} MB")


def bench_mrc(tg, dec, out_dir: str) -> None:
    print("\n== official shape.mrc (512³, raw σ, cube 0.9) ==")
    with PeakRSS() as p:
        info = E.write_mrc(os.path.join(out_dir, "shape.mrc"), tg, dec)
    row("mrc 512³", p, f"σ range {info['dmin']:.0f} … {info['dmax']:.0f}")


def threshold_sweep(tg, dec, levels, image_resolution: int = 256) -> None:
    from portrait3d_core import cameras, renderer
    from portrait3d_core.mesh_raster import silhouette

    print(f"\n== threshold sweep: mesh silhouette vs renderer mask (IoU), mesh 256³, images {image_resolution}² ==")
    settings = renderer.RenderSettings().portrait3d(coarse_samples=96, fine_samples=96, deterministic=True)
    views = {"front": (0.0, 0.0), "side": (90.0, 0.0), "back45": (135.0, 10.0)}
    masks = {}
    for name, (yaw, pitch) in views.items():
        c = cameras.camera_label(cameras.yaw_pitch_pose(yaw, pitch), cameras.GAN_FOCAL)
        masks[name] = (c[0], renderer.render_image(tg, dec, c, image_resolution, settings).weight_sum[0, 0].numpy()
                       > 0.5)
    print("  density   " + "  ".join(f"{n:>7}" for n in views) + "   (mesh faces)")
    for level in levels:
        mesh = M.extract_mesh(tg, dec, resolution=256, threshold=level)
        ious = []
        for c, mask in masks.values():
            sil = silhouette(mesh.vertices, mesh.faces, c, image_resolution)
            ious.append((sil & mask).sum() / (sil | mask).sum())
        print(f"  {level:7.2f}   " + "  ".join(f"{v:7.4f}" for v in ious) + f"   ({mesh.num_faces})", flush=True)
    tau, info = M.calibrate_threshold(tg, dec)
    print(f"  calibrate_threshold (preset 'auto'): {tau:.1f}  IoU {info['iou']}")
    print(f"  default {M.DEFAULT_DENSITY_THRESHOLD}; paper σ 10 → density {M.THRESHOLD_PRESETS['paper_sigma_10']:.2f}, "
          f"σ 15 → {M.THRESHOLD_PRESETS['paper_sigma_15']:.2f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolutions", default="256,512", help="comma-separated lattice sizes (default 256,512)")
    parser.add_argument("--texture-size", type=int, default=2048)
    parser.add_argument("--mrc", action="store_true", help="also time the 512³ shape.mrc")
    parser.add_argument("--threshold-sweep", action="store_true", help="print the silhouette IoU sweep instead")
    args = parser.parse_args(argv)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    t0 = time.perf_counter()
    tg, dec = analytic_trigrid(), demo_decoder()
    tg.kernel_levels()
    M.density_at(tg, dec, torch.zeros(8, 3))          # numba warm-up (compile / cache load)
    print(f"demo head tri-grid {tg.describe()} built in {time.perf_counter() - t0:.1f} s; RSS {rss_mb():.0f} MB "
          f"(levels + kernel-layout copy ≈ 300 MB)")
    if args.threshold_sweep:
        threshold_sweep(tg, dec, (1.0, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 80.0))
        return
    with tempfile.TemporaryDirectory(prefix="bench_export_") as out_dir:
        for res in (int(r) for r in args.resolutions.split(",") if r.strip()):
            bench_resolution(tg, dec, res, args.texture_size, out_dir)
        if args.mrc:
            bench_mrc(tg, dec, out_dir)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nprocess peak RSS {peak:.0f} MB; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
