"""What the denoiser predicts and how it is trained (SPEC D2).

With x_t = a x_0 + b eps, a = sqrt(abar_t), b = sqrt(1 - abar_t) (so a^2 + b^2 = 1), a network may
predict any of three equivalent targets:

    eps                      the noise (Ho et al. 2020)
    x0                       the clean data
    v = a eps - b x_0        the "velocity" (Salimans & Ho 2022, progressive distillation)

and each converts to the others given x_t:  x_0 = (x_t - b eps) / a,  eps = (x_t - a x_0) / b,
x_0 = a x_t - b v,  eps = a v + b x_t.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from genlab.diffusion.schedule import NoiseSchedule
from genlab.errors import ConfigError

Prediction = Literal["eps", "x0", "v"]
PREDICTIONS = ("eps", "x0", "v")


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ConfigError(f"unknown prediction {prediction!r}: choose one of {', '.join(PREDICTIONS)}")


def model_output_to_x0_eps(
    output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, prediction: Prediction
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0, eps) implied by a network's output at (x_t, t); t may be integer or fractional (N,)."""
    _check_prediction(prediction)
    a, b = schedule.signal_noise_scales(t, x_t)  # (N, 1, 1, 1) each
    if prediction == "eps":
        return (x_t - b * output) / a, output
    if prediction == "x0":
        return output, (x_t - a * output) / b
    return a * x_t - b * output, a * output + b * x_t  # v


def training_target(
    prediction: Prediction, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule
) -> torch.Tensor:
    """The regression target for x_t = q_sample(x0, t, eps): eps, x0 or v = a eps - b x0."""
    _check_prediction(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    a, b = schedule.signal_noise_scales(t, x0)
    return a * eps - b * x0


def loss_weight(
    t: torch.Tensor, schedule: NoiseSchedule, prediction: Prediction, min_snr_gamma: float | None = None
) -> torch.Tensor:
    """Per-sample MSE weights (N,) implementing min-SNR-gamma (Hang et al. 2023) for any prediction.

    Min-SNR weights the x_0 error by min(snr, gamma). Since ||eps - eps_hat||^2 = snr ||x_0 - x0_hat||^2
    and ||v - v_hat||^2 = (snr + 1) ||x_0 - x0_hat||^2, the same weighting on an eps or v loss is
    min(snr, gamma) / snr and min(snr, gamma) / (snr + 1). None gives ones (the plain loss).
    """
    _check_prediction(prediction)
    if min_snr_gamma is None:
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    if not min_snr_gamma > 0:
        raise ConfigError(f"min_snr_gamma={min_snr_gamma!r}: use a positive value (5 is usual) or None")
    snr = schedule.snr(t)  # (N,)
    clipped = snr.clamp(max=min_snr_gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "x0":
        return clipped
    return clipped / (snr + 1)


def diffusion_loss(
    output: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over the batch of weight_n * (mean squared error of sample n): a scalar, in float32 at least.

    The weights are not renormalised by their sum (as in Hang et al.'s code and diffusers), so
    min-SNR also scales the loss, not only its distribution over timesteps.
    """
    if output.shape != target.shape:
        raise ConfigError(f"output shape {tuple(output.shape)} != target shape {tuple(target.shape)}")
    dtype = torch.promote_types(output.dtype, torch.float32)  # float32 even for bf16 outputs
    error = (output.to(dtype) - target.to(dtype)) ** 2
    per_sample = error.reshape(len(error), -1).mean(dim=1)  # (N,)
    if weight is None:
        return per_sample.mean()
    return (weight.to(per_sample) * per_sample).mean()


# ---------------------------------------------------------------------------------------------
# Learned variance: the variational bound terms of improved DDPM (Nichol & Dhariwal 2021)


def normal_kl(
    mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor, log_var2: torch.Tensor
) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) in nats (broadcasting)."""
    return 0.5 * (log_var2 - log_var1 + torch.exp(log_var1 - log_var2) + (mean1 - mean2) ** 2 * torch.exp(-log_var2) - 1)


def _standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / 2**0.5))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise log P(x) in nats of 8-bit data x in [-1, 1] under N(mean, e^(2 log_scale)) integrated
    over x's bin of width 2/255 (Ho et al. 2020 sec. 3.3); the edge bins extend to -inf and +inf."""
    centred = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _standard_normal_cdf(inv_std * (centred + 1 / 255))
    cdf_minus = _standard_normal_cdf(inv_std * (centred - 1 / 255))
    tiny = 1e-12
    log_cdf_plus = torch.log(cdf_plus.clamp(min=tiny))  # bin (-inf, x + 1/255] at x = -1
    log_one_minus_cdf_minus = torch.log((1 - cdf_minus).clamp(min=tiny))  # bin [x - 1/255, inf) at x = 1
    log_bin = torch.log((cdf_plus - cdf_minus).clamp(min=tiny))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_bin))


def vlb_terms(
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    eps_hat: torch.Tensor,
    v: torch.Tensor,
) -> torch.Tensor:
    """Per-sample L_t of the variational bound in bits per dimension (N,) (Nichol & Dhariwal 2021 eq. 4-6).

    The model's p(x_{t-1} | x_t) = N(mu(x_t, x0_hat), Sigma) with x0_hat from ``eps_hat`` and
    log Sigma = v log beta_t + (1 - v) log beta_tilde_t (eq. 15). For t > 0, L_t = KL(q(x_{t-1} |
    x_t, x_0) || p); for t = 0, L_0 = -log p(x_0 | x_1) under the discretised Gaussian decoder. Pass
    ``eps_hat.detach()`` to train only the variance through this term (the hybrid loss's stop-gradient).
    """
    t = t.long()
    a, b = schedule.signal_noise_scales(t, x_t)
    x0_hat = (x_t - b * eps_hat) / a
    true_mean, _, true_log_var = schedule.q_posterior(x0, x_t, t)
    model_mean, _, _ = schedule.q_posterior(x0_hat, x_t, t)
    log_beta = schedule.gather(schedule.betas.log(), t, x_t)
    model_log_var = v * log_beta + (1 - v) * true_log_var  # true_log_var is log beta_tilde, clipped
    kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var).flatten(1).mean(dim=1)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).flatten(1).mean(dim=1)
    return torch.where(t == 0, nll, kl) / math.log(2.0)  # (N,) bits per dimension
