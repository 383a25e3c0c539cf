"""StyleGAN2-lite (Karras et al. 2020), SPEC G7: style-based generator, lazy R1, path-length regulariser.

One training step = one discriminator update, then one generator update (StyleGAN2-ADA's Dmain /
Gmain phases), with the paper's regularisers evaluated lazily (sec. 3.1):

* D: non-saturating logistic loss; every ``r1_every`` steps the R1 penalty (gamma / 2) E||grad D(x)||^2
  on reals, multiplied by ``r1_every`` so that its average strength is unchanged.
* G: non-saturating loss -log D(G(z)); with ``pl_weight > 0``, every ``pl_every`` steps the path-length
  penalty (||J_w^T y||_2 - a)^2 (paper eq. 4), y ~ N(0, I) / sqrt(H W) image-space noise and a the
  running mean (``pl_decay``) of the lengths, multiplied by ``pl_every``.

Lazy terms are added to the same optimiser step as the main loss (the paper runs them as separate
steps with adjusted Adam settings; one step per group keeps gradient accumulation possible).
Style mixing (sec. 2 of Karras et al. 2019): with probability ``style_mixing_prob`` a sample's
layers from a random crossover index on take their style from a second latent. All randomness (z,
noise inputs, mixing decisions and crossovers, path-length noise) is drawn through ``ctx``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from genlab.errors import ConfigError
from genlab.losses import discriminator_loss, generator_loss, r1_penalty
from genlab.methods.base import DataInfo, Method, OptimizerSpec
from genlab.methods.capabilities import Generates, StyleSpace
from genlab.methods.gan_health import WatchesTrainingHealth
from genlab.models.stylegan import Discriminator, Generator, StyleGANNetConfig
from genlab.noise import ImageNoise
from genlab.methods.health import HealthConfig


def path_lengths(images: torch.Tensor, ws: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||J_w^T y||_2 per sample (Karras et al. 2020, eq. 4), averaged over the num_ws style vectors.

    images (N, C, H, W) computed from ws (N, num_ws, w_dim) with a graph; y (N, C, H, W) image-space
    noise. Returns (N,) lengths sqrt(mean_l sum_d (J^T y)_ld^2), differentiable (create_graph).
    """
    (grads,) = torch.autograd.grad((images * y).sum(), ws, create_graph=True)  # J_w^T y, (N, num_ws, w_dim)
    return grads.square().sum(dim=2).mean(dim=1).sqrt()


@dataclass
class StyleGANConfig:
    """StyleGAN2-lite networks, regularisers and optimiser settings."""

    net: StyleGANNetConfig = field(default_factory=StyleGANNetConfig)
    class_conditional: bool = False  # label embedding in G's mapping and a projection D
    r1_gamma: float = 0.1  # R1 weight gamma (the paper's R1 gamma; 0 disables)
    r1_every: int = 16  # lazy R1: evaluate every k steps, scaled by k
    pl_weight: float = 0.0  # path-length regularisation weight (paper: 2; 0 disables)
    pl_every: int = 4
    pl_decay: float = 0.01  # running-mean rate of the path-length target a
    style_mixing_prob: float = 0.9
    w_avg_beta: float = 0.995  # EMA of mapped w, the centre of the truncation trick
    g_lr: float | None = None  # None: train.lr
    d_lr: float | None = None
    betas: tuple[float, ...] = (0.0, 0.99)  # Adam betas of both optimisers (paper)
    truncation: float = 1.0  # default psi when sampling (1: no truncation)
    health: HealthConfig = field(default_factory=HealthConfig)


