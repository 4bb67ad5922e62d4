"""The package inside a real ComfyUI 0.3.75 server, driven through its HTTP API as users and scripts do."""
import glob
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_client import ROOT, ServerError, execution_error, import_failures_of_pack, load_workflow, ui_to_api
from conftest import TEST_DECODER, TEST_GAN, TEST_TRIGRID
from portrait3d_core import cameras
from portrait3d_core.demo_assets import DEMO_TRIGRID_NAME, analytic_mask
from portrait3d_core.trigrid import load_trigrid

pytestmark = pytest.mark.server
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))
OUR_NODES = {
    "Portrait3D_LoadTriGrid": ([], ["PORTRAIT3D_TRIGRID"]),
    "Portrait3D_LoadDecoder": ([], ["PORTRAIT3D_DECODER"]),
    "Portrait3D_Camera": ([], ["PORTRAIT3D_CAMERA"]),
    "Portrait3D_RenderTriGrid": (["PORTRAIT3D_TRIGRID", "PORTRAIT3D_DECODER", "PORTRAIT3D_GAN", "PORTRAIT3D_CAMERA"],
                                 ["IMAGE", "MASK", "MASK", "IMAGE"]),
    "Portrait3D_RenderTurntable": (["PORTRAIT3D_TRIGRID", "PORTRAIT3D_DECODER", "PORTRAIT3D_GAN"],
                                   ["IMAGE", "MASK", "MASK", "IMAGE", "PORTRAIT3D_CAMERA"]),
    "Portrait3D_SaveTriGrid": (["PORTRAIT3D_TRIGRID"], ["STRING"]),
    "Portrait3D_LoadGAN": ([], ["PORTRAIT3D_GAN"]),
    "Portrait3D_ExportMesh": (["PORTRAIT3D_TRIGRID", "PORTRAIT3D_DECODER"], ["STRING", "MESH"]),
    "Portrait3D_TriGridSynthesis": (["PORTRAIT3D_GAN", "PORTRAIT3D_CAMERA"],
                                    ["PORTRAIT3D_TRIGRID", "PORTRAIT3D_DECODER", "IMAGE"]),
}


def _iou(pred, truth):
    return float((pred & truth).sum() / max(1, (pred | truth).sum()))


def _read_mask(path):
    return np.asarray(Image.open(path).convert("L")) > 127


def _prompt_for_tests(workflow, info, frames=None, resolution=None):
    """The example workflow in API form, on the small test assets (and fewer frames / pixels when asked)."""
    prompt = ui_to_api(workflow, info)
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "Portrait3D_LoadTriGrid":
            inputs["trigrid_file"] = TEST_TRIGRID
        if node["class_type"] == "Portrait3D_LoadDecoder":
            inputs["decoder_file"] = TEST_DECODER
        if node["class_type"] == "Portrait3D_LoadGAN":
            inputs["gan_file"] = TEST_GAN
        if frames is not None and "frames" in inputs:
            inputs["frames"] = frames
        if resolution is not None and "resolution" in inputs:
            inputs["resolution"] = resolution
        if "texture_size" in inputs:
            inputs["texture_size"] = 256
    if any(n["class_type"] == "Portrait3D_LoadGAN" for n in prompt.values()):
        for node in prompt.values():       # the oracle GAN has random weights: its densities stay low
            if node["class_type"] == "Portrait3D_ExportMesh":
                node["inputs"].update(threshold="custom", custom_density=0.5)
    return prompt


def _node(prompt, class_type):
    return next((k, v) for k, v in prompt.items() if v["class_type"] == class_type)


def test_server_loads_the_package_without_import_failure(comfy_server):
    log = comfy_server.log_text()
    assert "comfyui-portrait3d" in log
    assert import_failures_of_pack(log) == []


def test_server_object_info_lists_every_node_with_expected_io(comfy_server):
    info = comfy_server.object_info()
    ours = {k: v for k, v in info.items() if v.get("category", "").startswith("Portrait3D")}
    assert set(OUR_NODES) <= set(ours) and len(ours) >= 3
    for name, (socket_types, outputs) in OUR_NODES.items():
        node = info[name]
        assert node["display_name"] and node["description"]
        specs = {**node["input"].get("required", {}), **node["input"].get("optional", {})}
        assert all(spec[1].get("tooltip") for spec in specs.values()), f"{name}: every input needs a tooltip"
        assert [spec[0] for spec in specs.values() if spec[0].startswith("PORTRAIT3D_")] == \
            [t for t in socket_types if t.startswith("PORTRAIT3D_")]
        assert node["output"] == outputs


def test_server_model_folder_lists_files_from_models_dir_and_extra_paths(comfy_server):
    info = comfy_server.object_info()
    trigrids = info["Portrait3D_LoadTriGrid"]["input"]["required"]["trigrid_file"][1]["options"]
    decoders = info["Portrait3D_LoadDecoder"]["input"]["required"]["decoder_file"][1]["options"]
    assert TEST_TRIGRID in trigrids and DEMO_TRIGRID_NAME in trigrids   # extra_model_paths.yaml + models/portrait3d
    assert TEST_DECODER in decoders and TEST_DECODER not in trigrids


