"""Mesh and volume files of a portrait: GLB (default), OBJ + MTL + PNG, PLY, STL, and the official ``shape.mrc``.

``export_mesh(trigrid, decoder, out_dir, prefix, fmt="glb", ...)`` is the one call the node makes. Every file is
written atomically under a new name ``<prefix>_NNNNN_.<ext>`` (``fileio.save_new``); nothing is ever overwritten.

Frame and units of every mesh file: metres, y up, the face toward +z, the neck at the origin (``mesh.py``). glTF's
own convention is y up and +z "front", so viewers show the portrait upright and facing the default camera.

- ``.glb`` textured (``colour="texture"``): TEXCOORD_0 + a PBR material with ``baseColorTexture`` (PNG),
  ``metallicFactor`` 0, ``roughnessFactor`` 1; no COLOR_0. ``colour="vertex"``: COLOR_0 (RGBA8), no texture.
  Both carry NORMAL. The description and the generating settings are stored in the **scene extras**:
  ``scenes[0].extras = {"portrait3d": {...}}`` (trimesh reads them back as ``scene.metadata["portrait3d"]``). The
  ``provenance`` strings (ComfyUI's ``prompt`` / ``workflow`` JSON) go into ``asset.extras``, where core SaveGLB
  writes them and where the ComfyUI editor looks when a .glb is dropped on it.
- ``.obj``: with ``colour="texture"`` the OBJ references ``<same name>.mtl`` whose ``map_Kd`` is ``<same name>.png``
  (three files; ``vt`` written in the OpenGL convention); with ``colour="vertex"`` one OBJ with ``v x y z r g b``.
  Settings go into ``#`` comment lines; the provenance strings into the texture PNG's text chunks (as core SaveImage
  writes them).
- ``.ply``: binary little-endian, vertex colours (uchar RGBA) and normals; ``.stl``: binary, geometry only. Both use
  the un-split (watertight) mesh.
- ``.mrc``: the official stage-7 density volume (``pipeline.md`` §7), see ``write_mrc``.

``export_batch`` writes one set of files per tri-grid of a batch.
"""
from __future__ import annotations

import io
import json
import math
import os
import struct
import time
from dataclasses import dataclass, field, replace
from typing import Mapping, Optional, Union

import numpy as np
import torch

from . import __version__
from .decoder import Decoder
from .errors import InvalidInputError, Portrait3DError
from .fileio import PROVENANCE_KEYS, atomic_write, next_free_path, save_new
from .mesh import (DEFAULT_RESOLUTION, MeshData, MeshSettings, ProgressFn, add_vertex_colours, as_progress,
                   extract_mesh, raw_sigma_at)
from .mesh_texture import DEFAULT_TEXTURE_SIZE, bake_texture, check_texture_size, unwrap
from .trigrid import TriGrid

FORMATS = ("glb", "obj", "ply", "stl", "mrc")
COLOUR_MODES = ("texture", "vertex")
TEXTURE_MAX_FACES = 200_000   # textured exports decimate denser meshes to this first (xatlas ≈ 0.4 ms per face)

# Official shape.mrc layout (EG3D/Portrait3D gen_videos: create_samples + np.flip(axis 0) + border trim)
MRC_RESOLUTION = 512          # the paper's lattice; the default of export_mesh(fmt="mrc")
MRC_CUBE = 0.9
MRC_PAD_VALUE = -1000.0


# --------------------------------------------------------------------------------------------------- results

@dataclass
class ExportResult:
    """What ``export_mesh`` wrote. ``path`` is the main file (the .glb/.obj/.ply/.stl/.mrc); ``files`` lists every
    file written (OBJ: obj, mtl, png). ``mesh`` is the exported mesh (None for .mrc); ``stats`` holds counts,
    topology, timings and the settings."""

    path: str
    files: list
    mesh: Optional[MeshData]
    stats: dict = field(default_factory=dict)


