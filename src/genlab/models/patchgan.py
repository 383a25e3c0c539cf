"""PatchGAN discriminator (Isola et al. 2017, pix2pix; used by VQGAN, Esser et al. 2021).

A fully convolutional classifier whose every output logit judges one overlapping patch of the
input (70x70 for the default three stride-2 layers), so it penalises texture and local structure
and works at any image size. Layout of pix2pix's C64-C128-C256-C512 design, scaled by
``num_layers``: a 4x4 stride-2 convolution without normalisation, ``num_layers - 1`` further 4x4
stride-2 convolutions, one 4x4 stride-1 convolution, each followed by normalisation and
LeakyReLU(0.2), with widths base * min(2^n, 8); then a 4x4 stride-1 convolution to one logit map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from genlab.errors import ConfigError
from genlab.nn.blocks import norm_2d
from genlab.nn.init import dcgan_init_

KERNEL, PADDING = 4, 1


@dataclass
class PatchGANConfig:
    """Width, depth (receptive field) and normalisation of a PatchDiscriminator; defaults are pix2pix's."""

    base_channels: int = 64
    # Stride-2 layers: receptive field 16 / 34 / 70 / 142 for 1 / 2 / 3 / 4; None: derived from the
    # image size (see ``patchgan_layers_fitting``).
    num_layers: int | None = None
    norm: Literal["batch", "instance", "none"] = "batch"
    spectral_norm: bool = False


def _layer_plan(num_layers: int, base_channels: int = 64) -> list[tuple[int, int]]:
    """(out_channels, stride) of every convolution, first to last (the last one outputs the logits)."""
    if num_layers < 1:
        raise ConfigError(f"num_layers={num_layers} must be >= 1 (pix2pix uses 3: a 70x70 receptive field)")
    plan = [(base_channels, 2)]
    plan += [(base_channels * min(2**n, 8), 2) for n in range(1, num_layers)]
    plan += [(base_channels * min(2**num_layers, 8), 1), (1, 1)]
    return plan


def patchgan_receptive_field(num_layers: int) -> int:
    """Side of the input patch one output logit sees: 70 for 3 layers (16 for 1, 34 for 2, 142 for 4)."""
    field = 1
    for _, stride in reversed(_layer_plan(num_layers)):
        field = (field - 1) * stride + KERNEL  # walking back through a conv grows the field like this
    return field


def patchgan_output_size(image_size: int, num_layers: int) -> int:
    """Side of the logit map for a square input of side ``image_size``."""
    size = image_size
    for _, stride in _layer_plan(num_layers):
        size = (size + 2 * PADDING - KERNEL) // stride + 1
    return size



MAX_DERIVED_LAYERS = 3  # pix2pix's 70 px PatchGAN ...
MIN_DERIVED_LOGITS = 2  # ... or shallower, to keep at least a 2x2 map of logits


def patchgan_layers_fitting(image_size: int) -> int:
    """The deepest PatchGAN of at most 3 layers whose logit map is at least 2x2 (8 px: 1, 28 px: 2, 32 px: 3)."""
    fitting = [n for n in range(1, MAX_DERIVED_LAYERS + 1) if patchgan_output_size(image_size, n) >= MIN_DERIVED_LOGITS]
    return max(fitting, default=1)


class PatchDiscriminator(nn.Module):
    """(N, C, H, W) images -> (N, 1, h, w) real/fake logits, one per overlapping patch."""

    def __init__(
        self,
        in_channels: int,
        base_channels: int = 64,
        num_layers: int = 3,
        norm: Literal["batch", "instance", "none"] = "batch",
        spectral_norm: bool = False,
    ):
        super().__init__()
        if norm not in ("batch", "instance", "none"):
            raise ConfigError(f"PatchGAN norm={norm!r} is not one of batch, instance, none")
        if base_channels < 1:
            raise ConfigError(f"PatchGAN base_channels={base_channels} must be >= 1")
        self.num_layers = num_layers
        plan = _layer_plan(num_layers, base_channels)
        layers: list[nn.Module] = []
        ch = in_channels
        for i, (out, stride) in enumerate(plan):
            last, first = i == len(plan) - 1, i == 0
            normalised = not (first or last) and norm != "none"
            # BatchNorm's shift makes a conv bias redundant (pix2pix drops it there).
            conv = nn.Conv2d(ch, out, KERNEL, stride=stride, padding=PADDING, bias=not (normalised and norm == "batch"))
            dcgan_init_(conv)  # before spectral norm, whose power iteration starts from these weights
            if spectral_norm:  # Miyato et al. 2018: each layer 1-Lipschitz
                conv = _spectral_norm(conv)
            layers.append(conv)
            if not last:
                if normalised:
                    layers.append(dcgan_init_(norm_2d(norm, out)))
                layers.append(nn.LeakyReLU(0.2))
            ch = out
        self.net = nn.Sequential(*layers)

    @classmethod
    def from_config(cls, cfg: PatchGANConfig, in_channels: int) -> "PatchDiscriminator":
        """The discriminator a :class:`PatchGANConfig` describes."""
        return cls(in_channels, cfg.base_channels, cfg.num_layers, cfg.norm, cfg.spectral_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, 1, h, w) logits; h = patchgan_output_size(H, num_layers)."""
        size = min(x.shape[-2:])
        if patchgan_output_size(size, self.num_layers) < 1:
            raise ConfigError(f"images of side {size} are too small for a PatchGAN with num_layers={self.num_layers}: "
                              "lower num_layers")
        return self.net(x)
