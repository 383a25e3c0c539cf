"""pix2pix networks (Isola et al. 2017, SPEC G6): the U-Net generator and the choice of PatchGAN depth.

The generator is the paper's U-Net (appendix 6.1.1): an encoder of 4x4 stride-2 convolutions
C64-C128-C256-C512-C512-... (LeakyReLU 0.2, BatchNorm except on the first and the innermost layer)
down to a 1x1 bottleneck, and a decoder of 4x4 stride-2 transposed convolutions (ReLU, BatchNorm,
dropout 0.5 in the first decoder blocks) whose every block concatenates the encoder activation of
the same resolution (skip connections), ending in tanh. Depth follows the image: ceil(log2(size))
levels, so 8 px has 3, 28 and 32 px have 5 and 256 px has the paper's 8. Sizes that are not a power
of two (28) are reflect-padded to the next one (32) and the output is cropped back.

The discriminator is :class:`genlab.models.patchgan.PatchDiscriminator` on concat(A, B);
:func:`patchgan_layers_for` picks its depth so that its receptive field is ~70/256 of the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from genlab.errors import ConfigError
from genlab.nn.blocks import norm_2d
from genlab.nn.init import dcgan_init_
from genlab.models.patchgan import patchgan_output_size, patchgan_receptive_field

PIX2PIX_FIELD_RATIO = 70 / 256  # the paper's 70x70 PatchGAN at 256 px


@dataclass
class UNetGeneratorConfig:
    """Width, normalisation and dropout of the pix2pix U-Net; its depth follows the image size."""

    base_channels: int = 64  # C64 at the first level; level i has min(base * 2^i, max_channels)
    max_channels: int = 512  # the paper caps widths at 512
    norm: Literal["batch", "instance", "none"] = "batch"
    dropout: float = 0.5  # in the first `dropout_blocks` decoder blocks (the paper: 3 of 8, p = 0.5)
    dropout_blocks: int = 3


def unet_depth(image_size: int) -> int:
    """Number of stride-2 levels that bring the (padded) image to a 1x1 bottleneck: ceil(log2(size))."""
    return max(1, math.ceil(math.log2(image_size)))



class DownBlock(nn.Module):
    """Encoder block: [LeakyReLU(0.2)] -> Conv 4x4 stride 2 -> [norm]; halves H and W."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, activate: bool, normalise: bool):
        super().__init__()
        normalise = normalise and norm != "none"
        self.act = nn.LeakyReLU(0.2) if activate else nn.Identity()
        # A following BatchNorm's shift makes a conv bias redundant.
        self.conv = nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1, bias=not (normalise and norm == "batch"))
        self.norm = norm_2d(norm, out_channels) if normalise else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(self.act(x)))  # (N, out, H / 2, W / 2)


class UpBlock(nn.Module):
    """Decoder block: concat(h, skip) -> ReLU -> ConvTranspose 4x4 stride 2 -> [norm] -> [dropout]; doubles H and W."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, normalise: bool, dropout: float):
        super().__init__()
        normalise = normalise and norm != "none"
        self.act = nn.ReLU()
        self.conv = nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1,
                                       bias=not (normalise and norm == "batch"))
        self.norm = norm_2d(norm, out_channels) if normalise else nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, h: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = h if skip is None else torch.cat([h, skip], dim=1)  # (N, C_h + C_skip, H, W): the U-Net skip
        return self.dropout(self.norm(self.conv(self.act(x))))  # (N, out, 2H, 2W)


class UNetGenerator(nn.Module):
    """pix2pix U-Net: (N, C_in, H, W) input image in [-1, 1] -> (N, C_out, H, W) translated image in [-1, 1]."""

    def __init__(self, cfg: UNetGeneratorConfig, in_channels: int, out_channels: int, image_size: int):
        super().__init__()
        if not 0.0 <= cfg.dropout < 1.0:
            raise ConfigError(f"model.generator.dropout must be in [0, 1), got {cfg.dropout}")
        if cfg.base_channels < 1 or cfg.max_channels < cfg.base_channels:
            raise ConfigError(f"model.generator needs 1 <= base_channels <= max_channels, got {cfg.base_channels}, {cfg.max_channels}")
        if cfg.norm not in ("batch", "instance", "none"):
            raise ConfigError(f"model.generator.norm={cfg.norm!r} is not one of batch, instance, none")
        self.image_size = image_size
        self.depth = unet_depth(image_size)
        self.padded_size = 2**self.depth
        widths = [min(cfg.base_channels * 2**i, cfg.max_channels) for i in range(self.depth)]
        self.down = nn.ModuleList()
        ch = in_channels
        for i, width in enumerate(widths):
            first, innermost = i == 0, i == self.depth - 1
            # No norm on the first layer (paper) nor on the 1x1 bottleneck, where BatchNorm/InstanceNorm
            # over a single position would zero it (CycleGAN/pix2pix code does the same).
            self.down.append(DownBlock(ch, width, cfg.norm, activate=not first, normalise=not (first or innermost)))
            ch = width
        # up[j] rebuilds level depth-1-j; all but the innermost also take that level's encoder output.
        self.up = nn.ModuleList()
        for j in range(self.depth):
            level = self.depth - 1 - j
            in_ch = widths[level] if j == 0 else 2 * widths[level]
            outermost = level == 0
            out_ch = out_channels if outermost else widths[level - 1]
            dropout = cfg.dropout if j < cfg.dropout_blocks and not outermost else 0.0
            self.up.append(UpBlock(in_ch, out_ch, cfg.norm, normalise=not outermost, dropout=dropout))
        dcgan_init_(self)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H, W); H, W up to image_size, padded to a power of two inside."""
        height, width = a.shape[-2:]
        pad_h, pad_w = self.padded_size - height, self.padded_size - width
        if pad_h < 0 or pad_w < 0:
            raise ConfigError(f"the generator was built for {self.image_size} px images, got {height}x{width}")
        top, left = pad_h // 2, pad_w // 2
        if pad_h or pad_w:
            # Reflection keeps the border statistics that zero padding would break (replicate when too thin).
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            a = nn.functional.pad(a, (left, pad_w - left, top, pad_h - top), mode=mode)  # (N, C_in, P, P)
        skips = []
        h = a
        for block in self.down:
            h = block(h)  # (N, C_i, P / 2^(i+1), ...)
            skips.append(h)
        h = self.up[0](skips[-1], None)  # from the 1x1 bottleneck
        for j, block in enumerate(self.up[1:], start=1):
            h = block(h, skips[self.depth - 1 - j])  # concat the encoder output of the same resolution
        h = torch.tanh(h)  # (N, C_out, P, P)
        return h[..., top : top + height, left : left + width]  # (N, C_out, H, W)


def patchgan_layers_for(image_size: int, ratio: float = PIX2PIX_FIELD_RATIO) -> int:
    """PatchGAN depth whose receptive field is closest (in log scale) to ``ratio * image_size``.

    256 px -> 3 layers (70 px, the paper's), 128 px -> 2 (34 px), 64 px and below -> 1 (16 px, the
    smallest PatchGAN: on 28 px MNIST it sees 16x16 of 28x28, more than the 70/256 share, which
    would be ~8 px). Only depths that leave at least one output logit are considered.
    """
    target = ratio * image_size
    candidates = [n for n in range(1, 9) if patchgan_output_size(image_size, n) >= 1] or [1]
    return min(candidates, key=lambda n: abs(math.log(patchgan_receptive_field(n) / target)))
