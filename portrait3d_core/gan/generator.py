"""``PortraitGenerator``: the 3DPortraitGAN-Pyramid ``TriPlaneGenerator`` with the official state-dict layout.

Top-level keys (in order): ``dataset_label_std``, optional ``renderer.*`` (SMPL buffers, kept when a checkpoint
has them, never needed for canonical rendering), ``backbone.*``, ``superresolution.*``, ``decoder.*``,
``torgb.*``, ``bcg_synthesis.*``, ``pose_branch.*``.

Data flow (``portrait_gan.md`` §0): ``mapping(z, c, p)`` → ws ``[N, num_ws, w_dim]`` → ``trigrid(ws)`` (pyramid
levels ``[N, 3, 36, R, R]``) → ``render_image`` (the shared renderer) with the background hook
``bcg_synthesis(ws[:, :bcg_num_ws])`` composited in feature space → raw ToRGB → ``SuperresolutionHybrid8XDC``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._kernels import kernels
from ..decoder import Decoder, DecoderConfig, OSGDecoder, PoseBranch, RawToRGB
from ..errors import CheckpointError, InvalidInputError
from ..renderer import RenderSettings, render_image
from ..trigrid import TriGrid
from .backbone import Hierarchy3DAwareGenerator
from .config import GeneratorConfig, smpl_buffer_specs
from .deform import PoseDeformer, require_smpl
from .pose import PosePrediction, predict_pose
from .smpl import SMPLModel
from .stylegan2 import SynthesisNetwork
from .superres import SuperresolutionHybrid8XDC


class SMPLBuffers(nn.Module):
    """The ``renderer.*`` subtree as plain buffers (nested modules named after the key paths).

    Real checkpoints hold licensed SMPL data here; nothing in canonical rendering reads it. Empty by default.
    """

    def reset(self, items) -> None:
        """Replace the subtree by ``[(relative key, tensor or (shape, dtype, device)), …]`` in state-dict order."""
        self._buffers.clear()
        self._modules.clear()
        self._non_persistent_buffers_set.clear()
        for key, value in items:
            *path, name = key.split(".")
            node = self
            for part in path:
                if part not in node._modules:
                    node.add_module(part, nn.Module())
                node = node._modules[part]
            if not torch.is_tensor(value):
                shape, dtype, device = value
                value = torch.zeros(shape, dtype=dtype, device=device)
            node.register_buffer(name, value)

    def __len__(self) -> int:
        return sum(1 for _ in self.buffers())


class PortraitGenerator(nn.Module):
    """3DPortraitGAN-Pyramid generator. ``config`` fixes every size; ``smpl_buffers`` adds zero SMPL buffers
    (batch ``config.batch_size``) so the state dict has all 446 keys of an official checkpoint."""

    def __init__(self, config: GeneratorConfig = GeneratorConfig(), *, smpl_buffers: bool = False):
        super().__init__()
        self.config = config
        cfg = config
        self.register_buffer("dataset_label_std", torch.ones(cfg.c_dim))
        self.renderer = SMPLBuffers()
        if smpl_buffers:
            device = self.dataset_label_std.device
            self.renderer.reset([(k[len("renderer."):], (shape, getattr(torch, dtype), device))
                                 for k, shape, dtype in smpl_buffer_specs(cfg.batch_size)])
        self.backbone = Hierarchy3DAwareGenerator(cfg.z_dim, cfg.c_dim + cfg.pose_dim, cfg.w_dim,
                                                  cfg.backbone_resolution, cfg.plane_channels, cfg.mapping_layers,
                                                  cfg.mapping_lr_multiplier, cfg.conv_clamp)
        self.superresolution = SuperresolutionHybrid8XDC(
            cfg.decode_channels, cfg.sr_input_resolution, cfg.sr_channels, cfg.w_dim, cfg.img_channels,
            conv_clamp=cfg.sr_conv_clamp, use_fp16=cfg.sr_num_fp16_res > 0, antialias=cfg.sr_antialias,
            noise_mode=cfg.sr_noise_mode)
        self.decoder = OSGDecoder(cfg.trigrid_channels, cfg.decoder_hidden, cfg.decode_channels,
                                  cfg.decoder_lr_multiplier)
        self.torgb = RawToRGB(cfg.decode_channels, cfg.img_channels, cfg.w_dim)
        self.bcg_synthesis = SynthesisNetwork(cfg.w_dim, cfg.bcg_resolution, cfg.decode_channels,
                                              cfg.bcg_channel_base, cfg.bcg_channel_max, cfg.conv_clamp)
        self.pose_branch = PoseBranch(cfg.z_dim + cfg.c_dim, cfg.pose_hidden, cfg.pose_dim)
        if self.bcg_synthesis.num_ws != cfg.bcg_num_ws or self.backbone.num_ws != cfg.num_ws:
            raise AssertionError("internal: ws counts disagree with the config")

    # ------------------------------------------------------------------------------------------ sizes
    @property
    def num_ws(self) -> int:
        return self.config.num_ws

    @property
    def bcg_num_ws(self) -> int:
        return self.config.bcg_num_ws

    @property
    def device(self) -> torch.device:
        return self.dataset_label_std.device

    @property
    def smpl(self) -> Optional[SMPLModel]:
        """The renderer's SMPL body (``gan.smpl.SMPLModel``: canonical ``shaped_vertices``, ``faces``,
        ``joint_regressor``, ``posed_vertices(pose)``), or None when the checkpoint has no ``renderer.*`` buffers.
        Built from the buffers on first use and cached until they change (load, device or dtype moves)."""
        key = tuple((b.data_ptr(), b.device, b.dtype, b._version) for b in self.renderer.buffers())
        cached = getattr(self, "_smpl_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, SMPLModel.from_buffers(self.renderer, source="generator renderer.* buffers")
                      if key else None)
            self._smpl_cache = cached
        return cached[1]

    def deformer(self, pose: torch.Tensor, backend: str = "auto") -> PoseDeformer:
        """The posed → canonical sample warp for pose ``[N, 6]`` (neck + head axis-angle, radians), thickness from
        the config (0.25). Differentiable in ``pose``; pass it as ``render_image(..., deform=...)``."""
        return PoseDeformer(require_smpl(self.smpl), pose.to(self.device), self.config.thickness, backend)

    # ------------------------------------------------------------------------------------------ state
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Official key names; the ``renderer.*`` subtree is rebuilt from whatever the state holds (may be none)."""
        device = self.dataset_label_std.device
        self.renderer.reset([(k[len("renderer."):], (tuple(v.shape), v.dtype, device))
                             for k, v in state_dict.items() if k.startswith("renderer.")])
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def from_state_dict(cls, state: dict, config: GeneratorConfig, device="cpu") -> "PortraitGenerator":
        """Build for ``config`` and load ``state`` strictly (``renderer.*`` optional); eval mode, no grads.

        Built on the meta device first, so no time is spent on a random initialisation.
        """
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device=device)
        try:
            model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"the generator state dict does not match its config: {exc}") from None
        return model.eval().requires_grad_(False)

    def set_sr_fp16(self, enabled: bool) -> None:
        """Half-precision super-resolution on CUDA (official GPU behaviour, the default when sr_num_fp16_res > 0)."""
        self.superresolution.set_fp16(enabled)

    # ------------------------------------------------------------------------------------------ pieces
    def mapping(self, z: torch.Tensor, c: torch.Tensor, p: Optional[torch.Tensor] = None,
                truncation_psi: float = 1.0, truncation_cutoff: Optional[int] = None) -> torch.Tensor:
        """z ``[N, z_dim]``, conditioning camera ``[N, 25]``, pose ``[N, 6]`` (zeros if None)
        → ws ``[N, num_ws, w_dim]``."""
        return self.backbone.mapping(z, self.conditioning(c, p), truncation_psi, truncation_cutoff)

    def conditioning(self, c: torch.Tensor, p: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The mapping's label input ``(c ⊕ p) · c_scale`` ``[N, 31]`` (p = zeros when None)."""
        if c.dim() != 2 or c.shape[1] != self.config.c_dim:
            raise InvalidInputError(f"camera labels must be [N, {self.config.c_dim}], got {tuple(c.shape)}")
        if p is None:
            p = torch.zeros(c.shape[0], self.config.pose_dim, dtype=c.dtype, device=c.device)
        if p.shape != (c.shape[0], self.config.pose_dim):
            raise InvalidInputError(f"pose parameters must be [N, {self.config.pose_dim}], got {tuple(p.shape)}")
        return torch.cat([c, p.to(c.dtype)], dim=1) * self.config.c_scale

    def pose(self, z: torch.Tensor, c: torch.Tensor) -> PosePrediction:
        """The generator pose branch on ``z ⊕ c`` with explicit symmetry (``PosePrediction.pose`` ``[N, 6]``)."""
        return predict_pose(self.pose_branch, z, c, self.config.explicitly_symmetry)

    def synthesize_levels(self, ws: torch.Tensor, noise_mode: str = "const") -> list:
        """ws → pyramid levels ``[N, 3, 36, R, R]``, R = 8 … 512 (fp32)."""
        return self.backbone.synthesis(ws.float(), noise_mode=noise_mode)

    def trigrid(self, ws: torch.Tensor, noise_mode: str = "const") -> TriGrid:
        """ws → ``TriGrid`` (levels + ws, the model's box_warp)."""
        return TriGrid(self.synthesize_levels(ws, noise_mode), ws, self.config.box_warp,
                       {"source": "PortraitGenerator"})

    def decoder_view(self) -> Decoder:
        """A ``Decoder`` sharing this generator's ``decoder``/``torgb``/``pose_branch`` (no copy)."""
        cfg = self.config
        dcfg = DecoderConfig(features=cfg.trigrid_channels, hidden=cfg.decoder_hidden, out_features=cfg.decode_channels,
                             w_dim=cfg.w_dim, z_dim=cfg.z_dim, c_dim=cfg.c_dim, lr_multiplier=cfg.decoder_lr_multiplier)
        return Decoder.from_modules(self.decoder, self.torgb, self.pose_branch, dcfg)

    def background_ws(self, ws: torch.Tensor) -> torch.Tensor:
        """``ws[:, :bcg_num_ws]``; a shorter ws is padded by repeating its last entry."""
        return pad_ws(ws, self.bcg_num_ws)[:, :self.bcg_num_ws]

    def background(self, ws: torch.Tensor, noise_mode: str = "const") -> torch.Tensor:
        """Background features ``[N, 32, R_bg, R_bg]`` (R_bg = 128 for the released model)."""
        return self.bcg_synthesis(self.background_ws(ws).float(), noise_mode=noise_mode)

    def background_hook(self, noise_mode: str = "const", cache: bool = True) -> Callable:
        """``fn(trigrid, H, W) -> [B, 32, R_bg, R_bg]`` for ``render_image(..., background=fn)``, from ``trigrid.ws``.

        With ``cache`` the last result is reused while the ws values are unchanged (turntables re-render one ws).
        """
        memo = {}

        def hook(trigrid: TriGrid, height: int, width: int) -> torch.Tensor:
            if trigrid.ws is None:
                raise InvalidInputError("the GAN background needs the tri-grid's ws (this tri-grid has none)")
            ws = trigrid.ws
            if ws.shape[-1] != self.config.w_dim:
                raise InvalidInputError(f"tri-grid ws has width {ws.shape[-1]}, the generator expects "
                                        f"{self.config.w_dim}")
            if not cache or ws.requires_grad:
                return self.background(ws, noise_mode)
            hit = memo.get("ws")
            if hit is not None and hit.shape == ws.shape and hit.device == ws.device and torch.equal(hit, ws):
                return memo["bg"]
            bg = self.background(ws, noise_mode)
            memo.update(ws=ws.detach().clone(), bg=bg)
            return bg

        return hook

    def superresolve(self, image_raw: torch.Tensor, features: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
        """Raw image ``[N, 3, h, h]`` + composited features ``[N, 32, h, h]`` → ``[N, 3, img_res, img_res]``."""
        return self.superresolution(image_raw, features, ws)

    def render_settings(self, deterministic: bool = False, **changes) -> RenderSettings:
        """The model's ``rendering_kwargs`` as renderer settings (ray range, 48 + 48 samples, crop 0.1)."""
        rk = self.config.rendering_kwargs
        if not isinstance(rk.get("ray_start"), (int, float)) or not isinstance(rk.get("ray_end"), (int, float)):
            raise InvalidInputError("rendering_kwargs ray_start/ray_end must be numbers ('auto' is not supported)")
        values = dict(ray_start=float(rk["ray_start"]), ray_end=float(rk["ray_end"]),
                      coarse_samples=int(rk.get("depth_resolution", 48)),
                      fine_samples=int(rk.get("depth_resolution_importance", 48)), deterministic=deterministic)
        values.update(changes)
        return RenderSettings(**values)

    # ------------------------------------------------------------------------------------------ full passes
    def render_trigrid(self, trigrid: TriGrid, c: torch.Tensor, resolution: Optional[int] = None, *,
                       settings: Optional[RenderSettings] = None, background: bool = True,
                       super_resolution: bool = True, noise_mode: str = "const",
                       generator: Optional[torch.Generator] = None, progress=None,
                       pose: Optional[torch.Tensor] = None, deform=None) -> dict:
        """Render any tri-grid (synthesised or loaded; its ``ws`` styles ToRGB, background and SR) from cameras
        ``[N, 25]`` at ``resolution``² (default: the model's neural rendering resolution).

        ``pose [N, 6]`` renders the posed body (official ``apply_def=True``): every coarse and fine sample is warped
        posed → canonical by ``self.deformer(pose)`` before lookup and crop; ``None`` is the canonical render.
        ``deform`` passes a ready warp instead (any ``points -> points`` callable, e.g. a ``PoseDeformer``).

        Keys: ``image_raw`` ``[N, 3, h, h]``, ``image_depth``, ``image_mask`` (Σw·1.002 − 0.001), ``weights_image``,
        ``feature_image`` (composited; input of torgb and SR), ``feature_image_raw``; with ``background``:
        ``bcg_features`` (resized to h) and ``image_background`` (torgb of the background alone, styled by the last
        background w); with ``super_resolution``: ``image`` ``[N, 3, img_res, img_res]``.
        """
        if trigrid.ws is None:
            raise InvalidInputError("this tri-grid has no ws; ToRGB, the background and SR need them")
        ws = trigrid.ws
        if ws.shape[-1] != self.config.w_dim:
            raise InvalidInputError(f"tri-grid ws has width {ws.shape[-1]}, this generator expects {self.config.w_dim}")
        resolution = int(resolution or self.config.neural_rendering_resolution)
        settings = settings or self.render_settings()
        if pose is not None:
            if deform is not None:
                raise InvalidInputError("give either a pose or a deform callable, not both")
            if not torch.is_tensor(pose) or pose.dim() != 2 or pose.shape[1] != 6 or \
                    pose.shape[0] not in (1, c.shape[0]):
                raise InvalidInputError(f"pose must be [{c.shape[0]}, 6] (or [1, 6]) neck + head axis-angle in radians "
                                        f"for {c.shape[0]} camera(s), got "
                                        f"{tuple(pose.shape) if torch.is_tensor(pose) else type(pose).__name__}")
            deform = self.deformer(pose, settings.backend)      # the search uses the sampler's backend choice
        bcg = None
        if background:
            ws_bcg = self.background_ws(ws)
            bcg = self.bcg_synthesis(ws_bcg.float(), noise_mode=noise_mode)
        out = render_image(trigrid, self.decoder_view(), c, resolution, settings,
                           background=None if bcg is None else (lambda tg, h, w: bcg),
                           generator=generator, progress=progress, deform=deform)
        result = {"image_raw": out.image, "image_depth": out.depth, "image_mask": out.mask,
                  "weights_image": out.weight_sum, "feature_image": out.features,
                  "feature_image_raw": out.features_raw}
        if bcg is not None:
            if bcg.shape[-2:] != (resolution, resolution):
                bcg = F.interpolate(bcg, size=(resolution, resolution), mode="bilinear", align_corners=False,
                                    antialias=True)
            result["bcg_features"] = bcg
            result["image_background"] = self.torgb(bcg, ws_bcg[:, -1])
        if super_resolution:
            result["image"] = self.superresolve(out.image, out.features, ws)
        return result

    def synthesis(self, ws: torch.Tensor, c: torch.Tensor, neural_rendering_resolution: Optional[int] = None, *,
                  settings: Optional[RenderSettings] = None, noise_mode: str = "const",
                  generator: Optional[torch.Generator] = None, progress=None,
                  super_resolution: bool = True, pose: Optional[torch.Tensor] = None, deform=None) -> dict:
        """Official ``G.synthesis``: ws ``[N, num_ws, w_dim]`` + render cameras ``[N, 25]`` → ``render_trigrid``'s
        dict (``image``, ``image_raw``, ``image_depth``, ``image_mask``, ``image_background``, intermediates) plus
        ``trigrid`` (the synthesised ``TriGrid``). ``pose [N, 6]``: posed rendering (``apply_def=True,
        pose_params=pose``), differentiable in ws and pose; None: canonical."""
        if ws.dim() != 3 or ws.shape[1] != self.num_ws or ws.shape[2] != self.config.w_dim:
            raise InvalidInputError(f"ws must be [N, {self.num_ws}, {self.config.w_dim}], got {tuple(ws.shape)}")
        trigrid = self.trigrid(ws, noise_mode)
        result = self.render_trigrid(trigrid, c, neural_rendering_resolution, settings=settings, background=True,
                                     super_resolution=super_resolution, noise_mode=noise_mode,
                                     generator=generator, progress=progress, pose=pose, deform=deform)
        result["trigrid"] = trigrid
        return result

    def forward(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1.0,
                truncation_cutoff: Optional[int] = None, **synthesis_kwargs) -> dict:
        """``G(z, c)``: mapping conditioned on ``c`` (p = 0), then synthesis rendered from ``c``."""
        ws = self.mapping(z, c, None, truncation_psi, truncation_cutoff)
        return self.synthesis(ws, c, **synthesis_kwargs)

    def probe(self, trigrid: TriGrid, points: torch.Tensor) -> dict:
        """World points ``[N, M, 3]`` (no crop) → per-plane level-mean features ``[N, 3, M, 12]``, raw σ
        ``[N, M, 1]`` and decoded features ``[N, M, 32]`` (the official ``sample_trigrid``)."""
        coords = points.to(trigrid.dtype) * (2.0 / trigrid.box_warp)
        per_plane = kernels.trigrid_reference.sample_trigrid_per_plane(trigrid.levels, coords,
                                                                       self.config.triplane_depth)
        sigma, feats = self.decoder(per_plane.mean(dim=1))
        return {"sampled_features": per_plane, "sigma": sigma, "features": feats}


def pad_ws(ws: torch.Tensor, num_ws: int) -> torch.Tensor:
    """Pad ``[N, k, w_dim]`` to ``num_ws`` entries by repeating the last one (no-op when long enough)."""
    if ws.shape[1] >= num_ws:
        return ws
    return torch.cat([ws, ws[:, -1:].expand(-1, num_ws - ws.shape[1], -1)], dim=1)