def _metadata(trigrid: TriGrid, description: Optional[str], settings: dict, extra: Optional[dict]) -> dict:
    meta = {"generator": f"comfyui-portrait3d {__version__}",
            "description": description if description is not None else trigrid.meta.get("description"),
            "units": "metres", "frame": "y up, face toward +z, neck joint at the origin",
            "settings": settings}
    skip = {"description", *PROVENANCE_KEYS}      # the tri-grid's own workflow is not this export's provenance
    source = {k: str(v) for k, v in trigrid.meta.items() if k not in skip}
    if source:
        meta["trigrid"] = source
    if extra:
        meta.update(extra)
    return json.loads(json.dumps(meta, default=str))


# --------------------------------------------------------------------------------------------------- encoders

def _png_bytes(texture: np.ndarray, provenance: Optional[Mapping[str, str]] = None) -> bytes:
    """PNG of an ``[H, W, 3]`` uint8 image; ``provenance`` strings become tEXt chunks (key → value)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = None
    if provenance:
        info = PngInfo()
        for key, value in provenance.items():
            info.add_text(str(key), str(value))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(texture, np.uint8), "RGB").save(buf, format="PNG", optimize=False,
                                                                         pnginfo=info)
    return buf.getvalue()


def _rgba8(colours: np.ndarray) -> np.ndarray:
    rgb = np.clip(np.round(np.asarray(colours, np.float64) * 255.0), 0, 255).astype(np.uint8)
    return np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], 1)


def _trimesh(mesh: MeshData, visual: str):
    """A ``trimesh.Trimesh`` with the chosen visual: "texture", "vertex" or "none"."""
    import trimesh
    from PIL import Image

    kwargs = dict(vertices=mesh.vertices, faces=mesh.faces, process=False, validate=False)
    if mesh.normals is not None:
        kwargs["vertex_normals"] = mesh.normals
    if visual == "texture":
        material = trimesh.visual.material.PBRMaterial(
            name="portrait", baseColorTexture=Image.fromarray(mesh.texture, "RGB"), baseColorFactor=[255] * 4,
            metallicFactor=0.0, roughnessFactor=1.0, doubleSided=False)
        kwargs["visual"] = trimesh.visual.TextureVisuals(uv=mesh.uvs, material=material)
    elif visual == "vertex":
        kwargs["visual"] = trimesh.visual.ColorVisuals(vertex_colors=_rgba8(mesh.vertex_colors))
    return trimesh.Trimesh(**kwargs)


def glb_bytes(mesh: MeshData, metadata: dict, colour: str = "texture",
              provenance: Optional[Mapping[str, str]] = None) -> bytes:
    """Binary glTF of ``mesh`` (textured or vertex-coloured) with ``metadata`` in ``scenes[0].extras.portrait3d``
    and the ``provenance`` strings (e.g. ``{"prompt": json, "workflow": json}``) in ``asset.extras``."""
    import trimesh

    if colour == "texture" and (mesh.texture is None or mesh.uvs is None):
        raise InvalidInputError("a textured GLB needs a mesh with uvs and a baked texture")
    if colour == "vertex" and mesh.vertex_colors is None:
        raise InvalidInputError("a vertex-colour GLB needs vertex colours")
    scene = trimesh.Scene()
    scene.add_geometry(_trimesh(mesh, colour), geom_name="portrait", node_name="portrait")
    scene.metadata["portrait3d"] = metadata

    def finish_tree(tree):
        if provenance:
            tree.setdefault("asset", {}).setdefault("extras", {}).update({str(k): str(v) for k, v in provenance.items()})
        primitives = [p for gl_mesh in tree.get("meshes", []) for p in gl_mesh.get("primitives", [])]
        if colour == "vertex":
            # glTF's default material is fully metallic (viewers then show vertex colours almost black): give the
            # vertex-coloured primitive a white, non-metallic, fully rough material
            materials = tree.setdefault("materials", [])
            materials.append({"name": "portrait_vertex_colour", "doubleSided": False,
                              "pbrMetallicRoughness": {"baseColorFactor": [1.0, 1.0, 1.0, 1.0],
                                                       "metallicFactor": 0.0, "roughnessFactor": 1.0}})
            for primitive in primitives:
                primitive.setdefault("material", len(materials) - 1)
        # buffer-view targets (ARRAY_BUFFER / ELEMENT_ARRAY_BUFFER), as the Khronos validator recommends
        accessors, views = tree.get("accessors", []), tree.get("bufferViews", [])
        for primitive in primitives:
            for index in primitive.get("attributes", {}).values():
                views[accessors[index]["bufferView"]]["target"] = 34962
            if "indices" in primitive:
                views[accessors[primitive["indices"]]["bufferView"]]["target"] = 34963

    return trimesh.exchange.gltf.export_glb(scene, include_normals=mesh.normals is not None,
                                            tree_postprocessor=finish_tree)


def _fmt_rows(fmt: str, arr: np.ndarray) -> str:
    buf = io.StringIO()
    np.savetxt(buf, arr, fmt=fmt)
    return buf.getvalue()


def obj_text(mesh: MeshData, metadata: dict, mtl_name: Optional[str] = None) -> str:
    """Wavefront OBJ: with ``mtl_name`` (textured: v, vt, vn, f v/vt/vn) else vertex colours (v x y z r g b)."""
    head = ["# comfyui-portrait3d mesh: metres, y up, face toward +z, neck at the origin"]
    head += [f"# {k}: {json.dumps(v)}" for k, v in metadata.items()]
    parts = ["\n".join(head) + "\n"]
    if mtl_name:
        parts.append(f"mtllib {mtl_name}\n")
    v = mesh.vertices.astype(np.float64)
    if not mtl_name and mesh.vertex_colors is not None:
        parts.append(_fmt_rows("v %.6f %.6f %.6f %.4f %.4f %.4f", np.concatenate([v, mesh.vertex_colors], 1)))
    else:
        parts.append(_fmt_rows("v %.6f %.6f %.6f", v))
    has_vt = bool(mtl_name) and mesh.uvs is not None
    if has_vt:
        parts.append(_fmt_rows("vt %.6f %.6f", mesh.uvs))
    has_vn = mesh.normals is not None
    if has_vn:
        parts.append(_fmt_rows("vn %.5f %.5f %.5f", mesh.normals))
    if mtl_name:
        parts.append("usemtl portrait\n")
    f = mesh.faces + 1
    if has_vt and has_vn:
        rows = np.repeat(f, 3, axis=1)
        parts.append(_fmt_rows("f %d/%d/%d %d/%d/%d %d/%d/%d", rows))
    elif has_vn:
        parts.append(_fmt_rows("f %d//%d %d//%d %d//%d", np.repeat(f, 2, axis=1)))
    else:
        parts.append(_fmt_rows("f %d %d %d", f))
    return "".join(parts)


def mtl_text(png_name: str) -> str:
    return ("# comfyui-portrait3d material (unlit-looking PBR: no specular)\n"
            "newmtl portrait\nKa 1.000 1.000 1.000\nKd 1.000 1.000 1.000\nKs 0.000 0.000 0.000\nNs 1.0\n"
            "d 1.0\nillum 1\n"
            f"map_Kd {png_name}\n")


def ply_bytes(mesh: MeshData) -> bytes:
    visual = "vertex" if mesh.vertex_colors is not None else "none"
    return _trimesh(replace(mesh, uvs=None, texture=None), visual).export(file_type="ply", encoding="binary")


def stl_bytes(mesh: MeshData) -> bytes:
    return _trimesh(replace(mesh, uvs=None, texture=None, vertex_colors=None), "none").export(file_type="stl")


def _write_bytes(data: bytes):
    def write(tmp):
        with open(tmp, "wb") as fh:
            fh.write(data)
    return write


def _save_obj_set(out_dir: str, prefix: str, mesh: MeshData, metadata: dict, textured: bool,
                  provenance: Optional[Mapping[str, str]] = None) -> list:
    """Write ``<name>.obj`` (+ ``.mtl`` + ``.png``) under one fresh counter; retries the next counter on a race."""
    png = _png_bytes(mesh.texture, provenance) if textured else None
    for _ in range(1000):
        obj_path = next_free_path(out_dir, prefix, ".obj")
        stem = obj_path[:-len(".obj")]
        written = []
        try:
            if textured:
                mtl_path, png_path = stem + ".mtl", stem + ".png"
                written.append(atomic_write(png_path, _write_bytes(png)))
                written.append(atomic_write(mtl_path, _write_bytes(mtl_text(os.path.basename(png_path)).encode())))
                text = obj_text(mesh, metadata, os.path.basename(mtl_path))
            else:
                text = obj_text(mesh, metadata)
            written.append(atomic_write(obj_path, _write_bytes(text.encode())))
            return [written[-1]] + written[:-1]
        except FileExistsError:
            for path in written:           # files of this attempt only: they were created by us just now
                os.remove(path)
            continue
    raise InvalidInputError(f"could not find a free OBJ file name for {prefix!r} in {out_dir}")


# --------------------------------------------------------------------------------------------------- MRC

def mrc_header(shape: tuple, dmin: float, dmax: float, dmean: float, rms: float, voxel: float,
               label: str = "comfyui-portrait3d shape.mrc") -> bytes:
    """A 1024-byte MRC2014 header for a mode-2 (float32) volume stored as ``array[nz][ny][nx]`` (x fastest).

    Cell lengths = shape × ``voxel`` (world metres, so the voxel size reads as the world spacing); angles 90°;
    axis order mapc/mapr/maps = 1/2/3; space group 1 (a single volume); origin 0; little-endian machine stamp.
    """
    nz, ny, nx = (int(s) for s in shape)
    head = bytearray(1024)
    struct.pack_into("<10i", head, 0, nx, ny, nz, 2, 0, 0, 0, nx, ny, nz)      # nx ny nz mode nxstart.. mx my mz
    struct.pack_into("<6f", head, 40, nx * voxel, ny * voxel, nz * voxel, 90.0, 90.0, 90.0)
    struct.pack_into("<3i", head, 64, 1, 2, 3)                                  # mapc mapr maps
    struct.pack_into("<3f", head, 76, dmin, dmax, dmean)
    struct.pack_into("<2i", head, 88, 1, 0)                                     # ispg, nsymbt
    head[104:108] = b"\0\0\0\0"                                                 # exttyp: none
    struct.pack_into("<i", head, 108, 20140)                                    # nversion
    struct.pack_into("<3f", head, 196, 0.0, 0.0, 0.0)                           # origin
    head[208:212] = b"MAP "
    head[212:216] = bytes([0x44, 0x44, 0x00, 0x00])                             # little-endian stamp
    struct.pack_into("<f", head, 216, rms)
    struct.pack_into("<i", head, 220, 1)                                        # nlabl
    text = label.encode("ascii", "replace")[:80]
    head[224:224 + len(text)] = text
    return bytes(head)


def read_mrc_header(path: str) -> dict:
    """The main MRC2014 header fields of a file (for checks and tests)."""
    with open(path, "rb") as fh:
        head = fh.read(1024)
    nx, ny, nz, mode = struct.unpack_from("<4i", head, 0)
    return {"nx": nx, "ny": ny, "nz": nz, "mode": mode,
            "nxstart": struct.unpack_from("<3i", head, 16), "mxyz": struct.unpack_from("<3i", head, 28),
            "cella": struct.unpack_from("<3f", head, 40), "cellb": struct.unpack_from("<3f", head, 52),
            "mapcrs": struct.unpack_from("<3i", head, 64),
            "dmin": struct.unpack_from("<f", head, 76)[0], "dmax": struct.unpack_from("<f", head, 80)[0],
            "dmean": struct.unpack_from("<f", head, 84)[0], "ispg": struct.unpack_from("<i", head, 88)[0],
            "nsymbt": struct.unpack_from("<i", head, 92)[0], "nversion": struct.unpack_from("<i", head, 108)[0],
            "origin": struct.unpack_from("<3f", head, 196), "map": head[208:212],
            "machst": head[212:216], "rms": struct.unpack_from("<f", head, 216)[0],
            "nlabl": struct.unpack_from("<i", head, 220)[0],
            "label": head[224:304].rstrip(b"\0").decode("ascii", "replace")}


def read_mrc(path: str) -> np.ndarray:
    """Volume of a mode-2 MRC file as ``[nz, ny, nx]`` float32 (memory-mapped)."""
    head = read_mrc_header(path)
    if head["mode"] != 2:
        raise InvalidInputError(f"{path}: MRC mode {head['mode']} is not float32 (mode 2)")
    offset = 1024 + head["nsymbt"]
    return np.memmap(path, dtype="<f4", mode="r", offset=offset, shape=(head["nz"], head["ny"], head["nx"]))


def mrc_border(resolution: int) -> int:
    """Voxels set to −1000 on every face of an N³ volume: 60 at the paper's 512, scaled with N (int(30·N/256))."""
    return int(30 * int(resolution) / 256)


