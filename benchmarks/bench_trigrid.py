"""Tri-grid sampling and rendering speed: the fast CPU path (numba) against the grid_sample reference.

Run from the repository root: ``.venv/bin/python benchmarks/bench_trigrid.py`` (2 threads; ~5 minutes).
On a GPU machine: ``benchmarks/bench_trigrid.py --device cuda`` compares the Triton kernels with the grid_sample
reference on the GPU (same lines; times synchronised; peaks are ``torch.cuda.max_memory_allocated`` above the level
before the timed loop, in MB).

Workloads (real 7-level pyramid R = 8 … 512, 36 channels, batch 1, fp32):
- sampling at 262,144 points: forward (no grad) and forward + backward w.r.t. the tri-grid features, for two point
  sets: ``rays`` = the samples of a 64 × 64-ray, 64-sample render through the box (ordered along rays, as every stage
  of the pipeline produces them) and ``uniform`` = uniform in the box ±1.1 (random order, the cache-hostile worst case);
- a full 128² render (48 + 48 samples) forward + backward w.r.t. the tri-grid (``render_image`` with each backend);
- for the memory bound of chunked rendering: one 512² render at 96 + 96 samples, forward only (fast path, 1 run).
Each figure is the median of 7 runs after 2 warm-ups, measured in a fresh process per method; peak memory is the
process's resident high-water mark above its level before the timed loop (VmHWM after a reset), which counts
outputs, gradients and temporaries but not the 151 MB tri-grid itself. The fast path holds the tri-grid in its kernel
layout (converted once, as optimisation stages do); the render rows include that conversion per call.
The last line is ``speedup_fwd_bwd=<reference median / fast median>`` for the ``rays`` sampling workload.

Bytes moved per point (fp32, C = 12 features, D = 3, L = 7 levels, 3 planes):
- Triton kernel (kernel layout [B, 3, H, W, D, C]): forward gathers 8 corner rows × 48 B per (level, plane) =
  1152·L ≈ 8.1 KB, as 4–6 contiguous 128-B lines per (level, plane), plus 12 B coordinates in and 48 B out; no
  intermediates. Backward: 72 B in/out per point, 8.1 KB of atomic read-modify-writes into the feature gradient (and
  8.1 KB more gathers if the coordinate gradient is wanted), plus a one-off zero fill of the 151 MB gradient.
- Reference (one 5-D grid_sample per level on [B·3, 12, 3, H, W]): the same 8.1 KB of values but channel-strided
  (each value its own 32-B sector: ≈ 8× the memory transactions, ≈ 65 KB of traffic), plus ≈ 580·L ≈ 4 KB of
  intermediates per point in the forward (per level a [B·3, 12, M] output written, read into the running sum, written
  back, then permuted) and about as much again in autograd's backward; its backward scatters channel by channel.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RESOLUTIONS = (8, 16, 32, 64, 128, 256, 512)
N_POINTS = 262_144
WARMUP, RUNS = 2, 7


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _reset_peak() -> int:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _rss_kb("VmRSS")


def _points(kind: str):
    import torch

    g = torch.Generator().manual_seed(0)
    if kind == "uniform":
        return torch.rand(1, N_POINTS, 3, generator=g) * 2.2 - 1.1
    from portrait3d_core import cameras

    c = cameras.camera_label(cameras.yaw_pitch_pose(35.0, 10.0))
    origins, dirs = cameras.rays(c, 64)
    t = torch.linspace(2.35, 3.12, 64)
    pts = origins[:, :, None] + t[None, None, :, None] * dirs[:, :, None]
    return (pts.reshape(1, N_POINTS, 3) * (2 / 0.7)).contiguous()


def _time(fn, warmup=WARMUP, runs=RUNS, device="cpu"):
    if device == "cuda":
        return _time_cuda(fn, warmup, runs)
    for _ in range(warmup):
        fn()
    base = _reset_peak()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    peak_mb = (_rss_kb("VmHWM") - base) / 1024
    return statistics.median(times), peak_mb


def _time_cuda(fn, warmup, runs):
    """Synchronised wall times; peak = torch.cuda.max_memory_allocated above the allocation before the loop."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def measure(method: str, workload: str, device: str = "cpu") -> dict:
    import torch

    from portrait3d_core._kernels import kernels

    timed = lambda fn, **kw: _time(fn, device=device, **kw)  # noqa: E731

    torch.set_num_threads(2)
    try:
        import numba

        numba.set_num_threads(2)
    except ImportError:
        pass
    g = torch.Generator().manual_seed(1)
    official = [torch.randn(1, 3, 36, r, r, generator=g).to(device) for r in RESOLUTIONS]
    if workload == "render512":
        from portrait3d_core import cameras
        from portrait3d_core.decoder import Decoder
        from portrait3d_core.renderer import RenderSettings, render_image
        from portrait3d_core.trigrid import TriGrid

        torch.manual_seed(2)
        trigrid = TriGrid([x * 0.5 for x in official], torch.randn(1, 14, 512).to(device))
        decoder = Decoder().requires_grad_(False).to(device)
        c = cameras.camera_label(cameras.yaw_pitch_pose(20.0, 5.0)).to(device)
        settings = RenderSettings(backend=method).portrait3d(coarse_samples=96, fine_samples=96)
        trigrid.kernel_levels()                                  # converted once, outside the timed call

        def run():
            with torch.no_grad():
                render_image(trigrid, decoder, c, 512, settings)
        median, peak = timed(run, warmup=0, runs=1)
        return {"fwd": median, "peak_fwd": peak}
    if workload == "render":
        from portrait3d_core import cameras
        from portrait3d_core.decoder import Decoder
        from portrait3d_core.renderer import RenderSettings, render_image
        from portrait3d_core.trigrid import TriGrid

        torch.manual_seed(2)
        decoder = Decoder().requires_grad_(False).to(device)
        levels = [(x * 0.5).requires_grad_(True) for x in official]
        trigrid = TriGrid(levels, torch.randn(1, 14, 512).to(device))
        c = cameras.camera_label(cameras.yaw_pitch_pose(20.0, 5.0)).to(device)
        settings = RenderSettings(backend=method).portrait3d()
        grad = torch.randn(1, 3, 128, 128, generator=g).to(device)

        def run():
            out = render_image(trigrid, decoder, c, 128, settings)
            (out.image * grad).sum().backward()
            for x in levels:
                x.grad = None
        median, peak = timed(run)
        return {"fwd_bwd": median, "peak_fwd_bwd": peak}

    coords = _points(workload).to(device)
    grad_out = torch.randn(1, N_POINTS, 12, generator=g).to(device)
    if method == "reference":
        levels = [x.requires_grad_(True) for x in official]
        layout = "official"
    else:
        levels = [kernels.to_kernel_layout(x).requires_grad_(True) for x in official]
        layout = "kernel"
    del official

    def fwd():
        with torch.no_grad():
            kernels.sample_trigrid(levels, coords, layout=layout, backend=method)

    def fwd_bwd():
        out = kernels.sample_trigrid(levels, coords, layout=layout, backend=method)
        (out * grad_out).sum().backward()
        for x in levels:
            x.grad = None

    t_fwd, p_fwd = timed(fwd)
    t_fb, p_fb = timed(fwd_bwd)
    return {"fwd": t_fwd, "peak_fwd": p_fwd, "fwd_bwd": t_fb, "peak_fwd_bwd": p_fb}


