"""Vector-quantised autoencoders: VQ-VAE (SPEC AE4), VQ-GAN (AE6) and the VQ-regularised LDM autoencoder (AE7).

All three share one network: encoder -> 1x1 conv to the code dimension d -> vector quantiser ->
1x1 conv -> decoder (the first stage of Esser et al. 2021 / Rombach et al. 2022). They differ in
the loss:

* ``vqvae`` (van den Oord et al. 2017): reconstruction + codebook + commitment (eq. 3).
* ``vqgan`` (Esser et al. 2021): L1 + perceptual + codebook + commitment + lambda * PatchGAN hinge
  loss, lambda = disc_weight * ||grad_L rec|| / ||grad_L adv|| at the decoder's last layer L (eq. 7);
  the discriminator starts at step ``disc_start`` (before it is neither run nor trained).
* ``vq-ae`` (Rombach et al. 2022): the VQ-GAN objective with f in {2, 4, 8}, plus a ``latent_scale``
  buffer, 1 / std of the quantised latents, that latent diffusion multiplies its latents by.

None of them generates images by itself: a prior over the code maps does (``genlab train pixelcnn
--codes RUN`` or ``gpt``), using :meth:`VQVAE.encode_codes` and :meth:`VQVAE.decode_codes`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from genlab.errors import ConfigError
from genlab.losses import (
    ReconstructionLoss,
    ReconstructionLossConfig,
    adaptive_weight,
    discriminator_loss,
    generator_loss,
)
from genlab.methods.base import DataInfo, Method, OptimizerSpec
from genlab.methods.capabilities import DiscreteCodes, Encodes, LatentCodec, Reconstructs
from genlab.models.autoencoder import (
    AutoencoderNetConfig,
    Decoder,
    Encoder,
    downsampling_factor,
    is_fully_convolutional,
    latent_size,
)
from genlab.models.patchgan import PatchDiscriminator, PatchGANConfig, patchgan_layers_fitting, patchgan_output_size
from genlab.nn.quantize import QuantizerConfig, VectorQuantizer, perplexity


@dataclass
class VQVAEConfig:
    """Encoder/decoder widths, the quantiser, and the reconstruction loss."""

    net: AutoencoderNetConfig = field(default_factory=AutoencoderNetConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    loss: ReconstructionLossConfig = field(default_factory=ReconstructionLossConfig)


@dataclass
class VQGANLossConfig(ReconstructionLossConfig):
    """Esser et al. 2021's reconstruction terms: L1 plus a perceptual distance (their LPIPS)."""

    mse: float = 0.0
    l1: float = 1.0
    perceptual: float = 1.0


@dataclass
class VQGANConfig(VQVAEConfig):
    """A VQ autoencoder trained with L1 + perceptual + a PatchGAN's hinge loss under an adaptive weight."""

    loss: VQGANLossConfig = field(default_factory=VQGANLossConfig)
    disc: PatchGANConfig = field(default_factory=PatchGANConfig)
    disc_loss: Literal["hinge", "vanilla", "nonsaturating", "lsgan"] = "hinge"
    disc_weight: float = 0.8  # multiplies the adaptive weight; 0 trains without a discriminator
    disc_start: int = 2000  # optimiser step at which the discriminator is switched on
    adaptive_weight_max: float = 1e4  # clamp of the adaptive weight (taming-transformers)
    disc_lr: float | None = None  # None: train.lr
    disc_betas: tuple[float, ...] | None = None  # None: train.adam_betas (Esser et al. use (0.5, 0.9) for both)


@dataclass
class VQAutoencoderConfig(VQGANConfig):
    """The VQ-GAN objective for latent diffusion's first stage, f in {2, 4, 8}, with a data-derived latent scale."""

    latent_scale_decay: float = 0.99  # EMA decay of the latent moments behind latent_scale


