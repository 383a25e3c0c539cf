"""Control networks that steer a frozen U-Net with a spatial condition (SPEC A2, A3).

- :class:`ControlNet` (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image
  Diffusion Models"): a trainable copy of the U-Net's encoder and middle block, initialised from the
  frozen weights, sees x_t plus the encoded condition; its activations return to the frozen
  decoder through zero-initialised 1x1 convolutions, added to the skips and the middle output
  (``UNet.forward(down_residuals=..., mid_residual=...)``). At initialisation every zero
  convolution outputs 0, so the controlled U-Net is the frozen one, bit for bit.
- :class:`T2IAdapter` (Mou et al. 2023, "T2I-Adapter: Learning Adapters to Dig out More
  Controllable Ability for Text-to-Image Diffusion Models"): a small network of its own, run once per
  sample (it sees the condition only, not x_t or t), whose features at every encoder level are added
  to the frozen encoder's (``UNet.forward(adapter_features=...)``).

Both take the control map at the image's full resolution (N, C_c, H, W) and bring it to the U-Net's
working resolution H / f (f: the DDPM pixel patch, or the autoencoder's factor times it for latent
diffusion).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from genlab.errors import ConfigError
from genlab.models.unet import UNet, UNetLayer
from genlab.ranges import PositiveFloat, PositiveInt

# The paper's condition encoder for 512 px images and 64 px latents: four 4x4 convolutions with
# stride 2 and 16, 32, 64, 128 channels (ReLU between them).
PAPER_CONDITION_CHANNELS = (16, 32, 64, 128)


def resolution_factor(image_size: int, working_size: int) -> int:
    """log2 of image_size / working_size: the stride-2 layers a condition encoder needs (a one-line error
    unless the ratio is a power of two)."""
    factor = image_size // working_size if working_size else 0
    if factor < 1 or image_size != factor * working_size or factor & (factor - 1):
        raise ConfigError(f"the U-Net works at {working_size} px for {image_size} px images: a control network needs "
                          "a power-of-two ratio (use model.patch_size 1, 2 or 4 for the base)")
    return int(math.log2(factor))


def zero_conv(channels_in: int, channels_out: int) -> nn.Conv2d:
    """A 1x1 convolution with weight and bias at zero (ControlNet's "zero convolution")."""
    conv = nn.Conv2d(channels_in, channels_out, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ConditionEncoder(nn.Module):
    """ControlNet's condition encoder: the paper's 4x4 stride-2 convolutions, as many as the resolution
    needs (log2 of image / working size), the rest 3x3 stride 1; at least ``len(channels)`` layers, ReLU
    between them, then a zero 1x1 convolution to the U-Net's first width."""

    def __init__(self, in_channels: int, out_channels: int, downsamplings: int,
                 channels: tuple[int, ...] = PAPER_CONDITION_CHANNELS):
        super().__init__()
        if not channels:
            raise ConfigError("model.controlnet.condition_channels is empty: give the condition encoder's widths, "
                              "e.g. [16, 32, 64, 128] (the paper's)")
        widths = list(channels) + [channels[-1]] * max(0, downsamplings - len(channels))
        layers, c = [], in_channels
        for i, width in enumerate(widths):
            stride2 = i < downsamplings
            layers.append(nn.Conv2d(c, width, 4 if stride2 else 3, stride=2 if stride2 else 1, padding=1))
            layers.append(nn.ReLU())
            c = width
        self.layers = nn.Sequential(*layers[:-1])  # no activation after the last convolution ...
        self.out = zero_conv(c, out_channels)  # ... which a zero convolution maps to the U-Net's width

    def forward(self, control: torch.Tensor) -> torch.Tensor:
        """(N, C_c, H, W) -> (N, out_channels, H / 2^downsamplings, W / 2^downsamplings)."""
        return self.out(F.relu(self.layers(control)))


@dataclass
class ControlNetConfig:
    """The condition encoder's widths (the paper's (16, 32, 64, 128) suit 28-32 px images as they are)."""

    condition_channels: tuple[PositiveInt, ...] = PAPER_CONDITION_CHANNELS  # widths of the condition encoder's layers


class ControlNet(nn.Module):
    """Trainable copy of a U-Net's encoder and middle, with a condition encoder and zero convolutions.

    forward(x, t, control, y=None, context=None) -> (down_residuals, mid_residual), the keyword
    arguments of the frozen ``unet``'s forward.
    """

    def __init__(self, unet: UNet, control_channels: int, image_size: int,
                 config: ControlNetConfig | None = None):
        super().__init__()
        config = config or ControlNetConfig()
        self.config = config
        downsamplings = resolution_factor(image_size, unet.image_size)
        # The copy: the U-Net with its weights, the decoder dropped (only embed, conv_in, down, middle run).
        encoder = copy.deepcopy(unet)
        encoder.up, encoder.norm_out, encoder.conv_out = nn.ModuleList(), None, None
        encoder.requires_grad_(True)
        self.encoder = encoder
        self.condition = ConditionEncoder(control_channels, unet.skip_channels[0], downsamplings,
                                          tuple(config.condition_channels))
        self.zero_convs = nn.ModuleList(zero_conv(c, c) for c in unet.skip_channels)  # one per skip
        self.mid_zero_conv = zero_conv(unet.skip_channels[-1], unet.skip_channels[-1])

    def forward(self, x: torch.Tensor, t: torch.Tensor, control: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None, *, context_mask: torch.Tensor | None = None,
                pooled: torch.Tensor | None = None, micro: torch.Tensor | None = None
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x (N, C_in, h, w) the U-Net's input, t (N,), control (N, C_c, H, W) -> the residuals for the
        U-Net's skips (its ``skip_shapes``) and its middle output. The base's condition (labels y, or text:
        context, context_mask, pooled; micro-conditions) conditions the copy as it does the U-Net."""
        e = self.encoder
        emb = e.embed(x, t, y, pooled, micro)  # (N, E)
        context = e.refine_context(context, context_mask)  # (N, S, D_ctx)
        h = e.stem(x) + self.condition(control)  # (N, base, h, w): the condition joins after conv_in
        skips = [h]
        for module in e.down:
            h = module(h, emb, context, context_mask) if isinstance(module, UNetLayer) else module(h)
            skips.append(h)  # (N, C_level, h_level, w_level)
        for module in e.middle:
            h = module(h, emb, context, context_mask)  # (N, C_last, h / f, w / f)
        down = [conv(s) for conv, s in zip(self.zero_convs, skips)]  # each (N, C_level, ., .)
        return down, self.mid_zero_conv(h)  # ..., (N, C_last, h / f, w / f)


class AdapterBlock(nn.Module):
    """T2I-Adapter's residual block: x + conv3x3(ReLU(conv3x3(x))) (no normalisation, no time embedding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        return x + self.conv2(F.relu(self.conv1(x)))  # (N, C, H, W)


@dataclass
class T2IAdapterConfig:
    """Residual blocks per level (the paper: 2) and the width of the blocks relative to the U-Net's level widths."""

    num_res_blocks: PositiveInt = 1  # residual blocks per level (the paper: 2)
    width_mult: PositiveFloat = 1.0  # adapter width of level i: round(width_mult * U-Net width of level i)


class T2IAdapter(nn.Module):
    """Condition -> one feature map per U-Net level (its ``level_shapes``), added to the frozen encoder.

    As the paper: pixel unshuffle of the condition to the working resolution (their 512 -> 64 px),
    then per level a (strided, from the second level on) convolution and residual blocks. Deviation:
    each level's output goes through a zero-initialised 1x1 convolution, so that at initialisation
    the adapted U-Net is the frozen one (as ControlNet's zero convolutions); the paper starts from
    random outputs.
    """

    def __init__(self, unet: UNet, control_channels: int, image_size: int, config: T2IAdapterConfig | None = None):
        super().__init__()
        config = config or T2IAdapterConfig()
        self.config = config
        self.unshuffle = 2 ** resolution_factor(image_size, unet.image_size)
        level_widths = [unet.skip_channels[i + 1] for i in unet.level_ends]
        widths = [max(1, round(config.width_mult * w)) for w in level_widths]
        self.conv_in = nn.Conv2d(control_channels * self.unshuffle**2, widths[0], 3, padding=1)
        self.levels = nn.ModuleList()
        self.outs = nn.ModuleList()
        c = widths[0]
        for level, (width, level_width) in enumerate(zip(widths, level_widths)):
            down = nn.Conv2d(c, width, 3, stride=2 if level else 1, padding=1)  # halve from the second level on
            self.levels.append(nn.Sequential(down, *[AdapterBlock(width) for _ in range(config.num_res_blocks)]))
            self.outs.append(zero_conv(width, level_width))
            c = width

    def forward(self, control: torch.Tensor) -> list[torch.Tensor]:
        """control (N, C_c, H, W) -> [(N, C_level, H_level, W_level)] for every level of the U-Net."""
        h = F.pixel_unshuffle(control, self.unshuffle) if self.unshuffle > 1 else control  # (N, C_c f^2, H/f, W/f)
        h = self.conv_in(h)  # (N, C_0, H / f, W / f)
        features = []
        for level, out in zip(self.levels, self.outs):
            h = level(h)  # (N, C_level', H_level, W_level)
            features.append(out(h))  # (N, C_level, H_level, W_level)
        return features
