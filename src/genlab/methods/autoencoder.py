"""Autoencoders (SPEC AE1), denoising autoencoders (AE2), VAEs (AE3) and KL-regularised LDM autoencoders (AE7).

All four share one convolutional encoder/decoder pair (:mod:`genlab.models.autoencoder`) and the
autoencoder-family API used by the CLI, the evaluation suite, priors and latent diffusion:

    encode(x) -> z          (N, c, h, w) latent: the code (AE/DAE) or the posterior mean (VAE, kl-ae);
                            a dense latent of latent_dim is returned as (N, latent_dim, 1, 1)
    decode(z) -> x_hat      in [-1, 1]-ish, not clamped
    reconstruct(x) -> x_hat clamped to [-1, 1]

Only the VAE is a generative model (z ~ N(0, I), decode); the others have no prior and refuse
``sample`` with a message pointing to `genlab reconstruct` or to training a prior / LDM on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from genlab.errors import ConfigError, DataError
from genlab.losses import ReconstructionLoss, ReconstructionLossConfig, kl_diagonal_gaussian, reparameterize
from genlab.methods.base import DataInfo, Method
from genlab.methods.capabilities import Encodes, Generates, HasELBO, LatentCodec, Reconstructs
from genlab.models.autoencoder import (
    AutoencoderNetConfig,
    Decoder,
    DenseDecoderHead,
    DenseEncoderHead,
    Encoder,
    downsampling_factor,
    is_fully_convolutional,
    latent_size,
)
from genlab.noise import ImageNoise

NO_PRIOR = "an autoencoder has no prior: use `genlab reconstruct`, or train a prior/LDM on it"

# Bounds on the posterior log-variance (as in Rombach et al. 2022's DiagonalGaussianDistribution):
# keeps exp(logvar) finite early in training when the encoder output is still large.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


# ---------------------------------------------------------------------------------------------
# Configs


@dataclass
class AutoencoderConfig:
    """Plain autoencoder: encoder to a bottleneck, decoder back, a weighted reconstruction loss."""

    net: AutoencoderNetConfig = field(default_factory=AutoencoderNetConfig)
    # Channels of the spatial latent (N, latent_channels, H / f, W / f); with latent_dim set, the width
    # of the feature map that is flattened into the dense latent.
    latent_channels: int = 4
    latent_dim: int | None = None  # dense vector bottleneck of this size instead of a spatial latent
    loss: ReconstructionLossConfig = field(default_factory=ReconstructionLossConfig)


@dataclass
class DenoisingAutoencoderConfig(AutoencoderConfig):
    """An autoencoder trained to reconstruct the clean image from a corrupted copy (Vincent et al. 2008)."""

    corruption: Literal["gaussian", "mask", "gaussian+mask"] = "gaussian"
    noise_std: float = 0.5  # additive N(0, noise_std^2) on the [-1, 1] image (not clamped)
    # Masking as in masked autoencoders (He et al. 2022): the image is cut into patch_size x patch_size
    # squares and exactly round(mask_ratio * #patches) of them, chosen at random, are set to mask_value.
    mask_ratio: float = 0.5
    patch_size: int = 4
    mask_value: float = 0.0  # 0: mid-grey; -1: black


@dataclass
class VAEConfig:
    """VAE (Kingma & Welling 2014) with a discretised decoder likelihood over the 256 pixel levels."""

    net: AutoencoderNetConfig = field(default_factory=AutoencoderNetConfig)
    latent_channels: int = 4  # spatial latent channels, or the map width flattened into the dense latent
    # Dense vector z of this size (classic VAE; samples from N(0, I) far better than spatial latents);
    # None: spatial latent (N, latent_channels, H / f, W / f).
    latent_dim: int | None = 16
    beta: float = 1.0  # weight of the KL term in the training loss (beta-VAE, Higgins et al. 2017)
    kl_warmup_steps: int = 0  # beta ramps linearly from 0 over these steps (Bowman et al. 2016)
    likelihood: Literal["discretized-gaussian", "discretized-logistic"] = "discretized-gaussian"
    decoder_scale: Literal["channel", "global"] = "channel"  # learned scale of p(x|z): one per channel or one
    init_scale: float = 0.1  # initial decoder scale, in units of the [-1, 1] pixel range
    # What sample() draws z from. "standard": N(0, I), the prior of the ELBO. "aggregate": the Gaussian
    # with the mean and covariance of the aggregate posterior q(z) = E_x q(z|x), tracked during training
    # (an EMA, aggregate_decay per step). Training and the ELBO still use N(0, I); the learned decoder
    # scale keeps the KL small, so q(z) drifts far from N(0, I) and N(0, I) samples land in its holes
    # (ex-post density estimation, Ghosh et al. 2020; measured in docs/results.md "Every generative preset draws").
    prior: Literal["standard", "aggregate"] = "standard"
    aggregate_decay: float = 0.99


@dataclass
class KLAutoencoderConfig:
    """KL-regularised autoencoder for latent diffusion (Rombach et al. 2022, sec. 3 and app. G)."""

    net: AutoencoderNetConfig = field(default_factory=AutoencoderNetConfig)  # f = 2 ** (len(channel_mult) - 1)
    latent_channels: int = 4
    kl_weight: float = 1e-6  # tiny: the latent stays near-deterministic, only its scale is kept in check
    loss: ReconstructionLossConfig = field(default_factory=lambda: ReconstructionLossConfig(mse=0.0, l1=1.0))
    latent_scale_decay: float = 0.99  # EMA decay of the latents' second moment that sets latent_scale


# ---------------------------------------------------------------------------------------------
# Shared machinery


class _AutoencoderFamily(Method, Reconstructs, Encodes):
    """Encoder/decoder pair, optional dense bottleneck, and the encode/decode/reconstruct API."""

    latent_prior = "none"
    posterior = False  # True: the encoder outputs mean and log-variance of a diagonal Gaussian q(z|x)

    def __init__(self, config: Any, data_info: DataInfo):
        super().__init__(config, data_info)
        if config.latent_channels < 1:
            raise ConfigError(f"model.latent_channels={config.latent_channels} must be >= 1")
        latent_dim = getattr(config, "latent_dim", None)
        if latent_dim is not None and latent_dim < 1:
            raise ConfigError(f"model.latent_dim={latent_dim} must be >= 1, or null for a spatial latent")
        self.latent_dim = latent_dim
        c = data_info.channels
        self.f = downsampling_factor(config.net)
        side = latent_size(data_info.image_size, self.f)
        self.latent_side = side
        stats = 2 if self.posterior else 1  # mean and log-variance, or the code itself
        if latent_dim is None:
            self.encoder = Encoder(config.net, c, stats * config.latent_channels)
            self.decoder = Decoder(config.net, config.latent_channels, c)
            self.encoder_head = self.decoder_head = None
        else:
            self.encoder = Encoder(config.net, c, config.latent_channels)
            self.encoder_head = DenseEncoderHead(config.latent_channels, (side, side), stats * latent_dim)
            self.decoder_head = DenseDecoderHead(latent_dim, config.latent_channels, (side, side))
            self.decoder = Decoder(config.net, config.latent_channels, c)

    # ------------------------------------------------------------------ networks

    @property
    def fully_convolutional(self) -> bool:
        """Whether encode/decode apply unchanged to images of another size than the training one
        (no dense bottleneck, no self-attention; see :func:`is_fully_convolutional`)."""
        return self.latent_dim is None and is_fully_convolutional(self.config.net)

    def latent_shape(self) -> tuple[int, int, int]:
        """Shape of one latent z for the training image size: (c, h, w), (latent_dim, 1, 1) when dense."""
        if self.latent_dim is not None:
            return (self.latent_dim, 1, 1)
        return (self.config.latent_channels, self.latent_side, self.latent_side)

    def _encoder_output(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, k, h, w) spatial statistics, or (N, k, 1, 1) with the dense head."""
        c = self.data_info.channels
        if x.ndim != 4 or x.shape[1] != c:
            raise DataError(f"{self.name} expects images (N, {c}, H, W), got shape {tuple(x.shape)}")
        h = self.encoder(x)  # (N, k or latent_channels, h, w)
        if self.encoder_head is not None:
            if h.shape[-2:] != (self.latent_side, self.latent_side):
                size = self.data_info.image_size
                raise DataError(f"this {self.name} has a dense latent built for {size}x{size} images, got "
                                f"{x.shape[-2]}x{x.shape[-1]}: resize the images (data.image_size={size})")
            h = self.encoder_head(h)[:, :, None, None]  # (N, k, 1, 1)
        return h

    def _posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clamped log-variance of q(z|x), each (N, c, h, w)."""
        mean, logvar = self._encoder_output(x).chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image (N, C, H, W) in [-1, 1] -> latent (N, c, h, w): the code, or the posterior mean."""
        if self.posterior:
            return self._posterior(x)[0]
        return self._encoder_output(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (N, c, h, w) (or (N, latent_dim) when dense) -> image (N, C, H, W), not clamped."""
        if self.decoder_head is not None:
            h = self.decoder_head(z.flatten(1))  # (N, latent_channels, h, w)
        else:
            h = z
        size = self.data_info.image_size
        # Crop back to the training size only when z is that size's latent (padding undone exactly).
        output_size = size if h.shape[-1] == self.latent_side and h.shape[-2] == self.latent_side else None
        return self.decoder(h, output_size=output_size)  # (N, C, H, W)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)) clamped to [-1, 1]."""
        return self.decode(self.encode(x)).clamp(-1, 1)

    def ema_targets(self) -> dict[str, nn.Module]:
        targets = {"encoder": self.encoder, "decoder": self.decoder}
        if self.encoder_head is not None:
            targets.update(encoder_head=self.encoder_head, decoder_head=self.decoder_head)
        return targets

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, **options: Any) -> torch.Tensor:
        """Autoencoders without a prior cannot sample."""
        raise ConfigError(NO_PRIOR)