def _child(method: str, workload: str, device: str = "cpu") -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2", NUMBA_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", method, workload, device], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{method}/{workload} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: numba fast path vs reference; cuda: Triton vs reference on the GPU")
    device = parser.parse_args(argv).device
    fast_name = "triton" if device == "cuda" else "cpu"
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA GPU here")
        print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    print(f"tri-grid: 7 levels {RESOLUTIONS}, 36 channels; {N_POINTS} points; median of {RUNS} after {WARMUP} "
          f"warm-ups; {'device cuda' if device == 'cuda' else '2 threads'}; one process per measurement")
    results = {}
    for workload in ("rays", "uniform", "render", "render512"):
        for method in ((fast_name,) if workload == "render512" else ("reference", fast_name)):
            results[(method, workload)] = r = _child(method, workload, device)
            parts = [f"{k}={v * 1000:8.1f} ms" if not k.startswith("peak") else f"{k}={v:7.1f} MB"
                     for k, v in r.items()]
            label = {"render": "render 128² 48+48 fwd+bwd", "render512": "render 512² 96+96 fwd (1 run)"}.get(
                workload, f"sampling [{workload}]")
            print(f"{label:<28} {method:<9} " + "  ".join(parts), flush=True)
    for workload in ("rays", "uniform", "render"):
        ref, fast = results[("reference", workload)], results[(fast_name, workload)]
        ratios = [f"{key} ×{ref[key] / fast[key]:.2f}" for key in ("fwd", "fwd_bwd") if key in ref]
        mem = fast["peak_fwd_bwd"] / max(ref["peak_fwd_bwd"], 1e-9)
        print(f"speedup [{workload}]: " + ", ".join(ratios) + f"; peak memory fwd+bwd fast/reference = {mem:.2f}")
    ref, fast = results[("reference", "rays")], results[(fast_name, "rays")]
    print(f"speedup_fwd_bwd={ref['fwd_bwd'] / fast['fwd_bwd']:.2f}")


if __name__ == "__main__":
    if len(sys.argv) in (4, 5) and sys.argv[1] == "--child":
        print(json.dumps(measure(*sys.argv[2:])))
    else:
        main()
