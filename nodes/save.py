"""Save Tri-grid: our safetensors format, written atomically under a new name in the output folder."""
from __future__ import annotations

import os

from comfy_api.latest import io, ui

import folder_paths
from portrait3d_core.fileio import save_new

from .types import TriGridSocket, expect_trigrid


class SaveTriGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Portrait3D_SaveTriGrid",
            display_name="Save Tri-grid (Portrait3D)",
            category="Portrait3D/io",
            description="Writes the tri-grid as .safetensors (official key names trigrids_<R>, ws; metadata: "
                        "box_warp, source, prompt) into the output folder. Never overwrites a file.",
            inputs=[
                TriGridSocket.Input("trigrid", tooltip="The tri-grid to save (every batch entry gets its own file)."),
                io.String.Input("filename_prefix", default="portrait3d/trigrid",
                                tooltip="Path prefix inside ComfyUI's output folder; a counter is appended."),
                io.String.Input("prompt", default="", multiline=True,
                                tooltip="Optional text stored in the file's metadata (e.g. the generating prompt)."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Saved file, relative to the output folder.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, trigrid, filename_prefix, prompt) -> io.NodeOutput:
        trigrid = expect_trigrid(trigrid)
        out_dir = folder_paths.get_output_directory()
        paths = []
        for i in range(trigrid.batch_size):
            one = trigrid.select(i)
            if prompt:
                one.meta["prompt"] = prompt
            path = save_new(out_dir, filename_prefix, ".safetensors", lambda tmp: one.save(tmp, overwrite=True))
            paths.append(os.path.relpath(path, out_dir))
        return io.NodeOutput(paths[0], ui=ui.PreviewText("\n".join(paths)))
