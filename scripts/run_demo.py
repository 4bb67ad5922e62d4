"""README command 1 (after setup): run the main job through a real ComfyUI server and its API queue.

Today's fullest pipeline, from the best inputs found in ``.comfyui/models/portrait3d/``:
- the official GAN (``model_512.pkl``): a random portrait (seed 42) → tri-grid → 360° turntable with the GAN background
  + textured GLB (``example_workflows/portrait3d_random_portrait.json``);
- else an official tri-grid (e.g. a gallery ``*_pyramid_trigrid.pth``) + ``decoder_512.ckpt``: turntable + GLB
  (``portrait3d_turntable.json``, ``portrait3d_export_mesh.json``);
- else the clearly labelled DEMO assets, with the same two workflows.
The text → tri-grid stages (prompt image, inversion, SDS, refinement) are not implemented yet.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from comfy_client import (COMFY_DIR, ROOT, ComfyServer, ProgressPrinter, ServerEvents, execution_error,  # noqa: E402
                          load_workflow, ui_to_api)

from portrait3d_core.checkpoints import guess_file_kind  # noqa: E402
from portrait3d_core.demo_assets import DEMO_DECODER_NAME, DEMO_TRIGRID_NAME  # noqa: E402

MODELS = os.path.join(COMFY_DIR, "models", "portrait3d")
OUTPUT = os.path.join(ROOT, "outputs")
TRIGRID_WORKFLOWS = ("portrait3d_turntable.json", "portrait3d_export_mesh.json")
GAN_WORKFLOWS = ("portrait3d_random_portrait.json",)


def pick_assets() -> dict:
    """What to run on: {'gan': file} | {'trigrid': file, 'decoder': file} (official) | the demo assets."""
    files = sorted(os.listdir(MODELS)) if os.path.isdir(MODELS) else []
    official = [f for f in files if not f.startswith(("DEMO_", "TEST_"))]
    kinds = {f: guess_file_kind(os.path.join(MODELS, f)) for f in official}
    gans = [f for f, k in kinds.items() if k == "gan"]
    gans.sort(key=lambda f: not f.endswith(".safetensors"))      # an earlier conversion loads fastest
    if gans:
        return {"gan": gans[0], "demo": False}
    trigrids = [f for f, k in kinds.items() if k == "trigrid"]
    decoders = [f for f, k in kinds.items() if k == "decoder"]
    if trigrids and decoders:
        return {"trigrid": trigrids[0], "decoder": decoders[0], "demo": False}
    return {"trigrid": DEMO_TRIGRID_NAME, "decoder": DEMO_DECODER_NAME, "demo": True}


def run_workflow(server, info, path, assets, args) -> int:
    prompt = ui_to_api(load_workflow(path), info)
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "Portrait3D_LoadTriGrid":
            inputs["trigrid_file"] = assets["trigrid"]
        if node["class_type"] == "Portrait3D_LoadDecoder":
            inputs["decoder_file"] = assets["decoder"]
        if node["class_type"] == "Portrait3D_LoadGAN":
            inputs["gan_file"] = assets["gan"]
        if node["class_type"] == "Portrait3D_RenderTurntable":
            inputs["frames"] = args.frames or inputs["frames"]
            inputs["resolution"] = args.resolution or inputs["resolution"]
    started = time.time()
    entry = queue_and_follow(server, prompt, os.path.basename(path))
    if entry["status"]["status_str"] != "success":
        print(f"[demo] FAILED: {execution_error(entry)}", file=sys.stderr)
        return 1
    print(f"[demo] finished in {time.time() - started:.0f} s")
    for node_id, out in entry["outputs"].items():
        items = out.get("images", []) + out.get("3d", [])
        if items:
            first = server.output_path(items[0])
            more = f" (+{len(items) - 1} more)" if len(items) > 1 else ""
            print(f"[demo]   {prompt[node_id]['_meta']['title']}: {os.path.relpath(first, ROOT)}{more}")
    return 0


def queue_and_follow(server, prompt, name) -> dict:
    """Queue the prompt and print the server's progress (node, step/total) from its websocket until it ends."""
    try:
        events = ServerEvents(server)
    except Exception as exc:                       # no websocket-client, or no websocket: just wait
        events = None
        print(f"[demo] (no live progress: {exc})")
    prompt_id = server.queue(prompt)
    print(f"[demo] {name}: queued prompt {prompt_id} through POST /prompt; waiting …", flush=True)
    if events is not None:
        show = ProgressPrinter(prompt, write=lambda line: print(f"[demo]   {line}", flush=True))
        with events:
            for kind, data in events.of_prompt(prompt_id, timeout=3600):
                show(kind, data)
    return server.wait(prompt_id, timeout=3600)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=None, help="turntable frames (default: the workflow's 72)")
    parser.add_argument("--resolution", type=int, default=None, help="frame size (default: the workflow's 160)")
    args = parser.parse_args(argv)

    assets = pick_assets()
    if assets["demo"]:
        print("[demo] No official Portrait3D files found in .comfyui/models/portrait3d/ — running on the DEMO assets "
              "(analytic head tri-grid + hand-set decoder), not on real weights. See README › Official weights.")
        workflows = TRIGRID_WORKFLOWS
    elif "gan" in assets:
        print(f"[demo] Using the official GAN {assets['gan']}: a random portrait (the first load converts the pickle)")
        workflows = GAN_WORKFLOWS
    else:
        print(f"[demo] Using official files: {assets['trigrid']} + {assets['decoder']}")
        workflows = TRIGRID_WORKFLOWS
    os.makedirs(OUTPUT, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="p3d-comfy-") as work:
        server = ComfyServer(work)
        server.output_dir = OUTPUT
        print(f"[demo] starting ComfyUI 0.3.75 on 127.0.0.1 ({'CPU' if server.cpu else 'GPU'}) …")
        server.start()
        try:
            report = server.backend()
            why = f" — Triton not used: {report['reason']}" if report.get("reason") else ""
            label = {"cpu": "cpu (numba fast path)", "reference": "reference (grid_sample)",
                     "triton": f"triton {report.get('triton')}"}.get(report["trigrid_sampling"], report["trigrid_sampling"])
            print(f"[demo] server device {report['device']}; tri-grid sampling backend: {label}{why}")
            info = server.object_info()
            for name in workflows:
                if run_workflow(server, info, os.path.join(ROOT, "example_workflows", name), assets, args) != 0:
                    return 1
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
