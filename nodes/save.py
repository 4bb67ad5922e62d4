"""Save Tri-grid: our safetensors format, written atomically under a new name in the output folder."""
from __future__ import annotations

from comfy_api.latest import io

import folder_paths
from portrait3d_core.fileio import save_new

from . import host
from .types import TriGridSocket, expect_trigrid


class SaveTriGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Portrait3D_SaveTriGrid",
            display_name="Save Tri-grid (Portrait3D)",
            category="Portrait3D/io",
            description="Writes the tri-grid as .safetensors (official key names trigrids_<R>, ws; metadata: "
                        "box_warp, source, description, and the workflow — drop the file on the editor to load "
                        "it) into the output folder, one file per item of a batch. Never overwrites a file.",
            inputs=[
                TriGridSocket.Input("trigrid", tooltip="The tri-grid to save (every batch entry gets its own file)."),
                io.String.Input("filename_prefix", default="portrait3d/trigrid",
                                tooltip="Path prefix inside ComfyUI's output folder; a counter is appended."),
                io.String.Input("description", default="", multiline=True,
                                tooltip="Optional text about the portrait stored in the file's metadata "
                                        "(empty = keep the tri-grid's own)."),
            ],
            outputs=[io.String.Output(display_name="path", is_output_list=True,
                                      tooltip="Every saved file, relative to the output folder (a list: one path "
                                              "per item of the batch).")],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, trigrid, filename_prefix, description) -> io.NodeOutput:
        trigrid = expect_trigrid(trigrid)
        out_dir = folder_paths.get_output_directory()
        provenance = host.provenance(cls.hidden)
        paths = []
        for i in range(trigrid.batch_size):
            one = trigrid.select(i)
            if description:
                one.meta["description"] = description
            paths.append(save_new(out_dir, filename_prefix, ".safetensors",
                                  lambda tmp: one.save(tmp, overwrite=True, provenance=provenance)))
        relative = [host.output_relpath(path) for path in paths]
        return io.NodeOutput(relative, ui={"text": relative, **host.output_entries(paths)})
