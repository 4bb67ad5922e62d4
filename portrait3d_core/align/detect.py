"""Face and eye detection with the Haar cascades that ship inside the OpenCV wheel (offline, no model download).

Why OpenCV and not mediapipe (``kernels_and_deps.md`` §3): mediapipe 0.10.21, the last release with bundled models,
pins numpy < 2 and would downgrade ComfyUI's numpy 2.x; OpenCV 4.13+ wheels need numpy >= 2 and carry
``haarcascade_frontalface_default.xml`` and ``haarcascade_eye.xml`` (OpenCV 5 dropped the cascade classifier, hence
``< 5``). Detections are **mirror-symmetrised**: the detector runs on the image and on its mirror and the union of
both is used, so a flipped photo yields exactly the flipped detections (the mirrored camera).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import INSTALL_HINT, AlignDependencyError

_CASCADES = {}


def require_cv2():
    """The ``cv2`` module with the cascade classifier, or ``AlignDependencyError`` saying how to install it."""
    try:
        import cv2
    except ImportError as exc:
        raise AlignDependencyError(f"Align Portrait needs OpenCV (opencv-python-headless >= 4.13, < 5), which is not "
                                   f"installed: {INSTALL_HINT}") from exc
    if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
        raise AlignDependencyError(f"the installed OpenCV {getattr(cv2, '__version__', '?')} has no Haar cascade "
                                   f"classifier (OpenCV 5 removed it): {INSTALL_HINT}")
    return cv2


def _cascade(name: str):
    cv2 = require_cv2()
    if name not in _CASCADES:
        path = cv2.data.haarcascades + name
        classifier = cv2.CascadeClassifier(path)
        if classifier.empty():
            raise AlignDependencyError(f"OpenCV could not load its bundled cascade {path}: {INSTALL_HINT}")
        _CASCADES[name] = classifier
    return _CASCADES[name]


@dataclass(frozen=True)
class Box:
    """Axis-aligned box in pixels: left x, top y, width w, height h."""
    x: float
    y: float
    w: float
    h: float

    @property
    def cx(self) -> float:
        return self.x + self.w / 2

    @property
    def cy(self) -> float:
        return self.y + self.h / 2

    def mirrored(self, width: float) -> "Box":
        return Box(width - self.x - self.w, self.y, self.w, self.h)

    def scaled(self, s: float) -> "Box":
        return Box(self.x * s, self.y * s, self.w * s, self.h * s)

    def iou(self, other: "Box") -> float:
        ix = max(0.0, min(self.x + self.w, other.x + other.w) - max(self.x, other.x))
        iy = max(0.0, min(self.y + self.h, other.y + other.h) - max(self.y, other.y))
        inter = ix * iy
        return inter / (self.w * self.h + other.w * other.h - inter)


@dataclass(frozen=True)
class FaceDetection:
    """One face: its box and, when the eye cascade found one in each half of the face, the eye centres
    ``(x, y)`` in pixels ordered by image x (``eyes[0]`` is the person's right eye on a non-mirrored photo)."""
    box: Box
    eyes: Optional[tuple] = None


def _detect(gray: np.ndarray, cascade: str, min_size: int, neighbours: int) -> list:
    found = _cascade(cascade).detectMultiScale(gray, scaleFactor=1.1, minNeighbors=neighbours,
                                               minSize=(min_size, min_size))
    return [Box(*map(float, b)) for b in (found if len(found) else [])]


def _merge(boxes: list, iou: float = 0.3) -> list:
    """Connected groups of overlapping boxes → their mean box (order-independent, so mirror-exact)."""
    groups, seen = [], [False] * len(boxes)
    for i in range(len(boxes)):
        if seen[i]:
            continue
        stack, group = [i], []
        seen[i] = True
        while stack:
            k = stack.pop()
            group.append(boxes[k])
            for j in range(len(boxes)):
                if not seen[j] and boxes[k].iou(boxes[j]) > iou:
                    seen[j] = True
                    stack.append(j)
        n = len(group)
        groups.append(Box(sum(b.x for b in group) / n, sum(b.y for b in group) / n,
                          sum(b.w for b in group) / n, sum(b.h for b in group) / n))
    return sorted(groups, key=lambda b: (-b.w * b.h, b.x, b.y))


def _symmetric(gray: np.ndarray, cascade: str, min_size: int, neighbours: int) -> list:
    width = gray.shape[1]
    direct = _detect(gray, cascade, min_size, neighbours)
    mirrored = [b.mirrored(width) for b in _detect(np.ascontiguousarray(gray[:, ::-1]), cascade, min_size, neighbours)]
    return _merge(direct + mirrored)


def _eyes(gray: np.ndarray, face: Box) -> Optional[tuple]:
    """Eye centres inside the upper part of the face box, one per half, nearest to the usual eye positions."""
    x0, x1 = max(0, math.floor(face.x)), min(gray.shape[1], math.ceil(face.x + face.w))   # floor/ceil: mirror-exact
    y0, y1 = max(0, math.floor(face.y)), min(gray.shape[0], math.ceil(face.y + 0.62 * face.h))
    roi = np.ascontiguousarray(gray[y0:y1, x0:x1])
    if roi.shape[0] < 12 or roi.shape[1] < 12:
        return None
    candidates = _symmetric(roi, "haarcascade_eye.xml", max(6, int(face.w * 0.12)), 4)
    mid = roi.shape[1] / 2
    picks = []
    for side, expect_x in ((-1, 0.30), (1, 0.70)):
        best, best_d = None, None
        for b in candidates:
            if (b.cx - mid) * side <= 0 or b.w > 0.45 * face.w:
                continue
            d = math.hypot(b.cx - expect_x * roi.shape[1], b.cy - 0.38 * face.h)
            if best_d is None or d < best_d:
                best, best_d = b, d
        if best is None:
            return None
        picks.append((x0 + best.cx, y0 + best.cy))
    (xl, yl), (xr, yr) = picks
    distance = math.hypot(xr - xl, yr - yl)
    if not (0.25 * face.w <= distance <= 0.75 * face.w) or abs(yr - yl) > 0.3 * face.w:
        return None
    return tuple(picks)


def detect_faces(rgb: np.ndarray, max_side: int = 800, min_face_px: int = 24) -> list:
    """Frontal faces of an RGB uint8 image ``[H, W, 3]`` → ``FaceDetection`` list in full-resolution pixels, largest
    first. Runs at most at ``max_side`` pixels (larger photos are area-downscaled first)."""
    cv2 = require_cv2()
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    scale = min(1.0, max_side / max(gray.shape))
    if scale < 1.0:
        gray = cv2.resize(gray, (round(gray.shape[1] * scale), round(gray.shape[0] * scale)),
                          interpolation=cv2.INTER_AREA)
    gray = cv2.equalizeHist(gray)
    faces = _symmetric(gray, "haarcascade_frontalface_default.xml", max(12, int(min_face_px * scale)), 5)
    out = []
    for face in faces:
        eyes = _eyes(gray, face)
        if eyes is not None:
            eyes = tuple((x / scale, y / scale) for x, y in eyes)
        out.append(FaceDetection(face.scaled(1 / scale), eyes))
    # Haar false positives (clothing, texture) rarely have two eyes in place: when some faces have eyes, the others
    # are dropped; largest first among the rest.
    confirmed = [f for f in out if f.eyes is not None]
    return confirmed if confirmed else out
