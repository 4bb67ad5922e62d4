"""Decoder probe and renderer intermediates against the official generator's outputs (``case_*.safetensors``)."""
import glob
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import FIXTURES
from portrait3d_core import cameras
from portrait3d_core.decoder import Decoder, decoder_state_from
from portrait3d_core.renderer import RenderSettings, query, render_rays
from portrait3d_core.trigrid import TriGrid

CASES = sorted(glob.glob(os.path.join(FIXTURES, "case_*.safetensors")))


def close(a, b):
    return (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())


@pytest.fixture(scope="module")
def decoder():
    state = load_file(os.path.join(FIXTURES, "generator_state_dict.safetensors"))
    return Decoder.from_state_dict(decoder_state_from(state))


def _case(path):
    with safe_open(path, "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()


def _trigrid(data):
    keys = sorted((k for k in data if k.startswith("trigrid.")), key=lambda k: int(k.split(".")[1]))
    return TriGrid([data[k] for k in keys], data["mapping.ws"])


def test_render_oracle_cases_present():
    assert CASES, f"no case_*.safetensors in {FIXTURES}"


@pytest.mark.parametrize("path", CASES, ids=os.path.basename)
def test_render_decoder_probe_matches_oracle(path, decoder):
    data, _ = _case(path)
    sigma, feats = query(_trigrid(data), decoder, data["input.points"], crop=None)
    assert close(sigma, data["points.decoder_sigma"])
    assert close(feats, data["points.decoder_rgb"])


@pytest.mark.parametrize("path", CASES, ids=os.path.basename)
def test_render_intermediates_match_oracle(path, decoder):
    data, meta = _case(path)
    res = int(meta["neural_rendering_resolution"])
    n_coarse, n_fine = int(meta["depth_resolution"]), int(meta["depth_resolution_importance"])
    origins, dirs = cameras.rays(data["input.c_render"], res)
    assert close(origins, data["render.ray_origins"]) and close(dirs, data["render.ray_directions"])
    settings = RenderSettings(coarse_samples=n_coarse, fine_samples=n_fine, deterministic=True)
    with torch.no_grad():
        out = render_rays(_trigrid(data), decoder, origins, dirs, settings)
    image = lambda x: x.permute(0, 2, 1).reshape(1, -1, res, res)  # noqa: E731
    assert close(image(out.features), data["render.feature_image_raw"])
    assert close(image(out.depth), data["render.depth_image"])
    assert close(image(out.weight_sum), data["render.weights_image"])


@pytest.mark.parametrize("path", CASES, ids=os.path.basename)
def test_render_sample_depths_match_oracle(path, decoder):
    from portrait3d_core.renderer import importance_depths, march, stratified_depths

    data, meta = _case(path)
    res = int(meta["neural_rendering_resolution"])
    settings = RenderSettings(coarse_samples=int(meta["depth_resolution"]),
                              fine_samples=int(meta["depth_resolution_importance"]), deterministic=True)
    tg = _trigrid(data)
    origins, dirs = cameras.rays(data["input.c_render"], res)
    coarse = stratified_depths(1, res * res, settings, origins.device)
    assert close(coarse[0, 0, :, 0], data["render.depths_coarse"])
    with torch.no_grad():
        pts = (origins.unsqueeze(-2) + coarse * dirs.unsqueeze(-2)).reshape(1, -1, 3)
        sigma, feats = query(tg, decoder, pts)
        _, _, weights = march(feats.reshape(1, res * res, -1, 32), sigma.reshape(1, res * res, -1, 1), coarse)
        fine = importance_depths(coarse, weights, settings.fine_samples, deterministic=True)
    assert close(fine, data["render.depths_fine"])


def test_render_camera_sampler_matches_oracle_camera():
    """c_render of the cases was made with the official LookAtPoseSampler (yaw/pitch/radius in the metadata)."""
    import json

    data, meta = _case(CASES[0])
    cam = json.loads(meta["c_render_camera"])
    label = cameras.camera_label(cameras.gan_pose(cam["yaw"], cam["pitch"], cam["radius"], tuple(cam["lookat"])),
                                 cam["focal"])
    assert (label - data["input.c_render"]).abs().max() <= 1e-5
