"""The tri-grid decoder set: OSG decoder, raw ToRGB and the generator's pose branch.

Parameter names are the official ones, so ``decoder_512.ckpt`` (14 tensors) and the decoder part of a converted
``model_512.pkl`` load with ``strict=True``:
``decoder.net.{0,2}.{weight,bias}``, ``torgb.{weight,bias,affine.weight,affine.bias}``,
``pose_branch.net.{0,1,2}.{weight,bias}`` (``checkpoints.md`` §4, ``portrait_gan.md`` §5, §8, §11.2).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from .errors import CheckpointError
from .layers import FullyConnected


@dataclass(frozen=True)
class DecoderConfig:
    """Sizes of the decoder set. Defaults are the released 512 model's."""

    features: int = 12        # tri-grid feature channels fed to the decoder
    hidden: int = 32
    out_features: int = 32    # decoded feature channels (plus 1 density channel)
    w_dim: int = 512          # style width for the ToRGB modulation
    z_dim: int = 512          # pose branch input = z ⊕ camera label
    c_dim: int = 25
    lr_multiplier: float = 1.0


class OSGDecoder(nn.Module):
    """FC(12→32) → softplus → FC(32→33). Input ``[..., 12]`` → (σ_raw ``[..., 1]``, feature ``[..., 32]``)."""

    def __init__(self, features: int = 12, hidden: int = 32, out_features: int = 32, lr_multiplier: float = 1.0):
        super().__init__()
        self.net = nn.Sequential(
            FullyConnected(features, hidden, lr_multiplier=lr_multiplier),
            nn.Softplus(),
            FullyConnected(hidden, 1 + out_features, lr_multiplier=lr_multiplier),
        )

    def forward(self, x: torch.Tensor):
        shape = x.shape[:-1]
        out = self.net(x.reshape(-1, x.shape[-1])).reshape(*shape, -1)
        return out[..., :1], out[..., 1:]


