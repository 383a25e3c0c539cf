"""The forward (noising) process of DDPM: beta schedules and their derived coefficients (SPEC D1).

The forward process adds Gaussian noise in T discrete steps, q(x_t | x_{t-1}) = N(sqrt(alpha_t)
x_{t-1}, beta_t I) with alpha_t = 1 - beta_t, so that in closed form (Ho et al. 2020, eq. 4)

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   abar_t = prod_{s <= t} alpha_s,  eps ~ N(0, I).

Timesteps are 0-based: t = 0 is the first noising step (abar_0 = alpha_0 < 1), t = T - 1 the last.
"Before t = 0" (the clean data) is written t = -1 and has abar = 1.

The same process in the variance-exploding view of Karras et al. 2022 (k-diffusion) is
x_sigma = x_t / sqrt(abar_t) = x_0 + sigma_t eps with sigma_t = sqrt((1 - abar_t) / abar_t); the
continuous solvers in :mod:`genlab.diffusion.samplers` work there and map any sigma back to a
(fractional) timestep by interpolating log sigma linearly between neighbouring integer timesteps.
"""

from __future__ import annotations

import math

import torch

from genlab.errors import ConfigError

BETA_SCHEDULES = ("linear", "cosine", "sigmoid", "scaled-linear")


def _cosine_alphas_cumprod(tau: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021 eq. 17 before normalisation: f(tau) = cos^2((tau + s) / (1 + s) pi / 2)."""
    return torch.cos((tau + s) / (1 + s) * math.pi / 2) ** 2


def _sigmoid_alphas_cumprod(
    tau: torch.Tensor, start: float = -3.0, end: float = 3.0, temperature: float = 1.0
) -> torch.Tensor:
    """Sigmoid abar(tau), tau in [0, 1], falling from 1 to 0 (Jabri et al. 2022; Chen 2023, Alg. 1)."""
    v_start = torch.sigmoid(torch.tensor(start / temperature, dtype=tau.dtype))
    v_end = torch.sigmoid(torch.tensor(end / temperature, dtype=tau.dtype))
    return (v_end - torch.sigmoid((tau * (end - start) + start) / temperature)) / (v_end - v_start)


def _betas_from_alphas_cumprod(f, num_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Discretise a continuous abar(tau) into T betas: beta_i = 1 - f((i+1)/T) / f(i/T), clipped."""
    tau = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps  # (T + 1,)
    alphas_cumprod = f(tau)
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    # Both curves reach abar = 0 at tau = 1 (beta = 1): clip, as Nichol & Dhariwal do, so that the
    # last step keeps a little signal and sigma stays finite.
    return betas.clamp(0.0, max_beta)


def beta_schedule(name: str, num_timesteps: int) -> torch.Tensor:
    """The betas (T,) float64 of a named schedule.

    - ``"linear"``: DDPM (Ho et al. 2020), linspace(1e-4, 0.02) at T = 1000; for other T both ends
      are scaled by 1000 / T so that abar_T stays about the same (improved DDPM's rule).
    - ``"cosine"``: Nichol & Dhariwal 2021 eq. 17, abar_t = f(t) / f(0) with
      f(t) = cos^2((t / T + s) / (1 + s) * pi / 2), s = 0.008; betas clipped at 0.999.
    - ``"sigmoid"``: abar(tau) = (sigmoid(3) - sigmoid(6 tau - 3)) / (sigmoid(3) - sigmoid(-3)) for
      tau = t / T in [0, 1] (start = -3, end = 3, temperature 1: Jabri et al. 2022, Chen 2023 Alg. 1,
      the defaults of lucidrains' denoising-diffusion-pytorch); beta_t = 1 - abar((t+1)/T) /
      abar(t/T), clipped to [0, 0.999].
    - ``"scaled-linear"``: Stable Diffusion's, linspace(sqrt(0.00085), sqrt(0.012)) squared.
    """
    if not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise ConfigError(f"num_timesteps={num_timesteps!r}: use an integer >= 2 (e.g. 1000)")
    T = num_timesteps
    if name == "linear":
        scale = 1000.0 / T
        return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    if name == "cosine":
        return _betas_from_alphas_cumprod(_cosine_alphas_cumprod, T)
    if name == "sigmoid":
        return _betas_from_alphas_cumprod(_sigmoid_alphas_cumprod, T)
    if name == "scaled-linear":
        return torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    raise ConfigError(f"unknown beta schedule {name!r}: choose one of {', '.join(BETA_SCHEDULES)}")


def _as_index(t: torch.Tensor) -> torch.Tensor:
    """Check that t holds integer timesteps in [0, T) and return it as a LongTensor."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ConfigError(
            f"timesteps of dtype {t.dtype} cannot index the schedule: pass integer timesteps "
            "(torch.long), or use signal_noise_scales() for fractional ones"
        )
    return t.long()


class NoiseSchedule:
    """Betas and every coefficient derived from them (float64 on the CPU, cast when used)."""

    def __init__(self, betas: torch.Tensor, timestep_map: torch.Tensor | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.dim() != 1 or len(betas) < 2:
            raise ConfigError(f"betas of shape {tuple(betas.shape)}: pass a 1-D tensor of >= 2 values")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ConfigError(
                f"betas must lie in (0, 1), got min {betas.min().item():.3g} max "
                f"{betas.max().item():.3g}: for the linear schedule use num_timesteps >= 21"
            )
        self.betas = betas  # (T,)
        self.num_timesteps = len(betas)
        # Original timestep of each index: the identity, or the kept subset after respace().
        self.timestep_map = (
            torch.arange(self.num_timesteps) if timestep_map is None else timestep_map.long().cpu()
        )
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        # q(x_{t-1} | x_t, x_0) = N(mean, posterior_variance), Ho et al. 2020 eq. 6-7.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # posterior_variance[0] = 0 (x_0 is known at t = 0); its log is replaced by the next value,
        # as in Ho et al.'s code, so that the log is finite (it is never used to add noise).
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)
        )
        # Karras et al. 2022 view: x_t / sqrt(abar_t) = x_0 + sigma_t eps.
        self.sigmas = ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()  # increasing in t
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def from_name(cls, name: str, num_timesteps: int) -> NoiseSchedule:
        """The schedule of :func:`beta_schedule` ``(name, num_timesteps)``."""
        with torch.device("cpu"):  # CPU float64 whatever the default device (a model built on "meta" included)
            return cls(beta_schedule(name, num_timesteps))

    def __repr__(self) -> str:
        abar_last = self.alphas_cumprod[-1].item()
        return f"NoiseSchedule(num_timesteps={self.num_timesteps}, abar_T={abar_last:.3g})"

    # -- per-sample coefficients ---------------------------------------------------------------

    def gather(self, values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """values[t] for integer t (N,), shaped (N, 1, ..., 1) against x, in x's dtype and on its device."""
        index = _as_index(t).to(x.device)
        table = values.to(dtype=x.dtype).to(x.device)  # cast on the CPU: no float64 on the device
        return table[index].reshape(len(index), *([1] * (x.dim() - 1)))  # (N, 1, ..., 1)

    def signal_noise_scales(
        self, t: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) for t (N,), broadcastable to x.

        Integer t reads the tables; floating t (the continuous solvers' fractional timesteps) goes
        through sigma(t) of :meth:`t_to_sigma`: sqrt(abar) = 1 / sqrt(1 + sigma^2),
        sqrt(1 - abar) = sigma / sqrt(1 + sigma^2); both agree at integer t.
        """
        if t.dtype.is_floating_point:
            sigma = self.t_to_sigma(t.to(x.device)).to(x.dtype)
            sigma = sigma.reshape(len(t), *([1] * (x.dim() - 1)))  # (N, 1, ..., 1)
            scale = torch.rsqrt(1 + sigma**2)
            return scale, sigma * scale
        signal = self.gather(self.sqrt_alphas_cumprod, t, x)
        return signal, self.gather(self.sqrt_one_minus_alphas_cumprod, t, x)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) (N,) for integer t, float32 on t's device."""
        index = _as_index(t)
        snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        return snr.to(torch.float32).to(t.device)[index]

    # -- the forward process and its posterior -------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) with the given noise (eq. 4)."""
        signal, sigma = self.signal_noise_scales(t, x0)
        return signal * x0 + sigma * noise

    def q_posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. eq. 6-7)."""
        coef1 = self.gather(self.posterior_mean_coef1, t, x_t)
        mean = coef1 * x0 + self.gather(self.posterior_mean_coef2, t, x_t) * x_t
        variance = self.gather(self.posterior_variance, t, x_t)
        log_variance = self.gather(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    def respace(self, timesteps: torch.Tensor) -> NoiseSchedule:
        """The process seen only at a subset of timesteps (improved DDPM, Nichol & Dhariwal 2021 sec. 4).

        Keeping abar at the chosen timesteps s_0 < s_1 < ... (any order accepted) and recomputing
        beta_j = 1 - abar_{s_j} / abar_{s_{j-1}} (abar_{s_{-1}} = 1) gives a shorter Markov chain
        with the same marginals q(x_{s_j} | x_0), so DDPM's ancestral sampler can take fewer steps.
        Index j of the result stands for timestep ``timestep_map[j]`` of this schedule (what the
        network must be told).
        """
        kept = torch.as_tensor(timesteps).detach().cpu()
        kept = _as_index(kept).flatten()
        kept = torch.sort(kept).values
        distinct = len(kept) >= 2 and not bool((kept[1:] == kept[:-1]).any())
        if not distinct or kept[0] < 0 or kept[-1] >= self.num_timesteps:
            raise ConfigError(
                f"respace needs >= 2 distinct timesteps in [0, {self.num_timesteps}), "
                f"got {kept.tolist()[:8]}..."
            )
        alphas_cumprod = self.alphas_cumprod[kept]
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        betas = 1.0 - alphas_cumprod / alphas_cumprod_prev
        return NoiseSchedule(betas, timestep_map=self.timestep_map[kept])

    # -- sigma <-> continuous timestep (Karras et al. 2022) --------------------------------------

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep of each sigma, interpolating log sigma linearly between integer t.

        Sigmas outside [sigma_0, sigma_{T-1}] are clamped to the ends (t in [0, T - 1]). The result
        has sigma's floating dtype (at least float32) and device.
        """
        sigma = torch.as_tensor(sigma)
        dtype = torch.promote_types(sigma.dtype, torch.float32)
        log_sigmas = self.log_sigmas.to(dtype).to(sigma.device)  # (T,) increasing
        log_sigma = sigma.to(dtype).log().clamp(log_sigmas[0], log_sigmas[-1])
        high = torch.searchsorted(log_sigmas, log_sigma.contiguous()).clamp(1, self.num_timesteps - 1)
        low = high - 1
        w = (log_sigma - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])
        return low.to(dtype) + w.clamp(0.0, 1.0)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma at (fractional) timesteps t, log sigma interpolated linearly: inverse of sigma_to_t."""
        t = torch.as_tensor(t)
        dtype = torch.promote_types(t.dtype, torch.float32)
        log_sigmas = self.log_sigmas.to(dtype).to(t.device)
        t = t.to(dtype).clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low.to(dtype)
        return torch.exp((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1])
