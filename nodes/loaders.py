"""Loader nodes: tri-grids and decoders from the ``models/portrait3d`` folder."""
from __future__ import annotations

from comfy_api.latest import io

from portrait3d_core.decoder import load_decoder
from portrait3d_core.checkpoints import guess_file_kind
from portrait3d_core.trigrid import load_trigrid

from . import host
from .types import DecoderSocket, TriGridSocket

CATEGORY = "Portrait3D/loaders"


def _listing(*kinds):
    def accept(name, path):
        try:
            return guess_file_kind(path) in kinds
        except OSError:
            return False
    files = host.model_files(accept)
    return files or ["(no files in models/portrait3d)"]


class LoadTriGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Portrait3D_LoadTriGrid",
            display_name="Load Tri-grid (Portrait3D)",
            category=CATEGORY,
            description="Loads a pyramid tri-grid: an official trigrid.pkl / df.pth / epoch_*.pth / gallery "
                        "*_pyramid_trigrid.pth, or a Portrait3D .safetensors tri-grid. Files are read safely "
                        "(no pickled code runs).",
            inputs=[
                io.Combo.Input("trigrid_file", options=_listing("trigrid", "unknown"),
                               tooltip="A file in ComfyUI/models/portrait3d (or a portrait3d folder from "
                                       "extra_model_paths.yaml). DEMO_head_trigrid.safetensors is the analytic demo."),
            ],
            outputs=[TriGridSocket.Output(display_name="trigrid")],
        )

    @classmethod
    def execute(cls, trigrid_file: str) -> io.NodeOutput:
        trigrid = load_trigrid(host.model_path(trigrid_file))
        trigrid.meta.setdefault("source", trigrid_file)
        return io.NodeOutput(trigrid)


class LoadDecoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Portrait3D_LoadDecoder",
            display_name="Load Decoder (Portrait3D)",
            category=CATEGORY,
            description="Loads the tri-grid decoder + ToRGB (+ pose branch): the official decoder_512.ckpt, or a "
                        "Portrait3D .safetensors decoder. Read safely (weights only).",
            inputs=[
                io.Combo.Input("decoder_file", options=_listing("decoder", "unknown"),
                               tooltip="decoder_512.ckpt from the Portrait3D release, placed in ComfyUI/models/portrait3d. "
                                       "DEMO_decoder.safetensors renders the demo tri-grid."),
            ],
            outputs=[DecoderSocket.Output(display_name="decoder")],
        )

    @classmethod
    def execute(cls, decoder_file: str) -> io.NodeOutput:
        return io.NodeOutput(load_decoder(host.model_path(decoder_file)))
