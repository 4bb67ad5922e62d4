"""Random portraits from the GAN: seeds → latents → tri-grids (Portrait3D stage 4 without inversion)."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .. import cameras
from ..errors import InvalidInputError
from ..trigrid import TriGrid, stack
from .generator import PortraitGenerator


def seed_latents(seeds: Sequence[int], z_dim: int) -> torch.Tensor:
    """``[N, z_dim]`` latents, ``z = RandomState(seed).randn(z_dim)`` as the official sampling scripts draw them."""
    if not seeds:
        raise InvalidInputError("need at least one seed")
    return torch.from_numpy(np.stack([np.random.RandomState(int(s) % 2**32).randn(z_dim) for s in seeds])).float()


def frontal_label(focal: float = cameras.GAN_FOCAL) -> torch.Tensor:
    """The conditioning camera of the official scripts: EG3D yaw = pitch = π/2, radius 2.7 → ``[1, 25]``."""
    return cameras.camera_label(cameras.gan_pose(math.pi / 2, math.pi / 2), focal)


@torch.no_grad()
def synthesize_trigrids(generator: PortraitGenerator, seeds: Sequence[int], truncation_psi: float = 1.0,
                        truncation_cutoff: Optional[int] = None, c_cond: Optional[torch.Tensor] = None,
                        progress: Optional[Callable[[int, int], None]] = None) -> TriGrid:
    """One tri-grid per seed (batched ``TriGrid``, levels ``[N, 3, 36, R, R]``, ws ``[N, num_ws, w_dim]``).

    ``c_cond`` ``[1, 25]`` conditions the mapping (default: the frontal camera); pose p = 0 as at inference.
    Same seed and settings ⇒ the same tri-grid.
    """
    c = frontal_label() if c_cond is None else c_cond
    if c.shape != (1, 25):
        raise InvalidInputError(f"the conditioning camera must be one label [1, 25], got {tuple(c.shape)}")
    device = generator.device
    out = []
    for i, seed in enumerate(seeds):
        z = seed_latents([seed], generator.config.z_dim).to(device)
        ws = generator.mapping(z, c.to(device), None, truncation_psi, truncation_cutoff)
        trigrid = generator.trigrid(ws)
        trigrid.meta.update(seed=str(seed), truncation_psi=repr(float(truncation_psi)))
        out.append(trigrid)
        if progress is not None:
            progress(i + 1, len(seeds))
    if len(out) == 1:
        return out[0]
    batch = stack(out)
    batch.meta["seed"] = ",".join(str(s) for s in seeds)
    return batch
