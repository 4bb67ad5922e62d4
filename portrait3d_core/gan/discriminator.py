"""The discriminator's pose predictor (``PoseShapeAwareDualDiscriminator``; ``portrait_gan.md`` §11.6, §14;
``checkpoints.md`` §3.4; ``pipeline.md`` §3.2). It gives GAN inversion its initial neck/head pose p.

Structure (official key names, read from ``<stem>.discriminator.safetensors`` written by the converter):
- input: 7 channels at 512² = image (3) ⊕ raw image resized to 512 (3) ⊕ mask resized to 512 and mapped to [−1, 1];
- ``b512 … b8``: StyleGAN2 resnet ``DiscriminatorBlock`` s (``fromrgb`` 1×1 in the first block; ``conv0`` 3×3;
  ``conv1`` 3×3 with 2× FIR down-sampling; ``skip`` 1×1 without bias, down-sampled; out = (skip + conv1)·√½);
  channels min(channel_base / r, channel_max) = 36 at 512, 72 at 256, 144 below (channel_base 18432, max 144);
  lrelu·√2, conv clamp 256; fp16 in the 4 highest resolutions on CUDA (fp32 on CPU, as the official code);
- ``b4``: minibatch-stddev (group min(4, N), 1 channel) → ``conv`` 145 → 144 → flattened 4×4 features (2304);
  ``b4.fc`` / ``b4.out`` and ``mapping`` (embed 31 → 144, 8 FC layers, lr 0.01) belong to the real/fake logit and are
  loaded but not run here;
- ``pose_branch.net.0 … 4``: (features ⊕ camera label) 2329 → 2048 → 512 → 128 → 32 → 6 (lrelu except the last).
Symmetry: for a "left" camera (−π/2 ≤ atan2(c[11], c[3]) ≤ π/2) the three images are mirrored horizontally, the
camera label is passed **unchanged** (as the official ``predict_pose``), and the prediction is mirrored back by
negating components 1, 2, 4, 5.

Verification: no oracle exists for D. Shapes are checked against the official key list, and the tests cover a
random-weight forward, the mirror symmetry and a converter round trip; the numerical agreement with the official D
is unverified.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass
from typing import Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, InvalidInputError
from ..layers import FullyConnected
from .ops import LRELU_GAIN, bias_act, setup_filter, upfirdn2d
from .pose import flip_pose, is_left_camera

POSE_DIM = 6


# --------------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class DiscriminatorConfig:
    """Sizes of ``PoseShapeAwareDualDiscriminator``. Defaults: the released 512 model."""

    img_resolution: int = 512
    img_channels: int = 3            # per image; the input has 2·3 + seg_channels channels
    seg_channels: int = 1
    c_dim: int = 25
    channel_base: int = 18432
    channel_max: int = 144
    num_fp16_res: int = 4
    conv_clamp: Optional[float] = 256
    mbstd_group_size: int = 4
    mbstd_channels: int = 1
    mapping_layers: int = 8
    cmap_dim: Optional[int] = None   # None: channels at 4² (144)

    @property
    def block_resolutions(self) -> list:
        return [2 ** i for i in range(int(math.log2(self.img_resolution)), 2, -1)]

    def channels(self, resolution: int) -> int:
        return min(self.channel_base // resolution, self.channel_max)

    @property
    def fp16_resolution(self) -> int:
        return max(2 ** (int(math.log2(self.img_resolution)) + 1 - self.num_fp16_res), 8)

    @property
    def input_channels(self) -> int:
        return 2 * self.img_channels + self.seg_channels

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], init_kwargs: Optional[Mapping] = None,
                        source: str = "discriminator") -> "DiscriminatorConfig":
        """Sizes read from the tensor shapes; clamp / fp16 / mbstd settings from the official ``init_kwargs`` when
        given (else the released model's)."""
        try:
            res = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"b(\d+)\.conv0\.weight", k)))
            if not res:
                raise KeyError("b<res>.conv0.weight")
            top = res[-1]
            fromrgb = state[f"b{top}.fromrgb.weight"]
            ch4 = state["b4.conv.weight"].shape[0]
            c_dim = state["pose_branch.net.0.weight"].shape[1] - ch4 * 16
            mapping_layers = sum(1 for k in state if re.fullmatch(r"mapping\.fc\d+\.weight", k))
            cmap_dim = state["mapping.embed.weight"].shape[0]
        except KeyError as exc:
            raise CheckpointError(f"{source}: not a PoseShapeAwareDualDiscriminator state dict (missing {exc})") from None
        kw = dict(init_kwargs or {})
        epilogue = kw.get("epilogue_kwargs") or {}
        img_channels = int(kw.get("img_channels", 3))
        config = cls(img_resolution=top, img_channels=img_channels,
                     seg_channels=int(fromrgb.shape[1]) - 2 * img_channels, c_dim=int(c_dim),
                     channel_base=int(fromrgb.shape[0]) * top, channel_max=int(ch4),
                     num_fp16_res=int(kw.get("num_fp16_res", 4)),
                     conv_clamp=kw.get("conv_clamp", 256),
                     mbstd_group_size=int(epilogue.get("mbstd_group_size", 4)),
                     mbstd_channels=int(epilogue.get("mbstd_num_channels", 1)),
                     mapping_layers=mapping_layers,
                     cmap_dim=None if int(cmap_dim) == int(ch4) else int(cmap_dim))
        if config.seg_channels < 0:
            raise CheckpointError(f"{source}: b{top}.fromrgb takes {fromrgb.shape[1]} channels, expected 2·3 + mask")
        return config


