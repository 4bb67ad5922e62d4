"""comfyui-portrait3d: 3D portrait nodes for ComfyUI (Portrait3D, SIGGRAPH 2024) — GAN portraits, tri-grid rendering,
turntables, textured mesh export; the text → 3D stages are in progress.

ComfyUI calls ``comfy_entrypoint``; the node modules (which import ComfyUI) load only then, so ``portrait3d_core``
stays importable without ComfyUI. No compilation, download or conversion happens at import time.
"""
import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)   # makes ``portrait3d_core`` importable; ``kernels`` loads as ``portrait3d_kernels``


async def comfy_entrypoint():
    from .nodes import Portrait3DExtension

    return Portrait3DExtension()
