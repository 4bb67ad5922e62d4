"""Square crop with reflect padding, and the person mask of the crop."""
from __future__ import annotations

import numpy as np
import torch

from .detect import require_cv2


def fit_square(template_uv: torch.Tensor, detected_px: torch.Tensor):
    """2D similarity without rotation (``pipeline.md`` §2.5): ``detected ≈ origin + side · template_uv``, least squares.
    ``template_uv`` ``[P, 2]`` normalised crop coordinates, ``detected_px`` ``[P, 2]`` image px → (x0, y0, side) px."""
    u = template_uv.to(torch.float64)
    p = detected_px.to(torch.float64)
    du, dp = u - u.mean(0), p - p.mean(0)
    side = float((du * dp).sum() / (du * du).sum())
    origin = p.mean(0) - side * u.mean(0)
    return float(origin[0]), float(origin[1]), side


def crop(image: torch.Tensor, x0: float, y0: float, side: float, resolution: int) -> torch.Tensor:
    """Bilinear square crop ``[H, W, 3]`` float → ``[R, R, 3]``; outside the image reflect-padded. Downscaling by
    more than 1.5× blurs first (σ = 0.5 · factor) against aliasing."""
    factor = side / resolution
    src = image
    if factor > 1.5:
        cv2 = require_cv2()
        src = torch.from_numpy(cv2.GaussianBlur(image.numpy(), (0, 0), 0.5 * factor))
    h, w = src.shape[:2]
    t = (torch.arange(resolution, dtype=torch.float64) + 0.5) / resolution
    xs = (x0 + side * t) / w * 2 - 1
    ys = (y0 + side * t) / h * 2 - 1
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1)[None].float()
    out = torch.nn.functional.grid_sample(src.permute(2, 0, 1)[None].float(), grid, mode="bilinear",
                                          padding_mode="reflection", align_corners=False)
    return out[0].permute(1, 2, 0).clamp(0, 1)


def padded_fraction(height: int, width: int, x0: float, y0: float, side: float) -> float:
    """Share of the crop lying outside the image (0 … 1)."""
    ix = max(0.0, min(width, x0 + side) - max(0.0, x0))
    iy = max(0.0, min(height, y0 + side) - max(0.0, y0))
    return 1.0 - ix * iy / (side * side)


def person_mask(crop_rgb: torch.Tensor, face_uv, inside: np.ndarray, iterations: int = 4,
                work: int = 256) -> torch.Tensor:
    """GrabCut person mask of an aligned crop ``[R, R, 3]`` → ``[R, R]`` float {0, 1}.

    Seeds: the inner face box is sure foreground; a head ellipse and a torso block below it (shoulders ≈ 3 face
    widths) are probable foreground; the top and side borders and reflect-padded pixels are probable background.
    ``face_uv`` = (x0, y0, x1, y1) of the face box in normalised crop coordinates; ``inside`` ``[R, R]`` bool.
    """
    cv2 = require_cv2()
    r = crop_rgb.shape[0]
    img = cv2.resize((crop_rgb.numpy() * 255).round().astype(np.uint8), (work, work), interpolation=cv2.INTER_AREA)
    x0, y0, x1, y1 = (v * work for v in face_uv)
    fw, fh = x1 - x0, y1 - y0
    seeds = np.full((work, work), cv2.GC_PR_BGD, np.uint8)
    yy, xx = np.mgrid[0:work, 0:work]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 - 0.1 * fh
    head = ((xx - cx) / (0.8 * fw)) ** 2 + ((yy - cy) / (0.85 * fh)) ** 2 <= 1
    torso = (yy >= y1 + 0.1 * fh) & (np.abs(xx - cx) <= 1.4 * fw)
    neck = (yy >= y1 - 0.1 * fh) & (yy < y1 + 0.3 * fh) & (np.abs(xx - cx) <= 0.35 * fw)
    seeds[head | torso | neck] = cv2.GC_PR_FGD
    band = max(2, work // 64)
    border = np.zeros_like(head)
    border[:band] = True
    border[:, :band] = True
    border[:, -band:] = True
    seeds[border & ~torso] = cv2.GC_BGD
    outside = cv2.resize((~inside).astype(np.uint8), (work, work), interpolation=cv2.INTER_NEAREST).astype(bool)
    seeds[outside] = cv2.GC_PR_BGD
    core = (xx >= x0 + 0.2 * fw) & (xx <= x1 - 0.2 * fw) & (yy >= y0 + 0.2 * fh) & (yy <= y1 - 0.1 * fh)
    seeds[core] = cv2.GC_FGD
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)
    cv2.grabCut(img, seeds, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    fg = ((seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)).astype(np.uint8)
    fg = cv2.resize(fg, (r, r), interpolation=cv2.INTER_NEAREST)
    return torch.from_numpy(fg.astype(np.float32))
