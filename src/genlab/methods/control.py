"""Spatial control of a frozen diffusion run: ControlNet (SPEC A2) and T2I-Adapter (A3).

Both are child runs of a trained ``ddpm`` or ``ldm`` run with a U-Net (role ``base``, see
``Method.parents``): the base's weights stay frozen and are saved inside the child's checkpoints,
only the control network trains. The base's diffusion is used as it is (noise schedule, objective,
samplers, classifier-free guidance with its class conditioning, the autoencoder of a latent base);
the control network adds its outputs to the frozen U-Net through ``DDPM.network``'s
``backbone_kwargs`` hook. The control map (``model.control``: edges, mask, scribble, thickness;
:mod:`genlab.data.controls`) is computed from each training image.

    genlab train controlnet --base runs/ddpm --data mnist --control edges
    genlab train t2i-adapter --base runs/ddpm --data mnist --control edges
    genlab sample runs/controlnet --control-from mnist:test --control-scale 1 --out x.png
    genlab sample runs/controlnet --control-image edges.png --out x.png

Sampling without a control map gives the frozen base's samples (the control is absent).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
import torch
from torch import nn

from genlab.data.controls import CONTROLS, control_map
from genlab.data.paired import luminance
from genlab.errors import ConfigError, DataError
from genlab.methods.base import DataInfo, Method, ParentRun
from genlab.methods.capabilities import Denoiser, Generates
from genlab.models.controlnet import ControlNet, ControlNetConfig, T2IAdapter, T2IAdapterConfig
from genlab.models.unet import UNet
from genlab.ranges import NonNegativeFloat

CONTROL_CHANNELS = 1  # every control map of genlab.data.controls has one channel


@dataclass
class ControlNetMethodConfig:
    """The frozen base run, the control map it learns to follow, and the ControlNet's condition encoder."""

    base: str | None = None  # the ddpm / ldm run folder (U-Net); `genlab train controlnet --base RUN`
    control: Literal["edges", "mask", "scribble", "thickness"] = "edges"  # the map computed from each image
    control_scale: NonNegativeFloat = 1.0  # default multiplier of the control network's outputs at sampling
    controlnet: ControlNetConfig = field(default_factory=ControlNetConfig)


@dataclass
class T2IAdapterMethodConfig:
    """The frozen base run, the control map it learns to follow, and the adapter's size."""

    base: str | None = None  # the ddpm / ldm run folder (U-Net); `genlab train t2i-adapter --base RUN`
    control: Literal["edges", "mask", "scribble", "thickness"] = "edges"
    control_scale: NonNegativeFloat = 1.0
    adapter: T2IAdapterConfig = field(default_factory=T2IAdapterConfig)


