"""DCGAN and its stabilisation options, conditional GAN (SPEC G1-G5).

One training step is Goodfellow et al.'s alternating update (2014, alg. 1): ``n_critic`` updates of
the discriminator D on real images and detached fakes, then one update of the generator G through
the updated D. Each network has its own optimiser (``optimizer_groups``: TTUR learning rates,
Adam(0.5, 0.999) as in DCGAN, or SGD for D) and the trainer backpropagates a loss only into the
group it steps. Every random draw goes through ``ctx`` so a resumed run equals a straight one.

Stabilisation switches (G2), each a config field:

* ``label_smoothing``: D's targets drawn per sample, real ~ U[0.7, 1.2], fake ~ U[0, 0.3]
  (Salimans et al. 2016 sec. 3.4 smooth the real side; the noisy ranges are from the "GAN hacks"
  notes); ``label_flip_prob``: each target swapped for the other side's with this probability.
* ``instance_noise``: N(0, sigma_t^2) added to every D input, real and fake, with sigma_t decaying
  linearly to 0 over ``instance_noise_steps`` (Sonderby et al. 2017; Arjovsky & Bottou 2017).
* ``separate_batches``: real and fake pass through D in separate forward passes, so BatchNorm
  statistics are never mixed across the two (otherwise one concatenated batch).
* ``norm`` (G) / ``norm_d`` (D): batch, instance or none; ``spectral_norm`` on every D weight
  (Miyato et al. 2018); ``dropout_g``; ``latent`` gaussian or uniform; the EMA of G is the
  trainer's (``ema_targets``, ``train.ema_decay``).

Losses (L4 via ``genlab.losses``): vanilla (minimax), nonsaturating, hinge, lsgan, wgan (weight
clipping to +-``clip_value`` after every D step, ``n_critic`` 5) and wgan-gp (lambda
``gp_weight`` = 10); an optional R1 penalty (``r1_gamma``) for any loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from genlab.errors import ConfigError
from genlab.losses import clip_weights_, discriminator_loss, generator_loss, gradient_penalty, r1_penalty
from genlab.methods.base import DataInfo, Method, OptimizerSpec
from genlab.methods.capabilities import GANLatent, Generates
from genlab.methods.gan_health import WatchesTrainingHealth
from genlab.models.dcgan import Discriminator, Generator
from genlab.noise import ImageNoise
from genlab.methods.health import HealthConfig

_TARGET_LOSSES = ("vanilla", "nonsaturating", "lsgan")  # losses that use D's real/fake targets
_WASSERSTEIN = ("wgan", "wgan-gp")


@dataclass
class GANConfig:
    """A DCGAN pair, its adversarial loss, optimisers and every G2 stabilisation switch."""

    latent_dim: int = 100
    latent: Literal["gaussian", "uniform"] = "gaussian"  # z ~ N(0, I) or U[-1, 1]^Z
    g_channels: int = 64  # G's width at the last level (doubles towards the base grid)
    d_channels: int = 64  # D's width at the first level (doubles with each stride-2 conv)
    upsample: Literal["transposed", "upsample"] = "transposed"  # transposed conv, or nearest + conv3x3
    norm: Literal["batch", "instance", "none"] = "batch"  # generator normalisation
    norm_d: Literal["batch", "instance", "none"] = "batch"  # discriminator (never batch with wgan-gp)
    dropout_g: float = 0.0
    spectral_norm: bool = False  # on every weight of D
    class_conditional: bool = False  # G: class embedding concatenated to z; D: projection
    class_embed_dim: int = 32
    loss: Literal["vanilla", "nonsaturating", "hinge", "lsgan", "wgan", "wgan-gp"] = "nonsaturating"
    n_critic: int | None = None  # D updates per G update; None: 5 for wgan / wgan-gp, else 1
    gp_weight: float = 10.0  # lambda of WGAN-GP (Gulrajani et al. 2017)
    r1_gamma: float = 0.0  # R1 penalty weight gamma (Mescheder et al. 2018); 0: off
    clip_value: float = 0.01  # WGAN weight clipping bound c
    lr_g: float | None = None  # None: train.lr (TTUR: set lr_d > lr_g, Heusel et al. 2017)
    lr_d: float | None = None
    betas_g: tuple[float, ...] | None = (0.5, 0.999)  # DCGAN's Adam betas; None: train.adam_betas
    betas_d: tuple[float, ...] | None = (0.5, 0.999)
    d_optimizer: Literal["adam", "sgd"] = "adam"
    d_momentum: float = 0.0  # SGD momentum of D
    label_smoothing: bool = False  # real targets ~ U[0.7, 1.2], fake ~ U[0, 0.3]
    label_flip_prob: float = 0.0
    instance_noise: float = 0.0  # initial std of the noise added to D's inputs
    instance_noise_steps: int = 1000  # steps over which that std decays linearly to 0
    separate_batches: bool = True  # real and fake through D in separate passes (BatchNorm)
    health: HealthConfig = field(default_factory=HealthConfig)


class GAN(WatchesTrainingHealth, Method, Generates, GANLatent):
    """DCGAN (Radford et al. 2016) with L4 losses, G2 stabilisers and optional class conditioning (G5)."""

    name = "gan"
    Config = GANConfig
    latent_prior = "gaussian"

    def __init__(self, config: GANConfig, data_info: DataInfo):
        super().__init__(config, data_info)
        c = config
        self._validate(c, data_info)
        self.num_classes = data_info.num_classes if c.class_conditional else None
        self.latent_dim = c.latent_dim
        # Interpolation (CLI `interpolate`): slerp between Gaussian latents, straight lines in the uniform cube.
        self.latent_prior = "gaussian" if c.latent == "gaussian" else "none"
        self.n_critic = c.n_critic if c.n_critic is not None else (5 if c.loss in _WASSERSTEIN else 1)
        self.generator = Generator(c.latent_dim, data_info.channels, data_info.image_size, base_channels=c.g_channels,
                                   norm=c.norm, upsample=c.upsample, dropout=c.dropout_g,
                                   num_classes=self.num_classes, class_embed_dim=c.class_embed_dim)
        self.discriminator = Discriminator(data_info.channels, data_info.image_size, base_channels=c.d_channels,
                                           norm=c.norm_d, spectral_norm=c.spectral_norm, num_classes=self.num_classes)
        self.init_health(c.health, data_info)

    @staticmethod
    def _validate(c: GANConfig, data_info: DataInfo) -> None:
        """Refuse inconsistent option combinations with a message naming the fix."""
        if c.class_conditional and not data_info.num_classes:
            raise ConfigError("model.class_conditional=true needs a labelled data source (e.g. mnist, cifar10)")
        if c.latent_dim < 1:
            raise ConfigError(f"model.latent_dim must be >= 1, got {c.latent_dim}")
        if c.n_critic is not None and c.n_critic < 1:
            raise ConfigError(f"model.n_critic must be >= 1, got {c.n_critic}")
        if c.loss == "wgan-gp" and c.norm_d == "batch":
            raise ConfigError("model.loss=wgan-gp penalises per-sample gradients, which BatchNorm couples: "
                              "set model.norm_d=none (or instance)")
        if (c.label_smoothing or c.label_flip_prob > 0) and c.loss not in _TARGET_LOSSES:
            raise ConfigError(f"label smoothing/flipping changes D's targets, which model.loss={c.loss} does not use; "
                              f"use one of {list(_TARGET_LOSSES)} or turn them off")
        if not 0.0 <= c.label_flip_prob <= 0.5:
            raise ConfigError(f"model.label_flip_prob must be in [0, 0.5], got {c.label_flip_prob}")
        if c.instance_noise < 0 or c.instance_noise_steps < 1:
            raise ConfigError(f"model.instance_noise ({c.instance_noise}) must be >= 0 and "
                              f"model.instance_noise_steps ({c.instance_noise_steps}) >= 1")
        for key in ("betas_g", "betas_d"):
            betas = getattr(c, key)
            if betas is not None and (len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas)):
                raise ConfigError(f"model.{key} must be two numbers in [0, 1), e.g. [0.5, 0.999], got {list(betas)}")
        for key in ("gp_weight", "r1_gamma", "clip_value"):
            if getattr(c, key) < 0:
                raise ConfigError(f"model.{key} must be >= 0, got {getattr(c, key)}")

    # ------------------------------------------------------------------ trainer hooks

    def optimizer_groups(self) -> dict[str, OptimizerSpec]:
        """D and G optimisers: TTUR learning rates, per-network betas, Adam or SGD for D."""
        c = self.config
        d_kind = "sgd" if c.d_optimizer == "sgd" else "adamw"
        return {
            "discriminator": OptimizerSpec(list(self.discriminator.parameters()), lr=c.lr_d, kind=d_kind,
                                           betas=None if d_kind == "sgd" or c.betas_d is None else tuple(c.betas_d),
                                           momentum=c.d_momentum),
            "generator": OptimizerSpec(list(self.generator.parameters()), lr=c.lr_g,
                                       betas=None if c.betas_g is None else tuple(c.betas_g)),
        }

    def ema_targets(self) -> dict[str, torch.nn.Module]:
        return {"generator": self.generator}

    # ------------------------------------------------------------------ pieces of a step

    def draw_latent(self, ctx) -> torch.Tensor:
        """z for one micro-batch from ctx: (n, latent_dim), Gaussian or uniform on [-1, 1]."""
        if self.config.latent == "uniform":
            return ctx.rand(self.latent_dim) * 2 - 1
        return ctx.randn(self.latent_dim)

    def instance_noise_std(self, step: int) -> float:
        """sigma_t = instance_noise * max(0, 1 - step / instance_noise_steps)."""
        c = self.config
        return c.instance_noise * max(0.0, 1.0 - step / c.instance_noise_steps)

    def _perturb(self, x: torch.Tensor, sigma: float, ctx) -> torch.Tensor:
        """x + sigma * eps, eps ~ N(0, I) from ctx (instance noise); x itself when sigma is 0."""
        return x + sigma * ctx.randn(*x.shape[1:]) if sigma > 0 else x

    def discriminator_targets(self, ctx) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(real, fake) targets of D: 1 and 0, or per-sample smoothed (U[0.7, 1.2], U[0, 0.3]) and/or flipped."""
        c = self.config
        real_target: torch.Tensor | float = 1.0
        fake_target: torch.Tensor | float = 0.0
        if c.label_smoothing:
            real_target = 0.7 + 0.5 * ctx.rand()  # (n,)
            fake_target = 0.3 * ctx.rand()
        if c.label_flip_prob > 0:  # swap a sample's target for the other side's
            flip_real, flip_fake = ctx.rand() < c.label_flip_prob, ctx.rand() < c.label_flip_prob  # (n,) each
            real_target, fake_target = (torch.where(flip_real, fake_target, real_target),
                                        torch.where(flip_fake, real_target, fake_target))
        return real_target, fake_target

    def _discriminator_logits(self, real: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor | None):
        """D's logits on real and fake, (n,) each: two forward passes, or one on the concatenation."""
        if self.config.separate_batches:
            return self.discriminator(real, labels), self.discriminator(fake, labels)
        both = self.discriminator(torch.cat([real, fake]), None if labels is None else torch.cat([labels, labels]))
        return both.split(real.shape[0])

    def _accuracy(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """D's accuracy on real and fake: logits above / below its decision threshold.

        BCE and hinge: 0; LSGAN: 0.5 (midway between targets 0 and 1); a Wasserstein critic has no
        calibrated threshold, so the midpoint of the batch's mean real and fake scores is used.
        """
        with torch.no_grad():
            if self.config.loss in _WASSERSTEIN:
                threshold = 0.5 * (real_logits.mean() + fake_logits.mean())
            else:
                threshold = 0.5 if self.config.loss == "lsgan" else 0.0
            return (real_logits > threshold).float().mean(), (fake_logits < threshold).float().mean()

    def discriminator_step_loss(self, real: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor | None, ctx,
                                sigma: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """D's loss on a real batch and detached fakes (with instance noise, targets and penalties), and logs."""
        c = self.config
        real, fake = self._perturb(real, sigma, ctx), self._perturb(fake.detach(), sigma, ctx)
        if c.r1_gamma > 0:
            real = real.detach().requires_grad_(True)
        real_logits, fake_logits = self._discriminator_logits(real, fake, labels)
        real_target, fake_target = self.discriminator_targets(ctx)
        loss = discriminator_loss(c.loss, real_logits, fake_logits, real_target, fake_target)
        logs: dict[str, torch.Tensor] = {}
        logs["d_real_acc"], logs["d_fake_acc"] = self._accuracy(real_logits, fake_logits)
        if c.loss == "wgan-gp":
            mix = ctx.rand(1, 1, 1)  # (n, 1, 1, 1)
            gp = gradient_penalty(lambda x: self.discriminator(x, labels), real, fake, mix)
            loss = loss + c.gp_weight * gp
            logs["gp"] = gp.detach()
        if c.r1_gamma > 0:
            r1 = r1_penalty(real_logits, real)
            loss = loss + 0.5 * c.r1_gamma * r1
            logs["r1"] = r1.detach()
        return loss, logs

    # ------------------------------------------------------------------ the step

    def training_step(self, batch: dict[str, torch.Tensor], ctx) -> dict[str, torch.Tensor]:
        """n_critic D updates on (real, G(z).detach()), then one G update through the new D."""
        c = self.config
        if self.n_critic > 1 and (getattr(ctx, "micro", 0) > 0 or not getattr(ctx, "is_last_micro", True)):
            raise ConfigError(f"model.n_critic={self.n_critic} steps D several times per training step, which "
                              "gradient accumulation cannot split: set train.grad_accum=1")
        real = batch["image"]  # (n, C, H, W) in [-1, 1]
        labels = None
        if self.num_classes is not None:
            if "label" not in batch:
                raise ConfigError("model.class_conditional=true needs a labelled data source (e.g. mnist, cifar10)")
            labels = batch["label"]  # G is conditioned on the real batch's labels: classes stay balanced
        sigma = self.instance_noise_std(ctx.step)
        logs: dict[str, torch.Tensor] = {}
        for i in range(self.n_critic):
            # The real batch is reused by every critic iteration, with fresh z; the last fakes keep
            # their graph and feed the G update (as in the DCGAN reference loop).
            with torch.set_grad_enabled(i == self.n_critic - 1):
                fake = self.generator(self.draw_latent(ctx), labels)  # (n, C, H, W)
            d_loss, d_logs = self.discriminator_step_loss(real, fake, labels, ctx, sigma)
            ctx.optimize(d_loss, "discriminator")
            if c.loss == "wgan":  # Arjovsky et al. 2017, alg. 1 line 7: keep the critic K-Lipschitz
                clip_weights_(self.discriminator, c.clip_value)
        logs.update(d_logs)
        logs["d_loss"] = d_loss.detach()
        g_loss = generator_loss(c.loss, self.discriminator(self._perturb(fake, sigma, ctx), labels))
        ctx.optimize(g_loss, "generator")
        logs["g_loss"] = g_loss.detach()
        if c.instance_noise > 0:
            logs["instance_noise"] = torch.tensor(sigma)
        logs.update(self.watch_health(ctx, None if c.loss in _WASSERSTEIN else logs["d_loss"]))
        return logs

    # ------------------------------------------------------------------ sampling

    def synthesize(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """G(z[, labels]) with the current weights, differentiable: (N, latent_dim) -> (N, C, H, W) in [-1, 1]."""
        if labels is not None and self.num_classes is None:
            raise ConfigError("labels need a class-conditional GAN (train with model.class_conditional=true)")
        if labels is None and self.num_classes is not None:
            raise ConfigError("a class-conditional GAN needs labels (N,) to synthesize")
        return self.generator(z, labels)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        generator: ImageNoise | torch.Generator | None = None,
        labels: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
        truncation: float | None = None,
        **unknown: Any,
    ) -> torch.Tensor:
        """``n`` images G(z) in [-1, 1]; z drawn from the latent prior via ``generator`` unless given.

        A class-conditional GAN draws uniform random labels (after z) when none are given. Image i's
        z and label come from its own generator of the :class:`~genlab.noise.ImageNoise`.
        """
        if unknown:
            raise ConfigError(f"gan sampling does not take {', '.join(sorted(unknown))}")
        if truncation not in (None, 1.0):  # psi = 1 is no truncation, which is all a DCGAN does
            raise ConfigError(f"truncation (psi) is a StyleGAN option; a DCGAN samples its latent prior as it is "
                              f"(psi = 1), got {truncation}")
        if labels is not None and self.num_classes is None:
            raise ConfigError("--class needs a class-conditional GAN (train with model.class_conditional=true)")
        generator = ImageNoise.of(generator, n)
        if z is None:
            if self.config.latent == "uniform":
                z = generator.rand(self.latent_dim) * 2 - 1
            else:
                z = generator.randn(self.latent_dim)
        if z.shape != (n, self.latent_dim):
            raise ConfigError(f"z must have shape ({n}, {self.latent_dim}), got {tuple(z.shape)}")
        if self.num_classes is not None:
            if labels is None:
                labels = generator.randint(0, self.num_classes)
            labels = torch.as_tensor(labels).long()
            if labels.shape != (n,) or labels.min() < 0 or labels.max() >= self.num_classes:
                raise ConfigError(f"labels must be ({n},) class indices in [0, {self.num_classes}), got {labels.tolist()[:8]}")
            labels = labels.to(self.device)
        return self.synthesize(z.to(self.device), labels).clamp(-1, 1)