# --------------------------------------------------------------------------------------------------- layers

class Conv2dLayer(nn.Module):
    """Equalised-LR convolution (weight gain 1/√(in·k²)) with optional 2× FIR down-sampling, bias, lrelu·√2, clamp.

    Down-sampling as StyleGAN2's ``conv2d_resample``: 1×1 kernels filter (pad 1) and subsample first; 3×3 kernels
    filter with pad 2 and convolve with stride 2. Keys: ``weight [O, I, k, k]``, ``bias [O]`` (optional),
    ``resample_filter [4, 4]``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, bias: bool = True,
                 activation: str = "linear", down: int = 1, conv_clamp: Optional[float] = None):
        super().__init__()
        self.activation, self.down, self.conv_clamp = activation, down, conv_clamp
        self.register_buffer("resample_filter", setup_filter())
        self.padding = kernel_size // 2
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size ** 2)
        self.act_gain = LRELU_GAIN if activation == "lrelu" else 1.0
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        w = (self.weight * self.weight_gain).to(x.dtype)
        if self.down == 1:
            x = F.conv2d(x, w, padding=self.padding)
        elif w.shape[-1] == 1:
            x = upfirdn2d(x, self.resample_filter, pad=(1, 1, 1, 1))[..., ::2, ::2]
            x = F.conv2d(x, w)
        else:
            p = self.padding + 1
            x = F.conv2d(upfirdn2d(x, self.resample_filter, pad=(p, p, p, p)), w, stride=2)
        clamp = None if self.conv_clamp is None else self.conv_clamp * gain
        return bias_act(x, self.bias, self.activation, gain=self.act_gain * gain, clamp=clamp)


class DiscriminatorBlock(nn.Module):
    """StyleGAN2 resnet block at ``resolution``: (x ``[N, tmp, r, r]`` or None, img) → ``[N, out, r/2, r/2]``."""

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, resolution: int, img_channels: int,
                 conv_clamp: Optional[float], use_fp16: bool):
        super().__init__()
        self.in_channels, self.resolution, self.use_fp16 = in_channels, resolution, use_fp16
        self.register_buffer("resample_filter", setup_filter())
        if in_channels == 0:
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, 1, activation="lrelu", conv_clamp=conv_clamp)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, 3, activation="lrelu", conv_clamp=conv_clamp)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, 3, activation="lrelu", down=2, conv_clamp=conv_clamp)
        self.skip = Conv2dLayer(tmp_channels, out_channels, 1, bias=False, down=2)

    def forward(self, x: Optional[torch.Tensor], img: torch.Tensor) -> torch.Tensor:
        dtype = torch.float16 if self.use_fp16 and img.device.type == "cuda" else torch.float32
        if self.in_channels == 0:
            x = self.fromrgb(img.to(dtype))
        else:
            x = x.to(dtype)
        y = self.skip(x, gain=math.sqrt(0.5))
        x = self.conv1(self.conv0(x), gain=math.sqrt(0.5))
        return y + x


def minibatch_stddev(x: torch.Tensor, group_size: int, channels: int = 1) -> torch.Tensor:
    """Append the group standard deviation ``[N, C, H, W]`` → ``[N, C + channels, H, W]`` (groups of min(G, N)
    samples n, n + N/G, …, as StyleGAN2)."""
    n, c, h, w = x.shape
    g = min(group_size, n)
    if n % g:
        raise InvalidInputError(f"the discriminator's minibatch-stddev needs a batch divisible by {g}, got {n}")
    y = x.reshape(g, -1, channels, c // channels, h, w)
    y = (y - y.mean(dim=0)).square().mean(dim=0)
    y = (y + 1e-8).sqrt().mean(dim=[2, 3, 4]).reshape(-1, channels, 1, 1).repeat(g, 1, h, w)
    return torch.cat([x, y], dim=1)


class DiscriminatorEpilogue(nn.Module):
    """``b4``: minibatch stddev → ``conv`` (3×3) → flattened features; ``fc`` / ``out`` kept for the state dict."""

    def __init__(self, channels: int, cmap_dim: int, conv_clamp: Optional[float], group_size: int,
                 mbstd_channels: int):
        super().__init__()
        self.group_size, self.mbstd_channels = group_size, mbstd_channels
        self.conv = Conv2dLayer(channels + mbstd_channels, channels, 3, activation="lrelu", conv_clamp=conv_clamp)
        self.fc = FullyConnected(channels * 16, channels, activation="lrelu")
        self.out = FullyConnected(channels, cmap_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, 4, 4]`` → ``[N, C·16]`` (the official ``get_flatten_x``)."""
        x = x.float()
        if self.mbstd_channels > 0:
            x = minibatch_stddev(x, self.group_size, self.mbstd_channels)
        return self.conv(x).flatten(1)


