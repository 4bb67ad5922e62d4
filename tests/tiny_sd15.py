"""Build a tiny, random-weight checkpoint that ComfyUI detects as SD1.5 (for tests; nothing is downloaded).

ComfyUI's model detection checks only ``model_channels`` 320, ``context_dim`` 768, no linear transformer and no ADM
input, so a one-level 320-channel UNet loads through ``CheckpointLoaderSimple`` as a real ``SD15`` EPS model with the
SD1.5 latent format. The text encoder is the full SD1.5 CLIP-L shape (ComfyUI would leave missing keys
uninitialised); the VAE is TAESD (2.4 M parameters, default) or the SD AutoencoderKL (83.7 M, ``--vae kl``).

Run with the ComfyUI tree on ``sys.path`` (``--comfy .comfyui``); writes an fp16 ``.safetensors`` atomically:

    .venv/bin/python tests/tiny_sd15.py --comfy .comfyui --out /tmp/tiny_sd15.safetensors [--vae kl] [--seed 0]

Measured on the 2-core machine: about 10 s and 303 MB (TAESD) / 465 MB (KL).
"""
from __future__ import annotations

import argparse
import os
import sys

UNET_CONFIG = {
    "model_channels": 320, "context_dim": 768, "use_linear_in_transformer": False, "adm_in_channels": None,
    "in_channels": 4, "out_channels": 4, "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1],
    "transformer_depth_output": [1, 1], "transformer_depth_middle": 1, "use_spatial_transformer": True,
    "legacy": False, "use_checkpoint": False, "image_size": 32, "use_temporal_resblock": False,
    "use_temporal_attention": False, "num_heads": 8,
}
KL_CONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
             "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def _randomise(module, generator) -> None:
    """Seeded init: weights N(0, 0.02), norm weights 1, biases 0 (every tensor written, nothing left empty)."""
    import torch

    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and leaf == "weight":
                tensor.fill_(1.0)
            elif leaf == "bias":
                tensor.zero_()
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)


def build(comfy_dir: str, out: str, vae_kind: str = "taesd", seed: int = 0) -> str:
    sys.path.insert(0, os.path.abspath(comfy_dir))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True            # before comfy.model_management is imported
    import torch
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    generator = torch.Generator().manual_seed(seed)
    config = comfy.supported_models.SD15(dict(UNET_CONFIG))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    _randomise(model, generator)
    clip = comfy.sd.CLIP(target=config.clip_target(), embedding_directory=None)
    _randomise(clip.cond_stage_model, generator)
    if vae_kind == "taesd":
        import comfy.taesd.taesd

        vae_module = comfy.taesd.taesd.TAESD(latent_channels=4)
        _randomise(vae_module, generator)
        with torch.no_grad():
            vae_module.vae_scale.fill_(1.0)
            vae_module.vae_shift.fill_(0.0)
    elif vae_kind == "kl":
        from comfy.ldm.models.autoencoder import AutoencoderKL

        vae_module = AutoencoderKL(ddconfig=dict(KL_CONFIG), embed_dim=4)
        _randomise(vae_module, generator)
    else:
        raise SystemExit(f"--vae must be 'taesd' or 'kl', got {vae_kind!r}")
    vae = comfy.sd.VAE(sd=vae_module.state_dict())
    state = model.state_dict_for_saving(clip.get_sd(), vae.get_sd(), None)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".partial"
    comfy.utils.save_torch_file(state, tmp)
    os.replace(tmp, out)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfy", required=True, help="the ComfyUI tree (folder with main.py)")
    parser.add_argument("--out", required=True, help="output .safetensors path")
    parser.add_argument("--vae", default="taesd", choices=["taesd", "kl"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build(args.comfy, args.out, args.vae, args.seed))


if __name__ == "__main__":
    main()
