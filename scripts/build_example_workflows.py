"""Regenerate ``example_workflows/*.json`` (editor format) from short graph descriptions.

Widget order and socket types come from a live server's ``/object_info``, so the files always match the nodes.
Run after changing a node's inputs: ``.venv/bin/python scripts/build_example_workflows.py``.
Rules for these workflows: no subgraphs, primitives or reroutes (the API converter in ``comfy_client`` and the
tests rely on plain graphs).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from comfy_client import ROOT, ComfyServer, widget_names  # noqa: E402

OUT_DIR = os.path.join(ROOT, "example_workflows")
DEMO_TRIGRID = "DEMO_head_trigrid.safetensors"
DEMO_DECODER = "DEMO_decoder.safetensors"
OFFICIAL_GAN = "model_512.pkl"


def N(node_id, type_, widgets=None, links=None, pos=(0, 0), title=None):
    return {"id": node_id, "type": type_, "widgets": widgets or {}, "links": links or {}, "pos": pos, "title": title}


WORKFLOWS = {
    # Load the demo tri-grid → 360° turntable → MP4 (30 fps) + alpha-mask frames.
    "portrait3d_turntable": [
        N(1, "Portrait3D_LoadTriGrid", {"trigrid_file": DEMO_TRIGRID}, pos=(40, 80)),
        N(2, "Portrait3D_LoadDecoder", {"decoder_file": DEMO_DECODER}, pos=(40, 240)),
        N(3, "Portrait3D_RenderTurntable", {"frames": 72, "resolution": 160}, {"trigrid": (1, 0), "decoder": (2, 0)},
          pos=(440, 80)),
        N(4, "CreateVideo", {"fps": 30.0}, {"images": (3, 0)}, pos=(860, 80)),
        N(5, "SaveVideo", {"filename_prefix": "portrait3d/turntable", "format": "mp4", "codec": "h264"},
          {"video": (4, 0)}, pos=(1260, 80)),
        N(6, "MaskToImage", {}, {"mask": (3, 1)}, pos=(860, 300)),
        N(7, "SaveImage", {"filename_prefix": "portrait3d/turntable_mask"}, {"images": (6, 0)}, pos=(1260, 300)),
    ],
    # One view with its mask and ControlNet depth, and the tri-grid re-saved in our safetensors format.
    "portrait3d_render_view": [
        N(1, "Portrait3D_LoadTriGrid", {"trigrid_file": DEMO_TRIGRID}, pos=(40, 80)),
        N(2, "Portrait3D_LoadDecoder", {"decoder_file": DEMO_DECODER}, pos=(40, 240)),
        N(3, "Portrait3D_Camera", {"yaw": 30.0, "pitch": 10.0}, pos=(40, 400)),
        N(4, "Portrait3D_RenderTriGrid", {"resolution": 256, "background": "colour", "background_colour": "#ffffff"},
          {"trigrid": (1, 0), "decoder": (2, 0), "camera": (3, 0)}, pos=(440, 80)),
        N(5, "SaveImage", {"filename_prefix": "portrait3d/view"}, {"images": (4, 0)}, pos=(860, 40)),
        N(6, "MaskToImage", {}, {"mask": (4, 1)}, pos=(860, 360)),
        N(7, "SaveImage", {"filename_prefix": "portrait3d/view_mask"}, {"images": (6, 0)}, pos=(1260, 360)),
        N(8, "PreviewImage", {}, {"images": (4, 3)}, pos=(860, 560)),
        N(9, "Portrait3D_SaveTriGrid", {"filename_prefix": "portrait3d/trigrid", "description": "demo head"},
          {"trigrid": (1, 0)}, pos=(440, 620)),
    ],
    # The demo tri-grid → textured GLB → ComfyUI's 3D preview.
    "portrait3d_export_mesh": [
        N(1, "Portrait3D_LoadTriGrid", {"trigrid_file": DEMO_TRIGRID}, pos=(40, 80)),
        N(2, "Portrait3D_LoadDecoder", {"decoder_file": DEMO_DECODER}, pos=(40, 240)),
        N(3, "Portrait3D_ExportMesh", {"format": "glb", "resolution": 256, "texture_size": 1024,
                                       "filename_prefix": "portrait3d/mesh", "description": "demo head"},
          {"trigrid": (1, 0), "decoder": (2, 0)}, pos=(440, 80)),
        N(4, "Preview3D", {"model_file": ""}, {"model_file": (3, 0)}, pos=(860, 80)),
    ],
    # A random portrait from the GAN (official model_512.pkl) → preview, 360° turntable with the GAN background, saved
    # tri-grid, textured mesh.
    "portrait3d_random_portrait": [
        N(1, "Portrait3D_LoadGAN", {"gan_file": OFFICIAL_GAN}, pos=(40, 80)),
        N(2, "Portrait3D_TriGridSynthesis", {"seed": 42, "truncation_psi": 0.7}, {"gan": (1, 0)}, pos=(40, 240)),
        N(3, "Portrait3D_RenderTurntable", {"frames": 72, "resolution": 128, "samples": 48, "background": "gan"},
          {"trigrid": (2, 0), "decoder": (2, 1), "gan": (1, 0)}, pos=(440, 80)),
        N(4, "CreateVideo", {"fps": 30.0}, {"images": (3, 0)}, pos=(860, 80)),
        N(5, "SaveVideo", {"filename_prefix": "portrait3d/random_portrait", "format": "mp4", "codec": "h264"},
          {"video": (4, 0)}, pos=(1260, 80)),
        N(6, "PreviewImage", {}, {"images": (2, 2)}, pos=(860, 320)),
        N(7, "Portrait3D_SaveTriGrid", {"filename_prefix": "portrait3d/random_portrait", "description": ""},
          {"trigrid": (2, 0)}, pos=(440, 640)),
        N(8, "Portrait3D_ExportMesh", {"format": "glb", "resolution": 256, "texture_size": 1024,
                                       "filename_prefix": "portrait3d/random_portrait"},
          {"trigrid": (2, 0), "decoder": (2, 1)}, pos=(40, 640)),
        N(9, "Preview3D", {"model_file": ""}, {"model_file": (8, 0)}, pos=(1260, 320)),
    ],
}


def _default(spec):
    kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if "default" in opts:
        return opts["default"]
    if isinstance(kind, list):
        return kind[0]
    if kind == "COMBO":
        return opts.get("options", [""])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


def build(nodes, info) -> dict:
    links, ui_nodes = [], []
    outgoing = {}
    link_id = 0
    for n in nodes:
        for name, (src, slot) in n["links"].items():
            link_id += 1
            src_type = info[next(x["type"] for x in nodes if x["id"] == src)]["output"][slot]
            links.append([link_id, src, slot, n["id"], None, src_type, name])
            outgoing.setdefault((src, slot), []).append(link_id)
    for order, n in enumerate(nodes):
        spec = info[n["type"]]
        all_specs = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
        inputs = []
        socket_names = [name for group in ("required", "optional") for name in spec["input_order"].get(group, [])
                        if name in all_specs and name not in widget_names(spec)]
        linked_widgets = [name for name in widget_names(spec) if name in n["links"]]
        for slot, name in enumerate(socket_names + linked_widgets):
            link = next((l for l in links if l[3] == n["id"] and l[6] == name), None)
            if link is not None:
                link[4] = slot
            kind = all_specs[name][0]
            entry = {"name": name, "type": "COMBO" if isinstance(kind, list) else kind, "link": link[0] if link else None}
            if name in linked_widgets:
                entry["widget"] = {"name": name}
            inputs.append(entry)
        values = []
        for name in widget_names(spec):
            values.append("fixed" if name is None else n["widgets"].get(name, _default(all_specs[name])))
        unknown = set(n["widgets"]) - set(widget_names(spec))
        if unknown:
            raise SystemExit(f"{n['type']}: unknown widgets {unknown}")
        outputs = [{"name": name, "type": typ, "links": outgoing.get((n["id"], i), []), "slot_index": i}
                   for i, (name, typ) in enumerate(zip(spec["output_name"], spec["output"]))]
        rows = len(values) + max(len(inputs), len(outputs))
        size = [480, 560] if n["type"] == "Preview3D" else [340, 46 + 24 * rows]
        ui_nodes.append({"id": n["id"], "type": n["type"], "pos": list(n["pos"]), "size": size, "flags": {},
                         "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                         "properties": {"Node name for S&R": n["type"]}, "widgets_values": values,
                         **({"title": n["title"]} if n["title"] else {})})
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, json.dumps([x["type"] for x in nodes]))), "revision": 0,
            "last_node_id": max(n["id"] for n in nodes), "last_link_id": link_id, "nodes": ui_nodes,
            "links": [l[:6] for l in links], "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def main() -> None:
    with tempfile.TemporaryDirectory() as work:
        server = ComfyServer(work).start()
        try:
            info = server.object_info()
        finally:
            server.stop()
    os.makedirs(OUT_DIR, exist_ok=True)
    for name, nodes in WORKFLOWS.items():
        path = os.path.join(OUT_DIR, f"{name}.json")
        with open(path, "w") as fh:
            json.dump(build(nodes, info), fh, indent=1)
            fh.write("\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
