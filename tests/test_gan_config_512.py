"""The full-size 512 generator config builds (on the meta device) with exactly the official state-dict layout.

Reference: ``keys_and_shapes_512.txt`` of the generator oracle folder (``conftest.FIXTURES``; built from the
unmodified official code): 446 keys in order with ``renderer.*`` (SMPL buffers), 428 without.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

from conftest import FIXTURES
from portrait3d_core.gan.config import GeneratorConfig
from portrait3d_core.gan.generator import PortraitGenerator

KEYS_512 = os.path.join(FIXTURES, "keys_and_shapes_512.txt")


def read_reference():
    rows, header = [], ""
    with open(KEYS_512, encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\n")
            if line.startswith("#"):
                header += line + "\n"
                continue
            if not line.strip():
                continue
            key, shape, dtype = line.split("\t")[:3]
            shape = tuple(int(s) for s in re.findall(r"\d+", shape))
            rows.append((key, shape, dtype))
    return rows, header


def layout(model) -> list:
    return [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]


@pytest.fixture(scope="module")
def reference():
    assert os.path.isfile(KEYS_512), f"missing {KEYS_512}"
    return read_reference()


def build(smpl_buffers: bool) -> PortraitGenerator:
    with torch.device("meta"):
        return PortraitGenerator(GeneratorConfig.full_512(), smpl_buffers=smpl_buffers)


def test_full_512_with_smpl_buffers_matches_official_layout(reference):
    rows, header = reference
    got = layout(build(True))
    assert len(rows) == 446
    assert got == rows
    total = sum(int(torch.Size(s).numel()) for _, s, _ in got)
    outside = sum(int(torch.Size(s).numel()) for k, s, _ in got if not k.startswith("renderer."))
    m = re.search(r"(\d+) elements in total, (\d+) outside", header)
    if m:
        assert (total, outside) == (int(m.group(1)), int(m.group(2)))


def test_full_512_without_smpl_buffers_matches_official_layout(reference):
    rows, _ = reference
    expected = [r for r in rows if not r[0].startswith("renderer.")]
    assert len(expected) == 428
    assert layout(build(False)) == expected


def test_full_512_parameter_counts_and_sizes():
    """Parameter counts of ``portrait_gan.md`` §12.5 (parameters only, buffers excluded) and derived sizes."""
    G = build(False)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(G.backbone) == 7_370_483
    assert count(G.backbone.mapping) == 803_840
    assert count(G.bcg_synthesis) == 27_309_259
    assert count(G.superresolution) == 1_649_578
    assert count(G.pose_branch) == 73_190
    assert count(G.torgb) == 16_515
    assert count(G.decoder) == 1_505
    cfg = G.config
    assert (cfg.num_ws, cfg.bcg_num_ws) == (14, 12)
    assert cfg.pyramid_resolutions == [8, 16, 32, 64, 128, 256, 512]
    assert cfg.bcg_channels == {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256}
    assert GeneratorConfig.from_json(cfg.to_json()) == cfg


def test_official_512_kwargs_give_the_full_config():
    """``init_kwargs_512`` (train.py stage-3 kwargs) + the default literals = ``full_512()``."""
    import json

    with open(os.path.join(FIXTURES, "generator_config.json"), encoding="utf-8") as fh:
        kwargs = json.load(fh)["init_kwargs_512"]
    cfg = GeneratorConfig.from_init_kwargs(kwargs)
    assert cfg.replace(rendering_kwargs={}) == GeneratorConfig.full_512().replace(rendering_kwargs={})
