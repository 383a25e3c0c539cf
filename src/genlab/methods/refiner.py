"""Refiner: SDXL's ensemble of experts (Podell et al. 2023, sec. 2.5; eDiff-I, Balaji et al. 2022; SPEC D12).

A second diffusion model trained only on the low noise levels t < t_switch (``model.t_switch``)
specialises in the details a generalist renders last. It is a child run of its base (parent role
``base``, any diffusion run on the same images and noise schedule): ``genlab sample REFINER_RUN``
lets the base denoise t >= t_switch and hands the partly denoised images over to the refiner for the
rest, one sampler over one list of timesteps, so the number of network evaluations is what the base
alone would spend (:func:`genlab.diffusion.experts.handoff_denoiser`). The handoff may come later than
the training range's edge (``model.sample_switch`` or ``sample(..., switch=T)``, any T <= t_switch): the
refiner saw every t < t_switch in training, so every lower switch stays inside its range
(``benchmarks/sdxl_cascade_refiner.py refiner --switch ...`` compares them). ``model.init_from_base``
starts the refiner from the base's weights (eDiff-I's experts are fine-tuned copies of one model): on
MNIST only that refiner lowers FID (docs/results.md, "Cascade and refiner"). The refiner alone also refines
any image SDEdit-style (:meth:`Refiner.refine`: noise to t_start < t_switch, denoise back).

Why a child run and not ``genlab sample BASE --refiner RUN --switch T``: the pairing (which base,
which t_switch the refiner was trained for) is a fact of the refiner's training, so it is stored once
in the refiner's run (with the base's weights, by the one parent mechanism of :mod:`genlab.runs`) and
every sampling, evaluation and report of that run uses it, even after the base folder is gone; no
sampling flag can pair a refiner with a base of another noise schedule or a switch above its range.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Annotated, Any, Mapping

import torch
from torch import nn

from genlab.diffusion.experts import handoff_denoiser, sdedit
from genlab.errors import ConfigError
from genlab.methods.base import DataInfo, ParentRun, checked_parents
from genlab.methods.capabilities import Denoiser
from genlab.methods.ddpm import DDPM, DDPMConfig
from genlab.noise import ImageNoise
from genlab.ranges import PositiveInt, Range


@dataclass
class RefinerConfig(DDPMConfig):
    """DDPM's settings for the expert of the low noise levels, its base run and the switch timestep.

    ``schedule`` and ``num_timesteps`` are taken from the base (both experts share one noise process).
    """

    base: str | None = None  # run folder of the base diffusion run (the frozen parent; its EMA weights)
    # The refiner trains on t in [0, t_switch) and takes over from the base below t_switch. SDXL's
    # refiner covers the last ~20% of a 1000-step schedule (t_switch = 200).
    t_switch: Annotated[int, Range(1)] = 200
    # Where sampling hands over (the base denoises t >= sample_switch); None: t_switch. At most t_switch
    # (the refiner never saw higher levels); lower keeps it on the levels nearest the data.
    sample_switch: PositiveInt | None = None
    # Start from the base's denoiser (eDiff-I's experts are fine-tuned copies of one model) instead of random
    # weights: the refiner then starts as good as the base on every level and only specialises.
    init_from_base: bool = False


def check_same_process(expert: DDPM, base: DDPM, where: str) -> None:
    """Refuse an expert whose noise schedule or diffused shape differs from the base it takes over from."""
    theirs, ours = base.schedule.betas, expert.schedule.betas
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours):
        raise ConfigError(f"{where}: the base diffuses on a different noise schedule ({base.config.schedule}, "
                          f"{len(theirs)} steps) than this model ({expert.config.schedule}, {len(ours)} steps): "
                          "train it with the base's model.schedule and model.num_timesteps")
    if base._noise_shape() != expert._noise_shape():
        raise ConfigError(f"{where}: the base diffuses {base._noise_shape()} tensors, this model "
                          f"{expert._noise_shape()}: train it on the base's data (same size and channels)")


class Refiner(DDPM):
    """A DDPM trained on t < t_switch that finishes what its frozen base run starts (or refines any image)."""

    name = "refiner"
    Config = RefinerConfig
    parents = {"base": ParentRun(Denoiser, attribute="base")}

    def __init__(self, config: RefinerConfig, data_info: DataInfo, parents: Mapping[str, nn.Module] | None = None):
        base = checked_parents(type(self), config, parents)["base"]
        # One noise process for both experts: the refiner's schedule is the base's (the saved config records it).
        config = dataclasses.replace(config, schedule=base.config.schedule, num_timesteps=base.config.num_timesteps)
        if not 1 <= config.t_switch < config.num_timesteps:
            raise ConfigError(f"model.t_switch={config.t_switch} must be in [1, model.num_timesteps={config.num_timesteps})")
        self.check_switch(config.sample_switch, config, "model.sample_switch")
        super().__init__(config, data_info, parents)
        check_same_process(self, self.base, f"model.base={config.base}")
        if config.init_from_base:
            self._copy_base_denoiser()
        self._switch: int | None = None  # the handoff step of the sample() call under way (None: the config's)

    def _copy_base_denoiser(self) -> None:
        """Load the base's denoiser weights into this model's (the same network and sizes are required)."""
        ours, theirs = self.backbone, self.base.backbone
        mine, base = ours.state_dict(), theirs.state_dict()
        if type(ours) is not type(theirs) or mine.keys() != base.keys() or any(
                mine[k].shape != base[k].shape for k in mine):
            raise ConfigError("model.init_from_base=true needs the base's network and sizes (model.network, "
                              "model.unet / model.dit as in the base's config.yaml), or set it to false")
        ours.load_state_dict(base)

    @staticmethod
    def check_switch(switch: int | None, config: RefinerConfig, where: str) -> None:
        """Refuse a handoff step outside [1, t_switch]: above it the refiner would denoise levels it never saw."""
        if switch is not None and not (isinstance(switch, int) and 1 <= switch <= config.t_switch):
            raise ConfigError(f"{where}={switch}: the refiner was trained on t < t_switch={config.t_switch}; "
                              f"hand over at a step in [1, {config.t_switch}]")

    @property
    def switch(self) -> int:
        """The handoff step of sampling: the base denoises t >= switch, the refiner t < switch."""
        if self._switch is not None:
            return self._switch
        return self.config.t_switch if self.config.sample_switch is None else self.config.sample_switch

    def _training_timesteps(self) -> tuple[int, int]:
        """Only the low noise levels: t ~ U{0..t_switch-1}."""
        return 0, self.config.t_switch

    def _denoise(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, backbone_kwargs=None, **inputs: Any):
        """The base at t >= t_switch, the refiner below: what every sampler and guidance of DDPM.sample sees
        (a child run's ``backbone_kwargs`` steer the refiner's network, not the base's)."""
        base_y = y if getattr(self.base, "num_classes", None) is not None else None
        base = functools.partial(self.base._denoise, y=base_y)
        refiner = functools.partial(super()._denoise, y=y, backbone_kwargs=backbone_kwargs, **inputs)
        return handoff_denoiser(base, refiner, self.switch)(x_t, t)

    @torch.no_grad()
    def sample(self, n: int, *, switch: int | None = None, **options: Any) -> torch.Tensor:
        """DDPM.sample through the handoff at ``switch`` (default :attr:`switch`: model.sample_switch, else
        t_switch), any step in [1, t_switch]; ``options`` are DDPM's."""
        self.check_switch(switch, self.config, "switch")
        self._switch = switch  # read by _denoise, which every sampler and guidance of DDPM.sample calls
        try:
            return super().sample(n, **options)
        finally:
            self._switch = None

    @torch.no_grad()
    def refine(self, images: torch.Tensor, t_start: int | None = None, steps: int | None = None, *,
               sampler: str = "ddim", eta: float = 0.0, generator: ImageNoise | torch.Generator | None = None,
               labels: torch.Tensor | None = None) -> torch.Tensor:
        """SDEdit with the refiner alone: images (N, C, H, W) in [-1, 1] noised to ``t_start`` (default
        t_switch - 1, the highest level it was trained on) and denoised in ``steps`` steps (default: the
        share of model.sample_steps below t_start)."""
        c = self.config
        t_start = c.t_switch - 1 if t_start is None else int(t_start)
        if not 0 <= t_start < c.t_switch:
            raise ConfigError(f"t_start={t_start}: the refiner was trained on t < t_switch={c.t_switch}; "
                              f"refine from a t_start in [0, {c.t_switch})")
        if steps is None:
            steps = max(1, round(c.sample_steps * (t_start + 1) / c.num_timesteps))
        x0 = images.to(self.device)
        generator = ImageNoise.of(generator, len(x0))
        y = labels.to(self.device) if labels is not None and self.num_classes is not None else None
        denoise = functools.partial(DDPM._denoise, self, y=y)  # the refiner's own network, no handoff
        refined = sdedit(denoise, x0, self.schedule, t_start, steps, sampler=sampler, eta=eta, generator=generator,
                         clip_denoised=c.clip_denoised)
        return refined.clamp(-1, 1)
