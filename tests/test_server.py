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
    "Portrait3D_Refine": (["PORTRAIT3D_TRIGRID", "PORTRAIT3D_GAN"], ["PORTRAIT3D_TRIGRID", "IMAGE", "IMAGE"]),
    "Portrait3D_RenderViews": (["PORTRAIT3D_TRIGRID", "PORTRAIT3D_GAN"], ["IMAGE", "PORTRAIT3D_CAMERA"]),
    "Portrait3D_RefitTriGrid": (["PORTRAIT3D_TRIGRID", "PORTRAIT3D_CAMERA", "PORTRAIT3D_GAN", "PORTRAIT3D_DECODER"],
                                ["PORTRAIT3D_TRIGRID"]),
    "Portrait3D_SDS": (["PORTRAIT3D_TRIGRID", "PORTRAIT3D_GAN", "PORTRAIT3D_DECODER"], ["PORTRAIT3D_TRIGRID", "IMAGE"]),
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
    assert again.resolutions == [(r, r) for r in (8, 16, 32, 64)] and again.meta["description"] == "demo head"


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
                    "inputs": {"trigrid": ["1", 0], "filename_prefix": "tests/keep", "description": ""}}}
    names = []
    for run in range(2):
        prompt["2"]["inputs"]["description"] = f"run {run}"     # different input → not served from cache
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
                    "inputs": {"trigrid": ["1", 0], "filename_prefix": "tests/bad", "description": ""}}}
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
                            "inputs": {"trigrid": ["2", 0], "filename_prefix": "tests/after", "description": "ok"}}})


def test_server_lists_example_workflows_as_templates(comfy_server):
    templates = comfy_server.get("/api/workflow_templates")
    ours = templates.get("comfyui-portrait3d", [])
    assert sorted(ours) == sorted(os.path.splitext(os.path.basename(p))[0] for p in WORKFLOWS)


# ---------------------------------------------------------------------------------------------- batches

BATCH_SEED = 42
RENDER = {"radius": 2.7, "focal": 6.5104166, "resolution": 32, "samples": 8, "ray_start": 2.35, "ray_end": 3.12,
          "background": "gan", "background_colour": "#ffffff", "gan": ["1", 0]}


def _synthesis(seed, batch_size):
    return {"class_type": "Portrait3D_TriGridSynthesis",
            "inputs": {"gan": ["1", 0], "seed": seed, "batch_size": batch_size, "truncation_psi": 0.7,
                       "truncation_cutoff": 14, "preview": False}}


def _batch_prompt(**nodes):
    """Load GAN (#1) → Tri-grid Synthesis batch of 2 (#2) and single-item syntheses of both seeds (#3, #4)."""
    return {"1": {"class_type": "Portrait3D_LoadGAN", "inputs": {"gan_file": TEST_GAN}},
            "2": _synthesis(BATCH_SEED, 2), "3": _synthesis(BATCH_SEED, 1), "4": _synthesis(BATCH_SEED + 1, 1),
            **nodes}


def _saved_images(server, outputs, node):
    items = sorted(outputs[node]["images"], key=lambda i: i["filename"])
    return np.stack([np.asarray(Image.open(server.output_path(i)).convert("RGB"), np.float32) / 255 for i in items])


def _assert_item_major(batch, singles, per_item):
    """``batch`` [B·per_item, …] equals the single renders item by item (up to the renderer's sample jitter)."""
    assert batch.shape[0] == len(singles) * per_item
    for b, single in enumerate(singles):
        same = np.abs(batch[b * per_item:(b + 1) * per_item] - single).mean()
        other = np.abs(batch[b * per_item:(b + 1) * per_item] - singles[1 - b]).mean()
        assert other > 0.01 and same < 0.3 * other, (b, same, other)


def _render_view(trigrid_node, camera=None):
    inputs = {"trigrid": [trigrid_node, 0], "decoder": [trigrid_node, 1], "yaw": 25.0, "pitch": 5.0, **RENDER}
    if camera is not None:
        inputs["camera"] = camera
    return {"class_type": "Portrait3D_RenderTriGrid", "inputs": inputs}


def _save(images, prefix):
    return {"class_type": "SaveImage", "inputs": {"images": images, "filename_prefix": prefix}}