def mrc_lattice(resolution: int = MRC_RESOLUTION, cube: float = MRC_CUBE) -> np.ndarray:
    """World coordinates of the MRC lattice on each axis: −cube/2 + i·cube/(N − 1), i = 0 … N − 1 (float64)."""
    return -cube / 2 + np.arange(resolution, dtype=np.float64) * (cube / (resolution - 1))


def _eg3d_skewed_points(i: int, n: int, cube: float) -> torch.Tensor:
    """EG3D ``create_samples`` positions of the N² samples with slowest index i (float32 float-division quirk)."""
    idx = torch.arange(i * n * n, (i + 1) * n * n, dtype=torch.long)
    voxel, origin = cube / (n - 1), -cube / 2
    s2 = (idx % n).float()
    s1 = (idx.float() / n) % n
    s0 = ((idx.float() / n) / n) % n
    return torch.stack([s0 * voxel + origin, s1 * voxel + origin, s2 * voxel + origin], -1)


def write_mrc(path_or_tmp: str, trigrid: TriGrid, decoder: Decoder, *, resolution: int = MRC_RESOLUTION,
              cube: float = MRC_CUBE, eg3d_skew: bool = False, progress: ProgressFn = None) -> dict:
    """Write the official ``shape.mrc`` volume to a path (use via ``atomic_write``).

    Layout (Portrait3D stage 7 / EG3D ``gen_videos``): raw σ (no softplus, no crop) on an N³ lattice over a cube of
    side ``cube`` centred at the origin (voxel cube/(N − 1)); the array index [i, j, k] holds σ at
    (x_i, y_j, z_k) **flipped on axis 0**, i.e. file slab i is x = x_{N−1−i}; a border on every face is −1000; mode 2
    float32. The paper's N is 512 with a 60-voxel border; other N keep the border's share of the cube:
    ``mrc_border(N)`` = int(30·N/256) voxels (60 at 512, 30 at 256, 7 at 64). In MRC terms the columns (nx, fastest) run along world +z, the rows
    (ny) along world +y, the sections (nz) along world −x.

    ``eg3d_skew`` reproduces EG3D's float-division sample positions (y shifted by k/N voxel, x by (j + k/N)/N
    voxel, float32-rounded) instead of the exact lattice. Computed one x-slab at a time (bounded memory).
    """
    n = int(resolution)
    if n < 8:
        raise InvalidInputError(f"MRC resolution must be ≥ 8, got {n}")
    pad = mrc_border(n)
    coords = torch.from_numpy(mrc_lattice(n, cube)).float()
    report = as_progress(progress)
    count, total, total_sq = 0, 0.0, 0.0
    dmin, dmax = math.inf, -math.inf
    interior = slice(pad, n - pad)
    gy, gz = torch.meshgrid(coords[interior], coords[interior], indexing="ij")
    with open(path_or_tmp, "wb") as fh:
        fh.write(b"\0" * 1024)
        for i in range(n):
            slab = np.full((n, n), MRC_PAD_VALUE, dtype=np.float32)
            if pad <= i < n - pad:
                src = n - 1 - i                                  # the flip on axis 0
                if eg3d_skew:
                    pts = _eg3d_skewed_points(src, n, cube).reshape(n, n, 3)[interior, interior].reshape(-1, 3)
                else:
                    pts = torch.stack([torch.full_like(gy, float(coords[src])), gy, gz], -1).reshape(-1, 3)
                sigma = raw_sigma_at(trigrid, decoder, pts, crop=None)
                slab[interior, interior] = sigma.reshape(n - 2 * pad, n - 2 * pad).cpu().numpy()
            fh.write(slab.astype("<f4", copy=False).tobytes())
            s64 = slab.astype(np.float64)
            total += float(s64.sum())
            total_sq += float((s64 * s64).sum())
            count += slab.size
            dmin, dmax = min(dmin, float(slab.min())), max(dmax, float(slab.max()))
            report(i + 1, n)
        mean = total / count
        rms = math.sqrt(max(0.0, total_sq / count - mean * mean))
        fh.seek(0)
        fh.write(mrc_header((n, n, n), dmin, dmax, mean, rms, cube / (n - 1)))
    return {"resolution": n, "cube_m": cube, "voxel_m": cube / (n - 1), "border_voxels": pad, "dmin": dmin,
            "dmax": dmax, "dmean": mean, "rms": rms, "eg3d_skew": bool(eg3d_skew)}


