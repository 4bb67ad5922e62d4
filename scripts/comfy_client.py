"""Drive a real ComfyUI server (the one ``scripts/setup.sh`` installs in ``.comfyui/``) over its HTTP API.

Used by ``scripts/run_demo.py`` (README command 1) and by the server and browser tests. Loopback only.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFY_DIR = os.path.join(ROOT, ".comfyui")
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
PACK_LINK = os.path.join(COMFY_DIR, "custom_nodes", "comfyui-portrait3d")
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_host_installed() -> None:
    missing = [p for p in (os.path.join(COMFY_DIR, "main.py"), PYTHON) if not os.path.exists(p)]
    if missing or not os.path.exists(PACK_LINK):
        raise ServerError(f"ComfyUI host not installed ({', '.join(missing) or PACK_LINK} missing): "
                          f"run `bash scripts/setup.sh` first")


def gpu_available() -> bool:
    """Whether torch (this virtualenv's, the server's) sees a CUDA GPU."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class ComfyServer:
    """A ComfyUI process on 127.0.0.1 with its own output/temp/user folders under ``workdir``."""

    def __init__(self, workdir: str, extra_model_paths: dict | None = None, port: int | None = None,
                 disable_api_nodes: bool = False, cpu: bool | None = None):
        check_host_installed()
        # --cpu only when asked, or when torch sees no CUDA GPU (ComfyUI then needs it); else ComfyUI uses the GPU
        self.cpu = (not gpu_available()) if cpu is None else cpu
        self.workdir = workdir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output_dir = os.path.join(workdir, "output")
        self.temp_dir = os.path.join(workdir, "temp")
        self.user_dir = os.path.join(workdir, "user")
        self.log_path = os.path.join(workdir, "comfyui.log")
        self.extra_model_paths = extra_model_paths
        self.process: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex
        # Off by default, as in a user's launch: with --disable-api-nodes ComfyUI 0.3.75 also sends a CSP header
        # (connect-src 'self') that stops the 3D preview from loading textures embedded in GLB files.
        self.disable_api_nodes = disable_api_nodes

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 240.0) -> "ComfyServer":
        for d in (self.output_dir, self.temp_dir, self.user_dir):
            os.makedirs(d, exist_ok=True)
        cmd = [PYTHON, "main.py", *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1", "--port", str(self.port),
               "--output-directory", self.output_dir, "--temp-directory", self.temp_dir,
               "--user-directory", self.user_dir, "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
        if self.disable_api_nodes:
            cmd.append("--disable-api-nodes")
        if self.extra_model_paths:
            yaml_path = os.path.join(self.workdir, "extra_model_paths.yaml")
            with open(yaml_path, "w") as fh:
                fh.write("portrait3d_tests:\n")
                for key, value in self.extra_model_paths.items():
                    fh.write(f"    {key}: {value}\n")
            cmd += ["--extra-model-paths-config", yaml_path]
        log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(cmd, cwd=COMFY_DIR, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.process.returncode}:\n{self.log_text()[-4000:]}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (OSError, ServerError):
                time.sleep(0.5)
        self.stop()
        raise ServerError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_text()[-4000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    # ------------------------------------------------------------------------------------------ HTTP
    def _request(self, method: str, path: str, body=None, timeout: float = 30.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise ServerError(f"{method} {path} → HTTP {exc.code}: {exc.read().decode(errors='replace')}") from None
        try:
            return json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return raw

    def get(self, path: str, timeout: float = 30.0):
        return self._request("GET", path, timeout=timeout)

    def post(self, path: str, body=None, timeout: float = 30.0):
        return self._request("POST", path, body if body is not None else {}, timeout=timeout)

    def backend(self) -> dict:
        """``GET /portrait3d/backend``: the server's compute device and sampling backends (see nodes/host.py)."""
        return self.get("/portrait3d/backend", timeout=600)

    def object_info(self) -> dict:
        return self.get("/object_info", timeout=60)

    def queue(self, prompt: dict, extra_data: dict | None = None) -> str:
        """POST /prompt; returns the prompt id (``ServerError`` carries node_errors on HTTP 400)."""
        body = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        return self.post("/prompt", body)["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0, poll: float = 0.25) -> dict:
        """Poll /history until the prompt finished; returns its history entry."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if hist and prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"ComfyUI died while running the prompt:\n{self.log_text()[-4000:]}")
            time.sleep(poll)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        """Queue, wait, and raise with the server's error message unless it succeeded."""
        entry = self.wait(self.queue(prompt), timeout)
        if entry["status"]["status_str"] != "success":
            raise ServerError(f"prompt failed: {execution_error(entry)}")
        return entry

    def output_path(self, item: dict) -> str:
        # ComfyUI keeps temp files in a "temp" folder inside --temp-directory
        base = {"output": self.output_dir, "temp": os.path.join(self.temp_dir, "temp")}[item.get("type", "output")]
        return os.path.join(base, item.get("subfolder", ""), item["filename"])


def execution_error(entry: dict) -> str:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_message', '').strip()}"
        if kind == "execution_interrupted":
            return "interrupted"
    return json.dumps(entry.get("status"))[:500]


def import_failures_of_pack(log: str) -> list:
    """Lines where ComfyUI reports this package failed to import (ComfyUI's own audio nodes are ignored)."""
    return [line for line in log.splitlines()
            if "IMPORT FAILED" in line and "comfyui-portrait3d" in line]


# ---------------------------------------------------------------------------------------------- workflows

def _is_widget(spec) -> bool:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def _has_control_widget(name: str, spec) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return spec[0] == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed"))


def widget_names(node_info: dict) -> list:
    """Widget inputs of a node type in ``widgets_values`` order, with a placeholder after seed-like INTs."""
    names = []
    for group in ("required", "optional"):
        specs = node_info["input"].get(group, {})
        for name in node_info.get("input_order", {}).get(group, list(specs)):
            spec = specs[name]
            if _is_widget(spec):
                names.append(name)
                if _has_control_widget(name, spec):
                    names.append(None)   # the frontend's "control after generate" value
    return names


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert an editor (UI-format) workflow to an API prompt, as the frontend's graphToPrompt does.

    Supports plain graphs (no subgraphs, primitives or reroutes: our example workflows avoid them).
    """
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):
            continue
        if node["type"] not in object_info:
            raise ServerError(f"workflow node {node['id']} has unknown type {node['type']!r}")
        info = object_info[node["type"]]
        inputs = {}
        values = list(node.get("widgets_values") or [])
        for name, value in zip(widget_names(info), values):
            if name is not None:
                inputs[name] = value
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title") or info.get("display_name", node["type"])}}
    return prompt


def load_workflow(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def python_for_server() -> str:
    return PYTHON if os.path.exists(PYTHON) else sys.executable


# ---------------------------------------------------------------------------------------------- websocket progress

class ServerEvents:
    """The messages ComfyUI sends this client on ``/ws?clientId=<client_id>`` (needs websocket-client).

    Open it *before* queueing so nothing is missed, then iterate one prompt's messages as ``(type, data)`` pairs —
    ``execution_start``, ``execution_cached`` ({nodes}), ``executing`` ({node}), ``progress`` ({node, value, max}),
    ``executed`` ({node, output}), ``progress_state`` and the last one, ``execution_success`` / ``execution_error``
    / ``execution_interrupted``::

        with ServerEvents(server) as events:
            prompt_id = server.queue(prompt)
            for kind, data in events.of_prompt(prompt_id):
                ...
    Binary messages (live preview images) are skipped.
    """

    FINAL = ("execution_success", "execution_error", "execution_interrupted")

    def __init__(self, server: ComfyServer, poll: float = 1.0):
        import websocket    # websocket-client (requirements-dev.txt)

        self._timeout_error = websocket.WebSocketTimeoutException
        self.server = server
        url = server.url.replace("http://", "ws://", 1) + f"/ws?clientId={server.client_id}"
        self.ws = websocket.create_connection(url, timeout=poll)

    def __enter__(self) -> "ServerEvents":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.ws.close()

    def of_prompt(self, prompt_id: str, timeout: float = 3600.0):
        """Messages about ``prompt_id`` until its final message (included); ``ServerError`` if the server dies."""
        deadline = time.time() + timeout
        while True:
            try:
                raw = self.ws.recv()
            except self._timeout_error:
                raw = None
            if self.server.process is not None and self.server.process.poll() is not None:
                raise ServerError(f"ComfyUI died while running the prompt:\n{self.server.log_text()[-4000:]}")
            if time.time() > deadline:
                raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")
            if not raw or isinstance(raw, bytes):
                continue
            message = json.loads(raw)
            kind, data = message.get("type"), message.get("data") or {}
            if data.get("prompt_id") != prompt_id:
                continue
            yield kind, data
            if kind in self.FINAL:
                return


class ProgressPrinter:
    """Turns server messages into short progress lines: which node runs, and its step/total (at most one line every
    ``every_s`` seconds per node, plus its last step)."""

    def __init__(self, prompt: dict, write=print, every_s: float = 2.0):
        self.prompt, self.write, self.every_s = prompt, write, every_s
        self._last = {}

    def title(self, node) -> str:
        meta = self.prompt.get(str(node), {}).get("_meta", {})
        return f"{meta.get('title') or self.prompt.get(str(node), {}).get('class_type', 'node')} (#{node})"

    def __call__(self, kind: str, data: dict) -> None:
        if kind == "execution_cached" and data.get("nodes"):
            self.write(f"cached: {', '.join(self.title(n) for n in data['nodes'])}")
        elif kind == "executing" and data.get("node") is not None:
            self.write(f"running {self.title(data['node'])}")
        elif kind == "progress":
            node, value, total = data.get("node"), int(data.get("value", 0)), int(data.get("max", 0))
            now = time.time()
            if value >= total or now - self._last.get(node, 0.0) >= self.every_s:
                self._last[node] = now
                self.write(f"  {self.title(node)}: {value}/{total}")
        elif kind == "execution_error":
            self.write(f"error in {self.title(data.get('node_id'))}: {data.get('exception_message', '').strip()}")
        elif kind == "execution_interrupted":
            self.write("interrupted")
