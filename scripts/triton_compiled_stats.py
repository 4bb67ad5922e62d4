"""Compile the Triton tri-grid kernel for NVIDIA targets without a GPU and measure the compiled code.

``python scripts/triton_compiled_stats.py [--all]`` prints, per specialisation (target, dtype, variant, M mod 16),
registers, local-memory spill instructions, SASS instructions per point (dynamic estimate) and atomics per point.
Used by ``tests/test_kernel_triton.py::test_triton_compile_*`` (which asserts properties of the same numbers).

Must run in a process where ``TRITON_INTERPRET`` is unset and nothing launched a kernel yet:
``install_compile_only_driver()`` replaces Triton's (absent) CUDA driver with one that only names a target.

Estimates from the SASS (``nvdisasm`` from the Triton wheel):
- dynamic instructions per warp = static instructions weighted by loop trip counts: a loop that contains another
  loop runs once per level (L), an innermost loop once per plane (3); forward branches are counted as taken-through
  (an upper bound for the masked atomics, which compile to a predicated branch around each ``RED``);
- per point = per warp / points per warp (``BLOCK_M / num_warps``);
- atomics per point = dynamic ``RED``/``ATOM`` per thread x threads per point, with their element width.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (80, 86, 89, 90, 120)
VARIANTS = {  # name: (FORWARD, NEED_LEVELS, NEED_COORDS), as forward()/backward() launch them
    "forward": (True, False, False),
    "backward": (False, True, True),
    "backward_levels": (False, True, False),
    "backward_coords": (False, False, True),
}
DTYPES = ("float32", "float16", "bfloat16")
LEVEL_SIZES = tuple(2 ** k for k in range(3, 10))  # the released pyramid, 8 … 512
_STATE = {}


def install_compile_only_driver():
    """A CUDA "driver" for Triton that compiles for ``set_arch(...)`` and can never launch."""
    if "driver" in _STATE:
        return _STATE["driver"]
    if os.environ.get("TRITON_INTERPRET"):
        raise RuntimeError("unset TRITON_INTERPRET: the compile-only driver needs the compiling runtime")
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class CompileOnlyDriver:
        arch = 80

        def get_current_target(self):
            return GPUTarget("cuda", self.arch, 32)

        def get_current_device(self):  # one kernel cache per target
            return self.arch

        def get_current_stream(self, device=None):
            return 0

    _STATE["driver"] = d = CompileOnlyDriver()
    driver.set_active(d)
    return d


def compile_variant(arch: int, dtype: str, variant: str, m: int, num_levels: int = len(LEVEL_SIZES)):
    """The compiled kernel of one runtime specialisation (``m`` points, batch 1, 7 levels of 36 = 3 x 12 channels)."""
    import torch

    sys.path.insert(0, ROOT)
    from portrait3d_core._kernels import kernels  # noqa: F401  (registers portrait3d_kernels)
    from portrait3d_kernels import trigrid_triton as tt

    drv = install_compile_only_driver()
    drv.arch = arch
    dt = getattr(torch, dtype)
    forward, need_levels, need_coords = VARIANTS[variant]
    levels = [torch.empty(1, 3, r, r, 3, 12, dtype=dt) for r in LEVEL_SIZES[:num_levels]]
    coords, out = torch.empty(1, m, 3, dtype=dt), torch.empty(1, m, 12, dtype=dt)
    grads = None if forward else [torch.empty(t.shape) for t in levels]
    grid, args, kwargs, _ = tt.launch_args(levels, coords, out, out, grads, coords, forward, need_levels, need_coords,
                                            arch=arch)
    kernel = tt._trigrid_kernel.warmup(*args, grid=grid, **kwargs)
    return kernel, kwargs


def _tool(name: str) -> str:
    from triton.backends.nvidia import compiler as nv

    return os.path.join(os.path.dirname(nv.__file__), "bin", name)


def _run_on_cubin(kernel, *cmd) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(kernel.asm["cubin"])
        fh.flush()
        return subprocess.run([*cmd, fh.name], capture_output=True, text=True).stdout


def _registers(kernel) -> int:
    text = _run_on_cubin(kernel, _tool("cuobjdump"), "--dump-resource-usage")
    return int(re.search(r"REG:(\d+)", text).group(1))


def sass_lines(kernel) -> list:
    """``nvdisasm -c`` of the cubin: labels (``.L_x_N:``) and instructions (``/*addr*/ TEXT ;``) in order."""
    return _run_on_cubin(kernel, _tool("nvdisasm"), "-c").splitlines()


def analyse(kernel, block_m: int, num_warps: int, num_levels: int = len(LEVEL_SIZES)) -> dict:
    """Registers, spills and per-point instruction / atomic estimates of a compiled kernel (see module doc)."""
    labels, code = {}, []  # label -> index of the next instruction; [instruction text]
    for line in sass_lines(kernel):
        lab = re.match(r"^\s*(\.L_x_\d+):", line)
        if lab:
            labels[lab.group(1)] = len(code)
            continue
        ins = re.match(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;?\s*$", line)
        if ins:
            code.append(ins.group(1))
    loops = []  # (first, last) instruction indices of each backward branch's body
    for i, text in enumerate(code):
        br = re.search(r"\bBRA(?:\.\w+)*\s.*`\((\.L_x_\d+)\)", text)
        if br and labels.get(br.group(1), i + 1) <= i:
            loops.append((labels[br.group(1)], i))
    trips = [num_levels if any(a < b0 or b1 < b for b0, b1 in loops if (a, b) != (b0, b1) and a <= b0 and b1 <= b)
             else 3 for a, b in loops]
    weight = [1] * len(code)
    for (a, b), t in zip(loops, trips):
        for i in range(a, b + 1):
            weight[i] *= t
    points_per_warp = block_m / num_warps
    threads_per_point = 32 / points_per_warp
    atomics = [(i, t) for i, t in enumerate(code) if re.match(r"(@!?U?P\w+\s+)?(RED|ATOM)", t)]
    kinds = sorted({re.search(r"((?:RED|ATOM)\S*)", t).group(1) for _, t in atomics})
    dyn_atomics = sum(weight[i] for i, _ in atomics)
    width = 4 if any("x4" in k for k in kinds) else 2 if any("x2" in k for k in kinds) else 1
    spills = [i for i, t in enumerate(code) if re.match(r"(@!?P\w+\s+)?(STL|LDL)\b", t)]
    return {
        "registers": _registers(kernel),
        "spill_instructions": len(spills),
        "spill_instructions_in_loops": sum(weight[i] > 1 for i in spills),
        "sass_static": len(code),
        "warp_instructions_per_point": sum(weight) / points_per_warp,
        "atomics_per_point": dyn_atomics * threads_per_point,
        "atomic_width": width if atomics else 0,
        "atomic_kinds": kinds,
        "threads_per_point": threads_per_point,
    }


def measure(arch, dtype, variant, m):
    kernel, kwargs = compile_variant(arch, dtype, variant, m)
    return analyse(kernel, kwargs["BLOCK_M"], kwargs["num_warps"])


def main(argv=None) -> int:
    full = "--all" in (argv if argv is not None else sys.argv[1:])
    print("arch  dtype     variant          M%16 | regs spills(in loops) SASS(static) warp-instr/pt atomics/pt width")
    for arch in ARCHS:
        for dtype in (DTYPES if full else DTYPES[:1]):
            for variant in VARIANTS:
                for m in ((1024, 1000) if full else (1000,)):
                    s = measure(arch, dtype, variant, m)
                    print(f"sm_{arch:<3} {dtype:<9} {variant:<16} {m % 16:>4} | {s['registers']:>4} "
                          f"{s['spill_instructions']:>6}({s['spill_instructions_in_loops']}) {s['sass_static']:>12} {s['warp_instructions_per_point']:>14.1f} "
                          f"{s['atomics_per_point']:>10.0f} {s['atomic_width']:>5}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