class VQVAE(Method, Reconstructs, Encodes, DiscreteCodes):
    """VQ-VAE: encoder, nearest-neighbour codebook with straight-through gradients, decoder."""

    name = "vqvae"
    Config = VQVAEConfig
    latent_prior = "none"

    def __init__(self, config: VQVAEConfig, data_info: DataInfo):
        super().__init__(config, data_info)
        c, q = config, config.quantizer
        self.f = downsampling_factor(c.net)
        if latent_size(data_info.image_size, self.f) < 1 or self.f > data_info.image_size:
            raise ConfigError(f"downsampling factor f={self.f} (model.net.channel_mult={list(c.net.channel_mult)}) "
                              f"exceeds the image size {data_info.image_size}: use fewer channel_mult entries")
        self.encoder = Encoder(c.net, data_info.channels, q.dim)
        self.quant_conv = nn.Conv2d(q.dim, q.dim, 1)  # (N, d, h, w) -> (N, d, h, w): the vectors to quantise
        self.quantizer = VectorQuantizer.from_config(q)
        self.post_quant_conv = nn.Conv2d(q.dim, q.dim, 1)
        self.decoder = Decoder(c.net, q.dim, data_info.channels)
        self.reconstruction = ReconstructionLoss(c.loss, data_info.channels)

    # ------------------------------------------------------------------ autoencoder API

    @property
    def codebook_size(self) -> int:
        """K, the number of codes (the vocabulary of a prior over code maps)."""
        return self.quantizer.codebook_size

    @property
    def fully_convolutional(self) -> bool:
        """Whether encode/decode apply unchanged to images of another size (see :func:`is_fully_convolutional`)."""
        return is_fully_convolutional(self.config.net)

    @property
    def code_shape(self) -> tuple[int, int]:
        """(h, w) of the code map of one image of the training size."""
        side = latent_size(self.data_info.image_size, self.f)
        return (side, side)

    def encode_continuous(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) -> z_e (N, d, h, w), the encoder outputs before quantisation."""
        return self.quant_conv(self.encoder(x))

    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) -> code indices (N, h, w) long."""
        return self.quantizer.nearest_code_map(self.encode_continuous(x))  # (N, h, w)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) -> quantised latents z_q (N, d, h, w); never updates the codebook."""
        return self.quantizer.lookup(self.encode_codes(x))

    def decode(self, z: torch.Tensor, *, quantize: bool = False) -> torch.Tensor:
        """Latents (N, d, h, w) -> images (N, C, H, W), not clamped; ``quantize`` snaps z to its nearest codes first."""
        if quantize:
            z = self.quantizer.lookup(self.quantizer.nearest_code_map(z))  # (N, d, h, w)
        size = self.data_info.image_size if z.shape[-1] == self.code_shape[-1] else None
        return self.decoder(self.post_quant_conv(z), output_size=size)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices (N, h, w) -> images (N, C, H, W) in [-1, 1]."""
        return self.decode(self.quantizer.lookup(codes.to(self.device))).clamp(-1, 1)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> their reconstructions through the codebook, clamped to [-1, 1]."""
        return self.decode(self.encode(x)).clamp(-1, 1)

    @torch.no_grad()
    def code_usage(self, images: torch.Tensor, batch_size: int = 256) -> tuple[float, float]:
        """(fraction of the K codes used, perplexity of the code histogram) over ``images`` in [-1, 1]."""
        counts = torch.zeros(self.codebook_size, device=self.device)
        for part in images.split(batch_size):
            codes = self.encode_codes(part.to(self.device))
            counts += torch.bincount(codes.flatten(), minlength=self.codebook_size).float()
        return float((counts > 0).float().mean()), float(perplexity(counts))

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, **options: Any) -> torch.Tensor:
        """Not available: a VQ autoencoder has no prior over its codes (train pixelcnn / gpt on it)."""
        raise ConfigError(f"{self.name} has no generative prior of its own: train one on its codes with "
                          f"`genlab train pixelcnn --codes RUN` (or `genlab train gpt --codes RUN`) and sample that run")

    # ------------------------------------------------------------------ training

    def _autoencode(self, x: torch.Tensor, ctx) -> tuple[Any, torch.Tensor]:
        """Encode, quantise (updating the codebook statistics), decode: (quantiser output, x_hat)."""
        z_e = self.encode_continuous(x)  # (n, d, h, w)
        restart_rand = None
        if self.config.quantizer.dead_code_threshold > 0:
            restart_rand = ctx.rand(*z_e.shape[2:])  # (n, h, w): which encoder outputs restart dead codes
        q = self.quantizer(z_e, restart_rand=restart_rand)
        x_hat = self.decoder(self.post_quant_conv(q.z_q), output_size=x.shape[-2:])  # (n, C, H, W)
        return q, x_hat

    def training_step(self, batch: dict[str, torch.Tensor], ctx) -> dict[str, torch.Tensor]:
        """van den Oord et al. 2017 eq. 3: reconstruction + codebook + commitment."""
        x = batch["image"]  # (n, C, H, W) in [-1, 1]
        q, x_hat = self._autoencode(x, ctx)
        rec, terms = self.reconstruction(x_hat, x)
        loss = rec + sum(q.losses.values())
        ctx.optimize(loss)
        return {"loss": loss.detach(), "rec_loss": rec.detach(), **terms,
                **{k: v.detach() for k, v in q.losses.items()}, **q.stats}


