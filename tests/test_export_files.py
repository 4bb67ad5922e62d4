"""Mesh files: GLB (textured / vertex colours) read back with trimesh and pygltflib, OBJ + MTL + PNG, PLY, STL, and
the official MRC density volume (header, flip, border, orientation)."""
import io
import json
import os

import numpy as np
import pytest
import torch

from portrait3d_core import mesh as M, mesh_export as E
from portrait3d_core.demo_assets import Ellipsoid, analytic_trigrid, demo_decoder, linear_colour, linear_colour_trigrid

CENTRE = (0.0, 0.05, 0.0)
RES, TEX = 64, 256


@pytest.fixture(scope="module")
def sphere():
    tg = linear_colour_trigrid([Ellipsoid(CENTRE, (0.15,) * 3)], (32, 64), centre=CENTRE)
    tg.meta["description"] = "a test sphere"
    return tg, demo_decoder(n_shapes=1)


def _expected(vertices):
    return linear_colour(torch.from_numpy(np.asarray(vertices, np.float64)), CENTRE).numpy()


def _sample_texture(image: np.ndarray, uv_gltf: np.ndarray) -> np.ndarray:
    """Bilinear lookup with glTF UVs (origin top-left) → [N, C] float in [0, 1]."""
    h, w = image.shape[:2]
    x = np.clip(uv_gltf[:, 0] * w - 0.5, 0, w - 1)
    y = np.clip(uv_gltf[:, 1] * h - 0.5, 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    ax, ay = (x - x0)[:, None], (y - y0)[:, None]
    img = image.astype(np.float64) / 255.0
    top = img[y0, x0] * (1 - ax) + img[y0, x1] * ax
    bottom = img[y1, x0] * (1 - ax) + img[y1, x1] * ax
    return top * (1 - ay) + bottom * ay


def _gltf_array(gltf, accessor_index):
    """Read an accessor of a binary glTF into numpy (tightly packed buffer views, as trimesh writes them)."""
    acc = gltf.accessors[accessor_index]
    view = gltf.bufferViews[acc.bufferView]
    blob = gltf.binary_blob()
    dtype = {5121: np.uint8, 5123: np.uint16, 5125: np.uint32, 5126: np.float32}[acc.componentType]
    comps = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}[acc.type]
    start = (view.byteOffset or 0) + (acc.byteOffset or 0)
    return np.frombuffer(blob, dtype=dtype, count=acc.count * comps, offset=start).reshape(acc.count, comps)


def test_textured_glb(sphere, tmp_path):
    import pygltflib
    import trimesh
    from PIL import Image

    tg, dec = sphere
    res = E.export_mesh(tg, dec, str(tmp_path), "mesh/portrait", "glb", resolution=RES, texture_size=TEX,
                        colour="texture", metadata={"seed": 7})
    assert os.path.basename(res.path) == "portrait_00001_.glb" and os.path.isfile(res.path)
    assert res.stats["watertight"] and res.stats["euler"] == 2 and res.stats["texture_size"] == TEX

    gltf = pygltflib.GLTF2().load(res.path)
    prim = gltf.meshes[0].primitives[0]
    assert prim.attributes.TEXCOORD_0 is not None and prim.attributes.NORMAL is not None
    assert prim.attributes.COLOR_0 is None
    material = gltf.materials[prim.material]
    pbr = material.pbrMetallicRoughness
    assert pbr.metallicFactor == 0.0 and pbr.roughnessFactor == 1.0 and pbr.baseColorTexture is not None
    image = gltf.images[gltf.textures[pbr.baseColorTexture.index].source]
    assert image.mimeType == "image/png"
    view = gltf.bufferViews[image.bufferView]
    png = gltf.binary_blob()[view.byteOffset or 0:(view.byteOffset or 0) + view.byteLength]
    texture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert texture.shape == (TEX, TEX, 3)
    extras = gltf.scenes[gltf.scene].extras["portrait3d"]
    assert extras["description"] == "a test sphere" and extras["seed"] == 7
    assert extras["settings"]["resolution"] == RES and extras["settings"]["colour"] == "texture"
    assert extras["units"] == "metres"

    # the texture seen through the file's own UVs reproduces the known colour field at the vertices
    positions = _gltf_array(gltf, prim.attributes.POSITION)
    uv = _gltf_array(gltf, prim.attributes.TEXCOORD_0)
    err = np.abs(_sample_texture(texture, uv) - _expected(positions))
    assert np.percentile(err, 99) < 0.03 and err.mean() < 0.01

    scene = trimesh.load(res.path)
    assert scene.metadata["portrait3d"]["description"] == "a test sphere"
    geom = next(iter(scene.geometry.values()))
    assert geom.visual.kind == "texture" and geom.visual.uv.shape == (len(geom.vertices), 2)
    assert geom.visual.material.baseColorTexture.size == (TEX, TEX)
    merged = geom.copy()
    merged.merge_vertices(merge_tex=True, merge_norm=True)
    assert merged.is_watertight


