"""Export Mesh: textured GLB / OBJ, PLY, STL, or the official MRC density volume; shown by ComfyUI's Preview3D."""
from __future__ import annotations

import inspect

import torch
from comfy_api.latest import Types, io

import folder_paths
from portrait3d_core.mesh import batch_tensors
from portrait3d_core.mesh_export import export_batch

from . import host
from .types import DecoderSocket, TriGridSocket, expect_decoder, expect_trigrid

FORMATS = ["glb", "obj", "ply", "stl", "mrc"]
THRESHOLDS = ["default", "auto", "paper_sigma_10", "paper_sigma_15", "custom"]


def core_mesh(meshes):
    """ComfyUI's MESH (one batch) from our meshes: geometry always; colours / UVs / texture and the per-item
    vertex/face counts of a padded batch where the host's MESH has them (see ``batch_tensors``)."""
    tensors = batch_tensors(meshes)
    accepted = inspect.signature(Types.MESH).parameters
    extra = {k: v for k, v in tensors.items() if k not in ("vertices", "faces") and k in accepted}
    if "texture" in extra:
        extra.pop("vertex_colors", None)
    if ("vertex_counts" in extra) != ("face_counts" in extra):
        extra.pop("vertex_counts", None), extra.pop("face_counts", None)
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
                        "(over a 0.9 m cube, 512³ unless resolution says otherwise). Files go to the output folder "
                        "under a new name, one file (set) per portrait of a batch; every written file is listed "
                        "in the node's output (history: '3d' meshes, 'images' textures, 'files' .mtl / .mrc).",
            inputs=[
                TriGridSocket.Input("trigrid", tooltip="The portrait(s) to export: every item of a batch gets its "
                                                       "own file."),
                DecoderSocket.Input("decoder", tooltip="Decoder + ToRGB matching the tri-grid (colours, density)."),
                io.Combo.Input("format", options=FORMATS, default="glb",
                               tooltip="glb (binary glTF, opens in Blender, game engines and ComfyUI's 3D preview), "
                                       "obj (+ .mtl + .png), ply (vertex colours), stl (geometry), mrc (density)."),
                io.Int.Input("resolution", default=0, min=0, max=512, step=16,
                             tooltip="Grid points per side. 0 = auto: 256 for meshes (≈ 2.7 mm voxels over the "
                                     "head box; 512 is finer and slower), the paper's 512³ for mrc (537 MB; 64³ "
                                     "≈ 1 MB for a quick look; the −1000 border scales with it: 60 voxels at 512)."),
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
                io.String.Input("description", default="", multiline=True,
                                tooltip="Optional text about the portrait stored in the file's settings record "
                                        "(GLB scene extras, OBJ comments); empty = the tri-grid's own."),
            ],
            outputs=[io.String.Output(display_name="path", is_output_list=True,
                                      tooltip="The main file of every portrait, relative to the output folder "
                                              "(Preview3D's model_file). A list: one path per item of the batch, "
                                              "so Preview3D runs once per path and shows the first."),
                     io.Mesh.Output(display_name="mesh",
                                    tooltip="ComfyUI's MESH for the core 3D nodes: the whole batch, zero-padded to "
                                            "the largest item (empty for mrc).")],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, trigrid, decoder, format, resolution, threshold, custom_density, colour, texture_size,
                decimate_faces, smooth_iterations, close_holes, filename_prefix, description) -> io.NodeOutput:
        trigrid, decoder = expect_trigrid(trigrid), expect_decoder(decoder)
        level = {"default": None, "custom": float(custom_density)}.get(threshold, threshold)
        trigrid = host.on_compute_device(trigrid, decoder)
        results = export_batch(trigrid, decoder, folder_paths.get_output_directory(), filename_prefix, format,
                               resolution=resolution or None, threshold=level, texture_size=texture_size,
                               colour=colour, decimate_faces=decimate_faces or None,
                               smooth_iterations=smooth_iterations, close_holes=close_holes,
                               description=description or None, metadata={"source": trigrid.meta.get("source", "")},
                               provenance=host.provenance(cls.hidden), progress=host.Progress(1000))
        paths = [host.output_relpath(result.path) for result in results]
        ui = host.output_entries([path for result in results for path in result.files])
        if format == "mrc":            # density volumes: no mesh
            mesh = Types.MESH(torch.zeros(1, 0, 3), torch.zeros(1, 0, 3, dtype=torch.int64))
        else:
            mesh = core_mesh([result.mesh for result in results])
        return io.NodeOutput(paths, mesh, ui=ui)
