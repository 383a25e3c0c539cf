"""Samplers: pure functions that turn noise into data with a denoiser callable (SPEC D4, D5, D6).

Every sampler takes ``denoise(x_t, t) -> eps_hat``: x_t (N, C, H, W) on the variance-preserving
process of :class:`~genlab.diffusion.schedule.NoiseSchedule` and t (N,) the timesteps, and returns
the predicted noise, a tensor like x_t. A method wraps its network so that it always answers in
eps (see :func:`genlab.diffusion.objectives.model_output_to_x0_eps`); guidance wraps ``denoise``
again (:mod:`genlab.diffusion.guidance`), so every sampler gets every guidance. A model with a
learned variance (improved DDPM) may answer ``(eps_hat, v)`` instead, v (N, C, H, W) the
interpolation fraction of :func:`learned_log_variance`: DDPM ancestral sampling uses it, every
other sampler drops it (DDIM and the ODE solvers have no variance to learn).

- DDPM and DDIM call ``denoise`` with integer timesteps (torch.long).
- The Karras-sigma solvers (Euler, Heun, DPM-Solver++(2M)) call it with **fractional** timesteps
  (a floating tensor, :meth:`NoiseSchedule.sigma_to_t`); sinusoidal time embeddings accept them,
  and :meth:`NoiseSchedule.signal_noise_scales` gives abar at fractional t consistently. They
  integrate the probability-flow ODE of x = x_t / sqrt(abar_t) = x_0 + sigma eps over the noise
  levels of :func:`karras_sigmas` (rho = 7) from the schedule's sigma_max to its sigma_min, then 0;
  ``sigmas=`` (keyword) replaces those levels (num_steps + 1 values, decreasing, ending in 0);
  levels beyond the schedule's range are evaluated at its end timesteps (t clamped to [0, T - 1]).
  On the same levels, Euler is exactly DDIM with eta = 0 (Karras et al. 2022, sec. 3).
  The default sigma_max is capped at DEFAULT_SIGMA_MAX = 80 (Karras et al. 2022, Table 1, for data
  in [-1, 1]): the cosine schedule reaches sigma ~2e4 at t = T - 1, and Karras spacing from there
  spends most of a 10-step budget above sigma = 1000, where x is pure noise to the model.

``x`` is always the starting noise x_T ~ N(0, I) and the result is x_0. ``generator`` (a
:class:`genlab.noise.ImageNoise`, one generator per image, or a torch.Generator for the whole
batch) draws every random number of a stochastic sampler, so a seed reproduces a sample; with an
ImageNoise, image i's draws do not depend on the batch it is in. The global RNG is used only when
it is None. ``callback(i, t, x_t, x0_hat)`` is called once per step
with the step index, the timesteps (N,) given to ``denoise``, the current x_t (variance-preserving
scale) and the predicted x_0, for progress bars and previews.

Samplers do not switch off autograd themselves: call them under ``torch.no_grad()`` (guidance
wrappers that need a gradient enable it locally).
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch

from genlab.noise import ImageNoise, randn_like

from genlab.diffusion.schedule import NoiseSchedule
from genlab.errors import ConfigError

Denoiser = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]
MeanShift = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
Spacing = Literal["leading", "trailing", "linspace"]
Generator = ImageNoise | torch.Generator  # per-image or whole-batch randomness

SPACINGS = ("leading", "trailing", "linspace")
SAMPLERS = ("ddpm", "ddim", "euler", "heun", "dpmpp-2m")
DEFAULT_SIGMA_MAX = 80.0  # Karras et al. 2022 (EDM), Table 1: data in [-1, 1]


def split_output(output: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(eps_hat, v or None) of a denoiser's answer: a tensor, or (eps_hat, v) with a learned variance."""
    if isinstance(output, tuple):
        return output[0], output[1]
    return output, None


def learned_log_variance(v: torch.Tensor, beta: float, posterior_variance: float) -> torch.Tensor:
    """log Sigma = v log beta_t + (1 - v) log beta_tilde_t (Nichol & Dhariwal 2021, eq. 15), like v.

    v = 1 gives the upper bound beta_t, v = 0 the posterior variance beta_tilde_t; v is not clamped
    (the paper lets the network extrapolate a little). beta_tilde_t = 0 (the first step of a chain)
    is replaced by the next value's, as ``posterior_log_variance_clipped`` does.
    """
    return v * math.log(beta) + (1 - v) * math.log(posterior_variance)


