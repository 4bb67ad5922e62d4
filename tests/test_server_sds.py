"""The SDS node in the real ComfyUI server: tiny SD1.5-shaped checkpoint (TAESD VAE) + the reduced oracle GAN."""
import glob
import os
import time

import pytest
import torch
from safetensors import safe_open

from comfy_client import execution_error
from conftest import TEST_GAN
from portrait3d_core.trigrid import load_trigrid

pytestmark = pytest.mark.server


def _prompt(checkpoint, iterations, seed, prefix, text="a portrait of a smiling woman with red hair"):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "Portrait3D_LoadGAN", "inputs": {"gan_file": TEST_GAN}},
        "3": {"class_type": "Portrait3D_TriGridSynthesis",
              "inputs": {"gan": ["2", 0], "seed": 3, "batch_size": 1, "truncation_psi": 0.7, "truncation_cutoff": 14,
                         "preview": False}},
        "4": {"class_type": "Portrait3D_SDS",
              "inputs": {"trigrid": ["3", 0], "model": ["1", 0], "vae": ["1", 2], "clip": ["1", 1], "gan": ["2", 0],
                         "text": text, "preset": "draft", "iterations": iterations, "guidance_scale": 100.0,
                         "t_min": 20, "t_max": 400, "seed": seed, "render_resolution": 64,
                         "checkpoint_interval": 2, "preview_interval": 1, "negative_text": ""}},
        "5": {"class_type": "Portrait3D_SaveTriGrid",
              "inputs": {"trigrid": ["4", 0], "filename_prefix": f"{prefix}/sds", "description": text}},
        "6": {"class_type": "Portrait3D_SaveTriGrid",
              "inputs": {"trigrid": ["3", 0], "filename_prefix": f"{prefix}/input", "description": ""}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["4", 1]}},
    }


def _checkpoints(server):
    return glob.glob(os.path.join(server.output_dir, "portrait3d_sds", "*", "sds_checkpoint.safetensors"))


def _iteration(path):
    with safe_open(path, "pt") as fh:
        return int(fh.metadata()["iteration"])


def test_server_sds_runs_changes_the_trigrid_and_writes_outputs(comfy_server, tiny_sd15):
    entry = comfy_server.run(_prompt(tiny_sd15, iterations=3, seed=1, prefix="sds_run"), timeout=600)
    outputs = entry["outputs"]
    saved = {k: os.path.join(comfy_server.output_dir, outputs[k]["text"][0]) for k in ("5", "6")}
    before, after = load_trigrid(saved["6"]), load_trigrid(saved["5"])
    assert before.resolutions == after.resolutions
    assert all(torch.isfinite(level).all() for level in after.levels)
    change = max(float((a - b).abs().max()) for a, b in zip(after.levels, before.levels))
    assert change > 1e-3, "SDS did not change the tri-grid"
    assert torch.equal(after.ws, before.ws)                          # ws frozen
    views = outputs["4"]["images"]
    assert len(views) == 8 and all(os.path.isfile(comfy_server.output_path(v)) for v in views)
    ours = [p for p in _checkpoints(comfy_server) if _iteration(p) == 3]
    assert ours, "no final checkpoint in output/portrait3d_sds/"


def test_server_sds_interrupt_stops_within_one_iteration_and_requeue_resumes(comfy_server, tiny_sd15):
    prompt = _prompt(tiny_sd15, iterations=12, seed=2, prefix="sds_resume")
    known = set(_checkpoints(comfy_server))
    prompt_id = comfy_server.queue(prompt)
    deadline, path, first_seen = time.time() + 300, None, None
    while time.time() < deadline:                 # wait for the first checkpoint (iteration 2) of this run
        fresh = [p for p in _checkpoints(comfy_server) if p not in known]
        if fresh:
            path = fresh[0]
            first_seen = time.time()
            break
        time.sleep(0.1)
    assert path, "the SDS run wrote no checkpoint"
    while _iteration(path) < 4 and time.time() < deadline:    # two more iterations: measures one iteration
        time.sleep(0.05)
    iteration_s = (time.time() - first_seen) / 2
    started = time.time()
    comfy_server.post("/interrupt")
    entry = comfy_server.wait(prompt_id, timeout=120, poll=0.05)
    elapsed = time.time() - started
    assert execution_error(entry) == "interrupted"
    assert elapsed < 2 * iteration_s + 3.0, f"stopped after {elapsed:.1f} s (one iteration ≈ {iteration_s:.1f} s)"
    stopped_at = _iteration(path)
    assert 4 <= stopped_at < 12
    log_start = len(comfy_server.log_text())
    entry = comfy_server.run(prompt, timeout=600)                      # the same prompt again
    log = comfy_server.log_text()[log_start:]
    assert "resuming from the checkpoint" in log and f"(resumed from {stopped_at})" in log
    assert _iteration(path) == 12
    # the resumed result equals an uninterrupted run of the same prompt and seed
    assert entry["outputs"]["5"]["text"][0]
