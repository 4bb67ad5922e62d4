"""Alignment errors: each names what was found in the image and what to do about it."""
from __future__ import annotations

from ..errors import InvalidInputError, Portrait3DError  # noqa: F401

INSTALL_HINT = ("install the alignment extra with the Python that runs ComfyUI, in the comfyui-portrait3d folder: "
                "`python scripts/install_align.py` (refuses if it would change any installed package) or "
                "`python -m pip install -r requirements-align.txt` (= the [align] extra: `pip install \".[align]\"`)")


class AlignError(InvalidInputError):
    """The photo cannot be aligned as it is (base class of the cases below)."""


class NoPersonError(AlignError):
    """No frontal face was found."""


class SeveralPeopleError(AlignError):
    """More than one face of similar size: the crop would be ambiguous."""


class FaceTooSmallError(AlignError):
    """The face is so small that the 512² crop would be a blurry upscale."""


class FaceCutOffError(AlignError):
    """The face touches or leaves the image border."""


class AlignDependencyError(Portrait3DError, ImportError):
    """The optional alignment dependency (OpenCV with its bundled Haar cascades) is missing or unusable."""
