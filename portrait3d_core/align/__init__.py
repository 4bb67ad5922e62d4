"""Stage 2 of Portrait3D in-process: photo → aligned crop, GAN camera label, person mask (``pipeline.md`` §2).

detect (OpenCV Haar cascades, optional extra ``align``) → landmarks (SMPL template eyes) → camera (sphere of radius
2.7 around the neck) → crop (similarity fit, reflect padding) + GrabCut mask. Entry point: ``align``.
"""
from .aligner import AlignedPortrait, AlignSettings, align, frontal_center_crop
from .errors import (AlignDependencyError, AlignError, FaceCutOffError, FaceTooSmallError, NoPersonError,
                     SeveralPeopleError)

__all__ = ["AlignSettings", "AlignedPortrait", "align", "frontal_center_crop", "AlignError", "NoPersonError",
           "SeveralPeopleError", "FaceTooSmallError", "FaceCutOffError", "AlignDependencyError"]
