"""Headless Chromium driven over the DevTools protocol (websocket-client only; no browser download).

Used by the browser tests and to take the README's editor screenshot. Chromium comes from Debian's ``chromium``
package (installed by ``scripts/setup.sh``).
"""
from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

import websocket

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


class BrowserError(RuntimeError):
    pass


def find_chromium() -> str:
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    raise BrowserError("Chromium not found: install Debian's 'chromium' package (scripts/setup.sh does this as root)")


class Chromium:
    """One headless Chromium with one page; ``evaluate`` runs JavaScript (awaiting promises)."""

    def __init__(self, port: int, webgl: bool = False, width: int = 1600, height: int = 1000):
        self.port = port
        self.profile = tempfile.mkdtemp(prefix="p3d-chromium-")
        args = [find_chromium(), "--headless=new", "--no-sandbox", f"--remote-debugging-port={port}",
                f"--user-data-dir={self.profile}", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-quic", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"]
        args += ["--use-angle=swiftshader", "--enable-unsafe-swiftshader"] if webgl else ["--disable-gpu"]
        self.process = subprocess.Popen(args + ["about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._ids = itertools.count(1)
        self.ws = self._connect()
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def _connect(self, timeout: float = 30.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json", timeout=2) as resp:
                    pages = [t for t in json.load(resp) if t.get("type") == "page"]
                if pages:
                    return websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=120,
                                                       suppress_origin=True)
            except OSError:
                pass
            if self.process.poll() is not None:
                raise BrowserError(f"Chromium exited with code {self.process.returncode}")
            time.sleep(0.3)
        raise BrowserError("Chromium's DevTools endpoint did not come up")

    def send(self, method: str, params: dict | None = None):
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"JavaScript error: {text}")
        return result.get("result", {}).get("value")

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})

    def wait_for(self, expression: str, timeout: float = 90.0, poll: float = 0.5):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                value = self.evaluate(expression)
                if value:
                    return value
            except BrowserError:
                pass
            time.sleep(poll)
        raise BrowserError(f"timed out waiting for: {expression}")

    def screenshot(self, path: str) -> str:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


LOAD_WORKFLOW_JS = """
(async () => {
  const wf = %s;
  await app.loadGraphData(wf);
  await new Promise(r => setTimeout(r, 500));
  const registered = LiteGraph.registered_node_types;
  const nodes = app.graph._nodes.map(n => ({id: n.id, type: n.type, known: !!registered[n.type],
                                            errors: !!n.has_errors}));
  const prompt = await app.graphToPrompt();
  try { await app.extensionManager.command.execute('Comfy.Canvas.FitView'); } catch (e) {}
  document.querySelectorAll('button').forEach(b => { if ((b.getAttribute('aria-label') || '').match(/close/i)
      && b.closest('[class*=banner], [class*=announcement], [class*=toast]')) b.click(); });
  app.canvas.setDirty(true, true);
  await new Promise(r => setTimeout(r, 300));
  return JSON.stringify({nodes, output: prompt.output});
})()
"""


EDITOR_SETTINGS = {
    "Comfy.TutorialCompleted": True,          # no template browser on first start
    "Comfy.Minimap.Visible": False,
    "Comfy.Workflow.WorkflowTabsPosition": "Topbar",
}


def prepare_user_settings(server_url: str) -> None:
    """Settings of a first-time user that would cover the canvas (template browser, minimap)."""
    req = urllib.request.Request(server_url + "/settings", data=json.dumps(EDITOR_SETTINGS).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).read()


def open_editor(browser: Chromium, url: str, timeout: float = 120.0) -> None:
    prepare_user_settings(url)
    browser.navigate(url)
    browser.wait_for("!!(window.app && window.app.graph && window.LiteGraph)", timeout=timeout)
    browser.evaluate("document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click()) || true")


def load_workflow_in_editor(browser: Chromium, workflow: dict) -> dict:
    """Load a UI workflow; returns {'nodes': [{id, type, known, errors}], 'output': API prompt from graphToPrompt}."""
    return json.loads(browser.evaluate(LOAD_WORKFLOW_JS % json.dumps(workflow)))


VIEWER_RECT_JS = """JSON.stringify(Array.from(document.querySelectorAll('canvas'))
  .filter(c => c.id !== 'graph-canvas').map(c => c.getBoundingClientRect())
  .filter(r => r.width > 100 && r.height > 100).map(r => [r.x, r.y, r.width, r.height]))"""


def viewer_rects(browser: Chromium) -> list:
    """Screen rectangles [x, y, w, h] of the 3D viewer canvases (Load3D / Preview3D widgets)."""
    return json.loads(browser.evaluate(VIEWER_RECT_JS))


def clip_screenshot(browser: Chromium, rect) -> bytes:
    x, y, w, h = rect
    data = browser.send("Page.captureScreenshot", {"format": "png",
                                                   "clip": {"x": x, "y": y, "width": w, "height": h, "scale": 1}})
    return base64.b64decode(data["data"])


def nudge(browser: Chromium, rect) -> None:
    """A tiny drag inside a viewer so it renders a fresh frame."""
    x, y, w, h = rect
    cx, cy = x + w * 0.8, y + h * 0.8
    for kind, dx in (("mousePressed", 0), ("mouseMoved", 4), ("mouseMoved", 8), ("mouseReleased", 8)):
        browser.send("Input.dispatchMouseEvent", {"type": kind, "x": cx + dx, "y": cy, "button": "left",
                                                  "buttons": 0 if kind == "mouseReleased" else 1, "clickCount": 1})
