#!/usr/bin/env bash
# README command 1: set everything up (idempotent), then run the main job through a real ComfyUI server + API queue.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/python" "$ROOT/scripts/run_demo.py" "$@"
