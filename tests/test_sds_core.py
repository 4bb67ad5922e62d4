"""SDS core: loss gradient, view blending, Adan, EMA, checkpoints/resume, divergence and convergence (toy guidance)."""
import math
import os

import pytest
import torch
from safetensors import safe_open

from portrait3d_core import sds
from portrait3d_core.errors import CheckpointError, InvalidInputError
from portrait3d_core.guidance import ViewConditioning, view_prompts
from portrait3d_core.optim import EMA, Adan, adan_state_tensors, load_adan_state_tensors
from sds_toys import TargetGuidance, colour_targets, gradient_targets, small_decoder, small_trigrid

TOY = dict(render_resolution=16, encode_resolution=16, coarse_samples=8, fine_samples=8)


def _toy_settings(**changes):
    return sds.SDSSettings.paper(**{**TOY, **changes})


def test_sds_latent_gradient_equals_weighted_noise_residual():
    """With the point-target denoiser ε(x_t; z*) = (x_t − √ᾱ z*)/√(1 − ᾱ), CFG gives
    ε̂ − ε = √(ᾱ/(1 − ᾱ))·((z − z_u) + s·(z_u − z_c)), so the gradient reaching the latents must be
    w(t)(ε̂ − ε) = √(ᾱ(1 − ᾱ))·((z − z_u) + s·(z_u − z_c)) — whatever the noise draw."""
    guidance = TargetGuidance()
    guidance.capture = True
    targets = colour_targets(16)
    negative = torch.full((1, 3, 16, 16), -0.25)
    conditioning = ViewConditioning(negative, targets.front, targets.side, targets.back)
    settings = _toy_settings(guidance_scale=7.5)
    trigrid, _ = sds.trainable_trigrid(small_trigrid())
    problem = sds.SDSProblem(trigrid, sds.frozen_decoder(small_decoder()), guidance, conditioning, settings)
    noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    draws = sds.IterationDraws(azimuth_deg=30.0, polar_deg=80.0, t=250, noise=noise)
    result = sds.sds_iteration(problem, 1, draws, torch.Generator().manual_seed(0))
    a = float(guidance.alphas_cumprod(torch.tensor([250]))[0])
    z = result.latents
    z_c = (2 / 3) * targets.front + (1 / 3) * targets.side          # azimuth 30: r = 1 − 30/90
    expected = math.sqrt(a * (1 - a)) * ((z - negative) + 7.5 * (negative - z_c))
    assert len(guidance.captured) == 1
    torch.testing.assert_close(guidance.captured[0], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.grad, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(result.loss_sds), 0.5 * (expected ** 2).sum(), rtol=1e-4, atol=0)
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in trigrid.levels)


