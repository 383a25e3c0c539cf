"""Encoder-based GAN inversion (SPEC G8): train E so that G(E(x)) = x for a frozen generator G.

Zhu et al. 2020 ("In-Domain GAN Inversion") train the encoder on real images through the frozen
generator (pixel + perceptual reconstruction); Perarnau et al. 2016 regress the latent of generated
images, whose true latent is known. We use both terms: the latent regression teaches E the
generator's coordinates, the real-image reconstruction keeps E "in domain" for the data.

    genlab train gan-encoder --gan runs/gan-mnist --preset small
    genlab invert runs/gan-mnist --encoder runs/gan-encoder-... --image digit.png --out inv.png
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from genlab.errors import ConfigError
from genlab.inversion import latent_space, render
from genlab.losses import PerceptualLoss
from genlab.methods.base import DataInfo, Method, ParentRun
from genlab.methods.capabilities import GANLatent, conditions_on_classes
from genlab.models.autoencoder import AutoencoderNetConfig, Encoder, latent_size, downsampling_factor


@dataclass
class GANEncoderConfig:
    """The generator to invert, the encoder's size and the weights of its loss terms."""

    gan: str | None = None  # the gan / stylegan run folder (required; the frozen parent)
    space: str | None = None  # z (DCGAN) or w (StyleGAN; default for it)
    net: AutoencoderNetConfig = field(default_factory=lambda: AutoencoderNetConfig(
        base_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1))
    latent_weight: float = 1.0  # MSE between E(G(l)) and l on generated images
    image_weight: float = 1.0  # MSE between G(E(x)) and x on real images
    perceptual_weight: float = 0.1  # perceptual distance between G(E(x)) and x (0 disables)


class GANEncoder(Method):
    """An encoder x -> latent of a frozen GAN, trained on generated and real images."""

    name = "gan-encoder"
    Config = GANEncoderConfig
    parents = {"gan": ParentRun(GANLatent, attribute="gan")}  # frozen: saved with our checkpoints, never optimised

    def __init__(self, config: GANEncoderConfig, data_info: DataInfo, parents: Mapping[str, nn.Module] | None = None):
        super().__init__(config, data_info, parents)
        gan = self.gan
        if (gan.data_info.channels, gan.data_info.image_size) != (data_info.channels, data_info.image_size):
            raise ConfigError(f"the GAN makes {gan.data_info.channels}x{gan.data_info.image_size}px images but the data "
                              f"is {data_info.channels}x{data_info.image_size}px; train on the GAN's data")
        if conditions_on_classes(gan):
            raise ConfigError("gan-encoder inverts unconditional GANs; this GAN is class-conditional")
        self.space = latent_space(gan, config.space)
        if self.space == "w+":
            raise ConfigError("gan-encoder predicts z or w; w+ inversion is optimisation-only (genlab invert --space w+)")
        self.latent_dim = gan.latent_dim if self.space == "z" else int(gan.w_avg.numel())
        side = latent_size(data_info.image_size, downsampling_factor(config.net))
        width = config.net.base_channels * config.net.channel_mult[-1]
        self.encoder = Encoder(config.net, data_info.channels, width)
        self.head = nn.Linear(width * side * side, self.latent_dim)
        self.perceptual = PerceptualLoss("auto", channels=data_info.channels) if config.perceptual_weight > 0 else None

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"main": list(self.encoder.parameters()) + list(self.head.parameters())}

    def ema_targets(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "head": self.head}

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (N, D) of images (N, C, H, W) in [-1, 1]: z, or w for a StyleGAN."""
        h = self.encoder(x)  # (N, width, h, w)
        latents = self.head(h.flatten(1))  # (N, D)
        if self.space == "w":
            latents = latents + self.gan.w_avg.detach()  # predict the offset from the mean style
        return latents

    def training_step(self, batch: dict[str, torch.Tensor], ctx) -> dict[str, torch.Tensor]:
        c = self.config
        x = batch["image"]  # (n, C, H, W) real images
        with torch.no_grad():
            z = ctx.randn(self.gan.latent_dim)  # (n, latent_dim)
            latents = z if self.space == "z" else self.gan.mapping(z)
            fakes = render(self.gan, latents, self.space)  # (n, C, H, W), true latent known
        latent_loss = ((self.invert(fakes) - latents) ** 2).mean()
        reconstruction = render(self.gan, self.invert(x), self.space)  # gradients reach E through frozen G
        image_loss = ((reconstruction - x) ** 2).mean()
        loss = c.latent_weight * latent_loss + c.image_weight * image_loss
        logs = {"latent_mse": latent_loss.detach(), "image_mse": image_loss.detach()}
        if self.perceptual is not None:
            perceptual = self.perceptual(reconstruction, x)
            loss = loss + c.perceptual_weight * perceptual
            logs["perceptual"] = perceptual.detach()
        ctx.optimize(loss)
        return {"loss": loss.detach(), **logs}

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, **options: Any) -> torch.Tensor:
        raise ConfigError("gan-encoder inverts images: use `genlab invert GAN_RUN --encoder RUN --image X`; "
                          "sample from the GAN run itself")
