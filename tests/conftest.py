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

FIXTURES = os.environ.get("PORTRAIT3D_ORACLE_DIR",
                          os.path.join(ROOT, "..", "shared", "fixtures", "portrait_gan_oracle"))

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

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """One real ComfyUI server (``.comfyui/``, loopback, --cpu) for the whole session, with small test assets in an
    extra ``portrait3d`` model folder given through extra_model_paths.yaml."""
    from comfy_client import ComfyServer
    from portrait3d_core.demo_assets import SMALL_RESOLUTIONS, write_demo_assets

    work = tmp_path_factory.mktemp("comfyui")
    models = work / "test_models" / "portrait3d"
    write_demo_assets(str(models), SMALL_RESOLUTIONS, trigrid_name=TEST_TRIGRID, decoder_name=TEST_DECODER)
    write_oracle_generator(str(models))
    server = ComfyServer(str(work), extra_model_paths={"portrait3d": str(models)}).start()
    try:
        yield server
    finally:
        server.stop()
        os.makedirs(ARTIFACTS, exist_ok=True)
        with open(os.path.join(ARTIFACTS, "comfyui-server.log"), "w") as fh:
            fh.write(server.log_text())
