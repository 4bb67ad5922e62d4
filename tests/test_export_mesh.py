"""Mesh extraction from a tri-grid: geometry, topology, colours, clean-up options, silhouette vs the renderer."""
import math

import numpy as np
import pytest
import torch

from portrait3d_core import cameras, mesh as M, renderer
from portrait3d_core.demo_assets import (SMALL_RESOLUTIONS, Ellipsoid, analytic_trigrid, demo_decoder,
                                         linear_colour, linear_colour_trigrid)
from portrait3d_core.errors import InvalidInputError, Portrait3DError
from portrait3d_core.mesh_raster import rasterize, silhouette

CENTRE = (0.0, 0.05, 0.0)
RADIUS = 0.15
RES = 64


@pytest.fixture(scope="module")
def sphere():
    tg = linear_colour_trigrid([Ellipsoid(CENTRE, (RADIUS,) * 3)], (32, 64), centre=CENTRE)
    return tg, demo_decoder(n_shapes=1)


@pytest.fixture(scope="module")
def sphere_mesh(sphere):
    tg, dec = sphere
    return M.add_vertex_colours(M.extract_mesh(tg, dec, resolution=RES), tg, dec)


def test_sphere_is_watertight_genus0_and_round(sphere_mesh):
    m = sphere_mesh
    voxel = 0.7 / (RES - 1)
    assert m.vertices.dtype == np.float32 and m.faces.dtype == np.int64
    assert m.stats["watertight"] and m.stats["boundary_edges"] == 0
    assert m.stats["euler"] == 2
    r = np.linalg.norm(m.vertices - np.array(CENTRE), axis=1)
    assert np.abs(r - RADIUS).max() <= voxel
    # faces wound outward: enclosed volume positive, normals point away from the centre
    assert m.stats["volume_m3"] == pytest.approx(4 / 3 * math.pi * RADIUS ** 3, rel=0.05)
    radial = (m.vertices - np.array(CENTRE)) / r[:, None]
    assert (np.einsum("ij,ij->i", m.normals, radial) > 0.8).all()


def test_vertex_colours_equal_known_field(sphere_mesh):
    expected = linear_colour(torch.from_numpy(sphere_mesh.vertices).double(), CENTRE).numpy()
    assert sphere_mesh.vertex_colors.shape == sphere_mesh.vertices.shape
    assert np.abs(sphere_mesh.vertex_colors - expected).max() < 0.01


def test_many_slabs_give_the_same_watertight_mesh(sphere, sphere_mesh, monkeypatch):
    tg, dec = sphere
    monkeypatch.setattr(M, "SLAB_POINTS", 1)          # 2 slices per slab: a seam between every pair of slices
    m = M.extract_mesh(tg, dec, resolution=RES)
    assert m.stats["watertight"] and m.stats["euler"] == 2
    assert m.num_vertices == sphere_mesh.num_vertices and m.num_faces == sphere_mesh.num_faces
    np.testing.assert_allclose(np.sort(m.vertices, axis=0), np.sort(sphere_mesh.vertices, axis=0), atol=1e-6)


def test_neck_cut_closed_or_open():
    # a body that leaves the box through its bottom face (y = −0.35), like the chest of a portrait
    shapes = [Ellipsoid((0.0, -0.25, 0.0), (0.12, 0.2, 0.1))]
    tg, dec = analytic_trigrid(shapes, SMALL_RESOLUTIONS), demo_decoder(n_shapes=1)
    closed = M.extract_mesh(tg, dec, resolution=48, close_holes=True)
    assert closed.stats["watertight"] and closed.stats["euler"] == 2
    assert closed.vertices[:, 1].min() >= -0.35 - 0.7 / 47
    opened = M.extract_mesh(tg, dec, resolution=48, close_holes=False)
    assert not opened.stats["watertight"] and opened.stats["boundary_edges"] > 0
    assert opened.stats["euler"] == 1                   # a disc: one hole
    assert opened.vertices[:, 1].min() >= -0.35 - 1e-6


def test_keep_largest_component():
    shapes = [Ellipsoid((0.0, 0.05, 0.0), (0.12,) * 3), Ellipsoid((0.0, -0.25, 0.0), (0.04,) * 3)]
    tg, dec = analytic_trigrid(shapes, SMALL_RESOLUTIONS), demo_decoder(n_shapes=2)
    both = M.extract_mesh(tg, dec, resolution=48, keep_largest=False)
    one = M.extract_mesh(tg, dec, resolution=48)
    assert both.stats["euler"] == 4 and one.stats["euler"] == 2
    assert one.vertices[:, 1].min() > -0.1


def test_smoothing_and_decimation(sphere, sphere_mesh):
    tg, dec = sphere
    voxel = 0.7 / (RES - 1)
    m = M.extract_mesh(tg, dec, resolution=RES, smooth_iterations=10, decimate_faces=2000)
    assert 1500 <= m.num_faces <= 2000
    assert m.stats["euler"] == 2 and m.stats["watertight"]
    r = np.linalg.norm(m.vertices - np.array(CENTRE), axis=1)
    assert np.abs(r - RADIUS).max() <= 1.5 * voxel
    smooth = M.taubin_smooth(sphere_mesh.vertices.astype(np.float64), sphere_mesh.faces, 10)
    rough = np.linalg.norm(sphere_mesh.vertices - np.array(CENTRE), axis=1).std()
    assert np.linalg.norm(smooth - np.array(CENTRE), axis=1).std() < rough