def _check_turntable_masks(server, prompt, outputs, frames):
    _, turntable = _node(prompt, "Portrait3D_RenderTurntable")
    labels = cameras.orbit_labels(frames, turntable["inputs"]["elevation"], turntable["inputs"]["radius"],
                                  turntable["inputs"]["focal"])
    mask_items = sorted((item for out in outputs.values() for item in out.get("images", [])
                         if "mask" in item["filename"]), key=lambda i: i["filename"])
    assert len(mask_items) == frames
    for item, expected in zip(mask_items, analytic_mask(labels, 64)):
        assert _iou(_read_mask(server.output_path(item)), expected.numpy()) >= 0.9


def _check_video(server, prompt, outputs, frames):
    import av

    video_node, _ = _node(prompt, "SaveVideo")
    with av.open(server.output_path(outputs[video_node]["images"][0])) as container:
        assert sum(1 for _ in container.decode(video=0)) == frames


def _check_view(server, prompt, outputs):
    _, camera = _node(prompt, "Portrait3D_Camera")
    c = cameras.camera_label(cameras.yaw_pitch_pose(camera["inputs"]["yaw"], camera["inputs"]["pitch"],
                                                    camera["inputs"]["radius"]), camera["inputs"]["focal"])
    mask_item = next(item for out in outputs.values() for item in out.get("images", []) if "mask" in item["filename"])
    assert _iou(_read_mask(server.output_path(mask_item)), analytic_mask(c, 64)[0].numpy()) >= 0.9
    saved = next(out["text"][0] for out in outputs.values() if "text" in out)
    again = load_trigrid(os.path.join(server.output_dir, saved))
    assert again.resolutions == [(r, r) for r in (8, 16, 32, 64)] and again.meta["prompt"] == "demo head"


def _check_random_portrait(server, prompt, outputs):
    """Same seed ⇒ same tri-grid: the saved file equals a local synthesis with the workflow's settings."""
    from conftest import write_oracle_generator
    from portrait3d_core.gan.convert import load_generator
    from portrait3d_core.gan.sample import synthesize_trigrids

    _, synth = _node(prompt, "Portrait3D_TriGridSynthesis")
    saved = next(out["text"][0] for out in outputs.values() if "text" in out)
    got = load_trigrid(os.path.join(server.output_dir, saved))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        generator = load_generator(write_oracle_generator(tmp))
    want = synthesize_trigrids(generator, [synth["inputs"]["seed"]], synth["inputs"]["truncation_psi"],
                               synth["inputs"]["truncation_cutoff"])
    for a, b in zip(got.levels, want.levels):
        assert torch.allclose(a, b, atol=1e-5 * max(1.0, b.abs().max().item()))
    preview_node, _ = _node(prompt, "PreviewImage")
    preview = Image.open(server.output_path(outputs[preview_node]["images"][0]))
    assert preview.size == (128, 128)          # reduced oracle model: SR output 128² (512² for the real model)


def _check_export(server, prompt, outputs):
    """The history names the GLB (ui '3d' like core SaveGLB) and Preview3D got the same path; the file is a mesh."""
    import trimesh

    export_node, _ = _node(prompt, "Portrait3D_ExportMesh")
    item = outputs[export_node]["3d"][0]
    path = server.output_path(item)
    assert os.path.isfile(path) and path.endswith(".glb")
    preview_node, _ = _node(prompt, "Preview3D")
    assert outputs[preview_node]["result"][0] == os.path.relpath(path, server.output_dir)
    scene = trimesh.load(path)
    mesh = next(iter(scene.geometry.values()))
    assert len(mesh.faces) > 100 and mesh.visual.kind == "texture"


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_server_runs_example_workflow(comfy_server, path):
    frames = 6
    prompt = _prompt_for_tests(load_workflow(path), comfy_server.object_info(), frames=frames, resolution=64)
    outputs = comfy_server.run(prompt, timeout=900)["outputs"]
    kinds = {n["class_type"] for n in prompt.values()}
    if "Portrait3D_ExportMesh" in kinds:
        _check_export(comfy_server, prompt, outputs)
    if "SaveVideo" in kinds:
        _check_video(comfy_server, prompt, outputs, frames)
    if "Portrait3D_TriGridSynthesis" in kinds:
        _check_random_portrait(comfy_server, prompt, outputs)
    elif "Portrait3D_RenderTurntable" in kinds:
        _check_turntable_masks(comfy_server, prompt, outputs, frames)
    elif "Portrait3D_RenderTriGrid" in kinds:
        _check_view(comfy_server, prompt, outputs)
    assert len(WORKFLOWS) >= 3


