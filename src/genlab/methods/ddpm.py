"""Pixel-space diffusion (DDPM, Ho et al. 2020) with DDIM and fast samplers (SPEC D1-D5)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from genlab.diffusion import (
    NoiseSchedule,
    diffusion_loss,
    loss_weight,
    model_output_to_x0_eps,
    sample as run_sampler,
    training_target,
)
from genlab.errors import ConfigError
from genlab.methods.base import DataInfo, Method
from genlab.models.unet import UNet, UNetConfig


@dataclass
class DDPMConfig:
    """A denoising U-Net, its noise schedule and training objective, and the default sampler."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    # Space-to-depth before the U-Net (pixel_unshuffle): p x p pixel patches become channels, so the
    # network runs at 1/p of the resolution for ~p^2 less compute. p = 2 is what makes 28x28 diffusion
    # train in minutes on a CPU; the diffusion itself still happens on every pixel.
    patch_size: int = 1
    schedule: Literal["linear", "cosine", "sigmoid", "scaled-linear"] = "linear"
    num_timesteps: int = 1000
    prediction: Literal["eps", "x0", "v"] = "eps"
    min_snr_gamma: float | None = None  # Hang et al. 2023; None: plain MSE on the target
    class_conditional: bool = False  # embed labels; needs a labelled data source
    p_uncond: float = 0.1  # label dropped to the null class with this probability (for CFG)
    sampler: Literal["ddpm", "ddim", "euler", "heun", "dpmpp-2m"] = "ddim"  # default of `genlab sample`
    sample_steps: int = 50
    eta: float = 0.0  # DDIM stochasticity: 0 deterministic, 1 DDPM-like
    spacing: Literal["leading", "trailing", "linspace"] = "trailing"
    # Clip predicted x0 to the data range in DDPM/DDIM steps. Needed with the cosine schedule: at
    # t = T-1 its alpha_bar is ~1e-9, so x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar) amplifies any eps
    # error by ~3e4 and unclipped DDIM from trailing t = T-1 yields noise.
    clip_denoised: bool = True


class DDPM(Method):
    """eps/x0/v-prediction diffusion in pixel space with an ADM-style U-Net."""

    name = "ddpm"
    Config = DDPMConfig

    def __init__(self, config: DDPMConfig, data_info: DataInfo):
        super().__init__(config, data_info)
        if config.class_conditional and not data_info.num_classes:
            raise ConfigError("model.class_conditional=true needs a labelled data source (e.g. mnist, cifar10)")
        if not 0.0 <= config.p_uncond < 1.0:
            raise ConfigError(f"model.p_uncond must be in [0, 1), got {config.p_uncond}")
        self.num_classes = data_info.num_classes if config.class_conditional else None
        p = config.patch_size
        if p < 1 or data_info.image_size % p:
            raise ConfigError(f"model.patch_size={p} must be a positive divisor of the image size {data_info.image_size}")
        self.unet = UNet(
            config.unet,
            in_channels=data_info.channels * p * p,
            out_channels=data_info.channels * p * p,
            image_size=data_info.image_size // p,
            num_classes=self.num_classes,
        )
        self.schedule = NoiseSchedule.from_name(config.schedule, config.num_timesteps)

    def network(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The model's prediction at full resolution: (N, C, H, W) -> (N, C, H, W)."""
        p = self.config.patch_size
        if p == 1:
            return self.unet(x_t, t, y)
        h = F.pixel_unshuffle(x_t, p)  # (N, C p^2, H / p, W / p)
        return F.pixel_shuffle(self.unet(h, t, y), p)  # (N, C, H, W)

    def ema_targets(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet}

    def training_step(self, batch: dict[str, torch.Tensor], ctx) -> dict[str, torch.Tensor]:
        """Ho et al. 2020 Alg. 1: t ~ U{0..T-1}, x_t = q_sample(x0, t, eps), regress the target."""
        c = self.config
        x0 = batch["image"]  # (n, C, H, W) in [-1, 1]
        t = ctx.randint(0, c.num_timesteps)  # (n,)
        noise = ctx.randn(*x0.shape[1:])  # (n, C, H, W)
        x_t = self.schedule.q_sample(x0, t, noise)
        y = None
        if self.num_classes is not None:
            y = batch["label"].clone()
            drop = ctx.rand() < c.p_uncond  # classifier-free guidance: learn p(x) with the null class
            y[drop] = self.num_classes
        output = self.network(x_t, t, y)
        target = training_target(c.prediction, x0, noise, t, self.schedule)
        weight = loss_weight(t, self.schedule, c.prediction, c.min_snr_gamma)
        loss = diffusion_loss(output, target, weight)
        ctx.optimize(loss)
        return {"loss": loss.detach()}

    def denoiser(self, y: torch.Tensor | None = None):
        """The eps-predicting callable the samplers expect: denoise(x_t, t) -> eps_hat."""
        prediction = self.config.prediction

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            output = self.network(x_t, t, y)
            if prediction == "eps":
                return output
            # Fractional t (Karras solvers) is only meaningful for eps; others need an integer t.
            _, eps = model_output_to_x0_eps(output, x_t, t.round().long(), self.schedule, prediction)
            return eps

        return denoise

    @torch.no_grad()
    def invert(self, x0: torch.Tensor, steps: int | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM inversion (eta = 0 run upwards): the noise x_T that DDIM with the same steps maps back to x0."""
        from genlab.diffusion import ddim_invert, make_timesteps

        timesteps = make_timesteps(self.config.num_timesteps, steps or self.config.sample_steps, self.config.spacing)
        return ddim_invert(self.denoiser(labels), x0.to(self.device), self.schedule, timesteps)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float | None = None,
        labels: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        callback: Any = None,
        **unknown: Any,
    ) -> torch.Tensor:
        """Draw ``n`` images with the configured (or given) sampler; ``labels`` (n,) for class-conditional models."""
        if unknown:
            raise ConfigError(f"ddpm sampling does not take {', '.join(sorted(unknown))}")
        c = self.config
        sampler = sampler or c.sampler
        steps = steps or (c.num_timesteps if sampler == "ddpm" and c.sampler != "ddpm" else c.sample_steps)
        eta = c.eta if eta is None else eta
        if sampler != "ddim":
            eta = 0.0
        if labels is not None and self.num_classes is None:
            raise ConfigError("--class needs a class-conditional model (train with model.class_conditional=true)")
        d = self.data_info
        if noise is None:
            noise = torch.randn(n, d.channels, d.image_size, d.image_size, generator=generator,
                                device="cpu" if generator is None else generator.device)
        x = noise.to(self.device)
        if labels is not None:
            labels = labels.to(self.device)
        x0 = run_sampler(sampler, self.denoiser(labels), x, self.schedule, steps, eta=eta,
                         spacing=c.spacing, generator=generator, callback=callback,
                         clip_denoised=c.clip_denoised if sampler in ("ddpm", "ddim") else None)
        return x0.clamp(-1, 1)