def test_sds_gradient_zeroes_nans_and_uses_one_minus_alpha_bar():
    eps_hat = torch.tensor([[1.0, float("nan")], [3.0, -2.0]]).reshape(1, 1, 2, 2)
    noise = torch.tensor([[0.5, 0.0], [1.0, 1.0]]).reshape(1, 1, 2, 2)
    grad = sds.sds_gradient(eps_hat, noise, torch.tensor([0.75]))
    torch.testing.assert_close(grad, torch.tensor([[0.125, 0.0], [0.5, -0.75]]).reshape(1, 1, 2, 2))
    z = torch.randn(1, 4, 3, 3, requires_grad=True)
    g = torch.randn(1, 4, 3, 3)
    sds.sds_loss(z, g).backward()
    torch.testing.assert_close(z.grad, g, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("azimuth, expected", [
    (0, {"front": 1.0, "side": 0.0, "back": 0.0}),
    (45, {"front": 0.5, "side": 0.5, "back": 0.0}),
    (-45, {"front": 0.5, "side": 0.5, "back": 0.0}),
    (90, {"front": 0.0, "side": 1.0, "back": 0.0}),
    (-90, {"front": 0.0, "side": 1.0, "back": 0.0}),
    (135, {"front": 0.0, "side": 0.5, "back": 0.5}),
    (-135, {"front": 0.0, "side": 0.5, "back": 0.5}),
    (180, {"front": 0.0, "side": 0.0, "back": 1.0}),
    (-180, {"front": 0.0, "side": 0.0, "back": 1.0}),
    (30, {"front": 2 / 3, "side": 1 / 3, "back": 0.0}),
    (-120, {"front": 0.0, "side": 2 / 3, "back": 1 / 3}),
])
def test_sds_view_blending_matches_the_formula(azimuth, expected):
    weights = sds.view_weights(azimuth)
    assert weights == pytest.approx(expected, abs=1e-12)
    guidance = TargetGuidance()
    cond = ViewConditioning(None, torch.full((1, 2), 1.0), torch.full((1, 2), 10.0), torch.full((1, 2), 100.0))
    blended = sds.blended_conditioning(guidance, cond, azimuth)
    value = expected["front"] * 1 + expected["side"] * 10 + expected["back"] * 100
    torch.testing.assert_close(blended, torch.full((1, 2), value))


def test_sds_view_blending_rejects_azimuths_outside_the_range():
    with pytest.raises(InvalidInputError, match="azimuth"):
        sds.view_weights(181.0)
    assert view_prompts(" a knight ") == {"front": "front view a knight", "side": "side view a knight",
                                          "back": "back view a knight"}
    with pytest.raises(InvalidInputError, match="empty"):
        view_prompts("  ")


def _hand_adan(params, grads_per_step, lrs, betas=(0.98, 0.92, 0.99), eps=1e-8, wd=2e-5, max_norm=5.0):
    """Adan in float64 from the formulas (no in-place tricks): global clip, neg_pre_grad = −g at step 1,
    bias-corrected moments, proximal decay."""
    b1, b2, b3 = betas
    p = [list(x) for x in params]
    m = [[0.0] * len(x) for x in params]
    v = [[0.0] * len(x) for x in params]
    n = [[0.0] * len(x) for x in params]
    prev = None
    history = []
    for k, grads in enumerate(grads_per_step, start=1):
        norm = math.sqrt(sum(g * g for gs in grads for g in gs))
        clip = min(1.0, max_norm / (norm + eps))
        g = [[x * clip for x in gs] for gs in grads]
        if prev is None:
            prev = [list(gs) for gs in g]
        for i in range(len(p)):
            for j in range(len(p[i])):
                diff = g[i][j] - prev[i][j]
                m[i][j] = b1 * m[i][j] + (1 - b1) * g[i][j]
                v[i][j] = b2 * v[i][j] + (1 - b2) * diff
                n[i][j] = b3 * n[i][j] + (1 - b3) * (g[i][j] + b2 * diff) ** 2
                denom = math.sqrt(n[i][j]) / math.sqrt(1 - b3 ** k) + eps
                update = lrs[i] * (m[i][j] / (1 - b1 ** k) + b2 * v[i][j] / (1 - b2 ** k)) / denom
                p[i][j] = (p[i][j] - update) / (1 + lrs[i] * wd)
        prev = g
        history.append(([list(x) for x in p], clip, [list(x) for x in g]))
    return history


def test_sds_adan_matches_a_step_computed_by_hand():
    start = [[0.5, -1.0, 2.0], [0.25, 3.0]]
    grads = [[[3.0, -4.0, 1.0], [2.0, 0.5]], [[-4.0, 2.0, 0.25], [0.1, -3.0]], [[0.2, 0.1, -0.3], [0.0, 1.0]]]
    lrs = [1.0, 0.2]
    expected = _hand_adan(start, grads, lrs)
    params = [torch.nn.Parameter(torch.tensor(x)) for x in start]
    opt = Adan([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)], betas=(0.98, 0.92, 0.99), eps=1e-8,
               weight_decay=2e-5, max_grad_norm=5.0)
    for step, (grad, (want_params, want_clip, want_clipped)) in enumerate(zip(grads, expected), start=1):
        for p, g in zip(params, grad):
            p.grad = torch.tensor(g)
        norm = opt.step()
        assert float(norm) == pytest.approx(math.sqrt(sum(x * x for gs in grad for x in gs)), rel=1e-6)
        for p, want, clipped in zip(params, want_params, want_clipped):
            torch.testing.assert_close(p.detach(), torch.tensor(want), rtol=2e-6, atol=2e-6)
            torch.testing.assert_close(p.grad, torch.tensor(clipped), rtol=1e-6, atol=1e-7)   # clipped in place
        if step == 1:   # neg_pre_grad started at −(clipped g) ⇒ no difference term yet
            assert all(float(opt.state[p]["exp_avg_diff"].abs().max()) == 0.0 for p in params)
        assert want_clip < 1.0 or step == 3


