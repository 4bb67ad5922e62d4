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
    # the frontend's own conversion equals the API prompt the server tests queue
    ours = ui_to_api(workflow, comfy_server.object_info())
    theirs = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in result["output"].items()}
    assert theirs == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in ours.items()}
