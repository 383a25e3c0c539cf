"""Convolutional encoder and decoder of the autoencoder family (AE, VAE, VQ-VAE, VQ-GAN, LDM autoencoders).

The layout follows the first-stage autoencoder of Esser et al. 2021 / Rombach et al. 2022: a 3x3
input convolution, at each resolution ``num_res_blocks`` GroupNorm + SiLU residual blocks, a
stride-2 convolution between resolutions, a middle of residual blocks with optional self-attention,
and GroupNorm + SiLU + 3x3 convolution out. The decoder mirrors it with nearest-neighbour
upsampling followed by a convolution (avoids the checkerboard artefacts of transposed
convolutions, Odena et al. 2016). ``len(channel_mult) - 1`` halvings give the downsampling
factor f. Images whose side is not a multiple of f are padded by the encoder and cropped back
by the decoder (``output_size``).

:class:`DenseEncoderHead` / :class:`DenseDecoderHead` turn the spatial code into a dense vector
and back, for the classic VAE whose prior N(0, I) is over a small vector z.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genlab.errors import ConfigError
from genlab.nn.attention import SpatialAttention
from genlab.nn.blocks import group_norm


@dataclass
class AutoencoderNetConfig:
    """Widths and depth of the encoder/decoder pair; f = 2 ** (len(channel_mult) - 1)."""

    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)  # width multiplier per resolution, finest first
    num_res_blocks: int = 1  # residual blocks per resolution (the decoder uses one more, as in LDM)
    norm_groups: int = 8
    dropout: float = 0.0
    attention: bool = False  # single-head self-attention in the middle (lowest resolution)


def downsampling_factor(cfg: AutoencoderNetConfig) -> int:
    """Spatial reduction f of the encoder: 2 per stride-2 stage."""
    return 2 ** (len(cfg.channel_mult) - 1)


def is_fully_convolutional(cfg: AutoencoderNetConfig) -> bool:
    """True when the encoder/decoder pair is convolutions, GroupNorm and pointwise maps only (no self-attention):
    each latent position then depends on a local window of the image, so a network trained at one size
    encodes and decodes images of another size the same way (GroupNorm's per-image statistics aside)."""
    return not cfg.attention


def latent_size(size: int, f: int) -> int:
    """Side of the latent map for an image side ``size`` (the encoder pads to a multiple of f)."""
    return -(-size // f)


def _check(cfg: AutoencoderNetConfig) -> None:
    """Reject impossible network settings with a one-line ConfigError."""
    if not cfg.channel_mult or any(m < 1 for m in cfg.channel_mult):
        raise ConfigError(
            f"channel_mult={tuple(cfg.channel_mult)} must be a non-empty list of positive ints, e.g. [1, 2, 2]"
        )
    if cfg.base_channels < 1 or cfg.num_res_blocks < 0:
        raise ConfigError(
            f"base_channels={cfg.base_channels} must be >= 1 and num_res_blocks={cfg.num_res_blocks} >= 0"
        )
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"dropout={cfg.dropout} must be in [0, 1)")


def pad_to_multiple(x: torch.Tensor, f: int) -> torch.Tensor:
    """Zero-pad H and W of x (N, C, H, W) up to multiples of f, split evenly (extra row/column at the end)."""
    h, w = x.shape[-2:]
    ph, pw = latent_size(h, f) * f - h, latent_size(w, f) * f - w
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))  # (N, C, H', W')


