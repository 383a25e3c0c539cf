"""Samplers: timestep lists, agreement with diffusers, invariants, and exact Gaussian denoisers.

For data x_0 ~ N(mu, s^2 I) the optimal noise predictor is closed form,
eps*(x_t, t) = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar), so a correct sampler
driven by it must return samples with mean mu and std s, up to Monte-Carlo error and its own
discretisation error (which shrinks at the sampler's order as steps grow).
"""

import math
from fractions import Fraction

import pytest
import torch

from genlab.diffusion import (
    DEFAULT_SIGMA_MAX,
    SAMPLERS,
    SPACINGS,
    NoiseSchedule,
    ddim_invert,
    ddim_step,
    karras_sigma_max,
    karras_sigmas,
    make_timesteps,
    num_function_evaluations,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
)
from genlab.errors import ConfigError

diffusers = pytest.importorskip("diffusers")

MU, S = 0.3, 0.5


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_name("linear", 1000)


def gaussian_denoiser(schedule, mu=MU, s=S):
    """The exact E[eps | x_t] for x_0 ~ N(mu, s^2 I); accepts integer or fractional t."""

    def denoise(x_t, t):
        a, b = schedule.signal_noise_scales(t, x_t)
        return b * (x_t - a * mu) / (a**2 * s**2 + b**2)

    return denoise


def mixture_denoiser(schedule, m=0.6, s=0.2):
    """The exact E[eps | x_t] for x_0 ~ (N(-m, s^2) + N(m, s^2)) / 2 per pixel: a nonlinear denoiser."""

    def denoise(x_t, t):
        a, b = schedule.signal_noise_scales(t, x_t)
        var = a**2 * s**2 + b**2  # of x_t given either component
        w_plus = torch.sigmoid(2 * a * m * x_t / var)  # posterior weight of the +m component
        x0_mean = (2 * w_plus - 1) * a * m  # E[a mu_k | x_t]
        return b * (x_t - x0_mean) / var

    return denoise


