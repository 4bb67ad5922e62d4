"""Test-wide setup.

- Triton runs in interpreter mode when there is no GPU: ``TRITON_INTERPRET=1`` must be set before anything imports
  triton (``@triton.jit`` picks interpreter vs compiler at decoration time).
- The repository root is importable (``portrait3d_core``; ``kernels`` is loaded as ``portrait3d_kernels``).
"""
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "scripts")):
    if _path not in sys.path:
        sys.path.insert(0, _path)


def _has_cuda_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    import torch

    return torch.cuda.is_available()


if "TRITON_INTERPRET" not in os.environ and not _has_cuda_gpu():
    os.environ["TRITON_INTERPRET"] = "1"

FIXTURES = os.environ.get("PORTRAIT3D_ORACLE_DIR",
                          os.path.join(ROOT, "..", "shared", "fixtures", "portrait_gan_oracle"))
