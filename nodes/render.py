"""Camera and rendering nodes: one view, or a turntable for ComfyUI's video nodes."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from portrait3d_core import cameras
from portrait3d_core.renderer import (PORTRAIT3D_RAY_START, RenderSettings, normalized_depth, over_colour,
                                      render_views)

from . import host
from .types import (CameraSocket, DecoderSocket, GanSocket, TriGridSocket, expect_cameras, expect_decoder, expect_gan,
                    expect_trigrid)

CATEGORY = "Portrait3D/render"
BACKGROUNDS = ["none", "colour", "gan"]
FOCAL_TOOLTIP = ("Normalised focal length. 6.5104166 = the GAN / final-video camera; 6.4848 = the SDS and "
                 "refinement camera of Portrait3D.")


def _camera_inputs():
    return [
        io.Float.Input("radius", default=cameras.RADIUS, min=1.0, max=10.0, step=0.01,
                       tooltip="Camera distance from the neck (metres). Portrait3D uses 2.7."),
        io.Float.Input("focal", default=cameras.GAN_FOCAL, min=0.5, max=50.0, step=0.0001, tooltip=FOCAL_TOOLTIP),
    ]


def _render_inputs():
    return [
        io.Int.Input("resolution", default=256, min=16, max=2048, step=8,
                     tooltip="Output size in pixels (square). Cost grows with its square."),
        io.Int.Input("samples", default=48, min=4, max=256,
                     tooltip="Coarse samples per ray; the same number of importance samples is added "
                             "(48 = Portrait3D's SDS/refit setting, 96 = its final videos)."),
        io.Float.Input("ray_start", default=PORTRAIT3D_RAY_START, min=0.1, max=10.0, step=0.01,
                       tooltip="Where rays start (metres from the camera). Portrait3D's stages use 2.35."),
        io.Float.Input("ray_end", default=3.12, min=0.2, max=12.0, step=0.01,
                       tooltip="Where rays end (metres from the camera); the model config uses 3.12."),
        io.Combo.Input("background", options=BACKGROUNDS, default="none",
                       tooltip="none: what the model renders in empty space (ToRGB bias colour, the SDS look); "
                               "colour: composite over background_colour using the render's opacity; "
                               "gan: the GAN's background network (connect a gan), as in the paper's videos."),
        io.String.Input("background_colour", default="#ffffff",
                        tooltip="#RRGGBB colour used when background = colour."),
        GanSocket.Input("gan", optional=True, tooltip="Needed for background = gan (from Load Portrait GAN)."),
    ]


def _background_hook(background, gan, trigrid):
    if background != "gan":
        return None
    if gan is None:
        raise ValueError("background = gan needs a Portrait GAN: connect Load Portrait GAN to the 'gan' input")
    generator = expect_gan(gan)
    if trigrid.ws is None or trigrid.ws.shape[-1] != generator.config.w_dim:
        raise ValueError(f"this tri-grid's ws do not fit the GAN (w_dim {generator.config.w_dim}); use the GAN the "
                         f"tri-grid came from")
    return generator.background_hook()


def _settings(samples, ray_start, ray_end) -> RenderSettings:
    if ray_end <= ray_start:
        raise ValueError(f"ray_end ({ray_end}) must be larger than ray_start ({ray_start})")
    return RenderSettings(ray_start=ray_start, ray_end=ray_end, coarse_samples=samples, fine_samples=samples)


def _render(trigrid, decoder, labels, resolution, samples, ray_start, ray_end, background, background_colour, gan):
    """Render every tri-grid of the batch from every camera of ``labels`` (item-major; progress per view over
    items × cameras, cancel per chunk) → IMAGE, MASK, depth MASK, depth IMAGE."""
    progress = host.Progress(trigrid.batch_size * labels.shape[0])
    trigrid = host.on_compute_device(trigrid, decoder, gan if background == "gan" else None)
    with torch.no_grad():
        result = render_views(trigrid, decoder, labels, resolution, _settings(samples, ray_start, ray_end),
                              background=_background_hook(background, gan, trigrid),
                              on_chunk=progress.check_cancel, on_view=progress)
    return _render_outputs(result, decoder, background, background_colour)


def _render_outputs(result, decoder, background, background_colour):
    rgb = result.image
    if background == "colour":
        rgb = over_colour(result, decoder, host.parse_colour(background_colour))
    depth01 = normalized_depth(result.depth, result.weight_sum)
    return host.to_image(rgb), host.to_mask(result.weight_sum.clamp(0, 1)), host.to_mask(result.depth), \
        host.gray_to_image(depth01)


_OUTPUTS = [
    io.Image.Output(display_name="image"),
    io.Mask.Output(display_name="mask", tooltip="Opacity (sum of ray weights), 1 = solid."),
    io.Mask.Output(display_name="depth_m", tooltip="Expected depth along each ray in metres (not normalised)."),
    io.Image.Output(display_name="depth_image", tooltip="Depth for ControlNet: near = bright, background = black."),
]


class Camera(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Portrait3D_Camera",
            display_name="Camera (Portrait3D)",
            category=CATEGORY,
            description="A look-at camera around the head: yaw 0, pitch 0 = frontal camera at (0, 0, radius) aimed "
                        "at (0, 0.0649, 0).",
            inputs=[
                io.Float.Input("yaw", default=0.0, min=-360.0, max=360.0, step=0.5,
                               tooltip="Degrees; positive moves the camera toward +x (the portrait's left)."),
                io.Float.Input("pitch", default=0.0, min=-89.0, max=89.0, step=0.5,
                               tooltip="Degrees; positive moves the camera up."),
                *_camera_inputs(),
            ],
            outputs=[CameraSocket.Output(display_name="camera")],
        )

    @classmethod
    def execute(cls, yaw, pitch, radius, focal) -> io.NodeOutput:
        return io.NodeOutput(cameras.camera_label(cameras.yaw_pitch_pose(yaw, pitch, radius), focal))


class RenderTriGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Portrait3D_RenderTriGrid",
            display_name="Render Tri-grid (Portrait3D)",
            category=CATEGORY,
            description="Volume-renders a tri-grid from one camera (or every camera of a camera batch). A batch of "
                        "tri-grids gives every portrait from every camera, portrait-major: image b·N + n = "
                        "portrait b from camera n.",
            inputs=[
                TriGridSocket.Input("trigrid", tooltip="The portrait(s) to render: every item of a batch is "
                                                       "rendered, in order."),
                DecoderSocket.Input("decoder", tooltip="Decoder + ToRGB matching the tri-grid."),
                io.Float.Input("yaw", default=0.0, min=-360.0, max=360.0, step=0.5,
                               tooltip="Degrees; 0 = frontal, positive moves the camera toward +x."),
                io.Float.Input("pitch", default=0.0, min=-89.0, max=89.0, step=0.5,
                               tooltip="Degrees; positive moves the camera up."),
                *_camera_inputs(),
                *_render_inputs(),
                CameraSocket.Input("camera", optional=True,
                                   tooltip="Optional cameras; when connected they replace yaw/pitch/radius/focal."),
            ],
            outputs=list(_OUTPUTS),
        )

    @classmethod
    def execute(cls, trigrid, decoder, yaw, pitch, radius, focal, resolution, samples, ray_start, ray_end,
                background, background_colour, gan=None, camera=None) -> io.NodeOutput:
        trigrid, decoder = expect_trigrid(trigrid), expect_decoder(decoder)
        if camera is not None:
            labels = expect_cameras(camera)
        else:
            labels = cameras.camera_label(cameras.yaw_pitch_pose(yaw, pitch, radius), focal)
        return io.NodeOutput(*_render(trigrid, decoder, labels, resolution, samples, ray_start, ray_end, background,
                                      background_colour, gan))


PRESETS = ["custom", "paper_360", "paper_small_orbit"]


class RenderTurntable(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Portrait3D_RenderTurntable",
            display_name="Render Turntable (Portrait3D)",
            category=CATEGORY,
            description="Renders an orbit around the portrait as an IMAGE batch for ComfyUI's video nodes (30 fps). "
                        "paper_360 = 240 frames, 360° at the horizon; paper_small_orbit = 120 frames, ±20° orbit "
                        "(Portrait3D's final videos). A batch of B tri-grids gives B turntables one after the "
                        "other (B × frames images, portrait-major).",
            inputs=[
                TriGridSocket.Input("trigrid", tooltip="The portrait(s) to render: every item of a batch gets its "
                                                       "own turntable, in order."),
                DecoderSocket.Input("decoder", tooltip="Decoder + ToRGB matching the tri-grid."),
                io.Combo.Input("preset", options=PRESETS, default="custom",
                               tooltip="custom uses frames and elevation below; the paper presets fix the path."),
                io.Int.Input("frames", default=72, min=1, max=2400,
                             tooltip="Frames for a custom 360° orbit (30 fps → frames/30 seconds)."),
                io.Float.Input("elevation", default=0.0, min=-80.0, max=80.0, step=0.5,
                               tooltip="Camera elevation in degrees for the custom orbit (positive = above)."),
                *_camera_inputs(),
                *_render_inputs(),
            ],
            outputs=[*_OUTPUTS, CameraSocket.Output(display_name="cameras",
                                                    tooltip="The camera of every frame of one turntable (the same "
                                                            "for every portrait of a batch).")],
        )

    @classmethod
    def execute(cls, trigrid, decoder, preset, frames, elevation, radius, focal, resolution, samples, ray_start,
                ray_end, background, background_colour, gan=None) -> io.NodeOutput:
        trigrid, decoder = expect_trigrid(trigrid), expect_decoder(decoder)
        if preset == "custom":
            labels = cameras.orbit_labels(frames, elevation, radius, focal)
        else:
            labels = cameras.preset_labels(preset, radius, focal)
        return io.NodeOutput(*_render(trigrid, decoder, labels, resolution, samples, ray_start, ray_end, background,
                                      background_colour, gan), labels)
