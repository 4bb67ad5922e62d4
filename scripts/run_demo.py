"""README command 1 (after setup): run the main job through a real ComfyUI server and its API queue.

Today's fullest pipeline: load a pyramid tri-grid + decoder → 360° turntable → MP4 + alpha-mask frames.
With official files in ``.comfyui/models/portrait3d/`` (a tri-grid such as a gallery ``*_pyramid_trigrid.pth`` and
``decoder_512.ckpt``) those are used; otherwise the clearly labelled DEMO assets are. Text → tri-grid stages (prompt
image, inversion, SDS, refinement) are not implemented yet.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from comfy_client import COMFY_DIR, ROOT, ComfyServer, execution_error, load_workflow, ui_to_api  # noqa: E402

from portrait3d_core.checkpoints import guess_file_kind  # noqa: E402
from portrait3d_core.demo_assets import DEMO_DECODER_NAME, DEMO_TRIGRID_NAME  # noqa: E402

MODELS = os.path.join(COMFY_DIR, "models", "portrait3d")
OUTPUT = os.path.join(ROOT, "outputs")
WORKFLOW = os.path.join(ROOT, "example_workflows", "portrait3d_turntable.json")


def pick_assets() -> tuple[str, str, bool]:
    """(tri-grid file, decoder file, is_demo): official files when present, else the demo assets."""
    files = sorted(os.listdir(MODELS)) if os.path.isdir(MODELS) else []
    official = [f for f in files if not f.startswith(("DEMO_", "TEST_"))]
    trigrids = [f for f in official if guess_file_kind(os.path.join(MODELS, f)) == "trigrid"]
    decoders = [f for f in official if guess_file_kind(os.path.join(MODELS, f)) == "decoder"]
    if trigrids and decoders:
        return trigrids[0], decoders[0], False
    return DEMO_TRIGRID_NAME, DEMO_DECODER_NAME, True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=None, help="turntable frames (default: the workflow's 72)")
    parser.add_argument("--resolution", type=int, default=None, help="frame size (default: the workflow's 160)")
    args = parser.parse_args(argv)

    trigrid_file, decoder_file, demo = pick_assets()
    if demo:
        print("[demo] No official Portrait3D files found in .comfyui/models/portrait3d/ — running on the DEMO assets "
              "(analytic head tri-grid + hand-set decoder), not on real weights. See README › Official weights.")
    else:
        print(f"[demo] Using official files: {trigrid_file} + {decoder_file}")
    os.makedirs(OUTPUT, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="p3d-comfy-") as work:
        server = ComfyServer(work)
        server.output_dir = OUTPUT
        print("[demo] starting ComfyUI 0.3.75 on 127.0.0.1 (CPU) …")
        server.start()
        try:
            prompt = ui_to_api(load_workflow(WORKFLOW), server.object_info())
            for node in prompt.values():
                if node["class_type"] == "Portrait3D_LoadTriGrid":
                    node["inputs"]["trigrid_file"] = trigrid_file
                if node["class_type"] == "Portrait3D_LoadDecoder":
                    node["inputs"]["decoder_file"] = decoder_file
                if node["class_type"] == "Portrait3D_RenderTurntable":
                    if args.frames:
                        node["inputs"]["frames"] = args.frames
                    if args.resolution:
                        node["inputs"]["resolution"] = args.resolution
            started = time.time()
            prompt_id = server.queue(prompt)
            print(f"[demo] queued prompt {prompt_id} through POST /prompt; waiting …")
            entry = server.wait(prompt_id, timeout=3600)
            if entry["status"]["status_str"] != "success":
                print(f"[demo] FAILED: {execution_error(entry)}", file=sys.stderr)
                return 1
            print(f"[demo] finished in {time.time() - started:.0f} s")
            for node_id, out in entry["outputs"].items():
                items = out.get("images", [])
                if items:
                    first = server.output_path(items[0])
                    more = f" (+{len(items) - 1} more)" if len(items) > 1 else ""
                    print(f"[demo] {prompt[node_id]['_meta']['title']}: {os.path.relpath(first, ROOT)}{more}")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