def test_server_save_trigrid_never_overwrites(comfy_server):
    prompt = {"1": {"class_type": "Portrait3D_LoadTriGrid", "inputs": {"trigrid_file": TEST_TRIGRID}},
              "2": {"class_type": "Portrait3D_SaveTriGrid",
                    "inputs": {"trigrid": ["1", 0], "filename_prefix": "tests/keep", "prompt": ""}}}
    names = []
    for run in range(2):
        prompt["2"]["inputs"]["prompt"] = f"run {run}"     # different input → not served from cache
        entry = comfy_server.run(prompt)
        names.append(entry["outputs"]["2"]["text"][0])
    assert names[0] != names[1]
    assert all(os.path.exists(os.path.join(comfy_server.output_dir, n)) for n in names)


def test_server_full_size_demo_trigrid_renders(comfy_server):
    """The one test on the real 7-level shapes (8 … 512): the demo asset written by the setup script."""
    prompt = {"1": {"class_type": "Portrait3D_LoadTriGrid", "inputs": {"trigrid_file": DEMO_TRIGRID_NAME}},
              "2": {"class_type": "Portrait3D_LoadDecoder", "inputs": {"decoder_file": TEST_DECODER}},
              "3": {"class_type": "Portrait3D_RenderTriGrid",
                    "inputs": {"trigrid": ["1", 0], "decoder": ["2", 0], "yaw": 0.0, "pitch": 0.0, "radius": 2.7,
                               "focal": 6.5104166, "resolution": 64, "samples": 48, "ray_start": 2.35,
                               "ray_end": 3.12, "background": "none", "background_colour": "#ffffff"}},
              "4": {"class_type": "MaskToImage", "inputs": {"mask": ["3", 1]}},
              "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "tests/full"}}}
    entry = comfy_server.run(prompt)
    mask = _read_mask(comfy_server.output_path(entry["outputs"]["5"]["images"][0]))
    truth = analytic_mask(cameras.camera_label(cameras.yaw_pitch_pose(0.0, 0.0)), 64)[0].numpy()
    assert _iou(mask, truth) >= 0.9


def test_server_rejects_wrong_wiring_with_node_errors(comfy_server):
    prompt = {"1": {"class_type": "Portrait3D_LoadTriGrid", "inputs": {"trigrid_file": TEST_TRIGRID}},
              "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}
    with pytest.raises(ServerError, match="return_type_mismatch|PORTRAIT3D_TRIGRID"):
        comfy_server.queue(prompt)


def test_server_wrong_file_gives_a_clear_error(comfy_server):
    prompt = {"1": {"class_type": "Portrait3D_LoadTriGrid", "inputs": {"trigrid_file": TEST_DECODER}},
              "2": {"class_type": "Portrait3D_SaveTriGrid",
                    "inputs": {"trigrid": ["1", 0], "filename_prefix": "tests/bad", "prompt": ""}}}
    entry = comfy_server.wait(comfy_server.queue(prompt))
    assert entry["status"]["status_str"] == "error"
    message = execution_error(entry)
    assert TEST_DECODER in message and "not a pyramid tri-grid file" in message


def test_server_interrupt_stops_a_long_turntable_within_5_seconds(comfy_server):
    prompt = {"1": {"class_type": "Portrait3D_LoadTriGrid", "inputs": {"trigrid_file": TEST_TRIGRID}},
              "2": {"class_type": "Portrait3D_LoadDecoder", "inputs": {"decoder_file": TEST_DECODER}},
              "3": {"class_type": "Portrait3D_RenderTurntable",
                    "inputs": {"trigrid": ["1", 0], "decoder": ["2", 0], "preset": "paper_360", "frames": 240,
                               "elevation": 0.0, "radius": 2.7, "focal": 6.5104166, "resolution": 512,
                               "samples": 96, "ray_start": 2.35, "ray_end": 3.12, "background": "none",
                               "background_colour": "#ffffff"}},
              "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
    prompt_id = comfy_server.queue(prompt)
    deadline = time.time() + 120
    while time.time() < deadline:                      # wait until the turntable node is running
        running = comfy_server.get("/queue")["queue_running"]
        if running and running[0][1] == prompt_id:
            break
        time.sleep(0.2)
    time.sleep(3.0)
    started = time.time()
    comfy_server.post("/interrupt")
    entry = comfy_server.wait(prompt_id, timeout=60, poll=0.1)
    elapsed = time.time() - started
    assert execution_error(entry) == "interrupted"
    assert elapsed < 5.0, f"stopped after {elapsed:.1f} s"
    # the server keeps working afterwards
    comfy_server.run({"1": {"class_type": "Portrait3D_Camera",
                            "inputs": {"yaw": 1.0, "pitch": 0.0, "radius": 2.7, "focal": 6.5104166}},
                      "2": {"class_type": "Portrait3D_LoadTriGrid", "inputs": {"trigrid_file": TEST_TRIGRID}},
                      "3": {"class_type": "Portrait3D_SaveTriGrid",
                            "inputs": {"trigrid": ["2", 0], "filename_prefix": "tests/after", "prompt": "ok"}}})


def test_server_lists_example_workflows_as_templates(comfy_server):
    templates = comfy_server.get("/api/workflow_templates")
    ours = templates.get("comfyui-portrait3d", [])
    assert sorted(ours) == sorted(os.path.splitext(os.path.basename(p))[0] for p in WORKFLOWS)