class StyleGAN(WatchesTrainingHealth, Method, Generates, StyleSpace):
    """StyleGAN2-lite: mapping + modulated synthesis generator, residual discriminator."""

    name = "stylegan"
    Config = StyleGANConfig

    def __init__(self, config: StyleGANConfig, data_info: DataInfo):
        super().__init__(config, data_info)
        c = config
        if c.class_conditional and not data_info.num_classes:
            raise ConfigError("model.class_conditional=true needs a labelled data source (e.g. mnist, cifar10)")
        for key in ("r1_every", "pl_every"):
            if getattr(c, key) < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {getattr(c, key)}")
        if not 0.0 <= c.style_mixing_prob <= 1.0:
            raise ConfigError(f"model.style_mixing_prob must be in [0, 1], got {c.style_mixing_prob}")
        if c.net.mapping_layers < 1:
            raise ConfigError(f"model.net.mapping_layers must be >= 1, got {c.net.mapping_layers}")
        if len(c.betas) != 2:
            raise ConfigError(f"model.betas must be two numbers (beta1, beta2), got {list(c.betas)}")
        self.num_classes = data_info.num_classes if c.class_conditional else None
        self.generator = Generator(c.net, data_info.image_size, data_info.channels, self.num_classes)
        self.discriminator = Discriminator(c.net, data_info.image_size, data_info.channels, self.num_classes)
        self.register_buffer("pl_mean", torch.zeros(()))  # path-length target a (checkpointed: exact resume)
        # Last values of the lazy regularisers, logged every step so that window means stay meaningful.
        self.register_buffer("r1_last", torch.zeros(()), persistent=False)
        self.register_buffer("pl_last", torch.zeros(()), persistent=False)
        self.init_health(c.health, data_info)

    # ------------------------------------------------------------------ GAN-family API

    @property
    def latent_dim(self) -> int:
        return self.generator.z_dim

    @property
    def num_ws(self) -> int:
        return self.generator.num_ws

    @property
    def w_avg(self) -> torch.Tensor:
        return self.generator.w_avg

    def mapping(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """z (N, z_dim) -> w (N, w_dim)."""
        return self.generator.mapping(z, self._labels(labels))

    def synthesize_w(self, ws: torch.Tensor, noise: list[torch.Tensor] | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Styles (N, w_dim) or (N, num_ws, w_dim) -> images (N, C, H, W), differentiable, not clamped."""
        return self.generator.synthesize_w(ws, noise, generator)

    def synthesize(self, z: torch.Tensor, labels: torch.Tensor | None = None, truncation: float = 1.0,
                   noise: list[torch.Tensor] | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """z (N, z_dim) -> images (N, C, H, W), differentiable (inversion), with the current weights."""
        return self.generator(z, self._labels(labels), truncation, noise, generator)

    def style_mix(self, z1: torch.Tensor, z2: torch.Tensor, crossover: int, labels: torch.Tensor | None = None,
                  truncation: float = 1.0, noise: list[torch.Tensor] | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """Images whose layers < crossover take z1's styles (coarse) and the rest z2's (fine)."""
        if not 0 <= crossover <= self.num_ws:
            raise ConfigError(f"crossover must be in [0, {self.num_ws}] (style layers), got {crossover}")
        labels = self._labels(labels)
        g = self.generator
        w1, w2 = (g.truncate(g.mapping(z, labels), truncation) for z in (z1, z2))
        return g.synthesize_w(g.mix_styles(w1, w2, crossover), noise, generator)

    def _labels(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        if labels is not None and self.num_classes is None:
            raise ConfigError("--class needs a class-conditional model (train with model.class_conditional=true)")
        return labels

    # ------------------------------------------------------------------ training

    def optimizer_groups(self) -> dict[str, OptimizerSpec]:
        c = self.config
        betas = (float(c.betas[0]), float(c.betas[1]))
        return {
            "generator": OptimizerSpec(list(self.generator.parameters()), lr=c.g_lr, betas=betas),
            "discriminator": OptimizerSpec(list(self.discriminator.parameters()), lr=c.d_lr, betas=betas),
        }

    def ema_targets(self) -> dict[str, torch.nn.Module]:
        return {"generator": self.generator}

    def _training_styles(self, ctx, labels: torch.Tensor | None, update_w_avg: bool) -> torch.Tensor:
        """Styles (n, num_ws, w_dim) of a fresh z, mixed per sample with a second z's (all draws via ctx)."""
        g = self.generator
        z1, z2 = ctx.randn(g.z_dim), ctx.randn(g.z_dim)  # (n, z_dim) each
        mixed = ctx.rand() < self.config.style_mixing_prob  # (n,) bool
        crossover = ctx.randint(1, g.num_ws) if g.num_ws > 1 else torch.ones_like(mixed, dtype=torch.long)
        crossover = torch.where(mixed, crossover, torch.full_like(crossover, g.num_ws))  # num_ws: no mixing
        w1 = g.mapping(z1, labels)  # (n, w_dim)
        if update_w_avg:
            g.update_w_avg(w1, self.config.w_avg_beta)
        return g.mix_styles(w1, g.mapping(z2, labels), crossover)  # (n, num_ws, w_dim)

    def _training_noise(self, ctx) -> list[torch.Tensor]:
        return [ctx.randn(*shape) for shape in self.generator.noise_shapes()]

    def training_step(self, batch: dict[str, torch.Tensor], ctx) -> dict[str, torch.Tensor]:
        """One D step (logistic loss + lazy R1), then one G step (non-saturating loss + lazy path length)."""
        real_labels = batch.get("label") if self.num_classes else None
        d_loss, real_logits, fake_logits = self._discriminator_step(batch["image"], real_labels, ctx)
        g_loss = self._generator_step(ctx)
        logs = {
            "d_loss": d_loss.detach(),
            "g_loss": g_loss.detach(),
            "r1": self.r1_last.clone(),
            "pl": self.pl_last.clone(),
            "d_real_acc": (real_logits.detach() > 0).float().mean(),
            "d_fake_acc": (fake_logits.detach() < 0).float().mean(),
        }
        logs.update(self.watch_health(ctx, logs["d_loss"]))
        return logs

    def _discriminator_step(self, real: torch.Tensor, labels: torch.Tensor | None,
                            ctx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One D update on reals (n, C, H, W) and fakes of the current G (no graph into G); returns
        (logistic loss without R1, real logits (n,), fake logits (n,))."""
        c, D = self.config, self.discriminator
        with torch.no_grad():
            fake = self.generator.synthesize_w(self._training_styles(ctx, labels, update_w_avg=True),
                                               self._training_noise(ctx))  # (n, C, H, W)
        r1_step = c.r1_gamma > 0 and ctx.step % c.r1_every == 0
        real = real.detach().requires_grad_(r1_step)
        real_logits = D(real, labels)  # (n,)
        fake_logits = D(fake, labels)  # (n,)
        d_loss = discriminator_loss("nonsaturating", real_logits, fake_logits)
        ctx.optimize(d_loss + self._lazy_r1(real_logits, real) if r1_step else d_loss, "discriminator")
        return d_loss, real_logits, fake_logits

    def _lazy_r1(self, real_logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """(gamma / 2) E||grad D(x)||^2 on reals, times ``r1_every``: lazy R1 keeps its average strength (sec. 3.1)."""
        r1 = r1_penalty(real_logits, real)
        self.r1_last.copy_(r1.detach())
        return (self.config.r1_gamma / 2) * r1 * self.config.r1_every

    def _generator_step(self, ctx) -> torch.Tensor:
        """One G update through D (the trainer back-propagates into G's group only); returns the loss without PL."""
        c = self.config
        labels = ctx.randint(0, self.num_classes) if self.num_classes else None
        ws = self._training_styles(ctx, labels, update_w_avg=False)  # (n, num_ws, w_dim)
        fake = self.generator.synthesize_w(ws, self._training_noise(ctx))  # (n, C, H, W)
        g_loss = generator_loss("nonsaturating", self.discriminator(fake, labels))
        pl_step = c.pl_weight > 0 and ctx.step % c.pl_every == 0
        ctx.optimize(g_loss + self._lazy_path_length(fake, ws, ctx) if pl_step else g_loss, "generator")
        return g_loss

    def _lazy_path_length(self, fake: torch.Tensor, ws: torch.Tensor, ctx) -> torch.Tensor:
        """pl_weight E(||J_w^T y|| - a)^2 times ``pl_every`` (paper eq. 4), updating the running target a."""
        c = self.config
        h, w = fake.shape[-2:]
        y = ctx.randn(*fake.shape[1:]) / math.sqrt(h * w)  # y ~ N(0, I) / sqrt(HW): scale-free lengths
        lengths = path_lengths(fake, ws, y)  # (n,)
        with torch.no_grad():
            self.pl_mean.lerp_(lengths.mean().detach(), c.pl_decay)
        pl_penalty = (lengths - self.pl_mean).square().mean()
        self.pl_last.copy_(pl_penalty.detach())
        return c.pl_weight * pl_penalty * c.pl_every

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(self, n: int, *, generator: ImageNoise | torch.Generator | None = None, truncation: float | None = None,
               labels: torch.Tensor | None = None, z: torch.Tensor | None = None,
               noise: list[torch.Tensor] | None = None, **unknown: Any) -> torch.Tensor:
        """``n`` images in [-1, 1]; ``truncation`` psi pulls w toward w_avg (1: none, 0: the mean image).
        Image i's z, label and noise maps come from its own generator of the ImageNoise."""
        if unknown:
            raise ConfigError(f"stylegan sampling does not take {', '.join(sorted(unknown))}")
        psi = self.config.truncation if truncation is None else float(truncation)
        g, device = self.generator, self.w_avg.device
        generator = ImageNoise.of(generator, n)
        if z is None:
            z = generator.randn(g.z_dim)
        if z.shape != (n, g.z_dim):
            raise ConfigError(f"z must have shape ({n}, {g.z_dim}), got {tuple(z.shape)}")
        labels = self._labels(labels)
        if self.num_classes and labels is None:
            labels = generator.randint(0, self.num_classes)
        if noise is None:
            noise = [generator.randn(*shape) for shape in g.noise_shapes()]  # (n, 1, r, r) each
        noise = [m.to(device) for m in noise]
        w = g.mapping(z.to(device), None if labels is None else labels.to(device))  # (n, w_dim)
        w = g.truncate(w, psi)
        return g.synthesize_w(w, noise).clamp(-1, 1)
