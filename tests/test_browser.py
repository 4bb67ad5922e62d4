"""The ComfyUI editor in headless Chromium: every example workflow loads with all our nodes known."""
import glob
import os

import pytest

from cdp_browser import Chromium, load_workflow_in_editor, open_editor
from comfy_client import ROOT, free_port, load_workflow, ui_to_api
from conftest import ARTIFACTS

pytestmark = pytest.mark.browser
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))


@pytest.fixture(scope="module")
def editor(comfy_server):
    browser = Chromium(free_port())
    try:
        open_editor(browser, comfy_server.url)
        yield browser
    finally:
        browser.close()


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_browser_loads_example_workflow_without_missing_nodes(editor, comfy_server, path):
    workflow = load_workflow(path)
    result = load_workflow_in_editor(editor, workflow)
    name = os.path.splitext(os.path.basename(path))[0]
    shot = editor.screenshot(os.path.join(ARTIFACTS, f"editor_{name}.png"))
    assert os.path.getsize(shot) > 10_000
    missing = [n["type"] for n in result["nodes"] if not n["known"]]
    assert missing == [], f"missing node types in the editor: {missing}"
    assert {n["type"] for n in result["nodes"]} == {n["type"] for n in workflow["nodes"]}
    assert any(n["type"].startswith("Portrait3D_") for n in result["nodes"])
    # the frontend's own conversion equals the API prompt the server tests queue (frontend-only widgets, such as
    # Preview3D's 'image', are not server inputs and are left out)
    info = comfy_server.object_info()
    ours = ui_to_api(workflow, info)

    def server_inputs(class_type, inputs):
        known = {**info[class_type]["input"].get("required", {}), **info[class_type]["input"].get("optional", {})}
        return {k: v for k, v in inputs.items() if k in known}

    theirs = {k: {"class_type": v["class_type"], "inputs": server_inputs(v["class_type"], v["inputs"])}
              for k, v in result["output"].items()}
    assert theirs == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in ours.items()}


def test_browser_preview3d_shows_the_exported_mesh(comfy_server):
    """Export Mesh → Preview3D in the editor (WebGL via SwiftShader): the viewer shows the textured mesh."""
    import io
    import time

    import numpy as np
    from PIL import Image

    from cdp_browser import clip_screenshot, nudge, viewer_rects
    from conftest import TEST_DECODER, TEST_TRIGRID

    workflow = load_workflow(os.path.join(ROOT, "example_workflows", "portrait3d_export_mesh.json"))
    for node in workflow["nodes"]:
        if node["type"] == "Portrait3D_LoadTriGrid":
            node["widgets_values"] = [TEST_TRIGRID]
        if node["type"] == "Portrait3D_LoadDecoder":
            node["widgets_values"] = [TEST_DECODER]
    browser = Chromium(free_port(), webgl=True)
    try:
        open_editor(browser, comfy_server.url)
        load_workflow_in_editor(browser, workflow)
        browser.evaluate("""(() => { const n = app.graph._nodes.find(n => n.type === 'Portrait3D_ExportMesh');
            n.widgets.find(w => w.name === 'resolution').value = 96;
            n.widgets.find(w => w.name === 'texture_size').value = 512; return true; })()""")
        deadline = time.time() + 30
        while not viewer_rects(browser) and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(2.0)                                       # let the editor lay out the viewer widget
        rect = viewer_rects(browser)[0]
        empty = np.asarray(Image.open(io.BytesIO(clip_screenshot(browser, rect))).convert("RGB")).astype(int)
        before = set(comfy_server.get("/history"))
        browser.evaluate("(async () => { await app.queuePrompt(0, 1); return true; })()")
        deadline = time.time() + 300
        while time.time() < deadline and not (set(comfy_server.get("/history")) - before):
            time.sleep(0.5)
        new = (set(comfy_server.get("/history")) - before).pop()
        entry = comfy_server.wait(new, timeout=300)
        assert entry["status"]["status_str"] == "success"
        shown = None
        for _ in range(30):                                   # the viewer loads the GLB asynchronously
            time.sleep(1.0)
            assert viewer_rects(browser)[0] == rect, "the viewer moved on the page"
            nudge(browser, rect)
            time.sleep(0.3)
            shown = np.asarray(Image.open(io.BytesIO(clip_screenshot(browser, rect))).convert("RGB")).astype(int)
            changed = (np.abs(shown - empty).max(-1) > 24)
            if changed.mean() >= 0.05:
                break
        Image.fromarray(shown.astype(np.uint8)).save(os.path.join(ARTIFACTS, "preview3d_mesh.png"))
        assert changed.mean() >= 0.05, f"only {changed.mean():.1%} of the viewer changed"
        saturation = shown.max(-1) - shown.min(-1)
        assert (saturation[changed] > 40).mean() > 0.2, "the mesh is shown without its colour texture"
    finally:
        browser.close()