def crop_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple`: the centre (H, W) window of x, with the same split of the margin."""
    h, w = size
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    if top < 0 or left < 0:
        raise ConfigError(f"output_size={tuple(size)} is larger than the decoded map {tuple(x.shape[-2:])}")
    return x[..., top:top + h, left:left + w]


class ResnetBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), a 1x1 skip projection when the width changes (no time input)."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))  # (N, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (N, C_out, H, W)
        return self.skip(x) + h


def _middle(channels: int, cfg: AutoencoderNetConfig) -> nn.Sequential:
    """ResBlock, optional self-attention, ResBlock at the lowest resolution."""
    layers: list[nn.Module] = [ResnetBlock(channels, channels, cfg.norm_groups, cfg.dropout)]
    if cfg.attention:
        layers.append(SpatialAttention(channels, num_heads=1, norm_groups=cfg.norm_groups))
    layers.append(ResnetBlock(channels, channels, cfg.norm_groups, cfg.dropout))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Image (N, C, H, W) -> feature map (N, out_channels, ceil(H / f), ceil(W / f))."""

    def __init__(self, cfg: AutoencoderNetConfig, in_channels: int, out_channels: int):
        super().__init__()
        _check(cfg)
        self.f = downsampling_factor(cfg)
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(in_channels, cfg.base_channels, 3, padding=1)
        layers: list[nn.Module] = []
        ch = cfg.base_channels
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResnetBlock(ch, width, cfg.norm_groups, cfg.dropout))
                ch = width
            if level < len(widths) - 1:
                layers.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))  # exact halving: input padded to f
        self.down = nn.Sequential(*layers)
        self.mid = _middle(ch, cfg)
        self.norm_out = group_norm(ch, cfg.norm_groups)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        """The network on a padded image (N, C, H', W') -> (N, out, H' / f, W' / f)."""
        h = self.down(self.conv_in(x))  # (N, C_top, H' / f, W' / f)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, out, ceil(H / f), ceil(W / f))."""
        return self._body(pad_to_multiple(x, self.f))


class Decoder(nn.Module):
    """Latent map (N, in_channels, h, w) -> image (N, out_channels, h f, w f), cropped to ``output_size`` if given."""

    def __init__(self, cfg: AutoencoderNetConfig, in_channels: int, out_channels: int):
        super().__init__()
        _check(cfg)
        self.f = downsampling_factor(cfg)
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        ch = widths[-1]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.mid = _middle(ch, cfg)
        layers: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResnetBlock(ch, widths[level], cfg.norm_groups, cfg.dropout))
                ch = widths[level]
            if level > 0:
                layers.append(nn.Upsample(scale_factor=2.0, mode="nearest"))
                layers.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.up = nn.Sequential(*layers)
        self.norm_out = group_norm(ch, cfg.norm_groups)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> nn.Parameter:
        """Weight of the final convolution (the VQGAN adaptive weight differentiates there)."""
        return self.conv_out.weight

    def _body(self, z: torch.Tensor) -> torch.Tensor:
        """(N, in, h, w) -> (N, out, h f, w f)."""
        h = self.mid(self.conv_in(z))  # (N, C_top, h, w)
        h = self.up(h)  # (N, C_base, h f, w f)
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, z: torch.Tensor, output_size: tuple[int, int] | int | None = None) -> torch.Tensor:
        """(N, in, h, w) -> (N, out, h f, w f), or the centre ``output_size`` crop matching the encoder's padding."""
        x = self._body(z)
        if output_size is None:
            return x
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        return crop_to(x, tuple(output_size))


class DenseEncoderHead(nn.Module):
    """Flatten a feature map (N, C, h, w) and map it linearly to a vector (N, out_features)."""

    def __init__(self, channels: int, spatial: tuple[int, int], out_features: int):
        super().__init__()
        self.linear = nn.Linear(channels * spatial[0] * spatial[1], out_features)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, out_features)."""
        return self.linear(h.flatten(1))


class DenseDecoderHead(nn.Module):
    """Map a vector (N, in_features) linearly to a feature map (N, C, h, w) for the decoder."""

    def __init__(self, in_features: int, channels: int, spatial: tuple[int, int]):
        super().__init__()
        self.shape = (channels, spatial[0], spatial[1])
        self.linear = nn.Linear(in_features, channels * spatial[0] * spatial[1])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(N, in_features) -> (N, C, h, w)."""
        return F.silu(self.linear(z)).view(len(z), *self.shape)
