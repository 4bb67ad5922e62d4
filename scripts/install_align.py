"""Install the optional alignment dependency (requirements-align.txt) into THIS Python, but only after a pip dry run
shows that no package you already have would be changed (up- or downgraded). Run it with the Python of ComfyUI:

    python scripts/install_align.py            # check, then install
    python scripts/install_align.py --check    # check only
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIREMENTS = os.path.join(HERE, "requirements-align.txt")


def planned_changes() -> tuple:
    """(new packages, changed installed packages) that ``pip install -r requirements-align.txt`` would make."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", report,
                        "-r", REQUIREMENTS], check=True)
        with open(report) as fh:
            install = json.load(fh).get("install", [])
    new, changed = [], []
    for item in install:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            new.append(f"{name}=={version}")
            continue
        if have != version:
            changed.append(f"{name} {have} -> {version}")
    return new, changed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report what would happen")
    args = parser.parse_args()
    new, changed = planned_changes()
    if changed:
        print("refusing to install the alignment extra: it would change packages you already have:\n  "
              + "\n  ".join(changed) + "\nInstall a compatible OpenCV by hand (opencv-python-headless >= 4.13, < 5, "
              "with the Haar cascades) or update your environment first.", file=sys.stderr)
        return 1
    if not new:
        print("the alignment extra is already installed")
        return 0
    print("would install: " + ", ".join(new) + " (no installed package changes)")
    if args.check:
        return 0
    return subprocess.run([sys.executable, "-m", "pip", "install", "-r", REQUIREMENTS]).returncode


if __name__ == "__main__":
    sys.exit(main())
