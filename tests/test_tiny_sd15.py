"""The tiny random-weight checkpoint loads through the real server's CheckpointLoaderSimple as an SD1.5 model and
samples an image (txt2img through core nodes, API queue)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.server


def test_tiny_sd15_txt2img_through_server(comfy_server, tiny_sd15):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_sd15}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "upper body photo, a knight", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 1, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
    history = comfy_server.run(prompt, timeout=300)
    images = history["outputs"]["7"]["images"]
    assert len(images) == 1 and images[0]["filename"].endswith(".png")
