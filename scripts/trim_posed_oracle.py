"""Make ``tests/fixtures/posed_render_oracle/`` from the full posed-render oracle folder (only what the tests read).

    .venv/bin/python scripts/trim_posed_oracle.py <full posed_render_oracle folder> tests/fixtures/posed_render_oracle

Kept in full: ``deform_points.safetensors`` without ``nearest.dist_type``, both ``posed_case_*`` files without
``deform.*.dist_type`` (kaolin's closest-feature code, which no test reads), and the 18 ``renderer.*`` SMPL buffers
except ``aligned_SMPL.model.posedirs`` [207, 20670] (17 MB): a neck/head-only pose makes every rotation but the neck's
and the head's exactly the identity, so only the pose-feature rows of SMPL joints 12 and 15 (rows 99–107 and 126–134)
multiply non-zeros. Those 18 rows are stored as ``posedirs_neck_head_rows``; the tests rebuild the others as zeros
(``tests/test_posed_render.py::smpl_buffers``). 29 MB → 13 MB.
"""
from __future__ import annotations

import argparse
import os

from safetensors import safe_open
from safetensors.torch import save_file

POSEDIRS = "renderer.aligned_SMPL.model.posedirs"
NECK_HEAD_ROWS = (slice(99, 108), slice(126, 135))      # 9·(joint − 1) … for joints 12 and 15


def _read(path):
    with safe_open(path, "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("dest")
    args = parser.parse_args(argv)
    os.makedirs(args.dest, exist_ok=True)
    for name in ("deform_points", "posed_case_0", "posed_case_1"):
        tensors, meta = _read(os.path.join(args.source, f"{name}.safetensors"))
        kept = {k: v.contiguous() for k, v in tensors.items() if not k.endswith(".dist_type")}
        meta["trimmed"] = "dist_type dropped; see scripts/trim_posed_oracle.py"
        save_file(kept, os.path.join(args.dest, f"{name}.safetensors"), metadata=meta)
    tensors, meta = _read(os.path.join(args.source, "renderer_smpl_buffers.safetensors"))
    posedirs = tensors.pop(POSEDIRS)
    import torch

    tensors["posedirs_neck_head_rows"] = torch.cat([posedirs[rows] for rows in NECK_HEAD_ROWS]).contiguous()
    meta["trimmed"] = (f"{POSEDIRS} {list(posedirs.shape)} is stored as posedirs_neck_head_rows [18, "
                       f"{posedirs.shape[1]}]: rows 99-107 and 126-134 (the pose-feature rows of SMPL joints 12 and "
                       f"15, body-pose slots 11 and 14); every other row multiplies an exact zero for a neck/head-only "
                       f"pose (R - I = 0) and is rebuilt as zeros by the tests")
    save_file(tensors, os.path.join(args.dest, "renderer_smpl_buffers.safetensors"), metadata=meta)
    for entry in os.listdir(args.dest):
        os.chmod(os.path.join(args.dest, entry), 0o644)


if __name__ == "__main__":
    main()
