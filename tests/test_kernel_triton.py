"""Triton tri-grid sampling (``kernels/trigrid_triton.py``) against the grid_sample reference.

Runs under the Triton interpreter on CPU tensors (``TRITON_INTERPRET=1``, set by conftest without a GPU), on CUDA
tensors otherwise. Forward within 1e-5 absolute; both gradients within 1e-4 of the reference gradient's max abs value.
Tolerances are order-independent: on a GPU the feature gradient is a sum of fp32 atomics whose order varies between
launches, so no test compares two launches' feature gradients bit for bit (except in deterministic mode).

Also here: the launch device guard (``test_triton_device_*``, fake devices), backend selection and fallback
(``test_triton_fallback_*``, every branch of ``resolve_backend``) and the compile-only checks of the compiled code for
NVIDIA targets (``test_triton_compile_*``, no GPU needed).
"""
import json
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

from conftest import FIXTURES
from portrait3d_core._kernels import kernels

from portrait3d_kernels import trigrid_triton as tt  # noqa: E402  (a missing triton is an error, not a skip)
from portrait3d_kernels.trigrid_reference import sample_trigrid_reference  # noqa: E402

DEVICE = torch.device("cpu" if tt.INTERPRETED else "cuda")
FWD_TOL = 1e-5
GRAD_RTOL = 1e-4


def _problem(sizes, batch, m, span=1.3, channels=12, depth=3, dtype=torch.float32, seed=0):
    """Kernel-layout leaf levels [B, 3, H, W, D, C], coords [B, M, 3] in ±span (with exact texel/edge points)."""
    gen = torch.Generator().manual_seed(seed)
    levels = [torch.randn(batch, 3, h, w, depth, channels, generator=gen, dtype=dtype).to(DEVICE).requires_grad_()
              for h, w in sizes]
    coords = (torch.rand(batch, m, 3, generator=gen, dtype=dtype) * 2 - 1) * span
    special = torch.tensor([-1.0, 1.0, 0.0, 1 / 3, -2 / 3, 1.25], dtype=dtype)  # edges, texel centres, outside
    n = min(m, special.numel() ** 2)
    coords[0, :n, 0] = special.repeat_interleave(special.numel())[:n]
    coords[0, :n, 1] = special.repeat(special.numel())[:n]
    return levels, coords.to(DEVICE).requires_grad_()


def _reference(levels, coords, grad):
    """Reference output and gradients (levels in kernel layout, converted with ``from_kernel_layout``)."""
    out = sample_trigrid_reference([kernels.from_kernel_layout(level) for level in levels], coords,
                                   levels[0].shape[4])
    grads = torch.autograd.grad(out, [*levels, coords], grad)
    return out.detach(), list(grads[:-1]), grads[-1]


def _assert_grad_close(got, want):
    """Within GRAD_RTOL of the reference's largest magnitude: independent of the order of atomic additions."""
    scale = want.abs().max().clamp_min(1e-12).item()
    torch.testing.assert_close(got, want, atol=GRAD_RTOL * scale, rtol=0)