def test_sds_adan_refuses_a_nonfinite_gradient_without_touching_anything():
    p = torch.nn.Parameter(torch.ones(3))
    opt = Adan([p], lr=1.0, max_grad_norm=5.0, error_if_nonfinite=True)
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    from portrait3d_core.optim import NonFiniteGradientError

    with pytest.raises(NonFiniteGradientError, match="diverged"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and not opt.state[p]


def test_sds_ema_follows_the_num_updates_rule_and_restores_exactly():
    p = torch.nn.Parameter(torch.zeros(4))
    ema = EMA([p], decay=0.95)
    shadow, values = 0.0, [1.0, 2.0, -1.0, 4.0]
    for n, value in enumerate(values, start=1):
        with torch.no_grad():
            p.fill_(value)
        decay = min(0.95, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(decay)
        ema.update()
        shadow = shadow - (1 - decay) * (shadow - value)
        torch.testing.assert_close(ema.shadow[0], torch.full((4,), shadow), rtol=1e-6, atol=1e-7)
    assert ema.num_updates == 4
    state = ema.state_tensors(["p"])
    other = EMA([p], decay=0.95)
    other.load_state_tensors(["p"], state)
    assert other.num_updates == 4 and torch.equal(other.shadow[0], ema.shadow[0])
    # 20 per-epoch updates (the paper's 2000 iterations): the final average's weights on epochs 20, 19, 18
    weights, decays = [], [min(0.95, (1 + n) / (10 + n)) for n in range(1, 21)]
    for e in range(20, 17, -1):
        weights.append((1 - decays[e - 1]) * math.prod(decays[e:]))
    assert weights == pytest.approx([0.30, 0.22, 0.16], abs=0.01)      # pipeline.md §5.7


def test_sds_adan_state_round_trips_through_plain_tensors():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(2, 3))]
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    opt_a = Adan([{"params": [p], "lr": 0.5} for p in a], weight_decay=2e-5, max_grad_norm=5.0)
    opt_b = Adan([{"params": [p], "lr": 0.5} for p in b], weight_decay=2e-5, max_grad_norm=5.0)
    grads = [[torch.randn(5), torch.randn(2, 3)] for _ in range(3)]
    for p, g in zip(a, grads[0]):
        p.grad = g.clone()
    opt_a.step()
    load_adan_state_tensors(opt_b, ["a", "b"], adan_state_tensors(opt_a, ["a", "b"]))
    with torch.no_grad():
        for pb, pa in zip(b, a):
            pb.copy_(pa)
    for step in grads[1:]:
        for pa, pb, g in zip(a, b, step):
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert all(torch.equal(pa, pb) for pa, pb in zip(a, b))


def _run(tmp, **kwargs):
    settings = _toy_settings(iterations=6, checkpoint_interval=2, ema_interval=2)
    return sds.run_sds(small_trigrid(), small_decoder(), TargetGuidance(), colour_targets(16), settings, seed=7,
                       checkpoint_dir=tmp, **kwargs)


class _Cancel(Exception):
    pass


def test_sds_resume_restores_the_exact_state(tmp_path):
    """Uninterrupted vs stopped-and-resumed vs cancelled-and-resumed: bit-identical tri-grids (CPU, same seed)."""
    full = _run(None)
    assert full.iterations == 6 and full.resumed_from == 0 and full.checkpoint_path is None
    staged = str(tmp_path / "staged")
    first = _run(staged, stop_after=3)
    assert first.iterations == 3
    with safe_open(os.path.join(staged, sds.CHECKPOINT_NAME), "pt") as fh:
        assert fh.metadata()["iteration"] == "3"
    resumed = _run(staged)
    assert resumed.resumed_from == 3 and resumed.iterations == 6

    cancelled = str(tmp_path / "cancelled")

    def cancel_at_4(done, total):
        if done == 4:
            raise _Cancel()

    with pytest.raises(_Cancel):
        _run(cancelled, progress=cancel_at_4)
    with safe_open(os.path.join(cancelled, sds.CHECKPOINT_NAME), "pt") as fh:
        assert fh.metadata()["iteration"] == "4"       # the state after the last completed iteration
    after_cancel = _run(cancelled)
    assert after_cancel.resumed_from == 4
    for other in (resumed, after_cancel):
        for a, b in zip(full.trigrid.levels + full.trigrid_last.levels, other.trigrid.levels + other.trigrid_last.levels):
            assert torch.equal(a, b)
    assert not torch.equal(full.trigrid.levels[0], small_trigrid().levels[0])
    again = _run(cancelled)            # a finished run re-queued: nothing to do, same result
    assert again.resumed_from == 6 and not again.losses and torch.equal(again.trigrid.levels[2], full.trigrid.levels[2])


def test_sds_checkpoint_of_another_run_is_a_clear_error(tmp_path):
    _run(str(tmp_path), stop_after=2)
    settings = _toy_settings(iterations=6, checkpoint_interval=2, ema_interval=2)
    with pytest.raises(CheckpointError, match="another run"):
        sds.run_sds(small_trigrid(), small_decoder(), TargetGuidance(), colour_targets(16), settings, seed=8,
                    checkpoint_dir=str(tmp_path))