class RawToRGB(nn.Module):
    """Modulated 1×1 conv without demodulation: ``rgb = W·(F ⊙ s) + b``, ``s = affine(w) / sqrt(in)``.

    ``forward(features [B, C, H, W], w [B, w_dim]) -> [B, 3, H, W]`` (also accepts ``[B, N, C]`` → ``[B, N, 3]``).
    """

    def __init__(self, in_channels: int = 32, out_channels: int = 3, w_dim: int = 512):
        super().__init__()
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1.0 / math.sqrt(in_channels)

    def styles(self, w: torch.Tensor) -> torch.Tensor:
        """``[B, w_dim]`` → per-channel scales ``[B, in]``."""
        return self.affine(w) * self.weight_gain

    def forward(self, features: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        s = self.styles(w.to(features.dtype))
        weight = self.weight[:, :, 0, 0].to(features.dtype)
        if features.dim() == 4:
            x = features * s[:, :, None, None]
            return torch.einsum("oc,bchw->bohw", weight, x) + self.bias.to(features.dtype)[None, :, None, None]
        x = features * s[:, None, :]
        return x.matmul(weight.t()) + self.bias.to(features.dtype)


class PoseBranch(nn.Module):
    """Generator pose branch: (z ⊕ c) → FC 128 lrelu → FC 32 lrelu → FC 6. ``[B, z+c] -> [B, 6]``."""

    def __init__(self, in_features: int = 537, hidden=(128, 32), out_features: int = 6):
        super().__init__()
        dims = [in_features, *hidden, out_features]
        self.net = nn.Sequential(*[
            FullyConnected(dims[i], dims[i + 1], activation="lrelu" if i < len(dims) - 2 else "linear")
            for i in range(len(dims) - 1)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """Everything a tri-grid needs besides itself to become an image: decoder, ToRGB, pose branch."""

    def __init__(self, config: DecoderConfig = DecoderConfig()):
        super().__init__()
        self.config = config
        self.decoder = OSGDecoder(config.features, config.hidden, config.out_features, config.lr_multiplier)
        self.torgb = RawToRGB(config.out_features, 3, config.w_dim)
        self.pose_branch = PoseBranch(config.z_dim + config.c_dim)

    def forward(self, features: torch.Tensor):
        """Tri-grid features ``[..., 12]`` → (σ_raw ``[..., 1]``, decoded features ``[..., 32]``)."""
        return self.decoder(features)

    def to_rgb(self, features: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Feature image ``[B, 32, H, W]`` and style ``w [B, w_dim]`` (the tri-grid's ``ws[:, -1]``) → ``[B, 3, H, W]``."""
        return self.torgb(features, w)

    @classmethod
    def from_state_dict(cls, state: dict, source: str = "state dict") -> "Decoder":
        """Build with sizes inferred from the tensors and load them strictly (extra keys are an error)."""
        config = infer_decoder_config(state, source)
        model = cls(config)
        keys = set(model.state_dict())
        missing, extra = sorted(keys - set(state)), sorted(set(state) - keys)
        if missing or extra:
            raise CheckpointError(f"{source}: not a Portrait3D decoder checkpoint (missing {missing[:4]}, "
                                  f"unexpected {extra[:4]}); expected the 14 tensors of decoder_512.ckpt")
        try:
            model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{source}: decoder tensors have unexpected shapes: {exc}") from None
        return model.eval().requires_grad_(False)

    @classmethod
    def from_modules(cls, decoder: nn.Module, torgb: nn.Module, pose_branch: nn.Module,
                     config: DecoderConfig) -> "Decoder":
        """A view sharing existing submodules (no copy), e.g. a generator's top-level decoder/torgb/pose_branch."""
        view = cls.__new__(cls)
        nn.Module.__init__(view)
        view.config = config
        view.decoder, view.torgb, view.pose_branch = decoder, torgb, pose_branch
        return view

    def config_dict(self) -> dict:
        return asdict(self.config)


DECODER_KEYS = (
    "decoder.net.0.weight", "decoder.net.0.bias", "decoder.net.2.weight", "decoder.net.2.bias",
    "torgb.weight", "torgb.bias", "torgb.affine.weight", "torgb.affine.bias",
    "pose_branch.net.0.weight", "pose_branch.net.0.bias", "pose_branch.net.1.weight", "pose_branch.net.1.bias",
    "pose_branch.net.2.weight", "pose_branch.net.2.bias",
)


def infer_decoder_config(state: dict, source: str = "state dict", c_dim: int = 25) -> DecoderConfig:
    """Decoder sizes from tensor shapes; a clear error when the tensors are not a decoder set."""
    try:
        hidden, features = state["decoder.net.0.weight"].shape
        out_features = state["decoder.net.2.weight"].shape[0] - 1
        w_dim = state["torgb.affine.weight"].shape[1]
        pose_in = state["pose_branch.net.0.weight"].shape[1]
    except (KeyError, AttributeError, ValueError) as exc:
        raise CheckpointError(f"{source}: not a Portrait3D decoder (missing or malformed {exc}); expected the "
                              f"tensors {', '.join(DECODER_KEYS[:4])}, … of decoder_512.ckpt") from None
    return DecoderConfig(features=int(features), hidden=int(hidden), out_features=int(out_features),
                         w_dim=int(w_dim), z_dim=int(pose_in) - c_dim, c_dim=c_dim)


def decoder_state_from(state: dict) -> dict:
    """The 14 decoder tensors out of a decoder checkpoint, a converted generator or an SDS ``df.pth`` model dict."""
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]                    # decoder_512.ckpt: {'params', 'state_dict'}
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]                         # df.pth: {'model': {'model.decoder.…', …}}
    if not isinstance(state, dict):
        return {}
    for prefix in ("", "model.", "G_ema.", "generator."):
        picked = {k[len(prefix):]: v for k, v in state.items()
                  if isinstance(k, str) and k.startswith(prefix) and k[len(prefix):] in DECODER_KEYS}
        if len(picked) == len(DECODER_KEYS):
            return picked
    return {k: v for k, v in state.items() if isinstance(k, str) and k.split(".")[0] in ("decoder", "torgb", "pose_branch")}


def load_decoder(path: str) -> Decoder:
    """Read ``decoder_512.ckpt`` (torch zip, read safely), our safetensors, or any file holding the 14 tensors."""
    import os

    from . import checkpoints

    source = os.fspath(path)
    if not os.path.isfile(source):
        raise CheckpointError(f"{source}: decoder file not found")
    if checkpoints.is_safetensors(source):
        from safetensors.torch import load_file

        try:
            state = load_file(source)
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{source}: broken safetensors file ({exc})") from None
    else:
        state = checkpoints.load_any(source)
    picked = decoder_state_from(state)
    inner = state.get("model", state) if isinstance(state, dict) else {}
    if any(isinstance(k, str) and k.startswith("trigrids_") for k in inner) and len(picked) < len(DECODER_KEYS):
        raise CheckpointError(f"{source}: this is a tri-grid file, not a decoder; load it with Load Tri-grid and pick "
                              f"decoder_512.ckpt (or a converted model_512) here")
    return Decoder.from_state_dict(picked, source)
