"""UV unwrapping (xatlas) and texture baking of the decoder colour.

``unwrap(mesh, texture_size)`` → a new ``MeshData`` whose vertices are split along UV seams (``uvs`` [N, 2], OpenGL
convention: v up). ``bake_texture(mesh, trigrid, decoder, texture_size)`` rasterises every UV triangle into the
texture (texel centres), evaluates the decoder colour at the barycentric 3D point of each covered texel, and dilates
the charts into the empty texels so bilinear filtering and mipmaps do not pull in black at the seams.

Texture layout: ``texture [S, S, 3]`` uint8, row 0 is the top of the image (glTF / PNG); texel (row r, column c) has
its centre at u = (c + 0.5)/S, v = 1 − (r + 0.5)/S in the OpenGL convention ``uvs`` use.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from .errors import InvalidInputError, Portrait3DError
from .mesh import MeshData, ProgressFn, as_progress, colours_at
from .mesh_raster import rasterize

MIN_TEXTURE_SIZE = 64
MAX_TEXTURE_SIZE = 8192
DEFAULT_TEXTURE_SIZE = 2048
CHART_AREA_DIVISOR = 200.0   # max chart area = surface area / this (see unwrap)
BAKE_CHUNK = 1 << 18


def check_texture_size(size: int) -> int:
    size = int(size)
    if not (MIN_TEXTURE_SIZE <= size <= MAX_TEXTURE_SIZE):
        raise InvalidInputError(f"texture size must be between {MIN_TEXTURE_SIZE} and {MAX_TEXTURE_SIZE}, got {size}")
    return size


def unwrap(mesh: MeshData, texture_size: int = DEFAULT_TEXTURE_SIZE, padding: int | None = None) -> MeshData:
    """xatlas charts + packing for a ``texture_size``² texture → mesh with seam-split vertices and ``uvs``.

    Per-vertex arrays (normals, vertex colours) follow the split. One call into xatlas: it cannot be cancelled
    midway (≈ 7 s for 200k faces on 2 CPU cores; ``mesh_export`` decimates denser meshes first).
    """
    try:
        import xatlas
    except ImportError:
        raise Portrait3DError("UV unwrapping needs the 'xatlas' package (pip install xatlas); or export with "
                              "vertex colours") from None
    size = check_texture_size(texture_size)
    pad = max(2, size // 512) if padding is None else int(padding)
    atlas = xatlas.Atlas()
    # xatlas ignores faces whose area is below an absolute epsilon (~1e-7): in metres that drops the smallest
    # marching-cubes triangles (they would get uv (0, 0)). Work in millimetres; the UVs are normalised anyway.
    verts_mm = np.ascontiguousarray(mesh.vertices * 1000.0, np.float32)
    atlas.add_mesh(verts_mm, np.ascontiguousarray(mesh.faces, np.uint32))
    charts = xatlas.ChartOptions()
    # Unbounded charts make xatlas' chart growing superlinear on dense marching-cubes meshes (159k faces: 270 s on
    # 2 busy cores); capping a chart at 1/CHART_AREA_DIVISOR of the surface brings that to 6–9 s for a
    # somewhat lower packing utilisation (≈ 0.56 instead of 0.72).
    v64 = mesh.vertices.astype(np.float64) * 1000.0
    f = mesh.faces
    area_mm2 = 0.5 * np.linalg.norm(np.cross(v64[f[:, 1]] - v64[f[:, 0]], v64[f[:, 2]] - v64[f[:, 0]]), axis=1).sum()
    charts.max_chart_area = float(area_mm2 / CHART_AREA_DIVISOR)
    pack = xatlas.PackOptions()
    pack.resolution = size
    pack.padding = pad
    pack.bilinear = True
    atlas.generate(charts, pack)
    if atlas.atlas_count != 1:
        raise Portrait3DError(f"xatlas split the charts over {atlas.atlas_count} textures; use a larger texture size "
                              f"or fewer faces")
    vmapping, indices, uv = atlas[0]
    vmapping = np.asarray(vmapping, dtype=np.int64)
    # xatlas uv: (x, y) normalised by the atlas size, y pointing down the image → OpenGL v = 1 − y
    uvs = np.stack([uv[:, 0], 1.0 - uv[:, 1]], -1).astype(np.float32)
    pick = lambda a: None if a is None else a[vmapping]  # noqa: E731
    stats = dict(mesh.stats)
    stats.update(uv_charts=int(atlas.chart_count), uv_utilization=float(np.mean(atlas.utilization)),
                 uv_vertices=int(len(vmapping)), texture_padding=pad)
    return replace(mesh, vertices=mesh.vertices[vmapping], faces=np.asarray(indices, np.int64),
                   normals=pick(mesh.normals), vertex_colors=pick(mesh.vertex_colors), uvs=uvs, texture=None,
                   stats=stats)


def texel_coverage(mesh: MeshData, size: int):
    """Rasterise the UV triangles → (face index ``[S, S]`` int32, −1 where empty; barycentrics ``[S, S, 3]``)."""
    if mesh.uvs is None:
        raise InvalidInputError("the mesh has no UVs; call unwrap() first")
    # OpenGL uv → pixel coordinates with centres at integers: column = u·S − 0.5, row = (1 − v)·S − 0.5
    xy = np.stack([mesh.uvs[:, 0] * size - 0.5, (1.0 - mesh.uvs[:, 1]) * size - 0.5], -1)
    return rasterize(xy[mesh.faces], size, size)


def texel_points(mesh: MeshData, face: np.ndarray, bary: np.ndarray, texels: np.ndarray) -> np.ndarray:
    """3D points ``[K, 3]`` float32 at the flat (row-major) texel indices ``texels`` (covered texels only)."""
    f = face.reshape(-1)[texels]
    b = bary.reshape(-1, 3)[texels]
    corners = mesh.vertices[mesh.faces[f]]                          # [K, 3 corners, 3]
    return np.einsum("kc,kcd->kd", b, corners).astype(np.float32)


def dilate(texture: np.ndarray, covered: np.ndarray, iterations: int) -> np.ndarray:
    """Grow the charts into empty texels (mean of the filled 8-neighbours, ``iterations`` rings), then fill what is
    left with the mean colour. ``texture [S, S, 3]`` float32 → same (per-channel passes keep temporaries small)."""
    from scipy.ndimage import uniform_filter

    tex = texture.copy()
    filled = covered.copy()
    if not filled.any():
        return tex
    for _ in range(int(iterations)):
        if filled.all():
            break
        weight = uniform_filter(filled.astype(np.float32), size=3, mode="constant")
        grow = (~filled) & (weight > 1e-6)
        if not grow.any():
            break
        for ch in range(tex.shape[2]):
            plane = np.where(filled, tex[..., ch], np.float32(0))
            mean = uniform_filter(plane, size=3, mode="constant")
            tex[..., ch][grow] = mean[grow] / weight[grow]
        filled |= grow
    tex[~filled] = texture[covered].mean(0)
    return tex


def bake_texture(mesh: MeshData, trigrid, decoder, texture_size: int = DEFAULT_TEXTURE_SIZE,
                 progress: ProgressFn = None) -> MeshData:
    """``mesh`` (with ``uvs``) + the decoder colour baked into ``texture [S, S, 3]`` uint8.

    ``progress(done, total)`` is called per decoder chunk and may raise to cancel.
    """
    size = check_texture_size(texture_size)
    report = as_progress(progress)
    face, bary = texel_coverage(mesh, size)
    covered = face >= 0
    texels = np.flatnonzero(covered)
    count = len(texels)
    report(0.05, 1.0)
    colours = np.empty((count, 3), np.float32)
    for s in range(0, count, BAKE_CHUNK):                   # bounded memory: points of one chunk at a time
        points = texel_points(mesh, face, bary, texels[s:s + BAKE_CHUNK])
        colours[s:s + len(points)] = colours_at(trigrid, decoder, points)
        report(0.05 + 0.85 * min(count, s + BAKE_CHUNK) / max(count, 1), 1.0)
    del bary
    tex = np.zeros((size, size, 3), np.float32)
    tex[covered] = colours
    tex = dilate(tex, covered, max(4, size // 128))
    report(1.0, 1.0)
    stats = dict(mesh.stats)
    stats.update(texture_size=size, texture_coverage=float(covered.mean()))
    return replace(mesh, texture=np.clip(np.round(tex * 255.0), 0, 255).astype(np.uint8), stats=stats)
