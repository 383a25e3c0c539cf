"""Cascaded diffusion (Ho et al. 2021, "Cascaded Diffusion Models"; SR3, Saharia et al. 2021; SPEC D12).

A base run generates small images (e.g. 14x14, ``genlab train ddpm data.image_size=14``); the
super-resolution stage (method ``sr``, a child run whose parent role ``base`` is that run) is a
diffusion model at the full size (28x28) conditioned on the base's image, bilinearly up-sampled to
the full size and joined to x_t as extra input channels. ``genlab sample SR_RUN`` runs the cascade
end to end: base sample, up-sample, super-resolve; the base's weights live in the SR run's
checkpoint (the one parent mechanism), so it keeps sampling after the base folder is deleted.

Training never calls the base: the low-resolution input is the training image shrunk to the
base's size (antialiased bilinear, as ``data.image_size`` shrinks the base's data) and up-sampled
back. At sampling the input is a base sample instead, with the base's mistakes; Ho et al.'s
**conditioning augmentation** closes that train/test gap: during training the low-res input is
corrupted with Gaussian noise of a random level a ~ U[0, model.max_augmentation],

    z = sqrt(1 - a^2) * low_res + a * eps,

(variance-preserving, so a = 0 is the clean input and a -> 1 pure noise), and the level a is an
extra condition of the network (a micro-condition, 1000 a, embedded like a timestep). At sampling
the base's image is corrupted at a fixed level (``model.sample_augmentation``), which hides the
base's artefacts the SR model would otherwise copy; the paper picks that level by sweeping it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from genlab.errors import ConfigError
from genlab.methods.base import DataInfo, ParentRun, checked_parents
from genlab.methods.capabilities import Generates
from genlab.methods.ddpm import DDPM, DDPMConfig
from genlab.noise import ImageNoise
from genlab.ranges import UnitFloat

LEVEL_SCALE = 1000.0  # the augmentation level a in [0, 1] is embedded as 1000 a, on the scale of timesteps


@dataclass
class SRConfig(DDPMConfig):
    """DDPM's settings for the super-resolution stage, its base run and the conditioning augmentation."""

    base: str | None = None  # run folder of the low-resolution base (the frozen parent; its EMA weights)
    # Conditioning augmentation (Ho et al. 2021, sec. 4.2): training levels a ~ U[0, max_augmentation];
    # 0 trains the plain SR model (no noise, no level input).
    max_augmentation: UnitFloat = 0.0
    # The level the base's samples are corrupted at when sampling; None: max_augmentation / 2.
    sample_augmentation: UnitFloat | None = None


