"""Test-wide setup.

- Triton runs in interpreter mode when there is no GPU: ``TRITON_INTERPRET=1`` must be set before anything imports
  triton (``@triton.jit`` picks interpreter vs compiler at decoration time).
- The repository root is importable (``portrait3d_core``; ``kernels`` is loaded as ``portrait3d_kernels``).
"""
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "scripts")):
    if _path not in sys.path:
        sys.path.insert(0, _path)


def _has_cuda_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    import torch

    return torch.cuda.is_available()


if "TRITON_INTERPRET" not in os.environ and not _has_cuda_gpu():
    os.environ["TRITON_INTERPRET"] = "1"

FIXTURES_ROOT = os.path.join(ROOT, "tests", "fixtures")      # the repository's own copy (see its README)
ORACLE_ENV = "PORTRAIT3D_ORACLE_DIR"


def oracle_dir(name: str = "portrait_gan_oracle") -> str:
    """The oracle folder ``name``: ``tests/fixtures/<name>``, or under ``$PORTRAIT3D_ORACLE_DIR`` when set.

    The override may be the oracle folder itself (it holds ``generator_config.json``) or a folder of oracle folders.
    """
    override = os.environ.get(ORACLE_ENV)
    if not override:
        return os.path.join(FIXTURES_ROOT, name)
    if not os.path.isdir(override):
        raise RuntimeError(f"{ORACLE_ENV}={override!r} is not a folder: point it at an oracle fixture folder or "
                           f"unset it to use tests/fixtures/")
    nested = os.path.join(override, name)
    if os.path.isdir(nested):
        return nested
    if name == "portrait_gan_oracle" and os.path.isfile(os.path.join(override, "generator_config.json")):
        return override
    raise RuntimeError(f"{ORACLE_ENV}={override!r} has no '{name}' folder (and is not that oracle folder itself)")


FIXTURES = oracle_dir()

ARTIFACTS = os.path.join(ROOT, "test-artifacts")
TEST_TRIGRID = "TEST_head_small_trigrid.safetensors"   # levels 8..64: fast to load and render
TEST_DECODER = "TEST_decoder.safetensors"
TEST_GAN_STEM = "TEST_oracle_gan"                          # the reduced oracle generator (random weights), converted
TEST_GAN = TEST_GAN_STEM + ".generator.safetensors"


def write_oracle_generator(directory: str) -> str:
    """The oracle fixtures' reduced generator written in our converted format (as the loader node reads it)."""
    import json

    from safetensors.torch import load_file

    from portrait3d_core.gan.config import GeneratorConfig
    from portrait3d_core.gan.convert import OfficialCheckpoint, write_converted

    with open(os.path.join(FIXTURES, "generator_config.json")) as fh:
        cfg = json.load(fh)
    config = GeneratorConfig.from_oracle_config(cfg)
    source = os.path.join(FIXTURES, "generator_state_dict.safetensors")
    ckpt = OfficialCheckpoint(load_file(source), None, cfg["init_kwargs"], cfg["init_kwargs"]["rendering_kwargs"],
                              config.neural_rendering_resolution, config, "TriPlaneGenerator", None, None, source)
    return write_converted(ckpt, directory, TEST_GAN_STEM, overwrite=True)["generator"]

TINY_SD15 = "TEST_tiny_sd15.safetensors"                  # random-weight SD1.5-shaped checkpoint (tests/tiny_sd15.py)
CACHE_DIR = os.path.join(ROOT, ".cache", "test-models")    # built once per tiny_sd15.py version, never committed


def tiny_sd15_path(vae: str = "taesd") -> str:
    """Build (once) the tiny SD1.5-shaped checkpoint with ComfyUI's own classes; returns its cached path."""
    import hashlib
    import subprocess

    script = os.path.join(ROOT, "tests", "tiny_sd15.py")
    with open(script, "rb") as fh:
        digest = hashlib.sha256(fh.read() + vae.encode()).hexdigest()[:12]
    path = os.path.join(CACHE_DIR, f"tiny_sd15_{vae}_{digest}.safetensors")
    if not os.path.isfile(path):
        python = os.path.join(ROOT, ".venv", "bin", "python")
        subprocess.run([python if os.path.exists(python) else sys.executable, script, "--comfy",
                        os.path.join(ROOT, ".comfyui"), "--out", path, "--vae", vae], check=True,
                       stdout=subprocess.DEVNULL)
    return path


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """One real ComfyUI server (``.comfyui/``, loopback; ``--cpu`` unless torch sees a GPU) for the whole session,
    with small test assets in an
    extra ``portrait3d`` model folder and a ``checkpoints`` folder (see ``tiny_sd15``) given through
    extra_model_paths.yaml."""
    from comfy_client import ComfyServer
    from portrait3d_core.demo_assets import SMALL_RESOLUTIONS, write_demo_assets

    work = tmp_path_factory.mktemp("comfyui")
    models = work / "test_models" / "portrait3d"
    checkpoints = work / "test_models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    write_demo_assets(str(models), SMALL_RESOLUTIONS, trigrid_name=TEST_TRIGRID, decoder_name=TEST_DECODER)
    write_oracle_generator(str(models))
    server = ComfyServer(str(work), extra_model_paths={"portrait3d": str(models),
                                                      "checkpoints": str(checkpoints)}).start()
    server.checkpoints_dir = str(checkpoints)
    try:
        yield server
    finally:
        server.stop()
        os.makedirs(ARTIFACTS, exist_ok=True)
        with open(os.path.join(ARTIFACTS, "comfyui-server.log"), "w") as fh:
            fh.write(server.log_text())


@pytest.fixture(scope="session")
def tiny_sd15(comfy_server) -> str:
    """The tiny SD1.5-shaped checkpoint (TAESD VAE) visible to the test server as ``TEST_tiny_sd15.safetensors``
    (CheckpointLoaderSimple's list is re-read when the folder changes)."""
    target = os.path.join(comfy_server.checkpoints_dir, TINY_SD15)
    if not os.path.exists(target):
        os.symlink(tiny_sd15_path("taesd"), target)
    return TINY_SD15