def test_thresholds_and_validation(sphere):
    tg, dec = sphere
    assert M.resolve_threshold(None) == M.DEFAULT_DENSITY_THRESHOLD
    assert M.resolve_threshold("paper_sigma_10") == pytest.approx(float(torch.nn.functional.softplus(
        torch.tensor(9.0, dtype=torch.float64))))
    assert M.resolve_threshold("paper_sigma_15") == pytest.approx(M.density_from_sigma(15.0))
    assert M.resolve_threshold("7.5") == 7.5
    for bad in ("nope", -1.0, 0.0, float("nan")):
        with pytest.raises(InvalidInputError):
            M.resolve_threshold(bad)
    with pytest.raises(InvalidInputError):
        M.extract_mesh(tg, dec, resolution=8)
    with pytest.raises(Portrait3DError, match="no surface"):
        M.extract_mesh(tg, dec, resolution=32, threshold=1e6)
    # a higher level gives a smaller sphere (the paper's raw-σ level 15 is inside level 10)
    m10 = M.extract_mesh(tg, dec, resolution=32, threshold="paper_sigma_10")
    m15 = M.extract_mesh(tg, dec, resolution=32, threshold="paper_sigma_15")
    assert m15.stats["volume_m3"] < m10.stats["volume_m3"]


def test_sigma_fast_path_matches_decoder(sphere):
    tg, dec = sphere
    p = torch.rand(500, 3) * 0.7 - 0.35
    sigma, _ = renderer.query(tg, dec, p[None], crop=0.1)
    np.testing.assert_allclose(M.raw_sigma_at(tg, dec, p, crop=0.1).numpy(), sigma[0, :, 0].numpy(), atol=1e-4)
    np.testing.assert_allclose(M.density_at(tg, dec, p).numpy(),
                               renderer.density(tg, dec, p[None])[0, :, 0].numpy(), atol=1e-4)


def test_progress_reports_and_cancels(sphere):
    tg, dec = sphere
    seen = []
    M.extract_mesh(tg, dec, resolution=32, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (1000, 1000) and all(b[0] >= a[0] for a, b in zip(seen, seen[1:]))

    class Stop(Exception):
        pass

    def cancel(done, total):
        raise Stop

    with pytest.raises(Stop):
        M.extract_mesh(tg, dec, resolution=32, progress=cancel)


def test_as_tensors_for_comfy_mesh(sphere_mesh):
    t = sphere_mesh.as_tensors()
    n, f = sphere_mesh.num_vertices, sphere_mesh.num_faces
    assert t["vertices"].shape == (1, n, 3) and t["vertices"].dtype == torch.float32
    assert t["faces"].shape == (1, f, 3) and t["faces"].dtype == torch.int64
    assert t["vertex_colors"].shape == (1, n, 3) and t["normals"].shape == (1, n, 3)


def test_rasterizer_covers_pixel_centres():
    face, bary = rasterize(np.array([[[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]]]), 6, 6)
    assert (face >= 0).sum() == 15                      # i + j ≤ 4 on a 5×5 corner
    np.testing.assert_allclose(bary.sum(-1)[face >= 0], 1.0, atol=1e-6)


def test_mesh_silhouette_matches_renderer_mask():
    """Front and side: the default-threshold mesh covers the renderer's mask (Σw > 0.5) with IoU ≥ 0.9."""
    tg, dec = analytic_trigrid(resolutions=SMALL_RESOLUTIONS), demo_decoder()
    m = M.extract_mesh(tg, dec, resolution=96)
    settings = renderer.RenderSettings().portrait3d(deterministic=True)
    for yaw in (0.0, 90.0):
        c = cameras.camera_label(cameras.yaw_pitch_pose(yaw, 0.0), cameras.GAN_FOCAL)
        mask = renderer.render_image(tg, dec, c, 64, settings).weight_sum[0, 0].numpy() > 0.5
        sil = silhouette(m.vertices, m.faces, c[0], 64)
        iou = (sil & mask).sum() / (sil | mask).sum()
        assert iou >= 0.9, (yaw, iou)


def test_auto_threshold_calibration(sphere):
    tg, dec = sphere
    tau, info = M.calibrate_threshold(tg, dec, image_resolution=40)
    assert 2.0 < tau < 300.0 and min(info["iou"].values()) >= 0.9
    assert len(info["curve"]) == 61
    m = M.extract_mesh(tg, dec, resolution=32, threshold="auto")
    assert m.stats["threshold_preset"] == "auto" and m.stats["watertight"]
    assert 2.0 < m.stats["threshold_density"] < 300.0 and min(m.stats["calibration_iou"].values()) >= 0.9
    with pytest.raises(InvalidInputError):
        M.resolve_threshold("auto")


def test_sparse_evaluation_equals_dense():
    tg, dec = analytic_trigrid(resolutions=SMALL_RESOLUTIONS), demo_decoder()
    dense = M.extract_mesh(tg, dec, resolution=72, coarse_stride=1, keep_largest=False)
    sparse = M.extract_mesh(tg, dec, resolution=72, coarse_stride=2, keep_largest=False)
    assert sparse.stats["evaluated_points"] < 0.6 * dense.stats["evaluated_points"]
    assert sparse.num_faces == dense.num_faces and sparse.num_vertices == dense.num_vertices
    np.testing.assert_array_equal(sparse.faces, dense.faces)
    np.testing.assert_allclose(sparse.vertices, dense.vertices, atol=1e-6)
    assert M.coarse_stride_for(256) == 1 and M.coarse_stride_for(512) == 2
