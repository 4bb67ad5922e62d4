"""The discriminator's pose predictor (``gan/discriminator.py``): the initial neck/head pose of GAN inversion.

No oracle exists for D (the fixtures cover G only), so these tests pin what can be pinned without one: the state-dict
layout against the released model's key list (``checkpoints.md`` §3.4), a random-weight forward at the real size,
the left/right mirror symmetry, ``model_512.json`` preprocessing and the converter round trip. Whether our D
reproduces the official D numerically is NOT verified here.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import FIXTURES
from portrait3d_core import cameras
from portrait3d_core.errors import CheckpointError, InvalidInputError
from portrait3d_core.gan.discriminator import (DiscriminatorConfig, PoseDiscriminator, PosePredictSettings,
                                               filtered_resizing, load_discriminator, predict_initial_pose)
from portrait3d_core.gan.pose import flip_pose, is_left_camera

SMALL = DiscriminatorConfig(img_resolution=32, channel_base=256, channel_max=32, mapping_layers=2)


def random_discriminator(config: DiscriminatorConfig = SMALL, seed: int = 0) -> PoseDiscriminator:
    torch.manual_seed(seed)
    model = PoseDiscriminator(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval().requires_grad_(False)


def camera(yaw: float, pitch: float = math.pi / 2) -> torch.Tensor:
    return cameras.camera_label(cameras.gan_pose(yaw, pitch, 2.7, (0.0, 0.0649, 0.0)), 6.5104166).reshape(1, 25)


def inputs(batch: int = 1, size: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    mask = (torch.rand(batch, 1, size, size, generator=g) > 0.5).float()
    return image, mask


def test_pose_discriminator_layout_matches_the_released_model():
    """102 tensors, 8.76 M elements, the shapes ``checkpoints.md`` §3.4 lists; the config is read back from them."""
    with torch.device("meta"):
        model = PoseDiscriminator()
    state = model.state_dict()
    assert len(state) == 102
    assert sum(v.numel() for v in state.values()) == 8_763_818
    expected = {"b512.fromrgb.weight": (36, 7, 1, 1), "b4.conv.weight": (144, 145, 3, 3), "b4.fc.weight": (144, 2304),
                "b4.out.weight": (144, 144), "mapping.embed.weight": (144, 31), "resample_filter": (4, 4),
                "pose_branch.net.0.weight": (2048, 2329), "pose_branch.net.1.weight": (512, 2048),
                "pose_branch.net.2.weight": (128, 512), "pose_branch.net.3.weight": (32, 128),
                "pose_branch.net.4.weight": (6, 32)}
    expected.update({f"mapping.fc{i}.weight": (144, 144) for i in range(8)})
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert sorted(int(k[1:].split(".")[0]) for k in state if k.endswith(".conv0.weight")) == \
        [8, 16, 32, 64, 128, 256, 512]
    assert list(state)[0] == "resample_filter" and list(state)[1].startswith("pose_branch.")   # official order
    assert DiscriminatorConfig.from_state_dict(state) == DiscriminatorConfig()


def test_pose_discriminator_loader_rejects_other_layouts():
    state = random_discriminator().state_dict()
    with pytest.raises(CheckpointError, match="not a PoseShapeAwareDualDiscriminator"):
        PoseDiscriminator.from_state_dict({k: v for k, v in state.items() if not k.startswith("pose_branch")})
    bad = dict(state)
    bad["b8.conv0.weight"] = torch.zeros(3, 3, 3, 3)
    with pytest.raises(CheckpointError, match="b8.conv0.weight"):
        PoseDiscriminator.from_state_dict(bad)


def test_pose_discriminator_full_size_forward():
    """The released size with random weights: 512² image + mask → a finite pose [1, 6]."""
    model = random_discriminator(DiscriminatorConfig())
    image, mask = inputs(size=512)
    pose = predict_initial_pose(model, image, mask, camera(math.pi / 2 + 0.4))
    assert tuple(pose.shape) == (1, 6) and bool(torch.isfinite(pose).all()) and float(pose.abs().sum()) > 0


def test_pose_discriminator_mirror_symmetry():
    """A mirrored image seen from the mirrored camera gives the mirrored pose (components 1, 2, 4, 5 negated).

    The official predictor passes the camera label unchanged into the pose branch, so the symmetry is exact only
    when the branch ignores the camera: its camera columns are zeroed here."""
    model = random_discriminator()
    with torch.no_grad():
        model.pose_branch.net[0].weight[:, -25:] = 0
    right, left = camera(math.pi / 2 - 0.6), camera(math.pi / 2 + 0.6)
    assert is_left_camera(right).tolist() != is_left_camera(left).tolist()
    image, mask = inputs()
    raw = F.interpolate(image, size=16, mode="bilinear", antialias=True, align_corners=False)
    raw_mask = F.interpolate(mask, size=16, mode="bilinear", antialias=True, align_corners=False)
    a = model.predict_pose(image, raw, raw_mask, right)
    b = model.predict_pose(image.flip(-1), raw.flip(-1), raw_mask.flip(-1), left)
    torch.testing.assert_close(b, flip_pose(a))
    assert float((a - b).abs().max()) > 1e-4                            # the flip is not a no-op


def test_pose_discriminator_left_cameras_see_the_mirrored_image():
    """For a left camera D runs on the mirrored inputs and mirrors its answer back."""
    model = random_discriminator()
    left = camera(math.pi / 2 + 0.6)
    assert bool(is_left_camera(left))
    image, mask = inputs()
    raw, raw_mask = image[..., ::2, ::2], mask[..., ::2, ::2]
    got = model.predict_pose(image, raw, raw_mask, left)
    features = model.features(model.dual_input(image.flip(-1), raw.flip(-1), raw_mask.flip(-1)))
    torch.testing.assert_close(got, flip_pose(model.pose_branch(features, left)))


def test_pose_discriminator_initial_pose_preprocessing(tmp_path):
    """``predict_initial_pose``: image resized to D's resolution, raw image and mask to the json's rendering
    resolution; per-image runs (batch rows do not mix through the minibatch stddev); [B, h, w] masks."""
    model = random_discriminator()
    image, mask = inputs(batch=2, size=64)
    c = torch.cat([camera(math.pi / 2 - 0.3), camera(math.pi / 2 + 0.5)])
    path = tmp_path / "model_512.json"
    path.write_text(json.dumps({"neural_rendering_resolution": 16, "blur_sigma": 0, "filter_mode": "antialiased"}))
    settings = PosePredictSettings.from_json(str(path))
    assert settings == PosePredictSettings(16, 0.0, "antialiased")
    got = predict_initial_pose(model, image, mask[:, 0], c, settings)
    image32 = F.interpolate(image, size=32, mode="bilinear", antialias=True, align_corners=False)
    for i in range(2):
        one = model.predict_pose(image32[i:i + 1], filtered_resizing(image32[i:i + 1], 16),
                                 filtered_resizing(mask[i:i + 1], 16), c[i:i + 1])
        torch.testing.assert_close(got[i:i + 1], one)
    blurred = predict_initial_pose(model, image, mask, c, PosePredictSettings(16, 2.0))
    assert float((blurred - got).abs().max()) > 0
    with pytest.raises(InvalidInputError, match="not a readable model_512.json"):
        PosePredictSettings.from_json(str(tmp_path / "missing.json"))


def test_pose_discriminator_without_discriminator_gives_zeros():
    image, mask = inputs(batch=3)
    pose = predict_initial_pose(None, image, mask, camera(1.0).expand(3, -1))
    assert torch.equal(pose, torch.zeros(3, 6))


def test_pose_discriminator_rejects_bad_input():
    model = random_discriminator()
    image, mask = inputs()
    with pytest.raises(InvalidInputError, match=r"\[B, 3, H, W\]"):
        predict_initial_pose(model, image[:, :1], mask, camera(1.0))
    with pytest.raises(InvalidInputError, match="camera labels"):
        predict_initial_pose(model, image, mask, torch.zeros(1, 16))
    with pytest.raises(InvalidInputError, match="mask"):
        predict_initial_pose(model, image, mask.expand(-1, 3, -1, -1), camera(1.0))


def test_pose_discriminator_converter_round_trip(tmp_path):
    """D written by the checkpoint converter (``<stem>.discriminator.safetensors`` + manifest) loads back as the same
    network; a conversion without D gives None (pose prediction unavailable → zeros)."""
    from safetensors.torch import load_file

    from portrait3d_core.gan.config import GeneratorConfig
    from portrait3d_core.gan.convert import OfficialCheckpoint, write_converted

    with open(os.path.join(FIXTURES, "generator_config.json"), encoding="utf-8") as fh:
        cfg = json.load(fh)
    config = GeneratorConfig.from_oracle_config(cfg)
    g_state = load_file(os.path.join(FIXTURES, "generator_state_dict.safetensors"))
    model = random_discriminator()
    d_kwargs = {"c_dim": 25, "img_resolution": 32, "img_channels": 3, "seg_channels": 1, "channel_base": 256,
                "channel_max": 32, "num_fp16_res": 4, "conv_clamp": 256, "explicitly_symmetry": True,
                "epilogue_kwargs": {"mbstd_group_size": 4}}
    source = os.path.join(FIXTURES, "generator_state_dict.safetensors")
    for stem, d_state in (("with_d", model.state_dict()), ("without_d", None)):
        ckpt = OfficialCheckpoint(g_state, d_state, cfg["init_kwargs"], cfg["init_kwargs"]["rendering_kwargs"],
                                  config.neural_rendering_resolution, config, "TriPlaneGenerator",
                                  None if d_state is None else
                                  "training.dual_discriminator.PoseShapeAwareDualDiscriminator",
                                  None if d_state is None else d_kwargs, source)
        paths = write_converted(ckpt, str(tmp_path), stem)
        loaded = load_discriminator(paths["generator"])
        if d_state is None:
            assert loaded is None
            continue
        assert loaded.config == SMALL
        image, mask = inputs()
        c = camera(math.pi / 2 + 0.2)
        torch.testing.assert_close(predict_initial_pose(loaded, image, mask, c),
                                   predict_initial_pose(model, image, mask, c), rtol=0, atol=0)
