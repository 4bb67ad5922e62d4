"""SDS against the official code: two recorded iterations of Portrait3D's stage 5 (tests/fixtures/sds_oracle).

The run used a tiny random SD (``tiny_sd/``, diffusers format) and a 4-level tri-grid (8 … 64). Its random draws —
camera, stratified jitter, importance depths, VAE posterior noise, t and ε — are injected, so our renderer, the
diffusers adapter, the SDS loss and Adan must reproduce the recorded tensors. Tolerances from the oracle's README:
per tensor max|Δ| ≤ 1e-3·max|ref| (render, latents, ε, level gradients, Adan state), 5e-3 for ε̂ and the SDS
gradient (CFG 100 amplifies UNet round-off), relative 1e-4 for losses; Adan step-wise at 1e-5·max(1, |ref|).
"""
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import oracle_dir
from portrait3d_core import cameras, sds
from portrait3d_core.decoder import Decoder
from portrait3d_core.optim import EMA, Adan
from portrait3d_core.trigrid import TriGrid

ORACLE = oracle_dir("sds_oracle")
LEVELS = ["trigrids_8", "trigrids_16", "trigrids_32", "trigrids_64"]
ADAN_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad")


@pytest.fixture(scope="module")
def case():
    path = os.path.join(ORACLE, "sds_step_case.safetensors")
    with safe_open(path, "pt") as fh:
        meta = fh.metadata()
    import json

    return load_file(path), json.loads(meta["info"])


def _close(actual, expected, rel):
    """max|Δ| ≤ rel·max|ref| over the tensor."""
    expected = expected.to(actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * float(expected.abs().max()))


def _stepwise_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def _subset(case, level, tensor):
    return tensor.reshape(-1)[case[f"subset.{level}"]]


def _draws(case, it):
    p = f"it{it}."
    base = torch.linspace(2.35, 3.12, 48)
    coarse = base + case[p + "render.jitter_u16"].to(torch.int32).float() / 65535 * ((3.12 - 2.35) / 47)
    return sds.IterationDraws(float(case[p + "cam.azimuth"]), 90.0 + float(case[p + "cam.polar"]),
                              int(case[p + "sds.t"]),
                              depths=(coarse[..., None], case[p + "render.depths_fine"][..., None]),
                              posterior_noise=case[p + "sds.vae_posterior_noise"], noise=case[p + "sds.noise"])


