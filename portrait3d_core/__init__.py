"""comfyui-portrait3d core: the Portrait3D method (text -> 360-degree 3D portrait) as a plain torch library.

Nothing here imports ComfyUI. Main entry points:
- ``TriGrid`` (``portrait3d_core.trigrid``): the pyramid tri-grid and its files.
- ``Decoder`` (``portrait3d_core.decoder``): OSG decoder, raw ToRGB, pose branch.
- ``render_image`` (``portrait3d_core.renderer``) and the cameras in ``portrait3d_core.cameras``.
"""
__version__ = "0.1.0"