def test_batch_render_trigrid_renders_every_item_item_major(comfy_server):
    prompt = _batch_prompt(
        **{"10": {"class_type": "Portrait3D_Camera",
                  "inputs": {"yaw": 0.0, "pitch": 0.0, "radius": 2.7, "focal": 6.5104166}},
           "11": _render_view("2"), "12": _render_view("3"), "13": _render_view("4"),
           "14": _save(["11", 0], "tests/batch_view"), "15": _save(["12", 0], "tests/single_a"),
           "16": _save(["13", 0], "tests/single_b"),
           "17": {"class_type": "MaskToImage", "inputs": {"mask": ["11", 1]}},
           "18": _save(["17", 0], "tests/batch_view_mask")})
    outputs = comfy_server.run(prompt, timeout=600)["outputs"]
    batch = _saved_images(comfy_server, outputs, "14")
    _assert_item_major(batch, [_saved_images(comfy_server, outputs, n) for n in ("15", "16")], per_item=1)
    assert len(outputs["18"]["images"]) == 2                  # the MASK batch follows the IMAGE batch


def test_batch_render_turntable_every_item_with_progress_over_items_and_frames(comfy_server):
    from comfy_client import ServerEvents

    frames = 3

    def turntable(node):
        return {"class_type": "Portrait3D_RenderTurntable",
                "inputs": {"trigrid": [node, 0], "decoder": [node, 1], "preset": "custom", "frames": frames,
                           "elevation": 0.0, **RENDER}}

    prompt = _batch_prompt(**{"20": turntable("2"), "21": turntable("3"), "22": turntable("4"),
                              "23": _save(["20", 0], "tests/batch_turntable"),
                              "24": _save(["21", 0], "tests/turntable_a"), "25": _save(["22", 0], "tests/turntable_b"),
                              "26": {"class_type": "MaskToImage", "inputs": {"mask": ["20", 2]}},
                              "27": _save(["26", 0], "tests/batch_turntable_depth")})
    progress = []
    with ServerEvents(comfy_server) as events:
        prompt_id = comfy_server.queue(prompt)
        for kind, data in events.of_prompt(prompt_id, timeout=600):
            if kind == "progress" and data["node"] == "20":
                progress.append((data["value"], data["max"]))
    entry = comfy_server.wait(prompt_id)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    outputs = entry["outputs"]
    batch = _saved_images(comfy_server, outputs, "23")
    _assert_item_major(batch, [_saved_images(comfy_server, outputs, n) for n in ("24", "25")], per_item=frames)
    assert len(outputs["27"]["images"]) == 2 * frames
    assert progress and {total for _, total in progress} == {2 * frames} and progress[-1] == (6, 6)


def test_batch_export_mesh_writes_one_file_per_item_with_the_workflow(comfy_server):
    import json

    import pygltflib

    workflow = {"nodes": [{"id": 30, "type": "Portrait3D_ExportMesh"}], "links": [], "version": 0.4}
    prompt = _batch_prompt(**{
        "30": {"class_type": "Portrait3D_ExportMesh",
               "inputs": {"trigrid": ["2", 0], "decoder": ["2", 1], "format": "glb", "resolution": 48,
                          "threshold": "custom", "custom_density": 0.5, "colour": "texture", "texture_size": 256,
                          "decimate_faces": 0, "smooth_iterations": 0, "close_holes": True,
                          "filename_prefix": "tests/batch_mesh", "description": "two portraits"}},
        "31": {"class_type": "Preview3D", "inputs": {"model_file": ["30", 0]}},
        "32": {"class_type": "SaveGLB", "inputs": {"mesh": ["30", 1], "filename_prefix": "tests/batch_core_glb"}}})
    entry = comfy_server.wait(comfy_server.queue(prompt, extra_data={"extra_pnginfo": {"workflow": workflow}}),
                              timeout=600)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    outputs = entry["outputs"]
    files = [comfy_server.output_path(item) for item in outputs["30"]["3d"]]
    assert len(files) == 2 and all(f.endswith(".glb") and os.path.isfile(f) for f in files)
    shown = outputs["31"]["result"]                     # Preview3D ran once per path: the list output
    assert shown[0] == os.path.relpath(files[0], comfy_server.output_dir) and \
        os.path.relpath(files[1], comfy_server.output_dir) in shown
    seeds = []
    for path in files:
        gltf = pygltflib.GLTF2().load(path)
        assert json.loads(gltf.asset.extras["workflow"]) == workflow
        assert json.loads(gltf.asset.extras["prompt"])["30"]["class_type"] == "Portrait3D_ExportMesh"
        extras = gltf.scenes[gltf.scene].extras["portrait3d"]
        assert extras["description"] == "two portraits"
        seeds.append(extras["trigrid"]["seed"])
    assert seeds == [str(BATCH_SEED), str(BATCH_SEED + 1)]
    assert len(outputs["32"]["3d"]) == 2                # the MESH output is the whole batch (core SaveGLB)