# --------------------------------------------------------------------------------------------------- pipeline

def build_mesh(trigrid: TriGrid, decoder: Decoder, *, resolution: int = DEFAULT_RESOLUTION,
               threshold: Union[float, str, None] = None, colour: str = "texture",
               texture_size: int = DEFAULT_TEXTURE_SIZE, decimate_faces: Optional[int] = None,
               smooth_iterations: int = 0, close_holes: bool = True, keep_largest: bool = True,
               texture_max_faces: Optional[int] = TEXTURE_MAX_FACES, progress: ProgressFn = None) -> MeshData:
    """Extract, colour and (for ``colour="texture"``) unwrap + bake: the mesh ``export_mesh`` writes.

    The result always has ``vertex_colors``; the textured variant also has ``uvs`` and ``texture`` and its vertices
    are split along UV seams (``stats["watertight"]`` describes the un-split surface).
    """
    if colour not in COLOUR_MODES:
        raise InvalidInputError(f"colour must be one of {COLOUR_MODES}, got {colour!r}")
    if colour == "texture":
        check_texture_size(texture_size)
    report = as_progress(progress)
    timings = {}
    textured = colour == "texture"
    target = decimate_faces
    t0 = time.perf_counter()
    settings = MeshSettings(resolution=resolution, threshold=threshold, close_holes=close_holes,
                            keep_largest=keep_largest, smooth_iterations=smooth_iterations, decimate_faces=target)
    mesh = extract_mesh(trigrid, decoder, settings, progress=report.sub(0.0, 0.6 if textured else 0.9))
    if textured and texture_max_faces and mesh.num_faces > texture_max_faces:
        from .mesh import decimate, topology, vertex_normals

        try:
            v, f = decimate(mesh.vertices.astype(np.float64), mesh.faces, int(texture_max_faces))
        except Portrait3DError:      # fast-simplification missing: unwrap the full mesh (slower, still correct)
            mesh.stats["auto_decimation_skipped"] = "fast-simplification is not installed"
        else:
            stats = dict(mesh.stats, auto_decimated_for_texture=int(texture_max_faces), **topology(v, f))
            mesh = MeshData(v.astype(np.float32), f, vertex_normals(v, f), stats=stats)
    timings["extract_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mesh = add_vertex_colours(mesh, trigrid, decoder, progress=report.sub(0.6 if textured else 0.9,
                                                                          0.62 if textured else 1.0))
    timings["vertex_colour_s"] = time.perf_counter() - t0
    if textured:
        t0 = time.perf_counter()
        mesh = unwrap(mesh, texture_size)
        report(0.8, 1.0)
        timings["unwrap_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        mesh = bake_texture(mesh, trigrid, decoder, texture_size, progress=report.sub(0.8, 1.0))
        timings["bake_s"] = time.perf_counter() - t0
    mesh.stats.update(colour=colour, vertices=mesh.num_vertices, faces=mesh.num_faces, timings=timings)
    return mesh


def export_mesh(trigrid: TriGrid, decoder: Decoder, out_dir: str, prefix: str = "portrait3d/mesh", fmt: str = "glb",
                *, resolution: Optional[int] = None, threshold: Union[float, str, None] = None,
                texture_size: int = DEFAULT_TEXTURE_SIZE, colour: str = "texture",
                decimate_faces: Optional[int] = None, smooth_iterations: int = 0, close_holes: bool = True,
                keep_largest: bool = True, texture_max_faces: Optional[int] = TEXTURE_MAX_FACES,
                description: Optional[str] = None, metadata: Optional[dict] = None,
                provenance: Optional[Mapping[str, str]] = None, mrc_eg3d_skew: bool = False,
                progress: ProgressFn = None) -> ExportResult:
    """Extract the portrait's mesh and write it as ``fmt`` under ``out_dir/<prefix>_NNNNN_.<fmt>`` (never
    overwriting). ``fmt="mrc"`` writes the official density volume instead (mesh settings unused).

    ``resolution``: lattice points per side; None = ``DEFAULT_RESOLUTION`` (256) for meshes and the paper's
    ``MRC_RESOLUTION`` (512) for mrc. ``description`` (default: the tri-grid's own) and ``metadata`` go into the
    file's settings record; ``provenance`` (str → str, e.g. ComfyUI's ``prompt`` / ``workflow`` JSON) into the
    files that can hold it (GLB ``asset.extras``, the OBJ texture's PNG text chunks).
    ``progress(done, total)`` is called throughout (total 1000) and may raise to cancel; no file is left behind then.
    PLY gets vertex colours, STL geometry only (no texture is baked for them).
    """
    fmt = str(fmt).lower().lstrip(".")
    if fmt not in FORMATS:
        raise InvalidInputError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if colour not in COLOUR_MODES:
        raise InvalidInputError(f"colour must be one of {COLOUR_MODES}, got {colour!r}")
    if trigrid.batch_size != 1:
        raise InvalidInputError(f"export_mesh takes one portrait; this tri-grid has batch {trigrid.batch_size} "
                                f"(use export_batch, or trigrid.select(i))")
    report = as_progress(progress)
    started = time.perf_counter()
    if fmt == "mrc":
        info = {}

        def write(tmp):
            info.update(write_mrc(tmp, trigrid, decoder, resolution=resolution or MRC_RESOLUTION,
                                  eg3d_skew=mrc_eg3d_skew, progress=report))
        path = save_new(out_dir, prefix, ".mrc", write)
        info["total_s"] = time.perf_counter() - started
        return ExportResult(path, [path], None, info)

    textured = colour == "texture" and fmt in ("glb", "obj")
    mesh = build_mesh(trigrid, decoder, resolution=resolution or DEFAULT_RESOLUTION, threshold=threshold,
                      colour="texture" if textured else "vertex", texture_size=texture_size,
                      decimate_faces=decimate_faces, smooth_iterations=smooth_iterations, close_holes=close_holes,
                      keep_largest=keep_largest, texture_max_faces=texture_max_faces,
                      progress=report.sub(0.0, 0.97))
    settings = {k: mesh.stats.get(k) for k in ("resolution", "threshold_density", "threshold_preset", "crop",
                                               "close_holes", "keep_largest", "smooth_iterations", "decimate_faces")}
    settings.update(colour="texture" if textured else "vertex", format=fmt)
    if textured:
        settings["texture_size"] = int(texture_size)
    meta = _metadata(trigrid, description, settings, metadata)
    t0 = time.perf_counter()
    if fmt == "glb":
        data = glb_bytes(mesh, meta, "texture" if textured else "vertex", provenance)
        files = [save_new(out_dir, prefix, ".glb", _write_bytes(data))]
    elif fmt == "obj":
        files = _save_obj_set(out_dir, prefix, mesh, meta, textured, provenance)
    elif fmt == "ply":
        files = [save_new(out_dir, prefix, ".ply", _write_bytes(ply_bytes(mesh)))]
    else:
        files = [save_new(out_dir, prefix, ".stl", _write_bytes(stl_bytes(mesh)))]
    mesh.stats["timings"]["write_s"] = time.perf_counter() - t0
    mesh.stats["timings"]["total_s"] = time.perf_counter() - started
    report(1.0, 1.0)
    return ExportResult(files[0], files, mesh, dict(mesh.stats))


def export_batch(trigrid: TriGrid, decoder: Decoder, out_dir: str, prefix: str = "portrait3d/mesh",
                 fmt: str = "glb", *, progress: ProgressFn = None, **options) -> list:
    """``export_mesh`` for every tri-grid of a batch, in order: one ``ExportResult`` (one set of files) per item.

    ``options`` are ``export_mesh``'s keywords; ``progress(done, total)`` runs over the whole batch (total 1000).
    """
    report = as_progress(progress)
    count = trigrid.batch_size
    return [export_mesh(trigrid.select(i), decoder, out_dir, prefix, fmt, **options,
                        progress=report.sub(i / count, (i + 1) / count))
            for i in range(count)]
