"""Make ``tests/fixtures/sds_oracle/`` from the full SDS oracle folder (keeps only what the tests read).

    .venv/bin/python scripts/trim_sds_oracle.py <full sds_oracle folder> tests/fixtures/sds_oracle

Kept in full: the initial tri-grid and ws, the injected random draws (stratified jitter as uint16 fractions of a
depth interval — error ≤ 2.4e-7, at float32 round-off; importance depths as float32), the render image and Σw,
latents, noises, ε predictions, SDS gradient, text embeddings and every scalar. Level-sized tensors (gradients,
Adan state, parameters after each step, EMA) are kept on a fixed strided subset of ≤ 6912 elements per level
(``subset.<level>`` = the flat indices): Adan and the EMA are elementwise, so a subset checks them exactly.
Dropped: what the tests recompute (rays, 512² input, UNet inputs, per-sample weights → checked through the entropy
scalar) and tokenizer.json (CLIPTokenizer reads vocab.json + merges.txt).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

LEVEL_SETS = ("grad_preclip", "grad_postclip", "adan.exp_avg", "adan.exp_avg_sq", "adan.exp_avg_diff",
              "adan.neg_pre_grad", "param_after")
FULL_PER_ITERATION = ("cam.azimuth", "cam.polar", "cam.poses", "cam.intrinsics_fx_fy_cx_cy", "render.depths_fine",
                      "render.image", "render.weights_sum", "sds.latents", "sds.vae_posterior_noise", "sds.noise",
                      "sds.eps_uncond", "sds.eps_cond", "sds.eps_hat", "sds.grad", "sds.t", "sds.w_t",
                      "sds.unet_in_text", "loss.sds", "loss.entropy", "loss.lambda_entropy", "loss.total",
                      "global_step", "grad_global_norm_preclip", "grad_clip_factor")
SUBSET_SIZE = 6912
RAY_START, RAY_END, COARSE = 2.35, 3.12, 48


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("dest")
    args = parser.parse_args(argv)
    with safe_open(os.path.join(args.source, "sds_step_case.safetensors"), "pt") as fh:
        meta = fh.metadata()
        d = {k: fh.get_tensor(k) for k in fh.keys()}
    levels = sorted({k.split(".")[-1] for k in d if k.startswith("init.trigrids_")}, key=lambda n: int(n.split("_")[1]))
    out = {k: v for k, v in d.items() if k.startswith(("init.", "text.")) or k == "ema_num_updates"}
    for level in levels:
        n = d[f"init.{level}"].numel()
        idx = torch.arange(0, n, max(1, n // SUBSET_SIZE), dtype=torch.int64)
        out[f"subset.{level}"] = idx
        out[f"ema_after_epoch.{level}"] = d[f"ema_after_epoch.{level}"].reshape(-1)[idx].clone()
        for it in (1, 2):
            for name in LEVEL_SETS:
                out[f"it{it}.{name}.{level}"] = d[f"it{it}.{name}.{level}"].reshape(-1)[idx].clone()
            out[f"it{it}.lr.{level}"] = d[f"it{it}.lr.{level}"]
            out[f"it{it}.adan_group_step.{level}"] = d[f"it{it}.adan_group_step.{level}"]
    delta = (RAY_END - RAY_START) / (COARSE - 1)
    base = torch.linspace(RAY_START, RAY_END, COARSE)
    for it in (1, 2):
        for name in FULL_PER_ITERATION:
            out[f"it{it}.{name}"] = d[f"it{it}.{name}"]
        jitter = (d[f"it{it}.render.depths_coarse"] - base) / delta
        out[f"it{it}.render.jitter_u16"] = torch.round(jitter * 65535).clamp(0, 65535).to(torch.int32) \
            .to(torch.uint16)
    os.makedirs(args.dest, exist_ok=True)
    info = json.loads(meta["info"])
    info["trimmed"] = "see scripts/trim_sds_oracle.py"
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(args.dest, "sds_step_case.safetensors"),
              metadata={"info": json.dumps(info)})
    shutil.copy(os.path.join(args.source, "decoder_state_dict.safetensors"), args.dest)
    tiny = os.path.join(args.dest, "tiny_sd")
    if os.path.exists(tiny):
        shutil.rmtree(tiny)
    shutil.copytree(os.path.join(args.source, "tiny_sd"), tiny, ignore=shutil.ignore_patterns("tokenizer.json"))
    for root, dirs, files in os.walk(args.dest):
        for name in dirs + files:
            os.chmod(os.path.join(root, name), 0o755 if name in dirs else 0o644)


if __name__ == "__main__":
    main()