class LabelMapping(nn.Module):
    """D's label mapping (``mapping.embed``, ``mapping.fc0…``): kept for the state dict; not used for pose."""

    def __init__(self, c_dim: int, dim: int, num_layers: int, lr_multiplier: float = 0.01):
        super().__init__()
        self.embed = FullyConnected(c_dim, dim)
        for i in range(num_layers):
            setattr(self, f"fc{i}", FullyConnected(dim, dim, activation="lrelu", lr_multiplier=lr_multiplier))


class DPoseBranch(nn.Module):
    """``pose_branch.net``: (features ⊕ camera) → 2048 → 512 → 128 → 32 → 6."""

    def __init__(self, in_features: int, hidden=(2048, 512, 128, 32), out_features: int = POSE_DIM):
        super().__init__()
        dims = [in_features, *hidden]
        layers = [FullyConnected(a, b, activation="lrelu") for a, b in zip(dims[:-1], dims[1:])]
        self.net = nn.Sequential(*layers, FullyConnected(dims[-1], out_features))

    def forward(self, features: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([features, c.to(features.dtype)], dim=1))


# --------------------------------------------------------------------------------------------------- network

def filtered_resizing(x: torch.Tensor, size: int, filter_mode: Union[str, float] = "antialiased") -> torch.Tensor:
    """The official ``filtered_resizing``: bilinear resize to ``size``² (``'antialiased'``, ``'none'``, or a float in
    (0, 1) blending aliased and antialiased)."""
    if filter_mode == "antialiased":
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if filter_mode == "none":
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if isinstance(filter_mode, (int, float)) and 0 < float(filter_mode) < 1:
        a = float(filter_mode)
        filtered = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        aliased = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return (1 - a) * aliased + a * filtered
    raise InvalidInputError(f"filter_mode {filter_mode!r} is not supported (use 'antialiased', 'none' or a number in "
                            f"(0, 1)); the released model uses 'antialiased'")


