"""The repository stands alone: no tracked file points outside it (a clone must pass its tests by itself)."""
from __future__ import annotations

import os
import subprocess

import pytest

from conftest import ROOT

OUTSIDE_REFERENCES = ("../shared", "shared/fixtures", "shared/specs")


def _tracked_files() -> list:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [name for name in out.decode().split("\0") if name]


def test_no_tracked_file_refers_outside_the_repository():
    offenders = []
    for name in _tracked_files():
        path = os.path.join(ROOT, name)
        if not os.path.isfile(path) or os.path.getsize(path) > 5_000_000:
            continue
        with open(path, "rb") as fh:
            text = fh.read().decode("utf-8", "replace")
        offenders += [f"{name}: {ref}" for ref in OUTSIDE_REFERENCES if ref in text and name != "tests/test_repository.py"]
    assert not offenders, "files that refer outside the repository:\n" + "\n".join(offenders)


def test_oracle_fixtures_are_in_the_repository():
    fixtures = os.path.join(ROOT, "tests", "fixtures", "portrait_gan_oracle")
    for name in ("generator_config.json", "generator_state_dict.safetensors", "case_0.safetensors",
                 "trigrid_sampling.safetensors", "keys_and_shapes_512.txt"):
        assert os.path.isfile(os.path.join(fixtures, name)), f"missing tests/fixtures/portrait_gan_oracle/{name}"
