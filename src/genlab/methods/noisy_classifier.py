"""Noise-aware classifier p(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, SPEC D7).

Trained with cross-entropy on images noised by the forward process, x_t = q_sample(x_0, t, eps)
with t ~ U{0..T-1}, of the SAME schedule as the diffusion model it will guide (``schedule`` and
``num_timesteps`` must match that model's; DDPM.sample checks the betas). The network is the
encoder half of an ADM U-Net: residual blocks with the sinusoidal time embedding at decreasing
resolutions, then GroupNorm, SiLU, global average pooling and a linear head (ADM's classifier uses
the U-Net's down half with attention pooling; plain average pooling is enough at these sizes).

Sampling uses it through :meth:`NoisyClassifier.log_prob_gradient`: ``genlab sample DDPM_RUN
--classifier THIS_RUN --class K --classifier-scale S``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from genlab.diffusion import NoiseSchedule, classifier_log_prob_gradient
from genlab.errors import ConfigError
from genlab.methods.base import DataInfo, Method
from genlab.methods.capabilities import NoiseAwareClassifier
from genlab.nn.blocks import Downsample, ResBlock, group_norm
from genlab.nn.embeddings import TimestepEmbedder


@dataclass
class NoisyClassifierConfig:
    """The noise process to train under (match the guided model's) and the network's size."""

    schedule: Literal["linear", "cosine", "sigmoid", "scaled-linear"] = "linear"  # as DDPMConfig.schedule
    num_timesteps: int = 1000  # as DDPMConfig.num_timesteps
    base_channels: int = 32  # width of the first level; level i has base_channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 2)  # one entry per resolution level (downsampling between)
    num_res_blocks: int = 1  # residual blocks per level
    norm_groups: int = 8  # GroupNorm groups; must divide every width
    dropout: float = 0.0
    use_scale_shift_norm: bool = True  # ADM's time conditioning GN(h) (1 + scale) + shift

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        if self.base_channels < 1 or not self.channel_mult or min(self.channel_mult) < 1:
            raise ConfigError(f"model.base_channels={self.base_channels}, model.channel_mult={self.channel_mult}: "
                              "need positive widths, e.g. 32 and [1, 2, 2]")
        bad = [self.base_channels * m for m in self.channel_mult if (self.base_channels * m) % self.norm_groups]
        if self.norm_groups < 1 or bad:
            raise ConfigError(f"model.norm_groups={self.norm_groups} does not divide the widths {bad}: pick a divisor")
        if self.num_res_blocks < 1:
            raise ConfigError(f"model.num_res_blocks={self.num_res_blocks}: use at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout}: use a probability in [0, 1)")


class TimeConditionedEncoder(nn.Module):
    """The down half of a U-Net with a linear head: (x_t (N, C, H, W), t (N,)) -> logits (N, K)."""

    def __init__(self, config: NoisyClassifierConfig, in_channels: int, num_classes: int):
        super().__init__()
        base = config.base_channels
        emb_dim = 4 * base
        self.time_embed = TimestepEmbedder(base, emb_dim)
        self.conv_in = nn.Conv2d(in_channels, base, 3, padding=1)
        self.blocks = nn.ModuleList()
        channels = base
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                self.blocks.append(ResBlock(channels, base * mult, emb_dim, config.dropout,
                                            config.use_scale_shift_norm, config.norm_groups))
                channels = base * mult
            if level < len(config.channel_mult) - 1:
                self.blocks.append(Downsample(channels))
        self.norm_out = group_norm(channels, config.norm_groups)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Class logits (N, K) of noisy images x (N, C, H, W) at (possibly fractional) timesteps t (N,)."""
        emb = self.time_embed(t)  # (N, E)
        h = self.conv_in(x)  # (N, base, H, W)
        for block in self.blocks:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)  # (N, C_level, H_level, W_level)
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))  # global average pool: (N, C_last)
        return self.head(h)  # (N, K)


class NoisyClassifier(Method, NoiseAwareClassifier):
    """Cross-entropy on forward-process-noised images; guides a diffusion model of the same schedule."""

    name = "noisy-classifier"
    Config = NoisyClassifierConfig

    def __init__(self, config: NoisyClassifierConfig, data_info: DataInfo):
        super().__init__(config, data_info)
        if not data_info.num_classes:
            raise ConfigError("the noisy-classifier method needs a labelled data source (e.g. mnist, digits, cifar10)")
        self.schedule = NoiseSchedule.from_name(config.schedule, config.num_timesteps)
        self.net = TimeConditionedEncoder(config, data_info.channels, data_info.num_classes)

    def ema_targets(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits of p(y | x_t, t): x_t (N, C, H, W) in the forward process's scale, t (N,) -> (N, K)."""
        return self.net(x_t, t)

    def log_prob_gradient(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """grad_{x_t} log p(labels | x_t, t) (N, C, H, W), what classifier guidance adds to the score."""
        return classifier_log_prob_gradient(self, labels)(x_t, t)

    def training_step(self, batch: dict[str, torch.Tensor], ctx) -> dict[str, torch.Tensor]:
        """t ~ U{0..T-1}, x_t = q_sample(x_0, t, eps), cross-entropy of p(y | x_t, t)."""
        x0, labels = batch["image"], batch["label"]  # (n, C, H, W), (n,)
        t = ctx.randint(0, self.config.num_timesteps)  # (n,)
        x_t = self.schedule.q_sample(x0, t, ctx.randn(*x0.shape[1:]))
        logits = self.net(x_t, t)  # (n, K)
        loss = F.cross_entropy(logits, labels)
        ctx.optimize(loss)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return {"loss": loss.detach(), "accuracy": accuracy}

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, **options: Any) -> torch.Tensor:
        """Not available: a classifier does not generate images."""
        raise ConfigError("the noisy-classifier method does not generate images; use it to guide a diffusion "
                          "run: genlab sample DDPM_RUN --classifier THIS_RUN --class K")