def test_vertex_colour_glb_and_never_overwrite(sphere, tmp_path):
    import pygltflib
    import trimesh

    tg, dec = sphere
    first = E.export_mesh(tg, dec, str(tmp_path), "portrait", "glb", resolution=RES, colour="vertex")
    second = E.export_mesh(tg, dec, str(tmp_path), "portrait", "glb", resolution=RES, colour="vertex")
    assert first.path != second.path and os.path.basename(second.path) == "portrait_00002_.glb"
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp")] == []

    gltf = pygltflib.GLTF2().load(first.path)
    prim = gltf.meshes[0].primitives[0]
    assert prim.attributes.COLOR_0 is not None and prim.attributes.TEXCOORD_0 is None
    assert not gltf.textures and not gltf.images
    pbr = gltf.materials[prim.material].pbrMetallicRoughness
    assert pbr.metallicFactor == 0.0 and pbr.baseColorTexture is None
    colours = _gltf_array(gltf, prim.attributes.COLOR_0)[:, :3] / 255.0
    positions = _gltf_array(gltf, prim.attributes.POSITION)
    assert np.abs(colours - _expected(positions)).max() < 0.01

    # trimesh keeps COLOR_0 beside the (matte, untextured) material as a vertex attribute …
    mesh = next(iter(trimesh.load(first.path).geometry.values()))
    assert mesh.is_watertight and mesh.euler_number == 2
    colours = np.asarray(mesh.visual.vertex_attributes["color"])[:, :3] / 255.0
    assert np.abs(colours - _expected(mesh.vertices)).max() < 0.01
    # … and as plain vertex colours when materials are skipped
    mesh = trimesh.load(first.path, force="mesh", skip_materials=True)
    assert mesh.visual.kind == "vertex"
    assert np.abs(mesh.visual.vertex_colors[:, :3] / 255.0 - _expected(mesh.vertices)).max() < 0.01


def test_obj_textured_and_vertex(sphere, tmp_path):
    import trimesh

    tg, dec = sphere
    res = E.export_mesh(tg, dec, str(tmp_path), "portrait", "obj", resolution=RES, texture_size=TEX)
    names = sorted(os.path.basename(p) for p in res.files)
    assert names == ["portrait_00001_.mtl", "portrait_00001_.obj", "portrait_00001_.png"]
    text = open(res.path).read()
    assert "mtllib portrait_00001_.mtl" in text and "# description:" in text
    assert "map_Kd portrait_00001_.png" in open(res.files[0][:-4] + ".mtl").read()
    loaded = trimesh.load(res.path, force="mesh")
    assert loaded.visual.kind == "texture" and loaded.visual.material.image.size == (TEX, TEX)
    assert len(loaded.faces) == res.mesh.num_faces

    plain = E.export_mesh(tg, dec, str(tmp_path), "portrait", "obj", resolution=RES, colour="vertex")
    assert os.path.basename(plain.path) == "portrait_00002_.obj" and plain.files == [plain.path]
    loaded = trimesh.load(plain.path, force="mesh", process=False)
    assert loaded.visual.kind == "vertex"
    colours = loaded.visual.vertex_colors[:, :3] / 255.0
    assert np.abs(colours - _expected(loaded.vertices)).max() < 0.01


def test_ply_and_stl(sphere, tmp_path):
    import trimesh

    tg, dec = sphere
    ply = E.export_mesh(tg, dec, str(tmp_path), "portrait", "ply", resolution=RES)   # texture → vertex colours
    mesh = trimesh.load(ply.path, process=False)
    assert mesh.is_watertight and len(mesh.faces) == ply.mesh.num_faces
    assert np.abs(mesh.visual.vertex_colors[:, :3] / 255.0 - _expected(mesh.vertices)).max() < 0.01
    stl = E.export_mesh(tg, dec, str(tmp_path), "portrait", "stl", resolution=RES)
    mesh = trimesh.load(stl.path)
    assert mesh.is_watertight and len(mesh.faces) == stl.mesh.num_faces
    assert mesh.bounds[0] == pytest.approx([-0.15, -0.1, -0.15], abs=0.012)