def _noise(shape=(4096, 1, 2, 2), seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Timesteps


def test_make_timesteps_lin_et_al_table_2():
    # Lin et al. 2023, Table 2 (T = 1000, 10 steps), shifted from the paper's 1-based t to 0-based
    assert make_timesteps(1000, 10, "linspace").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert make_timesteps(1000, 10, "leading").tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert make_timesteps(1000, 10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert make_timesteps(1000, 10).dtype == torch.long


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize(
    "T, steps",
    [(1000, 1), (1000, 3), (1000, 7), (1000, 25), (1000, 50), (1000, 250), (500, 12), (100, 30), (100, 100)],
)
def test_make_timesteps_matches_diffusers(T, steps, spacing):
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    assert make_timesteps(T, steps, spacing).tolist() == scheduler.timesteps.tolist()


def test_make_timesteps_rounds_exact_fractions_half_to_even():
    # diffusers rounds float approximations, so it drifts at exact ties (e.g. 48 trailing steps);
    # the definition rounds the exact rational values (Python's round(Fraction) is half-to-even).
    for T, S in [(1000, 48), (1000, 27), (1000, 61), (999, 16), (64, 24)]:
        linspace = [round(Fraction(k * (T - 1), S - 1)) for k in range(S - 1, -1, -1)]
        trailing = [round(Fraction(T * (S - k), S)) - 1 for k in range(S)]
        assert make_timesteps(T, S, "linspace").tolist() == linspace
        assert make_timesteps(T, S, "trailing").tolist() == trailing
        assert len(set(trailing)) == S


def test_make_timesteps_rejects_bad_values():
    with pytest.raises(ConfigError, match="num_steps"):
        make_timesteps(1000, 1001)
    with pytest.raises(ConfigError, match="leading, trailing, linspace"):
        make_timesteps(1000, 10, "uniform")


@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddim_steps_to_the_next_entry_of_the_list(schedule, spacing):
    """With the oracle eps of one fixed (x0, eps0), eta = 0 DDIM visits exactly q_sample(x0, t, eps0)
    at every listed t (so each step lands on the NEXT entry, not a fixed stride) and ends on x0."""
    x0 = _noise((8, 1, 2, 2), seed=1, dtype=torch.float64).clamp(-1, 1)
    eps0 = _noise((8, 1, 2, 2), seed=2, dtype=torch.float64)

    def oracle(x_t, t):
        a, b = schedule.signal_noise_scales(t, x_t)
        return (x_t - a * x0) / b

    timesteps = make_timesteps(1000, 7, spacing)  # strides of 142 or 143: uneven on purpose
    seen = []

    def check(i, t, x_t, x0_hat):
        seen.append(int(t[0]))
        torch.testing.assert_close(x_t, schedule.q_sample(x0, t, eps0), rtol=0, atol=1e-9)
        torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-8)

    x_T = schedule.q_sample(x0, torch.full((8,), int(timesteps[0])), eps0)
    out = sample_ddim(oracle, x_T, schedule, timesteps, callback=check)
    assert seen == timesteps.tolist()
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Against diffusers (reference implementation)


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_step_matches_diffusers(schedule, eta, clip):
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip, set_alpha_to_one=True
    )
    scheduler.set_timesteps(50)  # leading spacing: the fixed stride 20 is also the next entry
    x_t = 1.5 * _noise((2, 3, 4, 4), seed=3)
    eps = _noise((2, 3, 4, 4), seed=4)
    noise = _noise((2, 3, 4, 4), seed=5)
    for t in (980, 500, 20, 0):  # 0 -> x_0 (abar = 1)
        ref = scheduler.step(eps, t, x_t, eta=eta, variance_noise=noise, use_clipped_model_output=clip)
        mine, x0 = ddim_step(x_t, eps, t, t - 20, schedule, eta=eta, noise=noise, clip_denoised=clip)
        torch.testing.assert_close(mine, ref.prev_sample, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(x0, ref.pred_original_sample, rtol=1e-4, atol=1e-5)


def test_ddim_loop_matches_diffusers(schedule):
    denoise = gaussian_denoiser(schedule)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    scheduler.set_timesteps(20)
    x = x_ref = _noise((64, 1, 2, 2), seed=6)
    for t in scheduler.timesteps:
        x_ref = scheduler.step(denoise(x_ref, t.repeat(64)), t, x_ref).prev_sample
    ours = sample_ddim(denoise, x, schedule, make_timesteps(1000, 20, "leading"))
    torch.testing.assert_close(ours, x_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_ddpm_loop_matches_diffusers(schedule, spacing):
    """diffusers' DDPMScheduler also steps to the next list entry: same noise, same samples."""
    denoise = gaussian_denoiser(schedule)
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=True, timestep_spacing=spacing
    )
    scheduler.set_timesteps(10)
    x = _noise((64, 1, 2, 2), seed=7)
    gen = torch.Generator().manual_seed(8)
    x_ref = x
    for t in scheduler.timesteps:
        x_ref = scheduler.step(denoise(x_ref, t.repeat(64)), t, x_ref, generator=gen).prev_sample
    timesteps = make_timesteps(1000, 10, spacing)
    ours = sample_ddpm(denoise, x, schedule, timesteps, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(ours, x_ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Invariants between samplers


def test_ddim_eta_one_is_ddpm_on_the_respaced_chain(schedule):
    """Song et al. sec. 4.1: eta = 1 gives the DDPM posterior; with the same noise, the same samples."""
    denoise = gaussian_denoiser(schedule)
    x = _noise((16, 1, 2, 2), seed=9, dtype=torch.float64)
    timesteps = make_timesteps(1000, 25, "linspace")
    ddim = sample_ddim(denoise, x, schedule, timesteps, eta=1.0, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    ddpm = sample_ddpm(denoise, x, schedule, timesteps, generator=gen, clip_denoised=False)
    torch.testing.assert_close(ddim, ddpm, rtol=0, atol=1e-10)


def test_ddim_is_euler_on_the_same_noise_levels(schedule):
    """Karras et al. 2022 sec. 3: deterministic DDIM is Euler's method in x / sqrt(abar) and sigma."""
    denoise = mixture_denoiser(schedule)
    x = _noise((16, 1, 2, 2), seed=10, dtype=torch.float64)
    timesteps = make_timesteps(1000, 15, "trailing")
    sigmas = torch.cat([schedule.sigmas[timesteps], torch.zeros(1, dtype=torch.float64)])
    ddim = sample_ddim(denoise, x, schedule, timesteps)
    euler = sample_euler(denoise, x, schedule, 15, sigmas=sigmas)
    torch.testing.assert_close(euler, ddim, rtol=0, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# Exact Gaussian denoiser: moments of the samples


def _check_moments(out, mu=MU, s=S, k=4.0):
    n = out.numel()
    se_mean, se_std = s / math.sqrt(n), s / math.sqrt(2 * n)
    assert abs(out.mean().item() - mu) < k * se_mean, (out.mean().item(), mu, se_mean)
    assert abs(out.std().item() - s) < k * se_std, (out.std().item(), s, se_std)


STOCHASTIC_RUNS = {
    "ddpm-1000": lambda d, x, sch, g: sample_ddpm(d, x, sch, generator=g, clip_denoised=False),
    "ddim-eta1-1000": lambda d, x, sch, g: sample_ddim(
        d, x, sch, make_timesteps(1000, 1000), eta=1.0, generator=g
    ),
    # first-order deterministic samplers are biased by ~1/steps (see the convergence test): many steps
    "ddim-eta0-500": lambda d, x, sch, g: sample_ddim(d, x, sch, make_timesteps(1000, 500)),
    "euler-500": lambda d, x, sch, g: sample_euler(d, x, sch, 500),
    "heun-50": lambda d, x, sch, g: sample_heun(d, x, sch, 50),
    "dpmpp-2m-50": lambda d, x, sch, g: sample_dpmpp_2m(d, x, sch, 50),
}


@pytest.mark.parametrize("run", list(STOCHASTIC_RUNS))
def test_samples_have_the_data_moments(schedule, run):
    x = _noise(seed=11)  # 4096 x 1 x 2 x 2 independent values
    out = STOCHASTIC_RUNS[run](gaussian_denoiser(schedule), x, schedule, torch.Generator().manual_seed(12))
    _check_moments(out)


def _affine_map(sampler, schedule, steps):
    """The deterministic samplers map x_T to x_0 affinely for Gaussian data: return (slope, intercept)."""
    x = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64).reshape(3, 1, 1, 1)
    y = sampler(gaussian_denoiser(schedule), x, schedule, steps).flatten()
    assert abs((y[0] + y[2] - 2 * y[1]).item()) < 1e-9  # affine
    return (y[2] - y[0]).item() / 2, y[1].item()


DETERMINISTIC = {
    "ddim": (lambda d, x, sch, n: sample_ddim(d, x, sch, make_timesteps(1000, n, "trailing")), 1, 0.06),
    "euler": (sample_euler, 1, 0.065),
    "heun": (sample_heun, 2, 0.008),
    "dpmpp-2m": (sample_dpmpp_2m, 2, 0.008),
}  # (sampler, order, max |std / s - 1| at 50 steps; measured 0.057, 0.060, 0.0067, 0.0070)


@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_deterministic_samplers_converge_at_their_order(schedule, name):
    """With x_T ~ N(0, 1) the output std is the slope and its mean the intercept, exactly (no Monte
    Carlo): both must approach (s, mu), the std error at 50 steps must be small, and doubling the
    steps must divide the error by 2 (first order) or 4 (second order). Beyond ~200 steps the error
    meets a floor of ~1e-4 (abar_T > 0 and sigma_min > 0), hence 25 -> 50 -> 100 steps."""
    sampler, order, tolerance_at_50 = DETERMINISTIC[name]
    errors = []
    for steps in (25, 50, 100):
        slope, intercept = _affine_map(sampler, schedule, steps)
        assert abs(intercept - MU) < 2e-3
        errors.append(slope / S - 1)
    assert abs(errors[1]) < tolerance_at_50
    for coarse, fine in zip(errors, errors[1:]):
        assert 0.75 * 2**-order < fine / coarse < 1.25 * 2**-order, errors


# ---------------------------------------------------------------------------------------------
# DDIM inversion


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_inversion_round_trip(schedule, spacing):
    """image -> noise -> the same image, for a nonlinear (two-mode) exact denoiser, data std ~0.63.

    Plain inversion (eps(x_s, t) for eps(x_t, t)) is first order: mean |error| ~1.8e-2 (max ~0.13)
    at 50 steps, 4x less at 200. Three fixed-point iterations per step bring 50 steps to ~2.5e-4.
    """
    denoise = mixture_denoiser(schedule)
    sign = torch.where(_noise((256, 1, 2, 2), seed=13) > 0, 1.0, -1.0)
    x0 = (0.6 * sign + 0.2 * _noise((256, 1, 2, 2), seed=14)).double()  # data from the mixture
    errors = {}
    for steps, iterations in ((50, 0), (200, 0), (50, 3)):
        timesteps = make_timesteps(1000, steps, spacing)
        x_T = ddim_invert(denoise, x0, schedule, timesteps, fixed_point_iterations=iterations)
        # ~N(0, 1), unlike x0 (std 0.63); the exact inverse of the 50-step sampler, which shrinks the
        # spread by ~6% (see the convergence test), spreads it by as much (std ~1.11)
        assert abs(x_T.std().item() - 1) < 0.15 and abs(x_T.mean().item()) < 0.1
        back = sample_ddim(denoise, x_T, schedule, timesteps)
        errors[steps, iterations] = (back - x0).abs()
    assert errors[50, 0].mean() < 0.025 and errors[50, 0].max() < 0.2
    assert errors[200, 0].mean() < 0.3 * errors[50, 0].mean()
    assert errors[50, 3].mean() < 1e-3


# ---------------------------------------------------------------------------------------------
# Randomness, callbacks, nfe, the dispatcher


@pytest.mark.parametrize("run", ["ddpm", "ddim-eta"])
def test_generator_makes_sampling_reproducible_and_leaves_global_rng_alone(schedule, run):
    denoise = gaussian_denoiser(schedule)
    x = _noise((8, 1, 2, 2), seed=15)
    timesteps = make_timesteps(1000, 20)

    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        if run == "ddpm":
            return sample_ddpm(denoise, x, schedule, timesteps, generator=gen)
        return sample_ddim(denoise, x, schedule, timesteps, eta=0.5, generator=gen)

    torch.manual_seed(0)
    state = torch.get_rng_state()
    first, again, other = draw(1), draw(1), draw(2)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-2


def test_callbacks_and_function_evaluations(schedule):
    denoise = gaussian_denoiser(schedule)
    x = _noise((4, 1, 2, 2), seed=16)
    runs = {
        "ddpm": lambda d, cb: sample_ddpm(d, x, schedule, make_timesteps(1000, 12), callback=cb),
        "ddim": lambda d, cb: sample_ddim(d, x, schedule, make_timesteps(1000, 12), callback=cb),
        "euler": lambda d, cb: sample_euler(d, x, schedule, 12, callback=cb),
        "heun": lambda d, cb: sample_heun(d, x, schedule, 12, callback=cb),
        "dpmpp-2m": lambda d, cb: sample_dpmpp_2m(d, x, schedule, 12, callback=cb),
    }
    levels = karras_sigmas(12, schedule.sigmas[0].item(), min(schedule.sigmas[-1].item(), 80.0))[:-1]
    karras_t = schedule.sigma_to_t(levels)
    for name, run in runs.items():
        calls, steps = [], []

        def counting(x_t, t):
            calls.append(t)
            return denoise(x_t, t)

        out = run(counting, lambda i, t, x_t, x0_hat: steps.append((i, t, x0_hat)))
        assert len(calls) == num_function_evaluations(name, 12)
        assert [i for i, _, _ in steps] == list(range(12))
        ts = torch.stack([t[0] for _, t, _ in steps])
        if name in ("ddpm", "ddim"):
            assert ts.dtype == torch.long and ts.tolist() == make_timesteps(1000, 12).tolist()
            if name == "ddim":
                torch.testing.assert_close(steps[-1][2], out)  # the last step returns x0_hat
        else:
            assert ts.dtype.is_floating_point
            torch.testing.assert_close(ts.double(), karras_t, rtol=1e-5, atol=1e-3)


def test_karras_sigmas_closed_form():
    sigmas = karras_sigmas(8, 0.02, 80.0, rho=7.0)
    assert sigmas.shape == (9,) and sigmas[-1] == 0
    assert sigmas[0].item() == pytest.approx(80.0) and sigmas[-2].item() == pytest.approx(0.02)
    inv_rho = sigmas[:-1] ** (1 / 7)
    step = (0.02 ** (1 / 7) - 80 ** (1 / 7)) / 7
    torch.testing.assert_close(inv_rho.diff(), torch.full((7,), step, dtype=torch.float64))


def test_sample_dispatches_by_name(schedule):
    denoise = gaussian_denoiser(schedule)
    x = _noise((4, 1, 2, 2), seed=17)
    assert torch.equal(
        sample("ddim", denoise, x, schedule, 10, spacing="linspace"),
        sample_ddim(denoise, x, schedule, make_timesteps(1000, 10, "linspace")),
    )
    assert torch.equal(sample("heun", denoise, x, schedule, 5), sample_heun(denoise, x, schedule, 5))
    assert set(SAMPLERS) == {"ddpm", "ddim", "euler", "heun", "dpmpp-2m"}
    with pytest.raises(ConfigError, match="unknown sampler"):
        sample("plms", denoise, x, schedule, 10)
    with pytest.raises(ConfigError, match="eta"):
        sample("euler", denoise, x, schedule, 10, eta=0.5)
    with pytest.raises(ConfigError, match="descending"):
        sample_ddim(denoise, x, schedule, torch.tensor([0, 500]))


# ---------------------------------------------------------------------------------------------
# Karras solvers on the cosine schedule: the sigma_max cap


@pytest.fixture(scope="module")
def cosine():
    return NoiseSchedule.from_name("cosine", 1000)


def test_karras_sigma_max_caps_the_schedule(schedule, cosine):
    # cosine reaches sigma ~2e4 at t = T - 1 (abar ~2.4e-9); linear ~157: both capped at 80 by default
    assert cosine.sigmas[-1] > 1e4
    assert karras_sigma_max(cosine) == DEFAULT_SIGMA_MAX == 80.0
    assert karras_sigma_max(cosine, math.inf) == pytest.approx(cosine.sigmas[-1].item())
    assert karras_sigma_max(cosine, 5.0) == 5.0
    short = NoiseSchedule(torch.full((10,), 0.1, dtype=torch.float64))  # sigma_max ~1.37: kept
    assert karras_sigma_max(short) == pytest.approx(short.sigmas[-1].item())
    with pytest.raises(ConfigError, match="sigma_max"):
        karras_sigma_max(cosine, 1e-4)
    seen = []
    sample_dpmpp_2m(gaussian_denoiser(cosine), _noise((2, 1, 1, 1)), cosine, 10, callback=lambda i, t, x, x0: seen.append(t[0]))
    assert cosine.t_to_sigma(seen[0]).item() == pytest.approx(80.0, rel=1e-4)


@pytest.mark.parametrize("run", ["euler-500", "heun-50", "dpmpp-2m-50"])
def test_karras_solvers_have_the_data_moments_on_the_cosine_schedule(cosine, run):
    out = STOCHASTIC_RUNS[run](gaussian_denoiser(cosine), _noise(seed=21), cosine, None)
    _check_moments(out)


@pytest.mark.parametrize("solver, tolerance", [(sample_euler, 0.2), (sample_heun, 0.15), (sample_dpmpp_2m, 0.1)])
def test_few_step_solvers_survive_an_eps_error_on_the_cosine_schedule(cosine, solver, tolerance):
    """x0_hat = x - sigma eps_hat turns an eps error of 0.01 into 200 at the cosine schedule's sigma
    ~2e4. Error = |mean - mu| + |std - s| after 10 steps: from sigma_max = 80, measured 0.17 (Euler,
    mostly its first-order discretisation error), 0.13 (Heun), 0.08 (DPM-Solver++); uncapped 0.31,
    1.3 and 0.26."""
    exact = gaussian_denoiser(cosine)

    def biased(x_t, t):
        return exact(x_t, t) + 0.01

    x = _noise(seed=22)
    capped = solver(biased, x, cosine, 10)
    uncapped = solver(biased, x, cosine, 10, sigma_max=math.inf)
    capped_error = abs(capped.mean().item() - MU) + abs(capped.std().item() - S)
    uncapped_error = abs(uncapped.mean().item() - MU) + abs(uncapped.std().item() - S)
    assert capped_error < tolerance and uncapped_error > 1.5 * capped_error, (capped_error, uncapped_error)