def test_sds_oracle_cameras_and_settings(case):
    data, info = case
    settings = sds.SDSSettings.paper()
    assert (settings.t_min, settings.t_max, settings.guidance_scale) == (20, 400, float(info["guidance_scale"]))
    lrs = sds.level_lrs_for(settings, 4)
    assert lrs == [1.0, 1.0, 0.2, 0.1]
    torch.testing.assert_close(torch.tensor(lrs), torch.stack([data[f"it1.lr.{n}"] for n in LEVELS]), rtol=0, atol=0)
    assert sds.level_lrs_for(settings, 7) == [1.0] * 5 + [0.2, 0.1]
    torch.testing.assert_close(torch.tensor(settings.focal * 128, dtype=torch.float64),
                               data["it1.cam.intrinsics_fx_fy_cx_cy"][0], rtol=1e-6, atol=0)
    for it in (1, 2):
        p = f"it{it}."
        ours = cameras.sds_pose(data[p + "cam.azimuth"], 90 + data[p + "cam.polar"])
        # the official look-at frame is ours with the image x axis (and hence OpenGL's y, z) negated
        torch.testing.assert_close(-ours[0, :3, :3], data[p + "cam.poses"][0, :3, :3], rtol=0, atol=1e-6)
        torch.testing.assert_close(ours[0, :3, 3], data[p + "cam.poses"][0, :3, 3], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def guidance():
    from portrait3d_core.guidance import DiffusersGuidance

    return DiffusersGuidance.from_pretrained(os.path.join(ORACLE, "tiny_sd"), device="cpu")


def test_sds_oracle_two_iterations_through_the_diffusers_adapter(case, guidance):
    data, info = case
    decoder = Decoder.from_state_dict(load_file(os.path.join(ORACLE, "decoder_state_dict.safetensors")))
    trigrid = TriGrid([data[f"init.{n}"] for n in LEVELS], data["init.ws"])
    conditioning = guidance.view_conditioning(info["prompt"])
    for name, ref in (("uncond", conditioning.negative), ("front", conditioning.front), ("side", conditioning.side),
                      ("back", conditioning.back)):
        torch.testing.assert_close(ref, data[f"text.emb_{name}"], rtol=0, atol=1e-6)
    settings = sds.SDSSettings.paper()
    model_trigrid, params = sds.trainable_trigrid(trigrid)
    problem = sds.SDSProblem(model_trigrid, sds.frozen_decoder(decoder), guidance, conditioning, settings)
    optimizer = sds.make_optimizer(params, settings)
    ema = EMA(params, settings.ema_decay)
    for it in (1, 2):
        p = f"it{it}."
        draws = _draws(data, it)
        positive = sds.blended_conditioning(guidance, conditioning, draws.azimuth_deg)
        _close(positive, data[p + "sds.unet_in_text"][1:], 1e-6)
        optimizer.zero_grad(set_to_none=True)
        result = sds.sds_iteration(problem, it, draws)
        _close(result.image.permute(0, 2, 3, 1), data[p + "render.image"], 1e-3)
        torch.testing.assert_close(result.image.permute(0, 2, 3, 1), data[p + "render.image"], rtol=0, atol=1e-4)
        _close(result.weights_sum[:, 0] * 1.002 - 0.001, data[p + "render.weights_sum"], 1e-3)
        _close(result.latents, data[p + "sds.latents"], 1e-3)
        t = torch.tensor([draws.t])
        _close(guidance.alphas_cumprod(t), 1 - data[p + "sds.w_t"], 1e-6)
        noisy = guidance.add_noise(result.latents, result.noise, t)
        eps_u, eps_c = guidance.noise_predictions(noisy, t, [conditioning.negative, positive])
        _close(eps_u, data[p + "sds.eps_uncond"], 1e-3)
        _close(eps_c, data[p + "sds.eps_cond"], 1e-3)
        _close(result.eps_hat, data[p + "sds.eps_hat"], 5e-3)
        _close(result.grad, data[p + "sds.grad"], 5e-3)
        for name in ("sds", "entropy", "lambda_entropy", "total"):
            ours = {"sds": result.loss_sds, "entropy": result.loss_entropy, "lambda_entropy": result.lambda_entropy,
                    "total": result.loss}[name]
            torch.testing.assert_close(torch.tensor(ours, dtype=torch.float64),
                                       data[f"{p}loss.{name}"].double(), rtol=1e-4, atol=0)
        for param, name in zip(params, LEVELS):
            _close(_subset(data, name, param.grad), data[f"{p}grad_preclip.{name}"], 1e-3)
        norm = optimizer.step()
        torch.testing.assert_close(norm, data[p + "grad_global_norm_preclip"], rtol=1e-4, atol=0)
        for param, name in zip(params, LEVELS):
            _close(_subset(data, name, param.grad), data[f"{p}grad_postclip.{name}"], 1e-3)
            for key in ("exp_avg", "exp_avg_sq", "neg_pre_grad"):
                # iteration 2 starts from our iteration-1 parameters (the ~0.2 % of elements where Adan's first
                # step amplified round-off move its gradients by ~1e-4): 2e-3 there; exact step-wise test below
                _close(_subset(data, name, optimizer.state[param][key]), data[f"{p}adan.{key}.{name}"],
                       1e-3 if it == 1 else 2e-3)
            # end to end, parameters inherit Adan's lr·g/|g| sensitivity where |g| ≈ 0: aggregate check (README §6)
            before = data[f"init.{name}"].reshape(-1)[data[f"subset.{name}"]] if it == 1 else \
                data[f"it1.param_after.{name}"]
            ref = data[f"{p}param_after.{name}"]
            ours = _subset(data, name, param.detach())
            within = float(((ours - ref).abs() <= 1e-4 * ref.abs().clamp_min(1)).float().mean())
            mean_err = float((ours - ref).abs().mean()) / float((ref - before).abs().mean())
            print(f"iteration {it} {name}: {within:.4f} within 1e-4, mean |err| / mean |update| {mean_err:.2e}")
            assert within >= (0.99 if it == 1 else 0.5), f"iteration {it} {name}: only {within:.3f} of elements match"
            assert mean_err <= 1e-2
    ema.update()
    for shadow, name in zip(ema.shadow, LEVELS):
        ref = data[f"ema_after_epoch.{name}"]
        moved = (ref - _subset(data, name, data[f"init.{name}"])).abs().mean()
        assert float((_subset(data, name, shadow) - ref).abs().mean()) <= 1e-2 * float(moved)
    assert ema.num_updates == int(data["ema_num_updates"])


def test_sds_adan_matches_the_oracle_stepwise_states(case):
    """Feed the recorded gradients (and the recorded state before iteration 2) to our Adan: every state tensor,
    the in-place clipped gradient and the parameters must match at 1e-5·max(1, |ref|). Adan is elementwise given
    the global clip factor, so the recorded subset of elements is exact; clipping is applied with the recorded
    factor (the end-to-end test checks the global norm itself)."""
    data, _ = case
    for it in (1, 2):
        p = f"it{it}."
        clip = data[p + "grad_clip_factor"]
        params, groups = [], []
        lrs = sds.level_lrs_for(sds.SDSSettings.paper(), len(LEVELS))
        for name, lr in zip(LEVELS, lrs):
            start = _subset(data, name, data[f"init.{name}"]) if it == 1 else data[f"it1.param_after.{name}"]
            param = torch.nn.Parameter(start.clone())
            param.grad = data[f"{p}grad_preclip.{name}"].clone() * clip
            params.append(param)
            groups.append({"params": [param], "lr": lr})
        optimizer = Adan(groups, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=2e-5, max_grad_norm=0.0)
        if it == 2:
            for group, param, name in zip(optimizer.param_groups, params, LEVELS):
                group["step"] = 1
                optimizer.state[param].update({k: data[f"it1.adan.{k}.{name}"].clone() for k in ADAN_KEYS})
        optimizer.step()
        for group, param, name in zip(optimizer.param_groups, params, LEVELS):
            assert group["step"] == int(data[f"{p}adan_group_step.{name}"])
            _stepwise_close(param.grad, data[f"{p}grad_postclip.{name}"])
            _stepwise_close(param.detach(), data[f"{p}param_after.{name}"])
            for key in ADAN_KEYS:
                _stepwise_close(optimizer.state[param][key], data[f"{p}adan.{key}.{name}"])
    for name in LEVELS:     # EMA after the epoch = one torch-ema update (decay min(0.95, 2/11)) from init
        shadow = EMA([_subset(data, name, data[f"init.{name}"]).clone()], 0.95)
        shadow.parameters = [data[f"it2.param_after.{name}"]]
        shadow.update()
        _stepwise_close(shadow.shadow[0], data[f"ema_after_epoch.{name}"])