def test_batch_save_trigrid_saves_every_item_with_the_workflow(comfy_server):
    import json

    from portrait3d_core.trigrid import read_metadata

    workflow = {"nodes": [{"id": 40, "type": "Portrait3D_SaveTriGrid"}], "links": [], "version": 0.4}
    prompt = _batch_prompt(**{"40": {"class_type": "Portrait3D_SaveTriGrid",
                                     "inputs": {"trigrid": ["2", 0], "filename_prefix": "tests/batch_trigrid",
                                                "description": "batch"}},
                              "41": {"class_type": "Portrait3D_SaveTriGrid",
                                     "inputs": {"trigrid": ["4", 0], "filename_prefix": "tests/single_trigrid",
                                                "description": "single"}}})
    entry = comfy_server.wait(comfy_server.queue(prompt, extra_data={"extra_pnginfo": {"workflow": workflow}}),
                              timeout=600)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    outputs = entry["outputs"]
    paths = [comfy_server.output_path(item) for item in outputs["40"]["files"]]
    assert len(paths) == 2 and outputs["40"]["text"] == [os.path.relpath(p, comfy_server.output_dir) for p in paths]
    items = [load_trigrid(p) for p in paths]
    assert [t.batch_size for t in items] == [1, 1]
    assert [t.meta["seed"] for t in items] == [str(BATCH_SEED), str(BATCH_SEED + 1)]
    single = load_trigrid(comfy_server.output_path(outputs["41"]["files"][0]))
    for a, b in zip(items[1].levels, single.levels):        # the second item is seed + 1's tri-grid
        torch.testing.assert_close(a, b)
    meta = read_metadata(paths[0])
    assert json.loads(meta["workflow"]) == workflow and meta["description"] == "batch"
    assert json.loads(meta["prompt"])["40"]["class_type"] == "Portrait3D_SaveTriGrid"


def test_server_export_mesh_mrc_honours_resolution_and_lists_every_file(comfy_server):
    from portrait3d_core.mesh_export import read_mrc_header

    def export(fmt, resolution):
        return {"1": {"class_type": "Portrait3D_LoadTriGrid", "inputs": {"trigrid_file": TEST_TRIGRID}},
                "2": {"class_type": "Portrait3D_LoadDecoder", "inputs": {"decoder_file": TEST_DECODER}},
                "3": {"class_type": "Portrait3D_ExportMesh",
                      "inputs": {"trigrid": ["1", 0], "decoder": ["2", 0], "format": fmt, "resolution": resolution,
                                 "threshold": "default", "custom_density": 30.0, "colour": "texture",
                                 "texture_size": 256, "decimate_faces": 0, "smooth_iterations": 0,
                                 "close_holes": True, "filename_prefix": f"tests/files_{fmt}", "description": ""}}}

    started = time.time()
    out = comfy_server.run(export("mrc", 64))["outputs"]["3"]
    assert time.time() - started < 60
    (item,) = out["files"]
    path = comfy_server.output_path(item)
    assert path.endswith(".mrc") and os.path.getsize(path) == 1024 + 4 * 64 ** 3
    assert read_mrc_header(path)["nx"] == 64
    out = comfy_server.run(export("obj", 48))["outputs"]["3"]
    names = {key: [i["filename"] for i in items] for key, items in out.items()}
    assert [os.path.splitext(n)[1] for n in names["3d"] + names["images"] + names["files"]] == [".obj", ".png", ".mtl"]
    assert all(os.path.isfile(comfy_server.output_path(i)) for items in out.values() for i in items)


def test_server_demo_prints_progress_from_the_websocket(comfy_server, capsys):
    from run_demo import queue_and_follow

    prompt = {"1": {"class_type": "Portrait3D_LoadTriGrid", "inputs": {"trigrid_file": TEST_TRIGRID}},
              "2": {"class_type": "Portrait3D_LoadDecoder", "inputs": {"decoder_file": TEST_DECODER}},
              "3": {"class_type": "Portrait3D_RenderTurntable",
                    "inputs": {"trigrid": ["1", 0], "decoder": ["2", 0], "preset": "custom", "frames": 3,
                               "elevation": 7.0, "radius": 2.7, "focal": 6.5104166, "resolution": 16, "samples": 8,
                               "ray_start": 2.35, "ray_end": 3.12, "background": "none",
                               "background_colour": "#ffffff"},
                    "_meta": {"title": "Spin"}},
              "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
    entry = queue_and_follow(comfy_server, prompt, "test")
    assert entry["status"]["status_str"] == "success"
    lines = capsys.readouterr().out.splitlines()
    assert "[demo]   running Spin (#3)" in lines and "[demo]     Spin (#3): 3/3" in lines
    assert any(line.startswith("[demo] test: queued prompt") for line in lines)
