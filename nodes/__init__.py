"""ComfyUI nodes of comfyui-portrait3d (V3 API). Thin: they translate types and call ``portrait3d_core``."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import host
from .export import ExportMesh
from .gan import LoadPortraitGAN, TriGridSynthesis
from .loaders import LoadDecoder, LoadTriGrid
from .render import Camera, RenderTriGrid, RenderTurntable
from .save import SaveTriGrid
from .sds import ScoreDistillation
from .refine import Refine, RefitTriGrid, RenderViews

NODE_CLASSES = [LoadTriGrid, LoadDecoder, LoadPortraitGAN, TriGridSynthesis, Camera, RenderTriGrid, RenderTurntable,
                SaveTriGrid, ExportMesh, ScoreDistillation]
NODE_CLASSES += [Refine, RenderViews, RefitTriGrid]


class Portrait3DExtension(ComfyExtension):
    async def on_load(self) -> None:
        host.register_model_folder()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        host.register_model_folder()    # 0.3.75 does not call on_load
        host.register_routes()          # GET /portrait3d/backend: compute device + sampling backend
        return list(NODE_CLASSES)