def test_export_cancel_leaves_no_file(sphere, tmp_path):
    tg, dec = sphere

    class Stop(Exception):
        pass

    calls = []

    def progress(done, total):
        calls.append(done)
        if done > 950:
            raise Stop

    with pytest.raises(Stop):
        E.export_mesh(tg, dec, str(tmp_path), "portrait", "glb", resolution=32, texture_size=128, progress=progress)
    with pytest.raises(Stop):
        E.export_mesh(tg, dec, str(tmp_path), "portrait", "mrc", resolution=16, progress=progress)
    assert os.listdir(tmp_path) == []
    with pytest.raises(Exception, match="format"):
        E.export_mesh(tg, dec, str(tmp_path), "portrait", "fbx")


def test_mrc_layout_and_orientation(tmp_path):
    # asymmetric density: a small ellipsoid off-centre on every axis
    centre = (0.12, 0.07, -0.09)
    tg, dec = analytic_trigrid([Ellipsoid(centre, (0.06, 0.05, 0.04))], (32, 64)), demo_decoder(n_shapes=1)
    n = 64
    res = E.export_mesh(tg, dec, str(tmp_path), "shape", "mrc", resolution=n)
    assert res.path.endswith(".mrc") and os.path.getsize(res.path) == 1024 + 4 * n ** 3
    head = E.read_mrc_header(res.path)
    assert (head["nx"], head["ny"], head["nz"], head["mode"]) == (n, n, n, 2)
    assert head["map"] == b"MAP " and head["machst"][:2] == b"\x44\x44" and head["nversion"] == 20140
    assert head["mapcrs"] == (1, 2, 3) and head["ispg"] == 1 and head["nsymbt"] == 0
    assert head["cella"] == pytest.approx((n * 0.9 / (n - 1),) * 3, rel=1e-6)

    vol = np.asarray(E.read_mrc(res.path))
    assert head["dmin"] == pytest.approx(vol.min()) and head["dmax"] == pytest.approx(vol.max())
    assert head["dmean"] == pytest.approx(vol.mean(dtype=np.float64), rel=1e-4)
    pad = E.mrc_border(n)
    assert (pad, E.mrc_border(512), E.mrc_border(256)) == (7, 60, 30)     # the paper's 60 at 512, scaled with N
    for border in (vol[:pad], vol[-pad:], vol[:, :pad], vol[:, -pad:], vol[:, :, :pad], vol[:, :, -pad:]):
        assert (border == -1000).all()
    inner = vol[pad:-pad, pad:-pad, pad:-pad]
    assert (inner > -1000).all()                         # raw σ, no crop

    # orientation: array [i, j, k] = σ(x_{N−1−i}, y_j, z_k) on the lattice −0.45 + idx·0.9/(N − 1)
    axis = E.mrc_lattice(n)
    i, j, k = np.unravel_index(np.argmax(vol), vol.shape)
    assert abs(axis[n - 1 - i] - centre[0]) < 0.02 and abs(axis[j] - centre[1]) < 0.02
    assert abs(axis[k] - centre[2]) < 0.02
    idx = np.array([[20, 30, 40], [pad, pad + 3, n - pad - 1], [i, j, k]])
    pts = torch.tensor(np.stack([axis[n - 1 - idx[:, 0]], axis[idx[:, 1]], axis[idx[:, 2]]], -1), dtype=torch.float32)
    np.testing.assert_allclose(vol[idx[:, 0], idx[:, 1], idx[:, 2]],
                               M.raw_sigma_at(tg, dec, pts, crop=None).numpy(), rtol=1e-5, atol=1e-3)

    skew = E.export_mesh(tg, dec, str(tmp_path), "shape", "mrc", resolution=n, mrc_eg3d_skew=True)
    other = np.asarray(E.read_mrc(skew.path))
    assert other.shape == vol.shape and not np.array_equal(other, vol)
    assert np.abs(other - vol)[pad:-pad, pad:-pad, pad:-pad].mean() < np.abs(inner).mean() * 0.2


def test_mrc_header_bytes():
    head = E.mrc_header((4, 5, 6), -1.0, 2.0, 0.5, 0.25, 0.01)
    assert len(head) == 1024
    assert np.frombuffer(head[:16], "<i4").tolist() == [6, 5, 4, 2]
    assert head[208:212] == b"MAP "
    assert json.dumps(E.FORMATS)