def test_sds_divergence_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    guidance = TargetGuidance()
    guidance.poison_from_call = 4                     # iteration 4's latents are inf
    settings = _toy_settings(iterations=6, checkpoint_interval=2, ema_interval=2)
    with pytest.raises(sds.SDSDivergedError, match=r"iteration 4.*iteration 2"):
        sds.run_sds(small_trigrid(), small_decoder(), guidance, colour_targets(16), settings, seed=7,
                    checkpoint_dir=str(tmp_path))
    with safe_open(os.path.join(str(tmp_path), sds.CHECKPOINT_NAME), "pt") as fh:
        assert fh.metadata()["iteration"] == "2"
        assert all(bool(torch.isfinite(fh.get_tensor(k)).all()) for k in fh.keys() if k.startswith("level."))


def test_sds_settings_presets_and_validation():
    paper = sds.SDSSettings.paper()
    assert (paper.iterations, paper.render_resolution, paper.coarse_samples, paper.fine_samples) == (2000, 128, 48, 48)
    assert (paper.encode_resolution, paper.encoder, paper.guidance_scale, paper.t_min, paper.t_max) == \
        (512, "vae", 100.0, 20, 400)
    assert (paper.polar_min_deg, paper.polar_max_deg, paper.radius) == (60.0, 105.0, 2.7)
    assert paper.focal == pytest.approx(6.484789, abs=1e-6)
    assert (paper.betas, paper.eps, paper.weight_decay, paper.max_grad_norm) == ((0.98, 0.92, 0.99), 1e-8, 2e-5, 5.0)
    assert (paper.ema_decay, paper.ema_interval, paper.lambda_entropy) == (0.95, 100, 1e-3)
    assert sds.entropy_weight(paper, 1) == pytest.approx(1e-6) and sds.entropy_weight(paper, 1500) == 1e-3
    draft = sds.SDSSettings.draft()
    assert draft.iterations < paper.iterations and draft.encoder == "taesd"
    assert draft.encode_resolution < paper.encode_resolution and draft.guidance_scale == paper.guidance_scale
    assert sds.SDSSettings.preset("draft", iterations=10).iterations == 10
    r = sds.training_render_settings(paper)
    assert (r.ray_start, r.ray_end, r.coarse_samples, r.fine_samples, r.crop) == (2.35, 3.12, 48, 48, 0.1)
    for bad in (dict(iterations=0), dict(t_min=500, t_max=400), dict(encoder="kl"), dict(encode_resolution=100),
                dict(polar_min_deg=120.0)):
        with pytest.raises(InvalidInputError):
            sds.SDSSettings.paper(**bad)
    with pytest.raises(InvalidInputError, match="preset"):
        sds.SDSSettings.preset("fast")


def _render_error(trigrid, decoder, guidance, conditioning, settings):
    """Mean |render − target| over 8 views (azimuth k·45°, polar 90°), fixed jitter."""
    errors = []
    for azimuth in (-180, -135, -90, -45, 0, 45, 90, 135):
        problem = sds.SDSProblem(trigrid, decoder, guidance, conditioning, settings)
        with torch.no_grad():
            image, _, _ = sds.render_training_view(problem, sds.IterationDraws(azimuth, 90.0, 0),
                                                   torch.Generator().manual_seed(0))
        target = (sds.blended_conditioning(guidance, conditioning, azimuth) + 1) / 2
        errors.append((image - target).abs().mean())
    return float(torch.stack(errors).mean())


def test_sds_converges_to_the_target_of_a_toy_denoiser():
    """The toy denoiser's SDS gradient pulls every view toward a vertical two-colour gradient (realisable by a
    3D object layered along y). After 250 iterations of the paper's optimiser (Adan, per-level LRs, EMA every 10
    iterations here) the EMA tri-grid must render it with mean error < 0.08 from 0.26 at the start. 0.08 is
    below what the best *uniform* colour could reach (0.117 = the gradient's own mean deviation), so passing needs
    the spatial structure; measured 0.045."""
    trigrid, decoder, guidance = small_trigrid(), small_decoder(), TargetGuidance()
    conditioning = gradient_targets(32)
    settings = sds.SDSSettings.paper(iterations=250, render_resolution=32, encode_resolution=32, coarse_samples=16,
                                     fine_samples=16, guidance_scale=1.0, ema_interval=10)
    private = sds.frozen_decoder(decoder)
    before = _render_error(trigrid, private, guidance, conditioning, settings)
    result = sds.run_sds(trigrid, decoder, guidance, conditioning, settings, seed=0)
    after = _render_error(result.trigrid, private, guidance, conditioning, settings)
    assert before > 0.2
    assert after < 0.08, f"render error {before:.3f} → {after:.3f}"
    assert result.losses[-1][1] < result.losses[0][1]
