"""Several denoisers over one noise process: the ensemble-of-experts handoff and SDEdit (SPEC D12).

- :func:`handoff_denoiser` (eDiff-I, Balaji et al. 2022; SDXL's refiner, Podell et al. 2023, sec.
  2.5): the base model denoises the high noise levels t >= t_switch and an expert trained only on
  t < t_switch takes over below. It is a denoiser like any other, so every sampler, every step count
  and every guidance works, and the number of network evaluations is the sampler's (equal NFE).
- :func:`sdedit` (Meng et al. 2022): an image is noised to an intermediate level t_start by
  q(x_t | x_0) and denoised from there; small t_start keeps the image and repairs its details, which
  is how SDXL's refiner is also used on any image ("img2img").
"""

from __future__ import annotations

import torch

from genlab.diffusion.samplers import Denoiser, Generator, make_timesteps, sample_ddim, sample_ddpm, split_output
from genlab.diffusion.schedule import NoiseSchedule
from genlab.errors import ConfigError
from genlab.noise import randn_like


def handoff_denoiser(high: Denoiser, low: Denoiser, t_switch: float) -> Denoiser:
    """``high`` at timesteps t >= t_switch, ``low`` below (per sample; fractional t of the Karras solvers too).

    A batch whose samples are all on one side calls one denoiser once (samplers give every sample
    the same t); a mixed batch evaluates each denoiser on its own rows.
    """

    def denoise(x_t: torch.Tensor, t: torch.Tensor):
        use_high = t >= t_switch  # (N,)
        if bool(use_high.all()):
            return high(x_t, t)
        if not bool(use_high.any()):
            return low(x_t, t)
        eps_high, v_high = split_output(high(x_t[use_high], t[use_high]))
        eps_low, v_low = split_output(low(x_t[~use_high], t[~use_high]))
        eps = torch.empty_like(x_t)
        eps[use_high], eps[~use_high] = eps_high, eps_low
        if v_high is None or v_low is None:  # a learned variance only when both experts have one
            return eps
        v = torch.empty_like(x_t)
        v[use_high], v[~use_high] = v_high, v_low
        return eps, v

    return denoise


def sdedit(denoise: Denoiser, x0: torch.Tensor, schedule: NoiseSchedule, t_start: int, num_steps: int,
           sampler: str = "ddim", eta: float = 0.0, generator: Generator | None = None, clip_denoised: bool = True,
           noise: torch.Tensor | None = None) -> torch.Tensor:
    """SDEdit: x_{t_start} = q_sample(x0, t_start, noise), then ``num_steps`` DDIM (or DDPM) steps to x_0.

    The steps visit t_start, ..., down to 0 (trailing spacing over [0, t_start]). t_start = 0 with one
    step gives back a denoised x0 at the lowest level; larger t_start departs further from x0.
    """
    if not 0 <= t_start < schedule.num_timesteps:
        raise ConfigError(f"t_start={t_start}: use a timestep in [0, {schedule.num_timesteps})")
    if not 1 <= num_steps <= t_start + 1:
        raise ConfigError(f"steps={num_steps}: SDEdit from t_start={t_start} takes 1 to {t_start + 1} steps")
    if sampler not in ("ddim", "ddpm"):
        raise ConfigError(f"SDEdit runs the ddim or ddpm sampler, not {sampler!r}")
    timesteps = make_timesteps(t_start + 1, num_steps, "trailing")  # (S,), starts at t_start
    if noise is None:
        noise = randn_like(x0, generator)
    t = torch.full((len(x0),), t_start, dtype=torch.long, device=x0.device)
    x_t = schedule.q_sample(x0, t, noise.to(x0.device))
    if sampler == "ddpm":
        return sample_ddpm(denoise, x_t, schedule, timesteps, generator=generator, clip_denoised=clip_denoised)
    return sample_ddim(denoise, x_t, schedule, timesteps, eta=eta, generator=generator, clip_denoised=clip_denoised)
