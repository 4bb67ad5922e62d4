"""Generator configuration: a plain dataclass, JSON in and out.

Two sources of numbers:
- the official constructor kwargs (``TriPlaneGenerator(**init_kwargs)``, recovered from ``model_512.pkl``'s
  ``_init_kwargs``; ``portrait_gan.md`` §12.1), and
- literals hard-coded in the official ``__init__`` bodies (backbone resolution 256, background channel base/max
  32768/512, SR input resolution 128 and block widths 256/128). ``channel_base``/``channel_max`` in the kwargs are
  accepted but ignored by this generator.

``GeneratorConfig.full_512()`` is the released model. ``GeneratorConfig.from_oracle_config(json)`` rebuilds the
reduced oracle model from ``generator_config.json`` (its ``init_kwargs`` plus the documented literal reductions).
``infer_literals(state)`` reads the literals back from a state dict's shapes (used by the converter).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping, Optional, Tuple

from ..errors import CheckpointError, InvalidInputError

FORMAT_NAME = "portrait3d-gan"
FORMAT_VERSION = 1

# rendering_kwargs of the released model (``checkpoints.md`` §3.3, ``generator_config.json``).
DEFAULT_RENDERING_KWARGS = {
    "image_resolution": 512,
    "disparity_space_sampling": False,
    "clamp_mode": "softplus",
    "superresolution_module": "training.superresolution.SuperresolutionHybrid8XDC",
    "c_gen_conditioning_zero": False,
    "gpc_reg_prob": 0.7,
    "decoder_activation": "none",
    "use_torgb_raw": True,
    "use_background": True,
    "triplane_depth": 3,
    "c_scale": 1.0,
    "superresolution_noise_mode": "none",
    "density_reg": 0.0,
    "density_reg_p_dist": 0.004,
    "reg_type": "l1",
    "decoder_lr_mul": 1.0,
    "sr_antialias": True,
    "radius_scale": 0.7,
    "depth_resolution": 48,
    "depth_resolution_importance": 48,
    "ray_start": 2.3850000000000002,
    "ray_end": 3.12,
    "box_warp": 0.7,
}


def _is_pow2(n: int) -> bool:
    return n >= 4 and (n & (n - 1)) == 0


@dataclass(frozen=True)
class GeneratorConfig:
    """Every size the generator's structure depends on. Defaults: the released 512 model."""

    z_dim: int = 512
    w_dim: int = 512
    c_dim: int = 25
    pose_dim: int = 6
    img_resolution: int = 512                 # SR output
    img_channels: int = 3
    mapping_layers: int = 2
    mapping_lr_multiplier: float = 0.01
    backbone_resolution: int = 256            # literal; pyramid levels are 2·r for r = 4 … this
    trigrid_channels: int = 12
    triplane_depth: int = 3
    decode_channels: int = 32
    decoder_hidden: int = 32
    conv_clamp: Optional[float] = None        # backbone and background
    num_fp16_res: int = 0                     # backbone (always run in fp32 here)
    bcg_channel_base: int = 32768             # literal
    bcg_channel_max: int = 512                # literal
    sr_input_resolution: int = 128            # literal (also the background resolution)
    sr_channels: Tuple[int, int] = (256, 128)  # literals: SR block0 / block1 widths
    sr_num_fp16_res: int = 4
    pose_hidden: Tuple[int, int] = (128, 32)
    batch_size: int = 4                       # training batch (sizes the optional SMPL buffers)
    explicitly_symmetry: bool = True
    thickness: float = 0.25
    neural_rendering_resolution: int = 128
    rendering_kwargs: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_RENDERING_KWARGS))

    def __post_init__(self):
        object.__setattr__(self, "sr_channels", tuple(int(c) for c in self.sr_channels))
        object.__setattr__(self, "pose_hidden", tuple(int(c) for c in self.pose_hidden))
        object.__setattr__(self, "rendering_kwargs", dict(self.rendering_kwargs))
        for name in ("backbone_resolution", "sr_input_resolution", "img_resolution"):
            if not _is_pow2(getattr(self, name)):
                raise InvalidInputError(f"GeneratorConfig.{name} must be a power of two ≥ 4, got {getattr(self, name)}")
        if self.img_resolution != 4 * self.sr_input_resolution:
            raise InvalidInputError(f"the 8XDC super-resolution needs img_resolution = 4 × sr_input_resolution, got "
                                    f"{self.img_resolution} and {self.sr_input_resolution}")
        if len(self.sr_channels) != 2:
            raise InvalidInputError("sr_channels must hold the two SR block widths")
        rk = self.rendering_kwargs
        unsupported = {
            "decoder_activation": ("none",), "use_torgb_raw": (True,), "use_background": (True,),
            "c_gen_conditioning_zero": (False,), "clamp_mode": ("softplus",), "disparity_space_sampling": (False,),
        }
        for key, allowed in unsupported.items():
            if key in rk and rk[key] not in allowed:
                raise InvalidInputError(f"rendering_kwargs[{key!r}] = {rk[key]!r} is not supported (only "
                                        f"{allowed[0]!r}, as in the released Portrait3D model)")
        if int(rk.get("triplane_depth", self.triplane_depth)) != self.triplane_depth:
            raise InvalidInputError("rendering_kwargs['triplane_depth'] disagrees with triplane_depth")

    # ------------------------------------------------------------------------------------------ derived sizes
    @property
    def plane_channels(self) -> int:
        """Channels per plane (36 = 12 features × 3 depth slices)."""
        return self.trigrid_channels * self.triplane_depth

    @property
    def backbone_channels(self) -> int:
        """2-D branch width (108 = 3 planes × 36)."""
        return 3 * self.plane_channels

    @property
    def block_resolutions(self) -> list:
        return [2 ** i for i in range(2, self.backbone_resolution.bit_length())]

    @property
    def pyramid_resolutions(self) -> list:
        """Spatial sizes of the tri-grid levels (8 … 512 for the released model)."""
        return [2 * r for r in self.block_resolutions]

    @property
    def num_ws(self) -> int:
        return 2 * len(self.block_resolutions)

    @property
    def bcg_resolution(self) -> int:
        return self.sr_input_resolution

    @property
    def bcg_block_resolutions(self) -> list:
        return [2 ** i for i in range(2, self.bcg_resolution.bit_length())]

    @property
    def bcg_channels(self) -> dict:
        return {r: min(self.bcg_channel_base // r, self.bcg_channel_max) for r in self.bcg_block_resolutions}

    @property
    def bcg_num_ws(self) -> int:
        return 2 * len(self.bcg_block_resolutions)

    @property
    def sr_conv_clamp(self) -> Optional[float]:
        return 256.0 if self.sr_num_fp16_res > 0 else None

    @property
    def box_warp(self) -> float:
        return float(self.rendering_kwargs.get("box_warp", 0.7))

    @property
    def c_scale(self) -> float:
        return float(self.rendering_kwargs.get("c_scale", 1.0))

    @property
    def sr_antialias(self) -> bool:
        return bool(self.rendering_kwargs.get("sr_antialias", True))

    @property
    def sr_noise_mode(self) -> str:
        return str(self.rendering_kwargs.get("superresolution_noise_mode", "none"))

    @property
    def decoder_lr_multiplier(self) -> float:
        return float(self.rendering_kwargs.get("decoder_lr_mul", 1.0))

    # ------------------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        d = asdict(self)
        d["sr_channels"] = list(self.sr_channels)
        d["pose_hidden"] = list(self.pose_hidden)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GeneratorConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InvalidInputError(f"unknown generator config fields {unknown}")
        return cls(**dict(d))

    @classmethod
    def from_json(cls, text: str) -> "GeneratorConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes) -> "GeneratorConfig":
        return replace(self, **changes)

    # ------------------------------------------------------------------------------------------ constructors
    @classmethod
    def full_512(cls) -> "GeneratorConfig":
        return cls()

    @classmethod
    def from_init_kwargs(cls, kwargs: Mapping[str, Any], *, neural_rendering_resolution: Optional[int] = None,
                         rendering_kwargs: Optional[Mapping[str, Any]] = None, **literals) -> "GeneratorConfig":
        """From official ``TriPlaneGenerator`` kwargs; ``literals`` override the hard-coded sizes
        (``backbone_resolution``, ``bcg_channel_base``, ``bcg_channel_max``, ``sr_input_resolution``,
        ``sr_channels``)."""
        kw = dict(kwargs)
        rk = dict(DEFAULT_RENDERING_KWARGS)
        rk.update(dict(kw.get("rendering_kwargs") or {}))
        if rendering_kwargs is not None:
            rk.update(dict(rendering_kwargs))
        mapping_kwargs = dict(kw.get("mapping_kwargs") or {})
        values = dict(
            z_dim=int(kw.get("z_dim", 512)), w_dim=int(kw.get("w_dim", 512)), c_dim=int(kw.get("c_dim", 25)),
            img_resolution=int(kw.get("img_resolution", 512)), img_channels=int(kw.get("img_channels", 3)),
            mapping_layers=int(mapping_kwargs.get("num_layers", 2)),
            conv_clamp=None if kw.get("conv_clamp") is None else float(kw["conv_clamp"]),
            num_fp16_res=int(kw.get("num_fp16_res", 0)), sr_num_fp16_res=int(kw.get("sr_num_fp16_res", 4)),
            batch_size=int(kw.get("batch_size", 4)), explicitly_symmetry=bool(kw.get("explicitly_symmetry", True)),
            thickness=float(kw.get("thickness", 0.25)), triplane_depth=int(rk.get("triplane_depth", 3)),
            rendering_kwargs=rk,
        )
        if neural_rendering_resolution is not None:
            values["neural_rendering_resolution"] = int(neural_rendering_resolution)
        values.update(literals)
        return cls(**values)

    @classmethod
    def from_oracle_config(cls, cfg: Mapping[str, Any]) -> "GeneratorConfig":
        """The reduced oracle model from ``generator_config.json``: ``init_kwargs`` + its documented reductions."""
        derived = cfg.get("derived", {})
        literals = {}
        if "pyramid_dict_keys" in derived:
            literals["backbone_resolution"] = max(int(k) for k in derived["pyramid_dict_keys"])
        if "sr_input_resolution" in derived:
            literals["sr_input_resolution"] = int(derived["sr_input_resolution"])
        if "sr_block_channels" in derived:
            literals["sr_channels"] = tuple(int(c) for c in derived["sr_block_channels"])
        for item in cfg.get("reduction", {}).get("changed_hardcoded_literals", []):
            where = str(item.get("where", "")).lower()
            if "background" in where and "channel_base" in where:
                literals["bcg_channel_base"] = int(item["oracle"])
            elif "background" in where and "channel_max" in where:
                literals["bcg_channel_max"] = int(item["oracle"])
            elif "tri-grid backbone" in where:
                literals["backbone_resolution"] = int(item["oracle"])
            elif "input_resolution" in where:
                literals["sr_input_resolution"] = int(item["oracle"])
            elif "block0" in where:
                literals["sr_channels"] = (int(item["oracle"][1]), literals.get("sr_channels", (0, 0))[1])
            elif "block1" in where:
                literals["sr_channels"] = (literals.get("sr_channels", (0, 0))[0], int(item["oracle"][1]))
        nrr = cfg.get("fixture_forward", {}).get("neural_rendering_resolution")
        return cls.from_init_kwargs(cfg["init_kwargs"], neural_rendering_resolution=nrr,
                                    rendering_kwargs=cfg.get("fixture_forward", {}).get("rendering_kwargs_used"),
                                    **literals)


def infer_literals(state: Mapping[str, Any], source: str = "state dict") -> dict:
    """The hard-coded sizes, read from tensor shapes of an official generator state dict."""
    try:
        blocks = [int(k.split(".")[2][1:]) for k in state
                  if k.startswith("backbone.synthesis.b") and not k.startswith("backbone.synthesis.b3d")]
        backbone_resolution = max(blocks)
        bcg = {}
        for k, v in state.items():
            if k.startswith("bcg_synthesis.b") and k.endswith(".conv1.weight"):
                bcg[int(k.split(".")[1][1:])] = int(v.shape[0])
        bcg_resolution = max(bcg)
        top = bcg[bcg_resolution]
        channel_max = max(bcg.values())
        sr0 = int(state["superresolution.block0.conv1.weight"].shape[0])
        sr1 = int(state["superresolution.block1.conv1.weight"].shape[0])
    except (KeyError, ValueError, IndexError, AttributeError) as exc:
        raise CheckpointError(f"{source}: not a 3DPortraitGAN-Pyramid generator state dict (could not read the "
                              f"backbone / background / super-resolution sizes: {type(exc).__name__}: {exc})") from None
    return dict(backbone_resolution=backbone_resolution, bcg_channel_base=top * bcg_resolution,
                bcg_channel_max=channel_max, sr_input_resolution=bcg_resolution, sr_channels=(sr0, sr1))


# The 18 SMPL-derived tensors of ``renderer.*`` (``checkpoints.md`` §3.1), in state-dict order. B = batch_size.
def smpl_buffer_specs(batch_size: int = 4) -> list:
    """``[(key, shape, dtype name), …]`` of the optional SMPL subtree."""
    b = batch_size
    return [
        ("renderer.shaped_smpl", (b, 6890, 3), "float32"),
        ("renderer.align_points", (b, 1, 3), "float32"),
        ("renderer.face_mask", (13776,), "bool"),
        ("renderer.head_face_mask", (13776,), "bool"),
        ("renderer.aligned_SMPL.smpl_joint_regressor", (30, 6890), "float32"),
        ("renderer.aligned_SMPL.faces", (13776, 3), "int64"),
        ("renderer.aligned_SMPL.model.betas", (b, 10), "float32"),
        ("renderer.aligned_SMPL.model.global_orient", (b, 3), "float32"),
        ("renderer.aligned_SMPL.model.body_pose", (b, 69), "float32"),
        ("renderer.aligned_SMPL.model.transl", (b, 3), "float32"),
        ("renderer.aligned_SMPL.model.shapedirs", (6890, 3, 10), "float32"),
        ("renderer.aligned_SMPL.model.faces_tensor", (13776, 3), "int64"),
        ("renderer.aligned_SMPL.model.v_template", (6890, 3), "float32"),
        ("renderer.aligned_SMPL.model.J_regressor", (24, 6890), "float32"),
        ("renderer.aligned_SMPL.model.posedirs", (207, 20670), "float32"),
        ("renderer.aligned_SMPL.model.parents", (24,), "int64"),
        ("renderer.aligned_SMPL.model.lbs_weights", (6890, 24), "float32"),
        ("renderer.aligned_SMPL.model.vertex_joint_selector.extra_joints_idxs", (21,), "int64"),
    ]
