"""Refine nodes in the real ComfyUI server: tiny SD1.5-shaped checkpoint (TAESD VAE) + the reduced oracle GAN."""
import os

import pytest
import torch

from conftest import TEST_GAN
from portrait3d_core.refine import DEFAULT_NEGATIVE
from portrait3d_core.trigrid import load_trigrid

pytestmark = pytest.mark.server
SEED = 5
VIEWS = dict(preset="draft", seed=SEED, view_resolution=32, frontal_view=False)
REFIT = dict(epochs=1, detach_opacity=False)


def _prompt(checkpoint, prefix):
    text = "a portrait of a smiling woman with red hair"
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "Portrait3D_LoadGAN", "inputs": {"gan_file": TEST_GAN}},
        "3": {"class_type": "Portrait3D_TriGridSynthesis",
              "inputs": {"gan": ["2", 0], "seed": 3, "batch_size": 1, "truncation_psi": 0.7, "truncation_cutoff": 14,
                         "preview": False}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": DEFAULT_NEGATIVE}},
        # one node
        "6": {"class_type": "Portrait3D_Refine",
              "inputs": {"trigrid": ["3", 0], "gan": ["2", 0], "model": ["1", 0], "positive": ["4", 0],
                         "negative": ["5", 0], "vae": ["1", 2], **VIEWS, "steps": 10, "denoise": 0.2, "cfg": 7.5,
                         "sampler_name": "ddim", "scheduler": "ddim_uniform", "views_per_batch": 8, **REFIT}},
        "7": {"class_type": "Portrait3D_SaveTriGrid",
              "inputs": {"trigrid": ["6", 0], "filename_prefix": f"{prefix}/one_node", "description": ""}},
        # split: Render Views → VAE Encode → KSampler → VAE Decode → Refit
        "8": {"class_type": "Portrait3D_RenderViews",
              "inputs": {"trigrid": ["3", 0], "gan": ["2", 0], **VIEWS, "background": True}},
        "9": {"class_type": "VAEEncode", "inputs": {"pixels": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "KSampler",
               "inputs": {"model": ["1", 0], "seed": SEED, "steps": 10, "cfg": 7.5, "sampler_name": "ddim",
                          "scheduler": "ddim_uniform", "positive": ["4", 0], "negative": ["5", 0],
                          "latent_image": ["9", 0], "denoise": 0.2}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "Portrait3D_RefitTriGrid",
               "inputs": {"trigrid": ["3", 0], "images": ["11", 0], "cameras": ["8", 1], "preset": "draft",
                          "seed": SEED, **REFIT, "gan": ["2", 0]}},
        "13": {"class_type": "Portrait3D_SaveTriGrid",
               "inputs": {"trigrid": ["12", 0], "filename_prefix": f"{prefix}/split", "description": ""}},
        "14": {"class_type": "Portrait3D_SaveTriGrid",
               "inputs": {"trigrid": ["3", 0], "filename_prefix": f"{prefix}/input", "description": ""}},
    }


def test_refine_split_path_equals_the_one_node_refine(comfy_server, tiny_sd15):
    entry = comfy_server.run(_prompt(tiny_sd15, "refine_split"), timeout=900)
    out = entry["outputs"]
    one, split, start = (load_trigrid(os.path.join(comfy_server.output_dir, out[k]["text"][0]))
                         for k in ("7", "13", "14"))
    assert one.resolutions == split.resolutions == start.resolutions
    change = max(float((a - b).abs().max()) for a, b in zip(one.levels, start.levels))
    assert change > 1e-3, "the refit did not change the tri-grid"
    for a, b in zip(one.levels, split.levels):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(one.ws, start.ws)
