"""Benchmark: the full-size 512 3DPortraitGAN-Pyramid generator on CPU with random weights.

Run from the repository root: ``.venv/bin/python benchmarks/bench_generator.py [--threads N] [--repeats K]``.

Reports
- tri-grid synthesis time (mapping excluded; batch 1, noise 'const'),
- 128² render (48 + 48 samples, GAN background) + super-resolution to 512² time,
- peak resident memory of each phase (``VmHWM`` from ``/proc/self/status``, reset through ``/proc/self/clear_refs``),
- an estimate of GPU memory for batch-1 synthesis + one 128² render + SR: weight bytes plus the measured peak of
  live tensor bytes of each phase (every tensor created through the torch dispatcher is tracked until its storage is
  freed), plus the persistent tri-grid during the render, plus a fixed allowance for the CUDA context and cuDNN
  workspaces; and whether that fits in 8 GB.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import weakref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from portrait3d_core import cameras  # noqa: E402
from portrait3d_core.gan.config import GeneratorConfig  # noqa: E402
from portrait3d_core.gan.generator import PortraitGenerator  # noqa: E402
from portrait3d_core.renderer import render_image  # noqa: E402

MiB = 1 << 20
CUDA_OVERHEAD_MIB = 1024     # CUDA context (~300–500 MiB) + cuDNN/cuBLAS workspaces + allocator slack
GPU_BUDGET_MIB = 8 * 1024


# ----------------------------------------------------------------------------------------------- memory probes

def _status(field: str) -> float:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0   # kB → MiB
    except OSError:
        pass
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False when not permitted."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class LiveTensorBytes(TorchDispatchMode):
    """Peak of live tensor-storage bytes created inside the mode (storages freed when their last tensor dies)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages = {}     # data_ptr → [nbytes, refs]

    def _track(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):
            return
        if nbytes == 0:
            return
        entry = self._storages.get(ptr)
        if entry is None:
            entry = self._storages[ptr] = [nbytes, 0]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        weakref.finalize(t, self._release, ptr)

    def _release(self, ptr: int) -> None:
        entry = self._storages.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            self.live -= entry[0]
            del self._storages[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


# ----------------------------------------------------------------------------------------------- phases

def frontal_camera() -> torch.Tensor:
    return cameras.camera_label(cameras.gan_pose(math.pi / 2, math.pi / 2), cameras.GAN_FOCAL)


def synthesize(G, ws):
    return G.trigrid(ws, noise_mode="const")


def render_and_sr(G, trigrid, c, resolution: int):
    out = render_image(trigrid, G.decoder_view(), c, resolution, G.render_settings(),
                       background=G.background_hook(cache=False))
    return G.superresolve(out.image, out.features, trigrid.ws)


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        result = None
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), times, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions per phase (min reported)")
    parser.add_argument("--resolution", type=int, default=128, help="neural rendering resolution")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")

    t0 = time.perf_counter()
    G = PortraitGenerator(GeneratorConfig.full_512()).eval().requires_grad_(False)
    weight_bytes = sum(t.numel() * t.element_size() for t in G.state_dict().values())
    print(f"built the 512 generator with random weights in {time.perf_counter() - t0:.1f} s: "
          f"{sum(p.numel() for p in G.parameters()) / 1e6:.2f} M parameters, "
          f"{weight_bytes / MiB:.0f} MiB of parameters + buffers (fp32, no SMPL buffers)")

    z = torch.randn(1, G.config.z_dim)
    c = frontal_camera()
    with torch.no_grad():
        ws = G.mapping(z, c, truncation_psi=0.7)
        G.trigrid(ws)          # warm-up (allocator, oneDNN kernel selection)

        can_reset = reset_peak_rss()
        rss0 = _status("VmRSS")
        t_syn, all_syn, trigrid = timed(lambda: synthesize(G, ws), args.repeats)
        hwm_syn = _status("VmHWM")
        trigrid_bytes = sum(level.numel() * level.element_size() for level in trigrid.levels)
        print(f"\ntri-grid synthesis (batch 1): {t_syn:.2f} s (runs: {', '.join(f'{t:.2f}' for t in all_syn)}); "
              f"levels {[lv.shape[-1] for lv in trigrid.levels]}, {trigrid_bytes / MiB:.0f} MiB")
        print(f"  peak RSS {hwm_syn:.0f} MiB (RSS before {rss0:.0f} MiB"
              f"{'' if can_reset else '; VmHWM could not be reset, value is the process peak'})")

        can_reset = reset_peak_rss()
        rss1 = _status("VmRSS")
        t_ren, all_ren, image = timed(lambda: render_and_sr(G, trigrid, c, args.resolution), args.repeats)
        hwm_ren = _status("VmHWM")
        print(f"\n{args.resolution}² render (48 + 48 samples, GAN background) + SR → {tuple(image.shape[-2:])}: "
              f"{t_ren:.2f} s (runs: {', '.join(f'{t:.2f}' for t in all_ren)})")
        print(f"  peak RSS {hwm_ren:.0f} MiB (RSS before {rss1:.0f} MiB)")

        # Live tensor bytes per phase (what a CUDA caching allocator would have to hold, before fragmentation).
        del image
        gc.collect()
        with LiveTensorBytes() as probe:
            tg = synthesize(G, ws)
        syn_peak = probe.peak
        with LiveTensorBytes() as probe:
            img = render_and_sr(G, tg, c, args.resolution)
        ren_peak = probe.peak
        del img

    gpu = weight_bytes + max(syn_peak, trigrid_bytes + ren_peak) + CUDA_OVERHEAD_MIB * MiB
    print("\nGPU memory estimate, batch-1 synthesis + one "
          f"{args.resolution}² render + SR (fp32 everywhere; fp16 SR would only lower it):")
    print(f"  weights + buffers           {weight_bytes / MiB:8.0f} MiB")
    print(f"  synthesis live-tensor peak  {syn_peak / MiB:8.0f} MiB "
          f"(includes the {trigrid_bytes / MiB:.0f} MiB tri-grid)")
    print(f"  render + SR live peak       {ren_peak / MiB:8.0f} MiB (+ the tri-grid held meanwhile)")
    print(f"  CUDA context / workspaces   {CUDA_OVERHEAD_MIB:8.0f} MiB (allowance)")
    print(f"  total                       {gpu / MiB:8.0f} MiB → "
          f"{'fits' if gpu < GPU_BUDGET_MIB * MiB else 'does NOT fit'} in 8 GB "
          f"({100 * gpu / (GPU_BUDGET_MIB * MiB):.0f} % of 8 GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