CASES = {
    "one_level_non_square": dict(sizes=[(12, 20)], batch=2, m=1500),
    "three_levels": dict(sizes=[(8, 8), (12, 20), (16, 16)], batch=2, m=1500),
    "eight_levels_tiny_and_odd": dict(sizes=[(1, 5), (3, 1), (2, 2), (5, 7), (8, 8), (12, 20), (20, 12), (16, 16)],
                                      batch=1, m=700),
    "generic_channels_depth": dict(sizes=[(6, 9), (10, 4)], batch=3, m=400, channels=5, depth=2),
    "real_pyramid_7_levels": dict(sizes=[(2 ** k, 2 ** k) for k in range(3, 10)], batch=1, m=1000, span=1.05),
    "gpu_block_ragged_tail": dict(sizes=[(8, 8), (12, 20), (16, 16)], batch=1, m=1000, block_m=128),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_triton_trigrid_matches_reference(case):
    spec = dict(CASES[case])
    block_m = spec.pop("block_m", None)
    levels, coords = _problem(**spec)
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(coords.shape[0], coords.shape[1], levels[0].shape[-1], generator=gen).to(DEVICE)
    ref_out, ref_glevels, ref_gcoords = _reference(levels, coords, grad)

    out = tt.forward(levels, coords, block_m=block_m)
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    assert (out - ref_out).abs().max().item() < FWD_TOL
    glevels, gcoords = tt.backward(levels, coords, grad, True, True, block_m=block_m)
    for got, want in zip(glevels, ref_glevels):
        _assert_grad_close(got, want)
    _assert_grad_close(gcoords, ref_gcoords)


def test_triton_kernel_backward_flags():
    """Only the requested gradient is computed; each equals the combined launch's one (the feature gradient up to
    the order of its atomics; the coordinate gradient has none, so exactly)."""
    levels, coords = _problem([(8, 8), (12, 20)], batch=2, m=500)
    grad = torch.randn(2, 500, 12, device=DEVICE)
    both_levels, both_coords = tt.backward(levels, coords, grad, True, True)
    only_levels, none_coords = tt.backward(levels, coords, grad, True, False)
    none_levels, only_coords = tt.backward(levels, coords, grad, False, True)
    assert none_coords is None and none_levels is None
    for a, b in zip(only_levels, both_levels):
        _assert_grad_close(a, b)
    assert torch.equal(only_coords, both_coords)
    assert tt.backward(levels, coords, grad, False, False) == (None, None)


def test_triton_backward_deterministic_mode():
    """``torch.use_deterministic_algorithms(True)``: the feature gradient is a sorted segment reduction (no atomics),
    bitwise reproducible and equal to the reference; the coordinate gradient is the kernel's."""
    levels, coords = _problem([(8, 8), (12, 20), (5, 7)], batch=2, m=700, seed=4)
    grad = torch.randn(2, 700, 12, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    _, ref_glevels, ref_gcoords = _reference(levels, coords, grad)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = tt.backward(levels, coords, grad, True, True)
        second = tt.backward(levels, coords, grad, True, True)
        only_levels, _ = tt.backward(levels, coords, grad, True, False)
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b, c, want in zip(first[0], second[0], only_levels, ref_glevels):
        assert torch.equal(a, b) and torch.equal(a, c)
        _assert_grad_close(a, want)
    assert torch.equal(first[1], second[1])
    _assert_grad_close(first[1], ref_gcoords)


def test_sampling_dispatch_triton_autograd():
    """``sample_trigrid(..., backend="triton")`` on CPU tensors, both layouts, with ``.backward()``."""
    kernel_levels, coords = _problem([(8, 8), (12, 20), (16, 16)], batch=2, m=800, seed=3)
    official = [kernels.from_kernel_layout(level).detach().requires_grad_() for level in kernel_levels]
    grad = torch.randn(2, 800, 12, device=DEVICE)

    ref = sample_trigrid_reference(official, coords, 3)
    ref_grads = torch.autograd.grad(ref, [*official, coords], grad)

    out = kernels.sample_trigrid(official, coords, backend="triton")
    assert (out - ref).abs().max().item() < FWD_TOL
    out.backward(grad)
    for level, want in zip(official, ref_grads[:-1]):
        _assert_grad_close(level.grad, want)
    _assert_grad_close(coords.grad, ref_grads[-1])

    coords.grad = None  # kernel layout, gradient to the levels only
    plain = coords.detach()
    out = kernels.sample_trigrid(kernel_levels, plain, layout="kernel", backend="triton")
    assert (out - ref).abs().max().item() < FWD_TOL
    out.backward(grad)
    want = torch.autograd.grad(sample_trigrid_reference(
        [kernels.from_kernel_layout(level) for level in kernel_levels], plain, 3), kernel_levels, grad)
    for level, w in zip(kernel_levels, want):
        _assert_grad_close(level.grad, w)


def test_trigrid_oracle_fixture():
    """Official ``sample_from_planes`` output (per plane) averaged over planes equals the Triton output."""
    from safetensors.torch import load_file

    data = load_file(os.path.join(FIXTURES, "trigrid_sampling.safetensors"), device=str(DEVICE))
    levels = [kernels.to_kernel_layout(data[f"trigrid.level{i}"], 3) for i in range(3)]
    coords = data["input.points"] * (2.0 / data["input.box_warp"])
    out = tt.forward(levels, coords)
    want = data["sampled_features"].mean(dim=1)
    assert out.shape == want.shape == (2, 300, 12)
    assert (out - want).abs().max().item() < FWD_TOL


def test_triton_kernel_dtypes():
    """fp64 at fp64 precision; fp16/bf16 accumulate in fp32 and return the input dtype."""
    levels, coords = _problem([(8, 8), (12, 20)], batch=2, m=300, dtype=torch.float64)
    grad = torch.randn(2, 300, 12, dtype=torch.float64, device=DEVICE)
    ref_out, ref_glevels, ref_gcoords = _reference(levels, coords, grad)
    assert (tt.forward(levels, coords) - ref_out).abs().max().item() < 1e-12
    glevels, gcoords = tt.backward(levels, coords, grad, True, True)
    assert all((g - r).abs().max().item() < 1e-12 for g, r in zip(glevels, ref_glevels))
    assert (gcoords - ref_gcoords).abs().max().item() < 1e-10

    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
        low = [level.detach().to(dtype) for level in levels]
        low_coords = coords.detach().to(dtype)
        want = tt.forward([level.float() for level in low], low_coords.float())
        out = tt.forward(low, low_coords)
        assert out.dtype == dtype and (out.float() - want).abs().max().item() < tol
        glow, gclow = tt.backward(low, low_coords, grad.to(dtype), True, True)
        assert [g.dtype for g in glow] == [dtype, dtype] and gclow.dtype == dtype


def test_triton_kernel_unaligned_level_views(monkeypatch):
    """A level that is a view at an odd offset (not 16-byte aligned) is copied before its address goes into the
    table (the kernel promises the compiler 16-byte aligned levels); results are unchanged."""
    levels, coords = _problem([(4, 4), (6, 5)], batch=1, m=64)
    storage = torch.zeros(levels[1].numel() + 1, device=DEVICE)
    storage[1:] = levels[1].detach().reshape(-1)
    odd = storage[1:].view(levels[1].shape)
    assert odd.is_contiguous() and odd.data_ptr() % 16 != 0
    tables = []
    real = tt.launch_args
    monkeypatch.setattr(tt, "launch_args", lambda *a, **k: tables.append(real(*a, **k)[1][0].tolist()) or real(*a, **k))
    out = tt.forward([levels[0], odd], coords)
    torch.testing.assert_close(out, tt.forward(levels, coords), atol=0, rtol=0)
    assert all(address % 16 == 0 for address in tables[0])


def test_triton_kernel_empty_and_invalid():
    levels, coords = _problem([(4, 4)], batch=1, m=10)
    assert tt.forward(levels, coords[:, :0]).shape == (1, 0, 12)
    glevels, gcoords = tt.backward(levels, coords[:, :0], torch.zeros(1, 0, 12, device=DEVICE), True, True)
    assert gcoords.shape == (1, 0, 3) and not glevels[0].any()
    with pytest.raises(kernels.TriGridSamplingError, match="kernel layout"):
        tt.forward([torch.zeros(2, 3, 4, 4, 3, 12, device=DEVICE)], coords)  # batch mismatch
    with pytest.raises(kernels.TriGridSamplingError, match="contiguous"):
        tt.forward([torch.zeros(1, 3, 4, 4, 12, 3, device=DEVICE).transpose(4, 5)], coords.detach())



# ------------------------------------------------------------------------------------------ device guard
from portrait3d_kernels import backend as backend_mod  # noqa: E402
from portrait3d_kernels import launch as launch_mod  # noqa: E402
nearest_mod = sys.modules["portrait3d_kernels.nearest_triangle"]  # the module (the package exports the function)


class _FakeCuda:
    """Stands in for ``torch.cuda``'s current-device state: what a launch would see as current."""

    def __init__(self, current=0):
        self.current, self.entered = current, []

    def device(self, device):
        fake = self

        class Guard:
            def __enter__(self):
                self.saved = fake.current
                fake.entered.append(device)
                fake.current = device.index

            def __exit__(self, *exc):
                fake.current = self.saved

        return Guard()


class _RecordingKernel:
    """``kernel[grid](*args)`` that records the current (fake) device at launch time."""

    def __init__(self, cuda):
        self.cuda, self.launches = cuda, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, self.cuda.current, args, kwargs))