def test_textured_mesh_auto_decimation_and_tensors(sphere):
    tg, dec = sphere
    mesh = E.build_mesh(tg, dec, resolution=RES, texture_size=128, texture_max_faces=2000)
    assert mesh.stats["auto_decimated_for_texture"] == 2000 and mesh.num_faces <= 2000
    assert mesh.stats["watertight"] and mesh.texture.shape == (128, 128, 3)
    t = mesh.as_tensors()
    assert t["uvs"].shape == (1, mesh.num_vertices, 2) and t["texture"].shape == (1, 128, 128, 3)
    assert float(t["texture"].max()) <= 1.0 and t["vertex_colors"].shape == (1, mesh.num_vertices, 3)


PROVENANCE = {"prompt": json.dumps({"3": {"class_type": "Portrait3D_ExportMesh", "inputs": {}}}),
              "workflow": json.dumps({"nodes": [{"id": 3, "type": "Portrait3D_ExportMesh"}], "links": []})}


def test_export_writes_provenance_where_the_file_can_hold_it(sphere, tmp_path):
    """GLB: asset.extras (where core SaveGLB puts it and the editor reads it); OBJ: the texture's PNG text chunks."""
    import pygltflib
    from PIL import Image

    tg, dec = sphere
    glb = E.export_mesh(tg, dec, str(tmp_path), "p", "glb", resolution=32, texture_size=128, provenance=PROVENANCE)
    gltf = pygltflib.GLTF2().load(glb.path)
    assert gltf.asset.extras == PROVENANCE
    assert gltf.scenes[gltf.scene].extras["portrait3d"]["description"] == "a test sphere"
    obj = E.export_mesh(tg, dec, str(tmp_path), "p", "obj", resolution=32, texture_size=128, provenance=PROVENANCE)
    png = next(p for p in obj.files if p.endswith(".png"))
    assert Image.open(png).text == PROVENANCE
    plain = E.export_mesh(tg, dec, str(tmp_path), "p", "glb", resolution=32, colour="vertex")
    assert not pygltflib.GLTF2().load(plain.path).asset.extras


def test_export_batch_writes_one_file_set_per_item(sphere, tmp_path):
    from portrait3d_core.trigrid import stack

    tg, dec = sphere
    small = linear_colour_trigrid([Ellipsoid(CENTRE, (0.1,) * 3)], (32, 64), centre=CENTRE)
    calls = []
    results = E.export_batch(stack([tg, small]), dec, str(tmp_path), "b", "obj", resolution=32, texture_size=128,
                             progress=lambda done, total: calls.append((done, total)))
    assert [os.path.basename(r.path) for r in results] == ["b_00001_.obj", "b_00002_.obj"]
    assert all(len(r.files) == 3 for r in results)
    assert results[0].mesh.num_faces > results[1].mesh.num_faces       # the bigger sphere first: order kept
    assert calls[-1] == (1000, 1000) and all(t == 1000 for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert any(400 <= d <= 600 for d, _ in calls)                      # one progress scale over both items


def test_mrc_default_is_the_papers_resolution_and_resolution_is_honoured(sphere, tmp_path, monkeypatch):
    tg, dec = sphere
    res = E.export_mesh(tg, dec, str(tmp_path), "v", "mrc", resolution=24)
    assert E.read_mrc_header(res.path)["nx"] == 24 and os.path.getsize(res.path) == 1024 + 4 * 24 ** 3
    assert E.MRC_RESOLUTION == 512
    monkeypatch.setattr(E, "MRC_RESOLUTION", 20)                       # the default, without writing 537 MB
    res = E.export_mesh(tg, dec, str(tmp_path), "v", "mrc")
    assert E.read_mrc_header(res.path)["nx"] == 20


def test_mesh_batch_tensors_pad_with_zeros_and_count_items():
    v1, f1 = np.random.rand(5, 3).astype(np.float32), np.array([[0, 1, 2], [2, 3, 4]])
    v2, f2 = np.random.rand(3, 3).astype(np.float32), np.array([[0, 1, 2]])
    single = M.batch_tensors([M.MeshData(v1, f1)])
    assert set(single) == {"vertices", "faces"} and single["vertices"].shape == (1, 5, 3)
    out = M.batch_tensors([M.MeshData(v1, f1, vertex_colors=v1), M.MeshData(v2, f2, vertex_colors=v2)])
    assert out["vertices"].shape == (2, 5, 3) and out["faces"].shape == (2, 2, 3)
    assert out["vertex_counts"].tolist() == [5, 3] and out["face_counts"].tolist() == [2, 1]
    torch.testing.assert_close(out["vertices"][1, :3], torch.from_numpy(v2))
    assert (out["vertices"][1, 3:] == 0).all() and (out["faces"][1, 1:] == 0).all()
    assert out["vertex_colors"].shape == (2, 5, 3)
