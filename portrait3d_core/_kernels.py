"""The repository's ``kernels/`` package, imported under the unique module name ``portrait3d_kernels``.

``kernels`` is too generic a top-level name to put on ``sys.path`` inside a user's ComfyUI (other packages use it),
so the folder is loaded by path once and registered as ``portrait3d_kernels``.
"""
from __future__ import annotations

import importlib.util
import os
import sys

_NAME = "portrait3d_kernels"


def _load():
    if _NAME in sys.modules:
        return sys.modules[_NAME]
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    spec = importlib.util.spec_from_file_location(_NAME, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_NAME]
        raise
    return module


kernels = _load()
