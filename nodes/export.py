"""Export Mesh: textured GLB / OBJ, PLY, STL, or the official MRC density volume; shown by ComfyUI's Preview3D."""
from __future__ import annotations

import inspect
import os

import torch
from comfy_api.latest import Types, io

import folder_paths
from portrait3d_core.mesh_export import export_mesh

from . import host
from .types import DecoderSocket, TriGridSocket, expect_decoder, expect_trigrid

FORMATS = ["glb", "obj", "ply", "stl", "mrc"]
THRESHOLDS = ["default", "auto", "paper_sigma_10", "paper_sigma_15", "custom"]


def core_mesh(mesh):
    """ComfyUI's MESH from our mesh data: geometry always; colours / UVs / texture where the host's MESH has them."""
    tensors = mesh.as_tensors()
    accepted = inspect.signature(Types.MESH).parameters
    extra = {k: v for k, v in tensors.items() if k not in ("vertices", "faces") and k in accepted}
    if "texture" in extra:
        extra.pop("vertex_colors", None)
    return Types.MESH(tensors["vertices"], tensors["faces"], **extra)


class ExportMesh(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Portrait3D_ExportMesh",
            display_name="Export Mesh (Portrait3D)",
            category="Portrait3D/export",
            description="Marching cubes on the portrait's density (softplus(σ − 1), crop applied), largest part, "
                        "closed neck, colours from the decoder through ToRGB (UV texture or vertex colours). Metres, "
                        "y up, face toward +z, neck at the origin. mrc writes the paper's raw-σ density volume "
                        "(512³ over a 0.9 m cube). Files go to the output folder under a new name.",
            inputs=[
                TriGridSocket.Input("trigrid", tooltip="The portrait to export (batch 1)."),
                DecoderSocket.Input("decoder", tooltip="Decoder + ToRGB matching the tri-grid (colours, density)."),
                io.Combo.Input("format", options=FORMATS, default="glb",
                               tooltip="glb (binary glTF, opens in Blender, game engines and ComfyUI's 3D preview), "
                                       "obj (+ .mtl + .png), ply (vertex colours), stl (geometry), mrc (density)."),
                io.Int.Input("resolution", default=256, min=32, max=512, step=16,
                             tooltip="Density grid per side over the head box (256 ≈ 2.7 mm voxels; 512 is finer "
                                     "and slower)."),
                io.Combo.Input("threshold", options=THRESHOLDS, default="default",
                               tooltip="Surface level: default (density 30, matches the renderer's silhouette), auto "
                                       "(fitted per portrait), the paper's raw-σ levels 10 / 15, or custom."),
                io.Float.Input("custom_density", default=30.0, min=0.01, max=10000.0, step=0.5,
                               tooltip="Density level used when threshold = custom."),
                io.Combo.Input("colour", options=["texture", "vertex"], default="texture",
                               tooltip="texture: UV-unwrapped colour texture (glb/obj); vertex: per-vertex colours."),
                io.Int.Input("texture_size", default=2048, min=256, max=8192, step=256,
                             tooltip="Texture width and height in pixels (colour = texture)."),
                io.Int.Input("decimate_faces", default=0, min=0, max=5_000_000,
                             tooltip="Target face count (0 = keep every face)."),
                io.Int.Input("smooth_iterations", default=0, min=0, max=100,
                             tooltip="Taubin smoothing passes (0 = none; shape-preserving)."),
                io.Boolean.Input("close_holes", default=True,
                                 tooltip="Cap the neck cut so the mesh is watertight (needed for 3D printing)."),
                io.String.Input("filename_prefix", default="portrait3d/mesh",
                                tooltip="Path prefix inside ComfyUI's output folder; a counter is appended."),
                io.String.Input("prompt", default="", multiline=True,
                                tooltip="Optional text stored in the GLB's extras (e.g. the generating prompt)."),
            ],
            outputs=[io.String.Output(display_name="path",
                                      tooltip="The file, relative to the output folder (Preview3D's model_file)."),
                     io.Mesh.Output(display_name="mesh", tooltip="ComfyUI's MESH (for the core 3D nodes).")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, trigrid, decoder, format, resolution, threshold, custom_density, colour, texture_size,
                decimate_faces, smooth_iterations, close_holes, filename_prefix, prompt) -> io.NodeOutput:
        trigrid, decoder = expect_trigrid(trigrid), expect_decoder(decoder)
        level = {"default": None, "custom": float(custom_density)}.get(threshold, threshold)
        out_dir = folder_paths.get_output_directory()
        progress = host.Progress(1000)
        trigrid = host.on_compute_device(trigrid.select(0), decoder)
        result = export_mesh(trigrid, decoder, out_dir, filename_prefix, format, resolution=resolution,
                             threshold=level, texture_size=texture_size, colour=colour,
                             decimate_faces=decimate_faces or None, smooth_iterations=smooth_iterations,
                             close_holes=close_holes, prompt=prompt or trigrid.meta.get("prompt"),
                             metadata={"source": trigrid.meta.get("source", "")}, progress=progress)
        rel = os.path.relpath(result.path, out_dir)
        subfolder, filename = os.path.split(rel)
        if result.mesh is None:          # mrc: a density volume, no mesh and nothing for the 3D preview
            empty = Types.MESH(torch.zeros(1, 0, 3), torch.zeros(1, 0, 3, dtype=torch.int64))
            return io.NodeOutput(rel.replace(os.sep, "/"), empty, ui={"text": [f"density volume: {rel}"]})
        ui = {"3d": [{"filename": filename, "subfolder": subfolder, "type": "output"}]}
        return io.NodeOutput(rel.replace(os.sep, "/"), core_mesh(result.mesh), ui=ui)
