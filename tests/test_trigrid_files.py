"""Tri-grid and decoder files: official formats (read safely), our safetensors format, clear errors."""
import io
import os
import pickle
import zipfile

import pytest
import torch
import torch.serialization

from portrait3d_core.checkpoints import CheckpointError, load_pickle
from portrait3d_core.decoder import DECODER_KEYS, Decoder, DecoderConfig, load_decoder
from portrait3d_core.demo_assets import demo_decoder
from portrait3d_core.trigrid import TriGrid, load_trigrid, read_metadata

RES = (8, 16, 32)


def _official_state(batch=1, num_ws=14, w_dim=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {f"trigrids_{r}": torch.randn(batch, 3, 36, r, r, generator=g) for r in RES}
    state["ws"] = torch.randn(batch, num_ws, w_dim, generator=g)
    return state


def _pickle_as_cuda(obj, path, protocol=4):
    """Plain ``pickle.dump`` as the official run_trigrid_gen does, with storages tagged ``cuda:0``."""
    original = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:0"
    try:
        with open(path, "wb") as fh:
            pickle.dump(obj, fh, protocol=protocol)
    finally:
        torch.serialization.location_tag = original


def _assert_same(trigrid, state):
    assert trigrid.resolutions == [(r, r) for r in RES]
    for level, r in zip(trigrid.levels, RES):
        assert torch.equal(level, state[f"trigrids_{r}"])
    assert torch.equal(trigrid.ws, state["ws"])


@pytest.mark.parametrize("protocol", [2, 4])
def test_trigrid_reads_official_pickle_with_cuda_storages(tmp_path, protocol):
    state = _official_state()
    state["ws"].requires_grad_(True)
    path = tmp_path / "trigrid.pkl"
    _pickle_as_cuda(state, path, protocol)
    assert b"cuda:0" in path.read_bytes()
    trigrid = load_trigrid(str(path))
    _assert_same(trigrid, {k: v.detach() for k, v in state.items()})
    assert trigrid.device.type == "cpu"


def test_trigrid_reads_official_torch_save_formats(tmp_path):
    state = _official_state()
    gallery = tmp_path / "007_pyramid_trigrid.pth"
    torch.save({"model": state}, gallery)
    _assert_same(load_trigrid(str(gallery)), state)
    # df.pth: SDS checkpoint with extra entries (stats with numpy floats, decoder tensors under model.*).
    import numpy as np

    df_state = dict(state)
    df_state.update({f"model.{k}": v for k, v in demo_decoder().state_dict().items()})
    df = tmp_path / "df.pth"
    torch.save({"epoch": 20, "global_step": 2000, "stats": {"loss": [np.float64(0.5)], "best_result": None},
                "model": df_state}, df)
    _assert_same(load_trigrid(str(df)), state)
    decoder = load_decoder(str(df))
    assert torch.equal(decoder.torgb.bias, demo_decoder().torgb.bias)


def test_trigrid_safetensors_roundtrip_keeps_names_and_metadata(tmp_path):
    import json

    state = _official_state()
    trigrid = TriGrid([state[f"trigrids_{r}"] for r in RES], state["ws"], 0.7,
                      {"description": "a knight", "source": "x", "workflow": "{\"old\": 1}"})
    workflow = {"nodes": [{"id": 1, "type": "Portrait3D_SaveTriGrid"}], "links": []}
    path = trigrid.save(str(tmp_path / "knight.safetensors"),
                        provenance={"prompt": json.dumps({"1": {"class_type": "X"}}), "workflow": json.dumps(workflow)})
    meta = read_metadata(path)
    assert meta["format"] == "portrait3d-trigrid" and meta["description"] == "a knight"
    assert float(meta["box_warp"]) == 0.7
    assert json.loads(meta["workflow"]) == workflow and json.loads(meta["prompt"]) == {"1": {"class_type": "X"}}
    from safetensors.torch import load_file

    assert set(load_file(path)) == {"trigrids_8", "trigrids_16", "trigrids_32", "ws"}
    again = load_trigrid(path)
    _assert_same(again, state)
    assert again.meta["description"] == "a knight" and json.loads(again.meta["workflow"]) == workflow


def test_trigrid_files_with_the_text_under_prompt_still_load_it_as_description(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "old.safetensors")
    save_file({"trigrids_8": torch.zeros(1, 3, 36, 8, 8)}, path,
              metadata={"format": "portrait3d-trigrid", "format_version": "1", "prompt": "a knight"})
    meta = load_trigrid(path).meta
    assert meta["description"] == "a knight" and "prompt" not in meta


def test_trigrid_select_narrows_per_item_seeds():
    batch = TriGrid([torch.zeros(2, 3, 36, 8, 8)], meta={"seed": "3,4", "source": "gan"})
    assert [batch.select(i).meta["seed"] for i in range(2)] == ["3", "4"]
    assert batch.select(1).meta["source"] == "gan"


def test_trigrid_save_never_overwrites(tmp_path):
    trigrid = TriGrid([torch.zeros(1, 3, 36, 8, 8)])
    path = str(tmp_path / "t.safetensors")
    trigrid.save(path)
    before = open(path, "rb").read()
    with pytest.raises(FileExistsError):
        TriGrid([torch.ones(1, 3, 36, 8, 8)]).save(path)
    assert open(path, "rb").read() == before
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp")] == []


def test_trigrid_non_square_levels_roundtrip(tmp_path):
    levels = [torch.randn(2, 3, 36, 12, 20), torch.randn(2, 3, 36, 8, 8)]
    path = TriGrid(levels).save(str(tmp_path / "ns.safetensors"))
    again = load_trigrid(path)
    assert again.resolutions == [(8, 8), (12, 20)]         # ordered by size
    assert torch.equal(again.levels[1], levels[0])


# ------------------------------------------------------------------------------------------------ bad files

def test_trigrid_rejects_wrong_truncated_and_foreign_files(tmp_path):
    cases = {}
    cases["missing.pth"] = (None, "not found")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    cases["empty.pth"] = (empty, "empty")
    good = tmp_path / "good.pkl"
    _pickle_as_cuda(_official_state(), good)
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    cases["truncated.pkl"] = (truncated, "truncated or corrupted")
    decoder_file = tmp_path / "decoder_512.ckpt"
    torch.save({"params": {"z_dim": 512}, "state_dict": demo_decoder().state_dict()}, decoder_file)
    cases["decoder_512.ckpt"] = (decoder_file, "not a pyramid tri-grid file")
    text = tmp_path / "notes.pth"
    text.write_text("hello, this is not a checkpoint")
    cases["notes.pth"] = (text, "not a readable pickle")
    bad_shape = tmp_path / "bad_shape.pth"
    torch.save({"model": {"trigrids_8": torch.zeros(1, 3, 32, 8, 8)}}, bad_shape)
    cases["bad_shape.pth"] = (bad_shape, r"expected \[B, 3, 36, R, R\]")
    nan = tmp_path / "nan.pth"
    torch.save({"model": {"trigrids_8": torch.full((1, 3, 36, 8, 8), float("nan"))}}, nan)
    cases["nan.pth"] = (nan, "NaN or inf")
    zip_junk = tmp_path / "junk.pth"
    with zipfile.ZipFile(zip_junk, "w") as zf:
        zf.writestr("archive/data.pkl", b"garbage")
    cases["junk.pth"] = (zip_junk, "could not be read safely")
    for name, (path, message) in cases.items():
        target = str(path) if path is not None else str(tmp_path / name)
        with pytest.raises(CheckpointError, match=message) as info:
            load_trigrid(target)
        assert os.path.basename(target) in str(info.value)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_trigrid_pickle_reaching_os_system_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as fh:
        pickle.dump({"trigrids_8": torch.zeros(1, 3, 36, 8, 8), "payload": _Evil()}, fh)
    with pytest.raises(CheckpointError, match="refused"):
        load_trigrid(str(path))
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    with pytest.raises(CheckpointError, match="posix.system|os.system"):
        load_pickle(str(path))


def test_trigrid_torch_zip_with_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": _Evil()}}, path)
    with pytest.raises(CheckpointError, match="could not be read safely"):
        load_trigrid(str(path))
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


# ------------------------------------------------------------------------------------------------ decoder

def test_trigrid_decoder_reads_official_ckpt_strictly(tmp_path):
    ref = Decoder(DecoderConfig())
    path = tmp_path / "decoder_512.ckpt"
    torch.save({"params": {"z_dim": 512, "c_dim": 25, "rendering_kwargs": {"box_warp": 0.7}},
                "state_dict": ref.state_dict()}, path)
    loaded = load_decoder(str(path))
    assert set(loaded.state_dict()) == set(DECODER_KEYS)
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_trigrid_decoder_rejects_wrong_files(tmp_path):
    tri = tmp_path / "trigrid.pth"
    torch.save({"model": _official_state()}, tri)
    with pytest.raises(CheckpointError, match="tri-grid file, not a decoder"):
        load_decoder(str(tri))
    partial = tmp_path / "partial.ckpt"
    sd = Decoder().state_dict()
    sd.pop("torgb.bias")
    torch.save({"state_dict": sd}, partial)
    with pytest.raises(CheckpointError, match="partial.ckpt"):
        load_decoder(str(partial))
    wrong_shape = tmp_path / "wrong.ckpt"
    sd = Decoder().state_dict()
    sd["decoder.net.2.weight"] = torch.zeros(33, 31)
    torch.save({"state_dict": sd}, wrong_shape)
    with pytest.raises(CheckpointError, match="wrong.ckpt"):
        load_decoder(str(wrong_shape))


def test_trigrid_invalid_construction_messages():
    with pytest.raises(ValueError, match="expected \\[B, 3, 36, H, W\\]"):
        TriGrid([torch.zeros(3, 36, 8, 8)])
    with pytest.raises(ValueError, match="batch"):
        TriGrid([torch.zeros(1, 3, 36, 8, 8), torch.zeros(2, 3, 36, 16, 16)])
    with pytest.raises(ValueError, match="ws must be"):
        TriGrid([torch.zeros(1, 3, 36, 8, 8)], ws=torch.zeros(14, 512))