def _repeat_to(x: torch.Tensor, n: int) -> torch.Tensor:
    """x (m, ...) repeated to n rows: classifier-free guidance runs the batch [x_t; x_t] (n = k m)."""
    return x if len(x) == n else x.repeat(n // len(x), *([1] * (x.dim() - 1)))


class ControlledDiffusion(Method, Generates):
    """A frozen U-Net diffusion run (``base``) steered by a trainable control network (``control_network``)."""

    parents = {"base": ParentRun(Denoiser, attribute="base")}

    def __init__(self, config: Any, data_info: DataInfo, parents: Mapping[str, nn.Module] | None = None):
        super().__init__(config, data_info, parents)
        base = self.base
        if not isinstance(getattr(base, "backbone", None), UNet):
            raise ConfigError(f"{self.name} steers a U-Net, but the base run {config.base} denoises with "
                              f"{type(getattr(base, 'backbone', base)).__name__}: train the base with model.network=unet")
        seen = base.data_info
        if (seen.channels, seen.image_size) != (data_info.channels, data_info.image_size):
            raise ConfigError(f"the base run {config.base} makes {seen.channels}x{seen.image_size}px images, the data is "
                              f"{data_info.channels}x{data_info.image_size}px: train on the base's data")
        if config.control not in CONTROLS:  # the config's type check names the choices; this guards direct use
            raise ConfigError(f"model.control={config.control!r}: choose one of {', '.join(CONTROLS)}")
        self.num_classes = base.num_classes  # the base's conditioning is passed through as it is
        self.control_network = self._make_control_network(base.backbone, data_info.image_size)

    def _make_control_network(self, unet: UNet, image_size: int) -> nn.Module:
        raise NotImplementedError

    def steering(self, control: torch.Tensor, scale: float = 1.0):
        """The ``backbone_kwargs`` callable of the base's network for control maps (N, 1, H, W)."""
        raise NotImplementedError

    def ema_targets(self) -> dict[str, nn.Module]:
        return {"control_network": self.control_network}

    def control_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The run's control maps (N, 1, H, W) in [-1, 1] of images (N, C, H, W) in [-1, 1]."""
        return control_map(self.config.control, images)

    def training_step(self, batch: dict[str, torch.Tensor], ctx) -> dict[str, torch.Tensor]:
        """The base's diffusion loss (Ho et al. 2020 Alg. 1, its objective and labels) with the control network
        steering its frozen U-Net; only the control network gets gradients."""
        base = self.base
        images = batch["image"]  # (n, C, H, W)
        x0 = base._diffused(images)  # (n, C, H, W) or the latents (n, c, h, w)
        t = ctx.randint(0, base.config.num_timesteps)  # (n,)
        noise = ctx.randn(*x0.shape[1:])
        y = base.training_labels(batch, ctx)  # (n,) or None, dropped to the null class as the base was trained
        loss, logs = base.loss(x0, t, noise, y, backbone_kwargs=self.steering(self.control_maps(images)))
        ctx.optimize(loss)
        return {"loss": loss.detach(), **logs}

    @torch.no_grad()
    def sample(self, n: int, *, control: torch.Tensor | None = None, control_scale: float | None = None,
               **options: Any) -> torch.Tensor:
        """``n`` images (n, C, H, W) in [-1, 1] following ``control`` (n, 1, H, W) control maps in [-1, 1].

        ``control_scale`` multiplies the control network's outputs (0: the base; default
        ``model.control_scale``). Every other option is the base's (sampler, steps, labels,
        guidance_scale, ...). Without ``control`` the frozen base samples on its own.
        """
        if control is None:
            return self.base.sample(n, **options)
        d = self.data_info
        control = torch.as_tensor(control)
        if tuple(control.shape) != (n, CONTROL_CHANNELS, d.image_size, d.image_size):
            raise ConfigError(f"control maps of shape {tuple(control.shape)}: give one {CONTROL_CHANNELS}x{d.image_size}x"
                              f"{d.image_size} map per sample, ({n}, {CONTROL_CHANNELS}, {d.image_size}, {d.image_size})")
        scale = self.config.control_scale if control_scale is None else float(control_scale)
        steer = self.steering(control.to(self.device, torch.float32), scale)
        return self.base.sample(n, backbone_kwargs=steer, **options)


class ControlNetMethod(ControlledDiffusion):
    """ControlNet (Zhang et al. 2023): a trainable copy of the base U-Net's encoder and middle block."""

    name = "controlnet"
    Config = ControlNetMethodConfig

    def _make_control_network(self, unet: UNet, image_size: int) -> ControlNet:
        return ControlNet(unet, CONTROL_CHANNELS, image_size, self.config.controlnet)

    def steering(self, control: torch.Tensor, scale: float = 1.0):
        """Residuals of the ControlNet on the U-Net's input (it sees x_t, t and the labels as the base does)."""

        def backbone_kwargs(h: torch.Tensor, t: torch.Tensor, condition: dict) -> dict:
            down, mid = self.control_network(h, t, _repeat_to(control, len(h)), **condition)
            return {"down_residuals": [scale * r for r in down], "mid_residual": scale * mid}

        return backbone_kwargs


class T2IAdapterMethod(ControlledDiffusion):
    """T2I-Adapter (Mou et al. 2023): features of the control map alone, added to the frozen encoder."""

    name = "t2i-adapter"
    Config = T2IAdapterMethodConfig

    def _make_control_network(self, unet: UNet, image_size: int) -> T2IAdapter:
        return T2IAdapter(unet, CONTROL_CHANNELS, image_size, self.config.adapter)

    def steering(self, control: torch.Tensor, scale: float = 1.0):
        """Adapter features, computed once (they depend on the control map only, not on x_t or t)."""
        features = [scale * f for f in self.control_network(control)]  # each (N, C_level, H_level, W_level)

        def backbone_kwargs(h: torch.Tensor, t: torch.Tensor, condition: dict) -> dict:
            return {"adapter_features": [_repeat_to(f, len(h)) for f in features]}

        return backbone_kwargs


def read_control_file(path: str | Path, image_size: int, n: int) -> torch.Tensor:
    """Control maps (n, 1, H, W) in [-1, 1] from a .png (one map, used for all n samples) or an .npz
    (``images`` uint8 N x H x W x C, N = 1 or N >= n); colour is reduced to its luminance. A missing,
    unreadable or wrongly sized file is a one-line DataError naming it."""
    from genlab.data import to_model_range
    from genlab.data.folder import decode_image
    from genlab.imageio import load_npz

    path = Path(path)
    if not path.is_file():
        raise DataError(f"--control-image {path}: no such file")
    if path.suffix.lower() == ".npz":
        u8 = load_npz(path)  # (N, C, H, W)
    else:
        u8 = torch.from_numpy(np.ascontiguousarray(decode_image(path.read_bytes(), str(path)))).permute(2, 0, 1)[None]
    if tuple(u8.shape[-2:]) != (image_size, image_size):
        raise DataError(f"--control-image {path}: the map is {u8.shape[-2]}x{u8.shape[-1]} px, the run makes "
                        f"{image_size}x{image_size} px images; resize it to {image_size}x{image_size}")
    if len(u8) not in (1,) and len(u8) < n:
        raise DataError(f"--control-image {path}: {len(u8)} maps for {n} samples; give one map or at least {n}")
    maps = luminance(to_model_range(u8))  # (N, 1, H, W) in [-1, 1]
    return maps.expand(n, -1, -1, -1).clone() if len(maps) == 1 else maps[:n]