# ---------------------------------------------------------------------------------------------
# Timesteps


def make_timesteps(num_train_timesteps: int, num_steps: int, spacing: Spacing = "trailing") -> torch.Tensor:
    """Descending LongTensor (num_steps,) of the timesteps a few-step sampler visits.

    The three spacings of Lin et al. 2023 (Table 2), as diffusers implements them (0-based; the
    paper counts from 1). For T = 1000 and 10 steps:

    - ``"linspace"`` (improved DDPM): round(linspace(0, T - 1, S)): 999, 888, ..., 111, 0
    - ``"leading"`` (DDIM, Stable Diffusion): (T // S) * k: 900, 800, ..., 100, 0
    - ``"trailing"`` (DPM-Solver): round(T - k T / S) - 1: 999, 899, ..., 199, 99

    Only linspace and trailing start from the last training timestep (where x_T is closest to pure
    noise); Lin et al. recommend trailing. Rounding is half-to-even (numpy's rule) on the exact
    rational values; diffusers rounds float approximations and so differs by one at a few exact
    ties (e.g. T = 1000, 48 trailing steps) and gives S + 1 trailing steps for some S (e.g. 61).
    Samplers step from each entry to the NEXT entry of this list, and from the last entry to x_0.
    """
    T, S = num_train_timesteps, num_steps
    if not isinstance(T, int) or T < 1:
        raise ConfigError(f"num_train_timesteps={T!r}: use a positive integer")
    if not isinstance(S, int) or not 1 <= S <= T:
        raise ConfigError(f"num_steps={S!r}: use an integer between 1 and num_train_timesteps={T}")
    if spacing == "linspace":
        # round(k (T - 1) / (S - 1)), k = S - 1, ..., 0, in exact integer arithmetic
        timesteps = [_round_half_even(k * (T - 1), S - 1) if S > 1 else 0 for k in range(S - 1, -1, -1)]
    elif spacing == "leading":
        timesteps = [k * (T // S) for k in range(S - 1, -1, -1)]
    elif spacing == "trailing":
        # round(T - k T / S) - 1 = round(T (S - k) / S) - 1, k = 0, ..., S - 1
        timesteps = [_round_half_even(T * (S - k), S) - 1 for k in range(S)]
    else:
        raise ConfigError(f"unknown timestep spacing {spacing!r}: choose one of {', '.join(SPACINGS)}")
    return torch.tensor(timesteps, dtype=torch.long)


def _round_half_even(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded to the nearest integer, ties to even (numpy's rule), exactly."""
    quotient, remainder = divmod(numerator, denominator)
    if 2 * remainder > denominator or (2 * remainder == denominator and quotient % 2 == 1):
        quotient += 1
    return quotient


def _timestep_list(timesteps: torch.Tensor, schedule: NoiseSchedule) -> list[int]:
    """Check that timesteps are distinct integers in [0, T), strictly descending; return them as ints."""
    values = torch.as_tensor(timesteps).detach().cpu()
    if values.dtype.is_floating_point or values.dim() != 1 or len(values) == 0:
        raise ConfigError(
            f"timesteps must be a non-empty 1-D integer tensor, got dtype {values.dtype} shape "
            f"{tuple(values.shape)}: build them with make_timesteps()"
        )
    ts = [int(v) for v in values]
    if ts[0] >= schedule.num_timesteps or ts[-1] < 0 or any(a <= b for a, b in zip(ts, ts[1:])):
        raise ConfigError(
            f"timesteps {ts[:5]}... must be strictly descending within [0, {schedule.num_timesteps}): "
            "build them with make_timesteps()"
        )
    return ts


def _alpha_cumprod(schedule: NoiseSchedule, t: int) -> float:
    """abar_t as a float, with abar_{-1} = 1 (the clean data, after the last step)."""
    return 1.0 if t < 0 else float(schedule.alphas_cumprod[t])


def _full_timesteps(t: float | int, x: torch.Tensor) -> torch.Tensor:
    """The timestep t repeated for each of the N samples of x: long (N,) or float (N,)."""
    if isinstance(t, int):
        return torch.full((len(x),), t, dtype=torch.long, device=x.device)
    return torch.full((len(x),), t, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)


# ---------------------------------------------------------------------------------------------
# DDPM (Ho et al. 2020)


def sample_ddpm(
    denoise: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor | None = None,
    generator: Generator | None = None,
    clip_denoised: bool = True,
    callback: Callback | None = None,
    mean_shift: MeanShift | None = None,
) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020 Alg. 2) with the posterior variance; nfe = len(timesteps).

    Each step predicts x_0 from eps (clipped to [-1, 1] when ``clip_denoised``) and draws
    x_{t_prev} ~ q(x_{t_prev} | x_t, x0_hat). With a subset of timesteps (default: all T) the
    posterior is that of the respaced chain (:meth:`NoiseSchedule.respace`, improved DDPM), whose
    step j goes from timesteps[i] to timesteps[i + 1]; the last step returns x0_hat, without noise.

    When ``denoise`` answers (eps, v) the variance is the learned one of :func:`learned_log_variance`
    on the respaced chain's beta and beta_tilde (improved DDPM), else beta_tilde. ``mean_shift(x_t,
    t, variance) -> delta`` (like x_t) is added to the mean of every noisy step: classifier guidance
    shifts it by s Sigma grad log p(y | x_t) (Dhariwal & Nichol 2021, Alg. 1).
    """
    if timesteps is None:
        timesteps = torch.arange(schedule.num_timesteps - 1, -1, -1)
    ts = _timestep_list(timesteps, schedule)
    chain = schedule.respace(torch.tensor(ts)) if len(ts) > 1 else None
    for i, t in enumerate(ts):
        j = len(ts) - 1 - i  # index of t in the respaced (ascending) chain
        t_batch = _full_timesteps(t, x)
        eps, v = split_output(denoise(x, t_batch))  # (N, C, H, W) each
        abar = _alpha_cumprod(schedule, t)
        x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)  # Ho et al. eq. 15
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        if callback is not None:
            callback(i, t_batch, x, x0)
        if j == 0:
            x = x0  # the posterior mean at the first step of the chain is x0_hat itself
            continue
        # q(x_{t_prev} | x_t, x_0) of the respaced chain, Ho et al. eq. 6-7.
        mean = float(chain.posterior_mean_coef1[j]) * x0 + float(chain.posterior_mean_coef2[j]) * x
        if v is None:
            std = math.sqrt(float(chain.posterior_variance[j]))
            variance = torch.full_like(x, std**2)
        else:
            log_variance = learned_log_variance(
                v, float(chain.betas[j]), math.exp(float(chain.posterior_log_variance_clipped[j]))
            )
            variance = log_variance.exp()
            std = (0.5 * log_variance).exp()
        if mean_shift is not None:
            mean = mean + mean_shift(x, t_batch, variance)
        x = mean + std * randn_like(x, generator)
    return x


# ---------------------------------------------------------------------------------------------
# DDIM (Song et al. 2021)


def ddim_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: int,
    t_prev: int,
    schedule: NoiseSchedule,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    clip_denoised: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update x_t -> x_{t_prev} (Song et al. 2021 eq. 12); returns (x_prev, x0_hat).

    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma noise with
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev) (eq. 16);
    t_prev = -1 means x_0 (abar = 1). With ``clip_denoised`` eps is re-derived from the clipped
    x0_hat, as in guided-diffusion, so both terms agree. With eta = 0 the step is deterministic and
    also runs "upwards" (t_prev > t), which is DDIM inversion.
    """
    abar_t, abar_prev = _alpha_cumprod(schedule, t), _alpha_cumprod(schedule, t_prev)
    x0 = (x_t - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
        eps = (x_t - math.sqrt(abar_t) * x0) / math.sqrt(1 - abar_t)
    sigma = 0.0
    if eta > 0:
        sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    x_prev = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
    if sigma > 0:
        if noise is None:
            raise ConfigError(f"ddim_step with eta={eta} needs a noise tensor")
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def sample_ddim(
    denoise: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor,
    eta: float = 0.0,
    generator: Generator | None = None,
    clip_denoised: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM sampling over ``timesteps`` (descending, e.g. :func:`make_timesteps`); nfe = len(timesteps).

    eta = 0 is the deterministic DDIM ODE sampler, eta = 1 has DDPM's posterior variance (on the
    respaced chain). Step i goes from timesteps[i] to timesteps[i + 1] (to x_0 after the last).
    """
    if not eta >= 0:
        raise ConfigError(f"eta={eta!r}: use eta >= 0 (0: deterministic DDIM, 1: DDPM-like noise)")
    ts = _timestep_list(timesteps, schedule)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        t_batch = _full_timesteps(t, x)
        eps, _ = split_output(denoise(x, t_batch))  # (N, C, H, W); a learned variance is unused
        noise = randn_like(x, generator) if eta > 0 and t_prev >= 0 else None
        x_prev, x0 = ddim_step(x, eps, t, t_prev, schedule, eta=eta, noise=noise, clip_denoised=clip_denoised)
        if callback is not None:
            callback(i, t_batch, x, x0)
        x = x_prev
    return x


def ddim_invert(
    denoise: Denoiser,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor,
    callback: Callback | None = None,
    fixed_point_iterations: int = 0,
) -> torch.Tensor:
    """Run deterministic DDIM backwards, x_0 -> x_T, so that sample_ddim(..., eta=0) maps it back.

    ``timesteps`` is the same descending list the sampler will use; inversion walks it from the
    end: from s = timesteps[i + 1] (or x_0) up to t = timesteps[i]. The sampler's step t -> s uses
    eps(x_t, t), unknown before x_t is: the plain inversion uses eps(x_s, t) instead (Song et al.
    2021 sec. 4.3; Mokady et al. 2023), whose round-trip error is O(1 / steps). Each of
    ``fixed_point_iterations`` re-evaluates eps at the current estimate of x_t and redoes the step,
    solving x_t = step^-1(x_s, eps(x_t, t)) by fixed-point iteration (as in "exact" / ReNoise
    inversions), so the round trip becomes exact as the iteration converges.
    nfe = len(timesteps) * (1 + fixed_point_iterations).
    """
    if not isinstance(fixed_point_iterations, int) or fixed_point_iterations < 0:
        raise ConfigError(f"fixed_point_iterations={fixed_point_iterations!r}: use an integer >= 0")
    ts = _timestep_list(timesteps, schedule)
    x = x0
    for i in range(len(ts) - 1, -1, -1):
        t, s = ts[i], (ts[i + 1] if i + 1 < len(ts) else -1)
        t_batch = _full_timesteps(t, x)
        eps, _ = split_output(denoise(x, t_batch))  # (N, C, H, W), at the less noisy x_s
        x_t, x0_hat = ddim_step(x, eps, s, t, schedule)  # the same update, run from s up to t
        for _ in range(fixed_point_iterations):
            eps, _ = split_output(denoise(x_t, t_batch))  # at the current estimate of x_t
            x_t, x0_hat = ddim_step(x, eps, s, t, schedule)
        if callback is not None:
            callback(len(ts) - 1 - i, t_batch, x, x0_hat)
        x = x_t
    return x


# ---------------------------------------------------------------------------------------------
# Solvers on Karras sigmas (Karras et al. 2022; Lu et al. 2022)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """n noise levels from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho) (Karras eq. 5),
    followed by a final 0: a float64 tensor (n + 1,)."""
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"num_steps={n!r}: use a positive integer")
    if not 0 < sigma_min < sigma_max:
        raise ConfigError(f"sigma_min={sigma_min!r}, sigma_max={sigma_max!r}: need 0 < sigma_min < sigma_max")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


class _KarrasDenoiser:
    """An eps denoiser seen as D(x, sigma) ~ E[x_0 | x] with x = x_0 + sigma eps (Karras et al. sec. 2)."""

    def __init__(self, denoise: Denoiser, schedule: NoiseSchedule, callback: Callback | None):
        self.denoise, self.schedule, self.callback = denoise, schedule, callback

    def __call__(self, x: torch.Tensor, sigma: float, step: int | None = None) -> torch.Tensor:
        """x0_hat at noise level sigma; reports to the callback when a step index is given."""
        t = float(self.schedule.sigma_to_t(torch.tensor(sigma, dtype=torch.float64)))
        t_batch = _full_timesteps(t, x)  # fractional timesteps (N,)
        x_t = x / math.sqrt(1 + sigma**2)  # the network's variance-preserving input
        x0 = x - sigma * split_output(self.denoise(x_t, t_batch))[0]
        if self.callback is not None and step is not None:
            self.callback(step, t_batch, x_t, x0)
        return x0


def karras_sigma_max(schedule: NoiseSchedule, sigma_max: float | None = None) -> float:
    """The highest noise level the Karras solvers start from: min(schedule's sigma_{T-1}, sigma_max),
    sigma_max defaulting to DEFAULT_SIGMA_MAX (80); ``math.inf`` keeps the schedule's whole range."""
    cap = DEFAULT_SIGMA_MAX if sigma_max is None else sigma_max
    if not cap > float(schedule.sigmas[0]):
        raise ConfigError(
            f"sigma_max={sigma_max!r} must exceed the schedule's smallest sigma "
            f"{float(schedule.sigmas[0]):.3g}: use e.g. 80, or None for the default"
        )
    return min(float(schedule.sigmas[-1]), cap)


def _karras_setup(
    x: torch.Tensor,
    schedule: NoiseSchedule,
    num_steps: int,
    sigmas: torch.Tensor | None,
    sigma_max: float | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """The noise levels (default: Karras sigmas from :func:`karras_sigma_max` down to the schedule's
    sigma_0) and x_T ~ N(0, I) lifted to the variance-exploding scale x = x_T sqrt(1 + sigma_max^2)."""
    if sigmas is None:
        sigmas = karras_sigmas(num_steps, float(schedule.sigmas[0]), karras_sigma_max(schedule, sigma_max))
    levels = [float(v) for v in torch.as_tensor(sigmas).flatten()]
    decreasing = all(a > b for a, b in zip(levels, levels[1:]))
    if len(levels) != num_steps + 1 or levels[-1] != 0 or not decreasing:
        raise ConfigError(
            f"sigmas must be num_steps + 1 = {num_steps + 1} strictly decreasing values ending in 0, "
            f"got {len(levels)} values ending in {levels[-1]:.3g}"
        )
    return x * math.sqrt(1 + levels[0] ** 2), levels


def sample_euler(
    denoise: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    num_steps: int,
    generator: Generator | None = None,
    callback: Callback | None = None,
    *,
    sigmas: torch.Tensor | None = None,
    sigma_max: float | None = None,
) -> torch.Tensor:
    """Euler steps of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras Alg. 1 /
    Alg. 2 without churn or correction); nfe = num_steps. Deterministic (generator is unused)."""
    model = _KarrasDenoiser(denoise, schedule, callback)
    x, sigmas = _karras_setup(x, schedule, num_steps, sigmas, sigma_max)
    for i in range(num_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = (x - model(x, sigma, step=i)) / sigma  # dx/dsigma, Karras eq. 3
        x = x + (sigma_next - sigma) * d
    return x


def sample_heun(
    denoise: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    num_steps: int,
    generator: Generator | None = None,
    callback: Callback | None = None,
    *,
    sigmas: torch.Tensor | None = None,
    sigma_max: float | None = None,
) -> torch.Tensor:
    """Heun's 2nd-order method on the probability-flow ODE (Karras Alg. 1, deterministic Alg. 2);
    nfe = 2 num_steps - 1 (the last step, to sigma = 0, is an Euler step). Deterministic."""
    model = _KarrasDenoiser(denoise, schedule, callback)
    x, sigmas = _karras_setup(x, schedule, num_steps, sigmas, sigma_max)
    for i in range(num_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = (x - model(x, sigma, step=i)) / sigma
        x_euler = x + (sigma_next - sigma) * d
        if sigma_next == 0:
            x = x_euler
            continue
        d_next = (x_euler - model(x_euler, sigma_next)) / sigma_next  # slope at the Euler end point
        x = x + (sigma_next - sigma) * (d + d_next) / 2  # trapezoidal rule
    return x


def sample_dpmpp_2m(
    denoise: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    num_steps: int,
    generator: Generator | None = None,
    callback: Callback | None = None,
    *,
    sigmas: torch.Tensor | None = None,
    sigma_max: float | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), data-prediction form; nfe = num_steps. Deterministic.

    With lambda = -log sigma and h = lambda_next - lambda the exact solution of the ODE with
    D held constant is x_next = (sigma_next / sigma) x - expm1(-h) D; the multistep variant replaces
    D by the extrapolation (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_{i-1} / h_i. The first step and
    the last (to sigma = 0, where the update is x_next = D) are first order.
    """
    model = _KarrasDenoiser(denoise, schedule, callback)
    x, sigmas = _karras_setup(x, schedule, num_steps, sigmas, sigma_max)
    x0_prev, h_prev = None, None
    for i in range(num_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = model(x, sigma, step=i)
        if sigma_next == 0:
            x = x0
            break
        h = math.log(sigma / sigma_next)
        x0_hat = x0
        if x0_prev is not None:
            r = h_prev / h
            x0_hat = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = (sigma_next / sigma) * x - math.expm1(-h) * x0_hat
        x0_prev, h_prev = x0, h
    return x


# ---------------------------------------------------------------------------------------------
# One entry point by name


def num_function_evaluations(sampler: str, num_steps: int) -> int:
    """How many times ``sampler`` calls the denoiser for ``num_steps`` steps (before guidance)."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    return 2 * num_steps - 1 if sampler == "heun" else num_steps


def sample(
    sampler: str,
    denoise: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    num_steps: int,
    *,
    eta: float = 0.0,
    spacing: Spacing = "trailing",
    clip_denoised: bool | None = None,
    generator: Generator | None = None,
    callback: Callback | None = None,
    mean_shift: MeanShift | None = None,
    sigma_max: float | None = None,
) -> torch.Tensor:
    """Run the sampler named ``sampler`` (one of SAMPLERS) for ``num_steps`` steps from noise x.

    DDPM and DDIM visit :func:`make_timesteps` (T, num_steps, spacing); ``eta`` applies to DDIM only
    and ``clip_denoised`` (None: the sampler's default) to DDPM and DDIM only. ``mean_shift`` is
    DDPM's (see :func:`sample_ddpm`; other samplers take guidance through ``denoise``) and
    ``sigma_max`` the Karras solvers' (see :func:`karras_sigma_max`).
    """
    num_function_evaluations(sampler, num_steps)  # validates the name
    if eta != 0 and sampler != "ddim":
        raise ConfigError(f"eta={eta} applies only to the ddim sampler, not {sampler!r}: drop it or use ddim")
    if mean_shift is not None and sampler != "ddpm":
        raise ConfigError(f"mean_shift applies only to the ddpm sampler, not {sampler!r}: shift eps instead")
    if sigma_max is not None and sampler in ("ddpm", "ddim"):
        raise ConfigError(f"sigma_max applies only to euler, heun and dpmpp-2m, not {sampler!r}")
    if sampler in ("ddpm", "ddim"):
        timesteps = make_timesteps(schedule.num_timesteps, num_steps, spacing)
        clip = {} if clip_denoised is None else {"clip_denoised": clip_denoised}
        options = {"generator": generator, "callback": callback, **clip}
        if sampler == "ddpm":
            return sample_ddpm(denoise, x, schedule, timesteps, mean_shift=mean_shift, **options)
        return sample_ddim(denoise, x, schedule, timesteps, eta=eta, **options)
    if clip_denoised:
        raise ConfigError(f"clip_denoised applies only to ddpm and ddim, not {sampler!r}")
    solver = {"euler": sample_euler, "heun": sample_heun, "dpmpp-2m": sample_dpmpp_2m}[sampler]
    return solver(denoise, x, schedule, num_steps, generator=generator, callback=callback, sigma_max=sigma_max)