def _on(device):
    return types.SimpleNamespace(device=torch.device(device))


def test_triton_device_launch_on_tensors_device(monkeypatch):
    """Tensors on cuda:1 while cuda:0 is current: the launch runs with cuda:1 current (so Triton takes cuda:1 and
    its current stream), and cuda:0 is current again afterwards."""
    cuda = _FakeCuda(current=0)
    monkeypatch.setattr(torch.cuda, "device", cuda.device)
    kernel = _RecordingKernel(cuda)
    launch_mod.launch(kernel, (3, 1), [_on("cuda:1"), _on("cuda:1"), None], "a", BLOCK=4)
    assert kernel.launches == [((3, 1), 1, ("a",), {"BLOCK": 4})]
    assert cuda.entered == [torch.device("cuda", 1)] and cuda.current == 0


def test_triton_device_unindexed_cuda_and_cpu(monkeypatch):
    """``cuda`` without an index means the current device; CPU (interpreter) tensors need no guard."""
    cuda = _FakeCuda(current=2)
    monkeypatch.setattr(torch.cuda, "device", cuda.device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    kernel = _RecordingKernel(cuda)
    launch_mod.launch(kernel, (1,), [_on("cuda")])
    launch_mod.launch(kernel, (1,), [_on("cpu")])
    assert [launch[1] for launch in kernel.launches] == [2, 2] and cuda.entered == [torch.device("cuda", 2)]


def test_triton_device_mixed_devices_refused(monkeypatch):
    cuda = _FakeCuda()
    monkeypatch.setattr(torch.cuda, "device", cuda.device)
    kernel = _RecordingKernel(cuda)
    with pytest.raises(launch_mod.LaunchDeviceError, match="cuda:1.*cuda:0"):
        launch_mod.launch(kernel, (1,), [_on("cuda:1"), _on("cuda:0")])
    with pytest.raises(launch_mod.LaunchDeviceError, match="no tensors"):
        launch_mod.launch(kernel, (1,), [None])
    assert kernel.launches == [] and cuda.entered == []


def test_triton_device_kernels_launch_through_the_guard(monkeypatch):
    """Both Triton kernels launch through ``launch`` with every tensor they touch, including the ones reached only
    through the address table (levels, gradient buffers): all on the points' device, tables listing those tensors."""
    calls = []

    def recording(kernel, grid, tensors, *args, **kwargs):
        calls.append((kernel, list(tensors), args))
        return launch_mod.launch(kernel, grid, tensors, *args, **kwargs)

    monkeypatch.setattr(tt, "launch", recording)
    levels, coords = _problem([(4, 4), (6, 5)], batch=1, m=50)
    tt.forward(levels, coords)
    tt.backward(levels, coords, torch.ones(1, 50, 12, device=DEVICE), True, True)
    assert [c[0] for c in calls] == [tt._trigrid_kernel] * 2
    for _, touched, args in calls:
        assert {t.device for t in touched} == {coords.device}
        assert args[0].tolist() == [level.data_ptr() for level in levels]  # level address table
        assert {level.data_ptr() for level in levels} <= {t.data_ptr() for t in touched}
    grad_table = calls[1][2][1].tolist()
    assert all(p in {t.data_ptr() for t in calls[1][1]} for p in grad_table) and grad_table != calls[1][2][0].tolist()

    from portrait3d_kernels import nearest_triangle_triton as nt

    monkeypatch.setattr(nt, "launch", recording)
    tris = torch.randn(1, 5, 3, 3, device=DEVICE)
    nt.nearest_triangle(torch.randn(1, 7, 3, device=DEVICE), tris)
    assert calls[-1][0] is nt._nearest_kernel and {t.device for t in calls[-1][1]} == {coords.device}


# ------------------------------------------------------------------------------------------ backend selection
CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def fresh_backend(monkeypatch):
    """No PORTRAIT3D_BACKEND, no remembered warnings or Triton decisions (restored afterwards)."""
    monkeypatch.delenv(backend_mod.ENV_BACKEND, raising=False)
    monkeypatch.setattr(backend_mod, "_WARNED", set())
    kernels.TRITON.reset()
    nearest_mod.TRITON.reset()
    yield monkeypatch
    kernels.TRITON.reset()
    nearest_mod.TRITON.reset()


def _gate(monkeypatch, module, reason):
    monkeypatch.setattr(module.TRITON, "usable", lambda device: reason)


NO_TRITON = "triton is not installed or too old (ImportError: No module named 'triton')"
RESOLVE_CASES = {  # id: (env, backend, device, triton reason, numba available, expected result or error pattern)
    "auto_cuda_triton_works": (None, "auto", CUDA0, None, True, "triton"),
    "auto_cuda_triton_missing": (None, "auto", CUDA0, NO_TRITON, True, "reference+warn"),
    "auto_cpu_numba": (None, "auto", torch.device("cpu"), None, True, "cpu"),
    "auto_cpu_no_numba": (None, "auto", torch.device("cpu"), None, False, "reference+warn"),
    "explicit_reference": (None, "reference", CUDA0, NO_TRITON, True, "reference"),
    "explicit_triton_works": (None, "triton", CUDA0, None, True, "triton"),
    "explicit_triton_broken": (None, "triton", CUDA0, "a compile failed", True, "error:cannot run: a compile failed"),
    "explicit_cpu_on_cuda": (None, "cpu", CUDA0, None, True, "error:needs CPU tensors"),
    "explicit_cpu_no_numba": (None, "cpu", torch.device("cpu"), None, False, "error:needs numba"),
    "unknown_backend": (None, "fast", CUDA0, None, True, "error:unknown backend 'fast'"),
    "env_forces_reference": ("reference", "auto", CUDA0, None, True, "reference"),
    "env_forces_triton_broken": ("triton", "auto", CUDA0, NO_TRITON, True, "error:forced by PORTRAIT3D_BACKEND"),
    "env_forces_cpu_on_cuda": ("cpu", "auto", CUDA0, None, True, "error:forced by PORTRAIT3D_BACKEND"),
    "env_auto_is_auto": ("auto", "auto", torch.device("cpu"), None, True, "cpu"),
    "env_invalid": ("gpu", "auto", CUDA0, None, True, "error:PORTRAIT3D_BACKEND='gpu' is not a backend"),
    "env_ignored_for_explicit": ("cpu", "reference", CUDA0, None, True, "reference"),
}


@pytest.mark.parametrize("case", RESOLVE_CASES, ids=list(RESOLVE_CASES))
@pytest.mark.parametrize("which", ["trigrid", "nearest"])
def test_triton_fallback_resolve_backend_branches(case, which, fresh_backend):
    env, backend, device, reason, numba, expected = RESOLVE_CASES[case]
    module = kernels if which == "trigrid" else nearest_mod
    if env is not None:
        fresh_backend.setenv(backend_mod.ENV_BACKEND, env)
    _gate(fresh_backend, module, reason)
    cpu_module = kernels.trigrid_cpu if which == "trigrid" else nearest_mod.nearest_triangle_cpu
    fresh_backend.setattr(cpu_module, "AVAILABLE", numba)
    error = kernels.TriGridSamplingError if which == "trigrid" else nearest_mod.NearestTriangleError
    if expected.startswith("error:"):
        with pytest.raises(error, match=expected[6:].replace("(", r"\(").replace(")", r"\)")):
            module.resolve_backend(backend, device)
        return
    name, _, warn = expected.partition("+")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert module.resolve_backend(backend, device) == name
        assert module.resolve_backend(backend, device) == name  # a second call: no second warning
    fallbacks = [w for w in caught if issubclass(w.category, backend_mod.BackendFallbackWarning)]
    assert len(fallbacks) == (1 if warn else 0), [str(w.message) for w in fallbacks]


def test_triton_fallback_warning_names_cause_fix_and_cost(fresh_backend):
    _gate(fresh_backend, kernels, NO_TRITON)
    with pytest.warns(backend_mod.BackendFallbackWarning) as caught:
        assert kernels.resolve_backend("auto", CUDA0) == "reference"
    text = str(caught[0].message)
    for part in (NO_TRITON, 'pip install "triton>=3.4"', "slower", "PORTRAIT3D_BACKEND=reference", "torch >= 2.8"):
        assert part in text


def test_triton_fallback_gate_checks_once():
    """The gate imports and probes once per device; the reason names what failed and what Triton needs."""
    probes = []

    def probe(module, device):
        probes.append(device)
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    gate = backend_mod.TritonGate("x", lambda: object(), probe)
    first = gate.usable(CUDA0)
    assert first == gate.usable(CUDA0) and len(probes) == 1
    assert "C compiler" in first and "RuntimeError" in first and "cuda:0" in first
    assert gate.usable(torch.device("cuda", 1)) is not None and len(probes) == 2

    def missing():
        raise ImportError("triton 3.2.0 is older than 3.4")

    assert "not installed or too old" in backend_mod.TritonGate("x", missing, probe).usable(CUDA0)
    ok = backend_mod.TritonGate("x", lambda: object(), lambda module, device: None)
    assert ok.usable(CUDA0) is None
    assert "ptxas" in ok.failed(CUDA0, RuntimeError("ptxas fatal")) and ok.usable(CUDA0) is not None


def test_triton_fallback_probe_runs_the_real_kernels(fresh_backend):
    """The probe compiles and launches forward + backward (here in the interpreter) and checks the answer."""
    kernels._probe_triton(tt, DEVICE)
    from portrait3d_kernels import nearest_triangle_triton as nt

    nearest_mod._probe_triton(nt, DEVICE)
    broken = types.SimpleNamespace(forward=lambda levels, coords: torch.zeros(1, 16, 12, device=DEVICE),
                                   backward=lambda *a: (None, None))
    with pytest.raises(RuntimeError, match="disagrees"):
        kernels._probe_triton(broken, DEVICE)


class _FailingTriton:
    """A Triton module whose launches fail the way a missing toolchain makes them fail."""

    def __init__(self, fail_forward=True):
        self.fail_forward = fail_forward

    def forward(self, levels, coords):
        if self.fail_forward:
            raise RuntimeError("Failed to find C compiler")
        return tt.forward(levels, coords)

    def backward(self, *args):
        raise RuntimeError("Failed to find C compiler")


@pytest.mark.parametrize("fail_forward", [True, False], ids=["forward_fails", "backward_fails"])
def test_triton_fallback_failed_launch_uses_reference(fail_forward, fresh_backend):
    """``auto`` picked Triton, its launch fails: one warning, the reference's answer (values and gradients)."""
    fresh_backend.setattr(kernels, "TRITON_DEVICE_TYPES", ("cuda", DEVICE.type))
    fresh_backend.setattr(kernels, "_load_triton", lambda: _FailingTriton(fail_forward))
    _gate_ok = {"reason": None}
    fresh_backend.setattr(kernels.TRITON, "_status", {})
    fresh_backend.setattr(kernels.TRITON, "_probe", lambda module, device: _gate_ok["reason"])
    levels, coords = _problem([(6, 6), (8, 5)], batch=1, m=300)
    grad = torch.randn(1, 300, 12, device=DEVICE)
    ref_out, ref_glevels, ref_gcoords = _reference(levels, coords, grad)
    with pytest.warns(backend_mod.BackendFallbackWarning, match="C compiler") as caught:
        out = kernels.sample_trigrid(levels, coords, layout="kernel")
        out.backward(grad)
    assert len([w for w in caught if issubclass(w.category, backend_mod.BackendFallbackWarning)]) == 1
    torch.testing.assert_close(out.detach(), ref_out, atol=FWD_TOL, rtol=0)
    for level, want in zip(levels, ref_glevels):
        _assert_grad_close(level.grad, want)
    _assert_grad_close(coords.grad, ref_gcoords)
    assert kernels.TRITON.usable(DEVICE) is not None  # remembered: later calls go straight to the reference


def test_triton_fallback_forced_backend_errors_instead(fresh_backend):
    """With ``PORTRAIT3D_BACKEND=triton`` (or ``backend="triton"``) a failing launch raises; nothing falls back."""
    fresh_backend.setenv(backend_mod.ENV_BACKEND, "triton")
    fresh_backend.setattr(kernels, "_load_triton", lambda: _FailingTriton())
    levels, coords = _problem([(6, 6)], batch=1, m=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error", backend_mod.BackendFallbackWarning)
        with pytest.raises(RuntimeError, match="C compiler"):
            kernels.sample_trigrid(levels, coords, layout="kernel")
        fresh_backend.delenv(backend_mod.ENV_BACKEND)
        with pytest.raises(RuntimeError, match="C compiler"):
            kernels.sample_trigrid(levels, coords, layout="kernel", backend="triton")


def test_triton_fallback_backend_report(fresh_backend):
    _gate(fresh_backend, kernels, NO_TRITON)
    _gate(fresh_backend, nearest_mod, NO_TRITON)
    with pytest.warns(backend_mod.BackendFallbackWarning):
        report = kernels.backend_report(CUDA0)
    assert report["device"] == "cuda:0" and report["trigrid_sampling"] == "reference"
    assert report["nearest_triangle"] == "reference" and report["reason"] == NO_TRITON
    cpu = kernels.backend_report(torch.device("cpu"))
    assert cpu["trigrid_sampling"] == "cpu" and cpu["reason"] is None and cpu["forced_by_env"] is None


# ------------------------------------------------------------------------------------------ compile-only
# Every runtime specialisation (dtype x variant x M mod 16) compiled for a covering set of targets: all variants in
# fp32 on sm_80 and sm_90 (the sm_8x and sm_9x+ code generators), the fp16 / bf16 variants on sm_80 and sm_90, forward
# and two-gradient backward on sm_86, sm_89 and sm_120 (+ the coordinate gradient on sm_86 and sm_120, where ptxas
# parks a value in local memory). ``scripts/triton_compiled_stats.py --all`` compiles the full
# product (5 targets x 3 dtypes x 4 variants x 2, ~6 minutes).
VARIANTS = ("forward", "backward", "backward_levels", "backward_coords")
COMPILE_SET = ([(arch, "float32", v, 1000) for arch in (80, 90) for v in VARIANTS]
               + [(80, "float32", v, 1024) for v in VARIANTS]  # M % 16 == 0 (the --all run: no figure changes)
               + [(arch, dt, v, 1000) for arch in (80, 90) for dt in ("float16", "bfloat16") for v in VARIANTS]
               + [(arch, "float32", v, 1000) for arch in (86, 89, 120) for v in ("forward", "backward")]
               + [(arch, "float32", "backward_coords", 1000) for arch in (86, 120)])
FORWARD_MAX_REGISTERS = 96     # measured 40-79; the previous [BLOCK_M, 16] tile design took 90-116
BACKWARD_MAX_REGISTERS = 168   # measured 50-166 (166: sm_86/89 two-gradient backward; sm_90 capped at 128)
_COMPILE_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import triton_compiled_stats as stats
out = []
for arch, dtype, variant, m in json.loads(sys.argv[2]):
    try:
        kernel, kwargs = stats.compile_variant(arch, dtype, variant, m)
    except Exception as exc:
        out.append({"key": [arch, dtype, variant, m], "error": f"{type(exc).__name__}: {exc}"[:2000]})
        continue
    row = stats.analyse(kernel, kwargs["BLOCK_M"], kwargs["num_warps"])
    ptx = kernel.asm["ptx"]
    row.update(key=[arch, dtype, variant, m], cubin_bytes=len(kernel.asm["cubin"]), ptx_target=ptx.split(".target")[1].split()[0],
               ptx_ld_global="ld.global" in ptx, ptx_vector_loads="ld.global.v4" in ptx or "ld.global.nc.v4" in ptx
               or "ld.global.v2" in ptx or "ld.global.nc.v2" in ptx)
    out.append(row)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Results of compiling COMPILE_SET in a fresh process (no interpreter), keyed by (arch, dtype, variant, m)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path_factory.mktemp("triton-cache")), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, os.path.join(root, "scripts"), json.dumps(COMPILE_SET)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    from conftest import ARTIFACTS

    os.makedirs(ARTIFACTS, exist_ok=True)
    with open(os.path.join(ARTIFACTS, "triton_compiled_stats.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    return {tuple(row["key"]): row for row in rows}


def test_triton_compile_every_runtime_specialisation(compiled):
    """Every (target, dtype, variant, M mod 16) of COMPILE_SET compiles to a cubin for its own target."""
    errors = {k: r["error"] for k, r in compiled.items() if "error" in r}
    unsupported = {k for k, e in errors.items() if k[0] not in (80, 90) and ("sm_" in e or "arch" in e.lower())}
    assert set(errors) == unsupported, errors  # only a target newer than this Triton may be missing
    assert set(compiled) == {tuple(k) for k in COMPILE_SET}
    for (arch, _, variant, _), row in compiled.items():
        if "error" in row:
            continue
        assert row["cubin_bytes"] > 0 and row["ptx_ld_global"]
        assert row["ptx_target"].startswith(f"sm_{arch}")
    covered = {(d, v, m % 16 == 0) for (a, d, v, m) in compiled if a == 80}
    assert {(d, v) for d, v, _ in covered} == {(d, v) for d in ("float32", "float16", "bfloat16") for v in VARIANTS}
    assert {div for _, _, div in covered} == {True, False}


def _ok(compiled):
    return {k: r for k, r in compiled.items() if "error" not in r}


MAX_SPILL_INSTRUCTIONS = 2  # ptxas parks one value (the point index) in local memory across the level loop on
#                              sm_120 forward and sm_90 fp16/bf16 coordinate gradient: 1 store + 1 load per thread


def test_triton_compile_no_spills_and_register_bounds(compiled):
    """No local-memory traffic per level or plane (no spill inside a loop) in any variant; at most one value parked
    outside the loops; registers within the stated bounds."""
    for (arch, dtype, variant, m), row in _ok(compiled).items():
        assert row["spill_instructions_in_loops"] == 0, (arch, dtype, variant, m, row)
        assert row["spill_instructions"] <= MAX_SPILL_INSTRUCTIONS, (arch, dtype, variant, m, row)
        bound = FORWARD_MAX_REGISTERS if variant == "forward" else BACKWARD_MAX_REGISTERS
        assert row["registers"] <= bound, (arch, dtype, variant, m, row["registers"])


def test_triton_compile_one_point_per_thread(compiled):
    """A thread owns a point: no repeated index maths across threads; per-point instructions well under the previous
    design's (459 forward / 3451 backward warp instructions per point on sm_80, fp32, 7 levels)."""
    for (arch, dtype, variant, m), row in _ok(compiled).items():
        assert row["threads_per_point"] == 1
        if arch == 80 and dtype == "float32":
            limit = {"forward": 300, "backward": 1200, "backward_levels": 900, "backward_coords": 400}[variant]
            assert row["warp_instructions_per_point"] < limit, (variant, row["warp_instructions_per_point"])


def test_triton_compile_atomics(compiled):
    """Feature-gradient atomics: 8 corners x 3 planes x 7 levels per point, 12 channels each: 3 vector (v4 fp32)
    atomics per corner on sm_90+, 12 scalar ones on sm_8x; none in the forward or the coordinate gradient."""
    corners = 8 * 3 * 7
    for (arch, dtype, variant, m), row in _ok(compiled).items():
        if variant in ("forward", "backward_coords"):
            assert row["atomics_per_point"] == 0 and row["atomic_kinds"] == []
            continue
        if arch >= 90:
            assert row["atomic_width"] == 4 and all("F32x4" in k for k in row["atomic_kinds"]), row["atomic_kinds"]
            assert row["atomics_per_point"] == 3 * corners
        else:
            assert row["atomic_width"] == 1 and all(".F32" in k for k in row["atomic_kinds"]), row["atomic_kinds"]
            assert row["atomics_per_point"] == 12 * corners


def test_triton_fallback_server_reports_device_and_backend(comfy_server):
    """The real server answers ``GET /portrait3d/backend`` with its compute device and sampling backends (what the
    quickstart prints); it runs on the GPU exactly when torch sees one (``--cpu`` otherwise)."""
    report = comfy_server.backend()
    assert report["device"].startswith("cuda" if torch.cuda.is_available() else "cpu")
    assert comfy_server.cpu == (not torch.cuda.is_available())
    assert report["trigrid_sampling"] in ("triton", "cpu", "reference")
    assert report["nearest_triangle"] in ("triton", "cpu", "reference")
    if report["device"] == "cpu":
        assert report["trigrid_sampling"] == "cpu" and report["reason"] is None
    assert "tri-grid sampling backend" in comfy_server.log_text()