@torch.no_grad()
def fold_moment(running: torch.Tensor, batch: torch.Tensor, first: bool, decay: float) -> None:
    """running <- batch (first update: no bias towards the initial value) or decay running + (1 - decay) batch.

    ``batch`` is this process's batch moment; under torch.distributed it is averaged over the processes
    first, so every process keeps the same buffer.
    """
    batch = batch.detach().float()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        batch = batch.clone()
        torch.distributed.all_reduce(batch)
        batch /= torch.distributed.get_world_size()
    if first:
        running.copy_(batch)
    else:
        running.mul_(decay).add_((1 - decay) * batch)


def _draw_normal(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """N(0, I) noise of ``shape`` drawn on the generator's device (CPU by default), on ``like``'s device and dtype."""
    noise = torch.randn(shape, generator=generator, device="cpu" if generator is None else generator.device)
    return noise.to(device=like.device, dtype=like.dtype)


# ---------------------------------------------------------------------------------------------
# AE1: plain autoencoder


class Autoencoder(_AutoencoderFamily):
    """Deterministic autoencoder trained with a weighted sum of reconstruction losses (SPEC AE1, L5)."""

    name = "ae"
    Config = AutoencoderConfig

    def __init__(self, config: AutoencoderConfig, data_info: DataInfo):
        super().__init__(config, data_info)
        self.reconstruction_loss = ReconstructionLoss(config.loss, data_info.channels)

    def _input(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """The encoder's input during training (the clean image; corrupted for the DAE)."""
        return x

    def training_step(self, batch: dict[str, torch.Tensor], ctx) -> dict[str, torch.Tensor]:
        """Minimise the configured reconstruction loss of decode(encode(input)) against the clean image."""
        x = batch["image"]  # (n, C, H, W) in [-1, 1]
        x_hat = self.decode(self.encode(self._input(x, ctx)))  # (n, C, H, W)
        loss, terms = self.reconstruction_loss(x_hat, x)
        ctx.optimize(loss)
        return {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}


# ---------------------------------------------------------------------------------------------
# AE2: denoising autoencoder


def patch_mask(scores: torch.Tensor, mask_ratio: float, patch_size: int, size: tuple[int, int]) -> torch.Tensor:
    """Boolean pixel mask (N, 1, H, W): the round(ratio * P) patches with the lowest ``scores`` (N, P) are True.

    Ranking i.i.d. uniform scores picks a uniformly random subset of exactly that many patches per
    image (the random shuffle of He et al. 2022). Patches lie on a grid of ceil(H / p) x ceil(W / p).
    """
    n, num_patches = scores.shape
    gh, gw = -(-size[0] // patch_size), -(-size[1] // patch_size)
    if num_patches != gh * gw:
        raise ConfigError(f"got {num_patches} patch scores for a {gh}x{gw} patch grid")
    k = round(mask_ratio * num_patches)
    ranks = scores.argsort(dim=1).argsort(dim=1)  # (N, P) rank of each patch's score
    masked = (ranks < k).view(n, 1, gh, gw)  # (N, 1, gh, gw)
    pixels = masked.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)  # (N, 1, gh p, gw p)
    return pixels[:, :, : size[0], : size[1]]


class DenoisingAutoencoder(Autoencoder):
    """Autoencoder that reconstructs the clean image from a noised and/or patch-masked copy (SPEC AE2)."""

    name = "dae"
    Config = DenoisingAutoencoderConfig

    def __init__(self, config: DenoisingAutoencoderConfig, data_info: DataInfo):
        super().__init__(config, data_info)
        if config.noise_std < 0:
            raise ConfigError(f"model.noise_std={config.noise_std} must be >= 0")
        if not 0.0 <= config.mask_ratio < 1.0:
            raise ConfigError(f"model.mask_ratio={config.mask_ratio} must be in [0, 1)")
        if config.patch_size < 1:
            raise ConfigError(f"model.patch_size={config.patch_size} must be >= 1")
        p, s = config.patch_size, data_info.image_size
        self.num_patches = (-(-s // p)) ** 2

    def corrupt(self, x: torch.Tensor, noise: torch.Tensor | None = None, scores: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """The corrupted input: x + noise_std * noise, then masked patches set to mask_value.

        ``noise`` (N, C, H, W) ~ N(0, I) and ``scores`` (N, P) ~ U(0, 1) are drawn from ``generator``
        when not given (training passes them from the step context).
        """
        c = self.config
        n = len(x)
        if "gaussian" in c.corruption:
            if noise is None:
                noise = _draw_normal(tuple(x.shape), generator, x)
            x = x + c.noise_std * noise  # (N, C, H, W)
        if "mask" in c.corruption:
            if scores is None:
                scores = torch.rand((n, self.num_patches), generator=generator,
                                    device="cpu" if generator is None else generator.device).to(x.device)
            mask = patch_mask(scores, c.mask_ratio, c.patch_size, tuple(x.shape[-2:]))  # (N, 1, H, W)
            x = torch.where(mask, torch.full_like(x, c.mask_value), x)
        return x

    def _input(self, x: torch.Tensor, ctx) -> torch.Tensor:
        c = self.config
        noise = ctx.randn(*x.shape[1:]) if "gaussian" in c.corruption else None
        scores = ctx.rand(self.num_patches) if "mask" in c.corruption else None
        return self.corrupt(x, noise=noise, scores=scores)


# ---------------------------------------------------------------------------------------------
# AE3: variational autoencoder


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a <= 0, accurate at both ends (Maechler 2012)."""
    return torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def discretized_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor,
    kind: Literal["discretized-gaussian", "discretized-logistic"] = "discretized-gaussian",
) -> torch.Tensor:
    """Elementwise log P(x) of 8-bit pixels x in [-1, 1] under a Gaussian/logistic(mean, e^log_scale) in 256 bins.

    Level k is x = 2k/255 - 1; its bin is [x - 1/255, x + 1/255], and the two end bins extend to
    -inf / +inf so the 256 probabilities sum to one (Salimans et al. 2017, sec. 2.1; Ho et al. 2020,
    eq. 13). P = F(b) - F(a) is evaluated in log space, on the lower tail (F(b) - F(a) = F(-a) - F(-b)
    by symmetry), so that tiny bins far from the mean keep a finite log-probability and a gradient.
    """
    log_cdf = torch.special.log_ndtr if kind == "discretized-gaussian" else F.logsigmoid
    inv_scale = torch.exp(-log_scale)
    a = (x - 1.0 / 255 - mean) * inv_scale  # standardised lower bin edge
    b = (x + 1.0 / 255 - mean) * inv_scale  # standardised upper bin edge
    flip = (a + b) > 0  # bin above the mean: use the mirrored bin, whose CDF values are small
    lo, hi = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_hi = log_cdf(hi)
    middle = log_hi + _log1mexp(torch.clamp(log_cdf(lo) - log_hi, max=-1e-12))
    first = log_cdf(b)  # x = -1: P(X <= -1 + 1/255)
    last = log_cdf(-a)  # x = +1: P(X >= 1 - 1/255)
    return torch.where(x < -0.999, first, torch.where(x > 0.999, last, middle))


class VAE(_AutoencoderFamily, Generates, HasELBO):
    """Gaussian-posterior VAE with a discretised decoder: loss = -log p(x|z) + beta KL(q(z|x) || N(0, I)) (SPEC AE3)."""

    name = "vae"
    Config = VAEConfig
    latent_prior = "gaussian"
    posterior = True

    def __init__(self, config: VAEConfig, data_info: DataInfo):
        super().__init__(config, data_info)
        if config.beta < 0:
            raise ConfigError(f"model.beta={config.beta} must be >= 0")
        if config.init_scale <= 0:
            raise ConfigError(f"model.init_scale={config.init_scale} must be > 0")
        if not 0.0 <= config.aggregate_decay < 1.0:
            raise ConfigError(f"model.aggregate_decay={config.aggregate_decay} must be in [0, 1)")
        scales = data_info.channels if config.decoder_scale == "channel" else 1
        # log of the decoder's scale (std for the Gaussian, s for the logistic), learned jointly
        # (the "sigma-VAE" of Rybkin et al. 2021 learns it instead of fixing it to a guess).
        self.log_scale = nn.Parameter(torch.full((scales,), math.log(config.init_scale)))
        if config.prior == "aggregate":  # only then: checkpoints of "standard" runs keep their tensors
            d = math.prod(self.latent_shape())
            # EMAs of E[z] and E[z z^T] under q(z) = E_x q(z|x), z flattened; before any update they
            # describe N(0, I), so an untrained model samples as with the standard prior.
            self.register_buffer("aggregate_mean", torch.zeros(d))
            self.register_buffer("aggregate_second_moment", torch.eye(d))
            self.register_buffer("aggregate_updates", torch.tensor(0, dtype=torch.long))

    @torch.no_grad()
    def update_aggregate(self, mean: torch.Tensor, logvar: torch.Tensor) -> None:
        """Fold a batch of posteriors q(z|x) = N(mean, diag e^logvar), each (n, c, h, w), into the q(z) moments.

        The batch's mixture of Gaussians has E[z] = avg mean and E[z z^T] = avg (mean mean^T + diag e^logvar).
        """
        mu = mean.flatten(1).float()  # (n, d)
        # float32 even under bf16 autocast (train.mixed_precision), which would round the matmul to
        # ~3 digits and leave E[z z^T] - m m^T with spurious negative eigenvalues (no Cholesky factor).
        with torch.autocast(mu.device.type, enabled=False):
            second = mu.T @ mu / len(mu) + torch.diag(logvar.flatten(1).float().exp().mean(0))  # (d, d)
        first, d = self.aggregate_updates.item() == 0, self.config.aggregate_decay
        fold_moment(self.aggregate_mean, mu.mean(0), first, d)
        fold_moment(self.aggregate_second_moment, second, first, d)
        self.aggregate_updates.add_(1)

    def aggregate_gaussian(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (d,), Cholesky factor L (d, d)) of the Gaussian fitted to q(z): covariance = E[z z^T] - E[z] E[z]^T."""
        m = self.aggregate_mean.double()
        cov = self.aggregate_second_moment.double() - torch.outer(m, m)
        cov = 0.5 * (cov + cov.T) + 1e-6 * torch.eye(len(m), dtype=cov.dtype, device=cov.device)
        return self.aggregate_mean, torch.linalg.cholesky(cov).float()

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x | z) in nats per image, (N,): the discretised decoder summed over pixels."""
        mean = self.decode(z)  # (N, C, H, W)
        log_scale = self.log_scale.clamp(min=-9.0).view(1, -1, 1, 1)  # floor keeps 1/scale finite
        return discretized_log_likelihood(x, mean, log_scale, self.config.likelihood).flatten(1).sum(1)

    def _terms(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(-log p(x|z), KL(q(z|x) || p(z))) in nats per image, z = mu + sigma eps (one sample), and (mu, log sigma^2)."""
        mean, logvar = self._posterior(x)  # (N, c, h, w) each
        z = reparameterize(mean, logvar, eps)
        return -self.log_likelihood(x, z), kl_diagonal_gaussian(mean, logvar), (mean, logvar)

    def negative_elbo(self, x: torch.Tensor, *, generator: torch.Generator | None = None,
                      samples: int = 1) -> torch.Tensor:
        """-ELBO = E_q[-log p(x|z)] + KL in nats per image, (N,), an upper bound on -log p(x).

        The KL is analytic; the reconstruction expectation is a Monte-Carlo estimate with
        ``samples`` draws of z (one by default, as in Kingma & Welling 2014). bits/dim is
        nats / (C H W ln 2).
        """
        total = torch.zeros(len(x), device=x.device)
        for _ in range(samples):
            eps = _draw_normal((len(x), *self.latent_shape()), generator, x)
            rec, kl, _ = self._terms(x, eps)
            total = total + rec
        return total / samples + kl

    def beta_at(self, step: int) -> float:
        """KL weight at optimiser step ``step`` (linear warm-up to beta)."""
        c = self.config
        if c.kl_warmup_steps <= 0:
            return c.beta
        return c.beta * min(1.0, (step + 1) / c.kl_warmup_steps)

    def training_step(self, batch: dict[str, torch.Tensor], ctx) -> dict[str, torch.Tensor]:
        """Minimise (-log p(x|z) + beta KL) / (C H W), i.e. the negative beta-ELBO in nats per dimension."""
        x = batch["image"]  # (n, C, H, W) in [-1, 1]
        eps = ctx.randn(*self.latent_shape())  # (n, c, h, w)
        rec, kl, posterior = self._terms(x, eps)  # (n,) each, nats
        if self.config.prior == "aggregate":
            self.update_aggregate(*posterior)
        dims = x[0].numel()
        loss = (rec + self.beta_at(ctx.step) * kl).mean() / dims
        ctx.optimize(loss)
        nelbo = (rec + kl).detach()
        return {"loss": loss.detach(), "rec": rec.mean().detach(), "kl": kl.mean().detach(),
                "elbo": -nelbo.mean(), "bpd": nelbo.mean() / (dims * math.log(2.0))}

    @torch.no_grad()
    def sample(self, n: int, *, generator: ImageNoise | torch.Generator | None = None, temperature: float = 1.0,
               **unknown: Any) -> torch.Tensor:
        """Decode z from the prior (N(0, I), or the aggregate Gaussian N(m, L L^T) when model.prior=aggregate)
        with its deviations scaled by ``temperature``: the decoder mean, clamped to [-1, 1]; z_i from image i's noise."""
        if unknown:
            raise ConfigError(f"vae sampling does not take {', '.join(sorted(unknown))}")
        if temperature <= 0:
            raise ConfigError(f"temperature={temperature} must be > 0")
        z = temperature * ImageNoise.of(generator, n).randn(*self.latent_shape(), device=self.log_scale.device)
        if self.config.prior == "aggregate":
            m, chol = self.aggregate_gaussian()
            z = (m + z.flatten(1) @ chol.T).view(n, *self.latent_shape())
        return self.decode(z).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------
# AE7: KL-regularised autoencoder for latent diffusion


class KLAutoencoder(_AutoencoderFamily, LatentCodec):
    """Spatial-latent autoencoder, tiny KL term, data-derived latent scale (Stable Diffusion's first stage)."""

    name = "kl-ae"
    Config = KLAutoencoderConfig
    posterior = True

    def __init__(self, config: KLAutoencoderConfig, data_info: DataInfo):
        super().__init__(config, data_info)
        if config.kl_weight < 0:
            raise ConfigError(f"model.kl_weight={config.kl_weight} must be >= 0")
        if not 0.0 <= config.latent_scale_decay < 1.0:
            raise ConfigError(f"model.latent_scale_decay={config.latent_scale_decay} must be in [0, 1)")
        self.reconstruction_loss = ReconstructionLoss(config.loss, data_info.channels)
        # LDM trains on encode(x) * latent_scale so its latents have unit variance (Rombach et al.
        # 2022, sec. 4.3.2: "rescale the latent by the component-wise standard deviation").
        self.register_buffer("latent_scale", torch.tensor(1.0))
        self.register_buffer("latent_second_moment", torch.tensor(1.0))
        self.register_buffer("latent_updates", torch.tensor(0, dtype=torch.long))

    @torch.no_grad()
    def update_latent_scale(self, z: torch.Tensor) -> None:
        """Fold a batch of latents into the EMA of E[z^2]; latent_scale = 1 / sqrt(that)."""
        fold_moment(self.latent_second_moment, z.float().pow(2).mean(), self.latent_updates.item() == 0,
                    self.config.latent_scale_decay)
        self.latent_updates.add_(1)
        self.latent_scale.copy_(self.latent_second_moment.clamp(min=1e-12).rsqrt())

    def training_step(self, batch: dict[str, torch.Tensor], ctx) -> dict[str, torch.Tensor]:
        """Reconstruction loss of a posterior sample + kl_weight * KL per dimension; update latent_scale."""
        x = batch["image"]  # (n, C, H, W) in [-1, 1]
        mean, logvar = self._posterior(x)  # (n, c, h, w) each
        z = reparameterize(mean, logvar, ctx.randn(*mean.shape[1:]))
        rec, terms = self.reconstruction_loss(self.decode(z), x)
        kl = kl_diagonal_gaussian(mean, logvar)  # (n,) nats
        # Rombach et al. sum both terms over dimensions; our reconstruction loss is a per-pixel mean,
        # so the KL is divided by C H W to give kl_weight the same meaning as theirs.
        loss = rec + self.config.kl_weight * kl.mean() / x[0].numel()
        ctx.optimize(loss)
        self.update_latent_scale(mean)  # what encode() returns and LDM sees
        return {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}, "kl": kl.mean().detach(),
                "latent_scale": self.latent_scale.detach().clone()}