def augment_condition(low_res: torch.Tensor, level: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Gaussian conditioning augmentation: sqrt(1 - a^2) low_res + a noise, a = ``level`` (N,) in [0, 1]."""
    a = level.to(low_res.dtype).view(-1, *([1] * (low_res.ndim - 1)))  # (N, 1, 1, 1)
    return torch.sqrt(1 - a * a) * low_res + a * noise


class SuperResolution(DDPM):
    """Diffusion at the full size conditioned on an up-sampled low-resolution image; samples run the cascade."""

    name = "sr"
    Config = SRConfig
    parents = {"base": ParentRun(Generates, attribute="base", data_keys=("source", "fit", "channels"))}

    def __init__(self, config: SRConfig, data_info: DataInfo, parents: Mapping[str, nn.Module] | None = None):
        base = checked_parents(type(self), config, parents)["base"]
        low = base.data_info
        if low.channels != data_info.channels:
            raise ConfigError(f"the base {config.base} makes {low.channels}-channel images, the data has "
                              f"{data_info.channels}: train sr on the base's images (data.channels={low.channels})")
        if low.image_size >= data_info.image_size:
            raise ConfigError(f"the base {config.base} makes {low.image_size}px images and the data is "
                              f"{data_info.image_size}px: sr needs larger data than its base (e.g. data.image_size="
                              f"{2 * low.image_size})")
        if config.micro_conditioning:
            raise ConfigError("model.micro_conditioning applies to base models: sr's micro-condition is its augmentation level")
        if config.sample_augmentation is not None and config.max_augmentation == 0 and config.sample_augmentation > 0:
            raise ConfigError(f"model.sample_augmentation={config.sample_augmentation} needs a model trained with "
                              "conditioning augmentation: set model.max_augmentation > 0")
        super().__init__(config, data_info, parents)
        self.low_res_size = low.image_size

    def _input_channels(self) -> int:
        """x_t and the up-sampled low-resolution image, side by side as channels (SR3 / CDM)."""
        return 2 * self.data_info.channels

    def _num_micro_conditions(self) -> int:
        """The augmentation level, when the model is trained with conditioning augmentation."""
        return 1 if self.config.max_augmentation > 0 else 0

    def default_micro(self, n: int) -> torch.Tensor:
        """Level 0: the clean low-resolution input."""
        return torch.zeros(n, 1, device=self.device)

    def upsampled_low_res(self, images: torch.Tensor) -> torch.Tensor:
        """Full-size images (N, C, H, W) -> shrunk to the base's size (antialiased) and up-sampled back (bilinear)."""
        low = F.interpolate(images, size=(self.low_res_size, self.low_res_size), mode="bilinear", antialias=True,
                            align_corners=False)  # (N, C, h, w)
        return self.upsample(low)

    def upsample(self, low_res: torch.Tensor) -> torch.Tensor:
        """Low-resolution images (N, C, h, w) -> bilinearly up-sampled to the full size (N, C, H, W)."""
        size = self.data_info.image_size
        return F.interpolate(low_res, size=(size, size), mode="bilinear", align_corners=False)

    def _network_inputs(self, batch: dict[str, Any], x0: torch.Tensor, ctx) -> dict[str, torch.Tensor]:
        """The up-sampled low-res input, augmented at a level a ~ U[0, max_augmentation] given as micro-condition."""
        condition = self.upsampled_low_res(x0)
        if not self.num_micro:
            return {"condition": condition}
        level = ctx.rand() * self.config.max_augmentation  # (n,)
        condition = augment_condition(condition, level, ctx.randn(*condition.shape[1:]))
        return {"condition": condition, "micro": LEVEL_SCALE * level[:, None]}

    def network(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, backbone_kwargs=None,
                micro: torch.Tensor | None = None, condition: torch.Tensor | None = None) -> torch.Tensor:
        """DDPM's network with the up-sampled low-resolution image (N, C, H, W) as ``condition`` (required)."""
        if condition is None:
            raise ConfigError("sr's denoiser needs the up-sampled low-resolution image: pass condition=(N, C, H, W) "
                              "(sample() makes it from the base run)")
        return super().network(x_t, t, y, backbone_kwargs, micro=micro, condition=condition)

    def loss(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, y: torch.Tensor | None = None,
             **inputs: Any):
        """DDPM's loss; without a given condition (held-out scoring) the clean up-sampled low-res input."""
        if inputs.get("condition") is None:
            inputs["condition"] = self.upsampled_low_res(x0)
        return super().loss(x0, t, noise, y, **inputs)

    @torch.no_grad()
    def sample(self, n: int, *, generator: ImageNoise | torch.Generator | None = None,
               low_res: torch.Tensor | None = None, augmentation: float | None = None, **options: Any) -> torch.Tensor:
        """The cascade: ``n`` base samples (or the given ``low_res`` (n, C, h, w) in [-1, 1]), up-sampled,
        augmented at level ``augmentation`` (default model.sample_augmentation), super-resolved.

        ``options`` are DDPM's (sampler, steps, eta, ...) and apply to the SR stage; the base samples
        with its own defaults.
        """
        c = self.config
        level = (c.max_augmentation / 2 if c.sample_augmentation is None else c.sample_augmentation) \
            if augmentation is None else float(augmentation)
        if not 0 <= level < 1:
            raise ConfigError(f"augmentation level {level}: use a value in [0, 1) (0: the clean base image)")
        if level > 0 and not self.num_micro:
            raise ConfigError(f"augmentation level {level}: this sr model was trained without conditioning "
                              "augmentation (model.max_augmentation=0); sample it at level 0")
        generator = ImageNoise.of(generator, n)
        if low_res is None:
            low_res = self.base.sample(n, generator=generator)  # (n, C, h, w)
        if low_res.shape[1:] != (self.data_info.channels, self.low_res_size, self.low_res_size):
            raise ConfigError(f"low_res of shape {tuple(low_res.shape)}: give (n, {self.data_info.channels}, "
                              f"{self.low_res_size}, {self.low_res_size}) images in [-1, 1]")
        condition = self.upsample(low_res.to(self.device))  # (n, C, H, W)
        micro = None
        if self.num_micro:
            levels = torch.full((n,), level, device=self.device)
            condition = augment_condition(condition, levels, generator.randn(*condition.shape[1:], device=self.device))
            micro = LEVEL_SCALE * levels[:, None]
        return super().sample(n, generator=generator, condition=condition, micro=micro, **options)