class VQGAN(VQVAE):
    """VQ-GAN first stage (Esser et al. 2021): perceptual + adversarial losses sharpen the reconstructions."""

    name = "vqgan"
    Config = VQGANConfig

    def __init__(self, config: VQGANConfig, data_info: DataInfo):
        super().__init__(config, data_info)
        if config.disc_weight < 0 or config.disc_start < 0:
            raise ConfigError(f"model.disc_weight={config.disc_weight} and model.disc_start={config.disc_start} must be >= 0")
        self.discriminator = None
        if config.disc_weight > 0:
            if config.disc.num_layers is None:  # derived from the image size; the saved config records it
                self.config = config = dataclasses.replace(
                    config, disc=dataclasses.replace(config.disc, num_layers=patchgan_layers_fitting(data_info.image_size)))
            if patchgan_output_size(data_info.image_size, config.disc.num_layers) < 1:
                raise ConfigError(f"model.disc.num_layers={config.disc.num_layers} is too deep for {data_info.image_size}px "
                                  "images: lower it (1 for 8x8, 2 for 28x28, 3 for 32x32 and up)")
            self.discriminator = PatchDiscriminator.from_config(config.disc, data_info.channels)

    def optimizer_groups(self) -> dict[str, list[nn.Parameter] | OptimizerSpec]:
        """"main": the autoencoder (and a gradient-learned codebook); "disc": the PatchGAN, with its own lr/betas."""
        main = [p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("discriminator.")]
        groups: dict[str, list[nn.Parameter] | OptimizerSpec] = {"main": main}
        if self.discriminator is not None:
            c = self.config
            groups["disc"] = OptimizerSpec(list(self.discriminator.parameters()), lr=c.disc_lr,
                                           betas=None if c.disc_betas is None else tuple(c.disc_betas))
        return groups

    def disc_active(self, step: int) -> bool:
        """Whether the discriminator is trained and used at optimiser step ``step``."""
        return self.discriminator is not None and step >= self.config.disc_start

    def training_step(self, batch: dict[str, torch.Tensor], ctx) -> dict[str, torch.Tensor]:
        """Esser et al. 2021 eq. 7-8: autoencoder step on rec + VQ + lambda * adv, then a hinge step of D."""
        c = self.config
        x = batch["image"]  # (n, C, H, W) in [-1, 1]
        q, x_hat = self._autoencode(x, ctx)
        rec, terms = self.reconstruction(x_hat, x)
        loss = rec + sum(q.losses.values())
        logs = {"rec_loss": rec.detach(), **terms, **{k: v.detach() for k, v in q.losses.items()}, **q.stats}
        active = self.disc_active(ctx.step)
        if active:
            g_loss = generator_loss(c.disc_loss, self.discriminator(x_hat))
            # lambda balances the two gradients where they meet, at the decoder's last layer.
            weight = c.disc_weight * adaptive_weight(rec, g_loss, self.decoder.last_layer, max_weight=c.adaptive_weight_max)
            loss = loss + weight * g_loss
            logs.update(g_loss=g_loss.detach(), adaptive_weight=weight)
        ctx.optimize(loss, "main")
        logs["loss"] = loss.detach()
        if active:
            real_logits = self.discriminator(x)
            fake_logits = self.discriminator(x_hat.detach())
            d_loss = discriminator_loss(c.disc_loss, real_logits, fake_logits)
            ctx.optimize(d_loss, "disc")
            logs.update(d_loss=d_loss.detach(), logits_real=real_logits.detach().mean(),
                        logits_fake=fake_logits.detach().mean())
        return logs


class VQAutoencoder(VQGAN, LatentCodec):
    """VQ-regularised autoencoder for latent diffusion (Rombach et al. 2022), with ``latent_scale`` = 1 / std(z_q)."""

    name = "vq-ae"
    Config = VQAutoencoderConfig

    def __init__(self, config: VQAutoencoderConfig, data_info: DataInfo):
        super().__init__(config, data_info)
        if self.f not in (2, 4, 8):
            raise ConfigError(f"vq-ae needs a downsampling factor f in {{2, 4, 8}}, got f={self.f} from "
                              f"model.net.channel_mult={list(config.net.channel_mult)} (use 2, 3 or 4 entries)")
        if not 0.0 < config.latent_scale_decay < 1.0:
            raise ConfigError(f"model.latent_scale_decay={config.latent_scale_decay} must be in (0, 1)")
        self.register_buffer("latent_scale", torch.ones(()))
        # EMA of (1, batch mean, batch second moment) of z_q; dividing by the first entry removes the
        # bias of starting the averages at 0 (Adam's correction).
        self.register_buffer("latent_moments", torch.zeros(3))

    @torch.no_grad()
    def update_latent_scale(self, z_q: torch.Tensor) -> None:
        """Fold one batch of quantised latents into the EMA moments; latent_scale = 1 / std (Rombach et al. 2022, sec. 4.3.2)."""
        z = z_q.detach().float()
        batch = torch.stack([torch.ones((), device=z.device), z.mean(), z.square().mean()])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(batch)
            batch /= dist.get_world_size()
        decay = self.config.latent_scale_decay
        self.latent_moments.mul_(decay).add_(batch, alpha=1 - decay)
        weight, mean, second = self.latent_moments.unbind()
        variance = (second / weight - (mean / weight) ** 2).clamp_min(1e-12)
        self.latent_scale.copy_(variance.rsqrt())

    def _autoencode(self, x: torch.Tensor, ctx) -> tuple[Any, torch.Tensor]:
        """The VQ autoencoding pass; its quantised latents also update ``latent_scale``."""
        q, x_hat = super()._autoencode(x, ctx)
        self.update_latent_scale(q.z_q)
        return q, x_hat

    def training_step(self, batch: dict[str, torch.Tensor], ctx) -> dict[str, torch.Tensor]:
        """The VQ-GAN step (whose autoencoding pass updates the latent scale); logs the scale."""
        logs = super().training_step(batch, ctx)
        logs["latent_scale"] = self.latent_scale.clone()
        return logs
