"""LoRA fine-tuning of a frozen run (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models"; SPEC A1), a child of any generating run with one optimiser (ddpm, dit, ldm, vae, ...).

The base run is the frozen parent (role ``base``, ARCHITECTURE: "A child run"). Its own networks
(its EMA targets: the U-Net of a DDPM, not the autoencoder of an LDM) get low-rank adapters on the
layers ``targets`` names (:mod:`genlab.nn.lora`), and training runs the BASE's training step: the
same loss, noise draws and conditioning, with gradients reaching only the adapters. The run samples
as its base does (every sampler, guidance and option of the base family).

    genlab train lora --base runs/ddpm-mnist --data fashion-mnist rank=4 alpha=4 targets=attn,conv
    genlab sample runs/lora-... --out grid.png
    genlab lora export runs/lora-... adapter/          # adapter_config.json + adapter_model.safetensors

``full_finetune=true`` is the baseline LoRA is compared with: no adapters, every weight of the base's
networks trained, through the same step, data and trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Mapping

import torch
from torch import nn

from genlab.errors import ConfigError
from genlab.methods.base import DataInfo, Method, ParentRun
from genlab.methods.capabilities import Generates
from genlab.nn.lora import adapter_parameters, adapter_ranks, inject_adapter, lora_layers, select_targets
from genlab.ranges import PositiveFloat, PositiveInt, Range

ADAPTER = "default"  # the adapter a lora run trains (peft's default name)


@dataclass
class LoRAConfig:
    """The base run, the adapters' rank, scale and target layers."""

    base: str | None = None  # run folder of the frozen base run (required; --base RUN)
    rank: PositiveInt = 4  # r: rank of the update B A
    alpha: PositiveFloat | None = None  # the update is scaled by alpha / r; None: alpha = r (scale 1)
    # Comma-separated: attn (attention q/k/v and output projections), conv (every Conv2d), conv1x1 (the
    # 1x1 Conv2d only: residual skips, projections), linear (every Linear), or module names / path suffixes
    # as in peft's target_modules (to_qkv, unet.conv_in). A 3x3 conv adapter costs r (9 C_in + C_out):
    # on a 32-64 channel U-Net that is 6-12 % of the layer at rank 4 (docs/results.md, the LoRA share table).
    targets: str = "attn,conv"
    # Rank of the adapters on convolutions with a kernel larger than 1x1 (LoCon's and kohya sd-scripts'
    # conv_dim; saved as peft's rank_pattern), with the same scale alpha / r as the others; None: rank.
    conv_rank: PositiveInt | None = None
    dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.0  # dropout on the adapters' input
    full_finetune: bool = False  # baseline: train every weight of the base's networks, no adapters


class LoRA(Method, Generates):
    """Low-rank adapters on a frozen base run, trained with the base's own training step."""

    name = "lora"
    Config = LoRAConfig
    parents = {"base": ParentRun(Generates, attribute="base")}

    def __init__(self, config: LoRAConfig, data_info: DataInfo, parents: Mapping[str, nn.Module] | None = None):
        super().__init__(config, data_info, parents)
        base = self.base
        if isinstance(base, LoRA):
            raise ConfigError(f"the base run {config.base} is itself a lora run: merge it first (`genlab lora merge "
                              "RUN --out MERGED`) and adapt the merged run, or adapt its base")
        seen = base.data_info
        if (seen.channels, seen.image_size) != (data_info.channels, data_info.image_size):
            raise ConfigError(f"the base run {config.base} makes {seen.channels}x{seen.image_size}px images, the data is "
                              f"{data_info.channels}x{data_info.image_size}px: fine-tune on data of the base's size "
                              f"(e.g. data.image_size={seen.image_size})")
        groups = list(base.optimizer_groups())
        if groups != ["main"]:
            raise ConfigError(f"lora fine-tunes methods with one optimiser; the base is a {base.name} run with "
                              f"{len(groups)} ({', '.join(groups)}): use a ddpm, dit, ldm or autoencoder run")
        self.num_classes = getattr(base, "num_classes", None)  # the base's conditioning is the run's
        self.networks = dict(base.ema_targets())  # the base's own networks (not its frozen parents)
        if not self.networks:
            raise ConfigError(f"a {base.name} run names no networks to adapt (its ema_targets are empty)")
        self.alpha = float(config.alpha if config.alpha is not None else config.rank)
        if config.full_finetune:
            self.target_paths: list[str] = []
            self.ranks: dict[str, int] = {}
            for network in self.networks.values():
                network.requires_grad_(True)
        else:
            self.target_paths = select_targets(base, config.targets, within=self.networks)
            self.ranks = adapter_ranks(base, self.target_paths, config.rank, config.conv_rank)
            inject_adapter(base, self.target_paths, ADAPTER, self.ranks, self.alphas(), config.dropout)

    def alphas(self) -> dict[str, float]:
        """path -> alpha, so that every adapter has the scale alpha / r of the run (conv_rank ones too)."""
        return {path: self.alpha * r / self.config.rank for path, r in self.ranks.items()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapters' A and B (or, with full_finetune, the base networks' weights)."""
        if self.config.full_finetune:
            return [p for network in self.networks.values() for p in network.parameters()]
        return adapter_parameters(self.base)

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"main": self.trainable_parameters()}

    def ema_targets(self) -> dict[str, nn.Module]:
        """The adapters (one module holding every layer's A and B), or the base networks when fully fine-tuned."""
        if self.config.full_finetune:
            return {f"base_{name}": network for name, network in self.networks.items()}
        # Module names may not contain dots: a layer's path is written with "/" instead.
        return {"lora": nn.ModuleDict({path.replace(".", "/"): nn.ModuleDict({"lora_A": layer.lora_A, "lora_B": layer.lora_B})
                                       for path, layer in lora_layers(self.base).items()})}

    def train(self, mode: bool = True) -> "LoRA":
        """The base stays in eval mode (a frozen parent) except what is trained: the adapters' dropout, or
        the fully fine-tuned networks."""
        super().train(mode)
        if self.config.full_finetune:
            for network in self.networks.values():
                network.train(mode)
        for layer in lora_layers(self.base).values():
            layer.lora_dropout.train(mode)
        return self

    def training_step(self, batch: dict[str, torch.Tensor], ctx) -> dict[str, torch.Tensor]:
        """The base family's own step (loss, noise, conditioning); ``ctx.optimize`` reaches our parameters only."""
        return self.base.training_step(batch, ctx)

    @torch.no_grad()
    def sample(self, n: int, **options: Any) -> torch.Tensor:
        """Sampling as the base does it, with the adapters in place."""
        return self.base.sample(n, **options)
