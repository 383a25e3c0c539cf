"""The method interface: what every model family gives the one trainer.

A method is an ``nn.Module`` that owns its networks and knows its family's math. The trainer never
special-cases a family: it calls :meth:`Method.training_step` once per micro-batch and hands it a
:class:`StepContext` through which the method draws its randomness and asks for optimiser steps
(one call for a diffusion model, two for a GAN's D and G updates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class DataInfo:
    """Shape facts of the training data that size a method's networks."""

    channels: int
    image_size: int
    num_classes: int | None = None
    source: str | None = None  # the data source's name (e.g. "fashion-mnist"): picks evaluator networks
    condition_channels: int | None = None  # channels of the input images of paired data (pix2pix)


@dataclass
class OptimizerSpec:
    """One optimiser of a method: its parameters and the settings that differ from ``train.*``.

    ``None`` means "use the run's train.lr / train.adam_betas / train.weight_decay". GANs use this
    for two time-scale learning rates (TTUR), Adam(0.5, 0.999) or SGD for the discriminator.
    The run's warm-up and LR schedule multiply every group's learning rate.
    """

    params: list[nn.Parameter]
    lr: float | None = None
    betas: tuple[float, float] | None = None
    kind: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float | None = None
    momentum: float = 0.0  # SGD only


class StepContext(Protocol):
    """What the trainer offers a training step (see ``genlab.train.trainer``)."""

    step: int  # optimiser step being computed (0-based)
    micro: int  # index of this micro-batch within the step (gradient accumulation)
    is_last_micro: bool  # optimiser steps happen on the last micro-batch
    logs: dict[str, torch.Tensor]  # values the trainer adds for this step (e.g. grad_norm_<group>)

    def randn(self, *shape_per_sample: int) -> torch.Tensor: ...  # (n_local, *shape) on the device

    def rand(self, *shape_per_sample: int) -> torch.Tensor: ...

    def randint(self, low: int, high: int) -> torch.Tensor: ...  # (n_local,) long

    def optimize(self, loss: torch.Tensor, group: str = "main") -> None: ...


class Method(nn.Module):
    """Base class of every family: networks, a training step, and sampling."""

    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, config: Any, data_info: DataInfo):
        super().__init__()
        self.config = config
        self.data_info = data_info

    def optimizer_groups(self) -> dict[str, list[nn.Parameter] | OptimizerSpec]:
        """Parameters (or an :class:`OptimizerSpec`) of each optimiser by name, stepped by ``ctx.optimize``."""
        return {"main": [p for p in self.parameters() if p.requires_grad]}

    def ema_targets(self) -> dict[str, nn.Module]:
        """Sub-modules whose weights the trainer averages (EMA) and uses for sampling."""
        return {}

    def training_step(self, batch: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, torch.Tensor]:
        """Compute losses on ``batch``, call ``ctx.optimize``, return the values to log."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, n: int, *, generator: Any = None, **options: Any) -> torch.Tensor:
        """``n`` images in [-1, 1], (n, C, H, W). ``generator``: a :class:`genlab.noise.ImageNoise`
        (image i's randomness from its own generator, whatever the batch) or a torch.Generator."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