class PoseDiscriminator(nn.Module):
    """``PoseShapeAwareDualDiscriminator`` with the official state-dict layout; ``predict_pose`` is implemented."""

    def __init__(self, config: DiscriminatorConfig = DiscriminatorConfig()):
        super().__init__()
        self.config = cfg = config
        ch4 = cfg.channels(4)
        self.pose_branch = DPoseBranch(ch4 * 16 + cfg.c_dim)          # first, as the official module order
        for r in cfg.block_resolutions:
            block = DiscriminatorBlock(cfg.channels(r) if r < cfg.img_resolution else 0, cfg.channels(r),
                                       cfg.channels(r // 2), r, cfg.input_channels, cfg.conv_clamp,
                                       r >= cfg.fp16_resolution)
            setattr(self, f"b{r}", block)
        cmap_dim = cfg.cmap_dim or ch4
        self.mapping = LabelMapping(cfg.c_dim + POSE_DIM, cmap_dim, cfg.mapping_layers)
        self.b4 = DiscriminatorEpilogue(ch4, cmap_dim, cfg.conv_clamp, cfg.mbstd_group_size, cfg.mbstd_channels)
        self.register_buffer("resample_filter", setup_filter())

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], init_kwargs: Optional[Mapping] = None,
                        device="cpu", source: str = "discriminator") -> "PoseDiscriminator":
        """Build from an official ``D_ema`` state dict (strict; eval mode, no grads)."""
        config = DiscriminatorConfig.from_state_dict(state, init_kwargs, source)
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device=device)
        expected = model.state_dict()
        bad = [k for k in expected if k not in state or tuple(state[k].shape) != tuple(expected[k].shape)]
        extra = sorted(set(state) - set(expected))
        if bad or extra:
            detail = ", ".join(f"{k} {tuple(state[k].shape) if k in state else 'missing'} (expected "
                               f"{tuple(expected[k].shape)})" for k in bad[:4])
            raise CheckpointError(f"{source}: the discriminator does not match the PoseShapeAwareDualDiscriminator "
                                  f"layout ({detail}{'; unexpected ' + ', '.join(extra[:4]) if extra else ''})")
        model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
        return model.eval().requires_grad_(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """7-channel input ``[N, 7, R, R]`` → flattened 4×4 epilogue features ``[N, 16·C₄]``."""
        h = None
        for r in self.config.block_resolutions:
            h = getattr(self, f"b{r}")(h, x)
        return self.b4.features(h)

    def dual_input(self, image: torch.Tensor, image_raw: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        """image ``[N, 3, R, R]`` in [−1, 1] ⊕ raw image resized to R ⊕ mask resized to R and mapped to [−1, 1]."""
        size = image.shape[-1]
        raw = filtered_resizing(image_raw, size)
        seg = 2 * filtered_resizing(image_mask, size) - 1
        return torch.cat([image, raw, seg], dim=1)

    def predict_pose(self, image: torch.Tensor, image_raw: torch.Tensor, image_mask: torch.Tensor,
                     c: torch.Tensor) -> torch.Tensor:
        """Official ``predict_pose``: images ``[N, 3, R, R]`` (R = img_resolution), raw ``[N, 3, h, h]``, mask
        ``[N, 1, h, h]`` in [0, 1], cameras ``[N, 25]`` → pose ``[N, 6]`` (explicit left/right symmetry)."""
        res = self.config.img_resolution
        if image.dim() != 4 or tuple(image.shape[1:]) != (self.config.img_channels, res, res):
            raise InvalidInputError(f"the discriminator takes images [N, {self.config.img_channels}, {res}, {res}], "
                                    f"got {tuple(image.shape)}")
        if c.dim() != 2 or c.shape != (image.shape[0], self.config.c_dim):
            raise InvalidInputError(f"camera labels must be [{image.shape[0]}, {self.config.c_dim}], got "
                                    f"{tuple(c.shape)}")
        left = is_left_camera(c)[:, None, None, None]
        mirror = lambda t: torch.where(left, t.flip(-1), t)  # noqa: E731
        x = self.dual_input(mirror(image), mirror(image_raw), mirror(image_mask))
        pose = self.pose_branch(self.features(x), c)
        return torch.where(left[:, :, 0, 0], flip_pose(pose), pose)


# --------------------------------------------------------------------------------------------------- inversion init

@dataclass(frozen=True)
class PosePredictSettings:
    """``model_512.json`` (``pose_predict_kwargs``): D's input preprocessing at its snapshot (``pipeline.md`` §3.2)."""

    neural_rendering_resolution: int = 128     # raw-image resolution (UNKNOWN in the release; 128 expected)
    blur_sigma: float = 0.0                    # D blur at snapshot time (expected 0)
    filter_mode: Union[str, float] = "antialiased"

    @classmethod
    def from_json(cls, source: Union[str, os.PathLike, Mapping]) -> "PosePredictSettings":
        """From ``model_512.json`` (path or parsed dict); ``resample_filter`` is only used by the 'classic' mode."""
        if isinstance(source, Mapping):
            data, where = dict(source), "pose-prediction settings"
        else:
            where = os.fspath(source)
            try:
                with open(where, encoding="utf-8") as fh:
                    data = json.load(fh)
            except (OSError, ValueError) as exc:
                raise InvalidInputError(f"{where}: not a readable model_512.json ({exc})") from None
        try:
            return cls(int(data.get("neural_rendering_resolution", 128)), float(data.get("blur_sigma", 0.0)),
                       data.get("filter_mode", "antialiased"))
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"{where}: invalid pose-prediction settings ({exc})") from None


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The official D blur: separable taps 2^(−(k/σ)²), k = −⌊3σ⌋ … ⌊3σ⌋, normalised, zero padding, same size."""
    size = math.floor(sigma * 3)
    if size <= 0:
        return x
    taps = torch.arange(-size, size + 1, dtype=x.dtype, device=x.device).div(sigma).square().neg().exp2()
    taps = taps / taps.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (size, size, 0, 0)), taps.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, size, size)), taps.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def predict_initial_pose(discriminator: Optional[PoseDiscriminator], image: torch.Tensor, mask: torch.Tensor,
                         camera_label: torch.Tensor,
                         settings: PosePredictSettings = PosePredictSettings()) -> torch.Tensor:
    """Initial pose p ``[B, 6]`` for GAN inversion (official ``get_pose_params``).

    Args:
        discriminator: the checkpoint's ``PoseDiscriminator``; None (no ``D_ema`` in the checkpoint) gives zeros,
            the canonical pose.
        image: aligned target ``[B, 3, H, W]`` in [−1, 1]; resized (antialiased bilinear) to D's resolution (512)
            when it differs (the official script resizes the 1024² crop to 512 with PIL bilinear first).
        mask: person mask ``[B, 1, h, w]`` or ``[B, h, w]`` in [0, 1], any resolution.
        camera_label: ``[B, 25]``.
        settings: ``model_512.json``.

    The raw image and the mask are resized to ``settings.neural_rendering_resolution`` (``filter_mode``); with
    ``blur_sigma`` > 0 the raw image and then the image are blurred (as the official script). Each image runs alone
    (batch 1, as the official inversion), so the minibatch-stddev never mixes images.
    """
    if image.dim() != 4 or image.shape[1] != 3:
        raise InvalidInputError(f"image must be [B, 3, H, W] in [-1, 1], got {tuple(image.shape)}")
    b = image.shape[0]
    if camera_label.dim() != 2 or camera_label.shape != (b, 25):
        raise InvalidInputError(f"camera labels must be [{b}, 25], got {tuple(camera_label.shape)}")
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.dim() != 4 or mask.shape[0] != b or mask.shape[1] != 1:
        raise InvalidInputError(f"mask must be [{b}, 1, h, w] or [{b}, h, w] in [0, 1], got {tuple(mask.shape)}")
    if discriminator is None:
        return torch.zeros(b, POSE_DIM, dtype=torch.float32, device=image.device)
    param = next(discriminator.parameters())
    device, res = param.device, discriminator.config.img_resolution
    image = image.to(device=device, dtype=torch.float32)
    mask = mask.to(device=device, dtype=torch.float32)
    camera_label = camera_label.to(device=device, dtype=torch.float32)
    with torch.no_grad():
        if image.shape[-2:] != (res, res):
            image = F.interpolate(image, size=(res, res), mode="bilinear", align_corners=False, antialias=True)
        raw = filtered_resizing(image, settings.neural_rendering_resolution, settings.filter_mode)
        mask_raw = filtered_resizing(mask, settings.neural_rendering_resolution, settings.filter_mode)
        if settings.blur_sigma > 0:
            raw = gaussian_blur(raw, settings.blur_sigma)
            image = gaussian_blur(image, settings.blur_sigma)
        poses = [discriminator.predict_pose(image[i:i + 1], raw[i:i + 1], mask_raw[i:i + 1], camera_label[i:i + 1])
                 for i in range(b)]
    return torch.cat(poses).float()


def load_discriminator(path, cache_dir: Optional[str] = None, *, device="cpu") -> Optional[PoseDiscriminator]:
    """The checkpoint's discriminator (converted files or the official pickle), or None when it has no ``D_ema``."""
    from .convert import load_discriminator_state, read_manifest
    from .. import checkpoints

    source = os.fspath(path)
    try:
        state = load_discriminator_state(source, cache_dir)
    except CheckpointError as exc:
        if "no discriminator" in str(exc) or "has no 'D_ema'" in str(exc):
            return None
        raise
    init_kwargs = None
    if checkpoints.is_safetensors(source) or source.endswith(".json"):
        init_kwargs = (read_manifest(source).get("discriminator") or {}).get("init_kwargs")
    return PoseDiscriminator.from_state_dict(state, init_kwargs, device, source)
