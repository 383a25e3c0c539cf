"""The method interface: what every model family gives the one trainer.

A method is an ``nn.Module`` that owns its networks and knows its family's math. The trainer never
special-cases a family: it calls :meth:`Method.training_step` once per micro-batch and hands it a
:class:`StepContext` through which the method draws its randomness and asks for optimiser steps
(one call for a diffusion model, two for a GAN's D and G updates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping, Protocol

import torch
from torch import nn

from genlab.errors import ConfigError
from genlab.methods.capabilities import Capability, Generates, capable_methods, require


@dataclass(frozen=True)
class DataInfo:
    """Shape facts of the training data that size a method's networks."""

    channels: int
    image_size: int
    num_classes: int | None = None
    source: str | None = None  # the data source's name (e.g. "fashion-mnist"): picks evaluator networks
    condition_channels: int | None = None  # channels of the input images of paired data (pix2pix)
    num_images: int | None = None  # examples in the training data (personalisation methods need a few; None: unknown)


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
    nesterov: bool = False  # SGD only: Nesterov momentum (Sutskever et al. 2013)


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


@dataclass(frozen=True)
class ParentRun:
    """A frozen parent run a child method is built on (ARCHITECTURE: "A child run").

    The role is the key of ``Method.parents`` and also the model config field (``model.<role>``, the
    CLI's ``--<role> RUN``) that names the parent's run folder. The builder (:mod:`genlab.runs`)
    loads that run, or rebuilds it from the copy stored in the child's checkpoint, and passes the
    built method to the child's constructor, which keeps it as the frozen submodule ``attribute``:
    its weights are saved with the child's.
    """

    capability: type[Capability]
    attribute: str
    # The data settings a child run takes from this parent's run when --data is not given (a cascade's
    # super-resolution stage takes the base's images but not its smaller image_size).
    data_keys: tuple[str, ...] = ("source", "image_size", "fit", "channels")


def checked_parents(method_cls: type["Method"], config: Any, parents: Mapping[str, nn.Module] | None
                    ) -> dict[str, nn.Module]:
    """The parents ``method_cls`` declares, taken from ``parents``, each checked for its capability."""
    parents = dict(parents or {})
    unknown = set(parents) - set(method_cls.parents)
    if unknown:
        raise ConfigError(f"{method_cls.name} takes no parent run {', '.join(sorted(unknown))}")
    for role, spec in method_cls.parents.items():
        if parents.get(role) is None:
            raise ConfigError(f"{method_cls.name} needs a frozen {role} run: pass --{role} RUN (a "
                              f"{' or '.join(capable_methods(spec.capability))} run folder), i.e. model.{role}=RUN")
        require(parents[role], spec.capability, f"be the {role} of {method_cls.name}",
                where=f"model.{role}={getattr(config, role, None)}")
    return parents


class Method(nn.Module):
    """Base class of every family: networks, a training step, and sampling."""

    name: ClassVar[str]
    Config: ClassVar[type]
    parents: ClassVar[dict[str, ParentRun]] = {}  # role -> the frozen parent run it needs (child methods)
    # The data source a run of this method trains on when neither --data nor a preset says (None: the
    # config's default, mnist5k); e.g. clip needs captioned data.
    default_source: ClassVar[str | None] = None

    def __init__(self, config: Any, data_info: DataInfo, parents: Mapping[str, nn.Module] | None = None):
        super().__init__()
        self.config = config
        self.data_info = data_info
        self.parent_records: dict[str, dict] = {}  # role -> the parent's config and provenance (set by the builder)
        for role, parent in checked_parents(type(self), config, parents).items():
            parent.requires_grad_(False)
            # A submodule: saved with our weights, never optimised.
            self.add_module(type(self).parents[role].attribute, parent.eval())

    def parent_modules(self) -> dict[str, nn.Module]:
        """The frozen parents by role."""
        return {role: getattr(self, spec.attribute) for role, spec in type(self).parents.items()}

    def train(self, mode: bool = True) -> "Method":
        """Switch this method's mode; frozen parents always stay in eval mode (BatchNorm statistics, dropout)."""
        super().train(mode)
        for parent in self.parent_modules().values():
            parent.eval()
        return self

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
        require(self, Generates, "generate images")
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
