"""The forward process: beta schedules against closed forms and diffusers, posterior, q_sample moments."""

import math

import numpy as np
import pytest
import torch
from scipy.special import expit

from genlab.diffusion import BETA_SCHEDULES, NoiseSchedule, beta_schedule
from genlab.errors import ConfigError

diffusers = pytest.importorskip("diffusers")


def _diffusers_betas(kind, T, **kwargs):
    return diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=kind, **kwargs).betas.double().numpy()


def test_linear_schedule_endpoints_and_scaling():
    betas = beta_schedule("linear", 1000).numpy()
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4, abs=1e-15) and betas[-1] == pytest.approx(0.02, abs=1e-15)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)  # evenly spaced
    np.testing.assert_allclose(betas, _diffusers_betas("linear", 1000), atol=1e-9)
    # improved DDPM's rule for other T: both ends scaled by 1000 / T
    short = beta_schedule("linear", 250).numpy()
    assert short[0] == pytest.approx(4e-4) and short[-1] == pytest.approx(0.08)


def test_cosine_schedule_follows_nichol_dhariwal_alpha_bar():
    T, s = 1000, 0.008
    schedule = NoiseSchedule.from_name("cosine", T)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = np.array([f(t + 1) / f(0) for t in range(T)])  # abar after step t (0-based)
    unclipped = schedule.betas.numpy() < 0.999
    assert unclipped[:-1].all() and not unclipped[-1]  # only the very last beta is clipped
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy()[unclipped], expected[unclipped], rtol=1e-10)
    assert schedule.betas[-1].item() == pytest.approx(0.999)
    np.testing.assert_allclose(schedule.betas.numpy(), _diffusers_betas("squaredcos_cap_v2", T), atol=1e-6)


def test_sigmoid_schedule_closed_form():
    T = 1000
    tau = np.arange(T + 1) / T
    # the documented form: start -3, end 3, temperature 1
    abar = (expit(3.0) - expit(6.0 * tau - 3.0)) / (expit(3.0) - expit(-3.0))
    expected = np.clip(1 - abar[1:] / abar[:-1], 0, 0.999)
    betas = beta_schedule("sigmoid", T).numpy()
    np.testing.assert_allclose(betas, expected, rtol=1e-9, atol=1e-15)
    alphas_cumprod = np.cumprod(1 - betas)
    np.testing.assert_allclose(alphas_cumprod[:-1], abar[1:-1], rtol=1e-9)  # before the clipped end
    assert (np.diff(alphas_cumprod) < 0).all()


def test_scaled_linear_schedule_matches_stable_diffusion():
    betas = beta_schedule("scaled-linear", 1000).numpy()
    assert betas[0] == pytest.approx(0.00085) and betas[-1] == pytest.approx(0.012)
    np.testing.assert_allclose(np.diff(np.sqrt(betas)), (0.012**0.5 - 0.00085**0.5) / 999, rtol=1e-9)
    ref = _diffusers_betas("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
    np.testing.assert_allclose(betas, ref, atol=1e-9)


def test_unknown_schedule_and_bad_betas_are_config_errors():
    with pytest.raises(ConfigError) as info:
        beta_schedule("quadratic", 1000)
    for name in BETA_SCHEDULES:
        assert name in str(info.value)
    with pytest.raises(ConfigError, match="num_timesteps"):
        beta_schedule("linear", 0)
    with pytest.raises(ConfigError, match="betas"):
        NoiseSchedule.from_name("linear", 10)  # betas up to 2.0 once scaled by 1000 / T


@pytest.mark.parametrize("name", BETA_SCHEDULES)
def test_derived_coefficients(name):
    schedule = NoiseSchedule.from_name(name, 200)
    betas = schedule.betas.numpy()
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(schedule.alphas.numpy(), 1 - betas, rtol=1e-14)
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), abar, rtol=1e-12)
    np.testing.assert_allclose(schedule.alphas_cumprod_prev.numpy(), np.r_[1.0, abar[:-1]], rtol=1e-12)
    np.testing.assert_allclose(schedule.sqrt_alphas_cumprod.numpy(), np.sqrt(abar), rtol=1e-12)
    np.testing.assert_allclose(schedule.sqrt_one_minus_alphas_cumprod.numpy(), np.sqrt(1 - abar), rtol=1e-12)
    np.testing.assert_allclose(schedule.sigmas.numpy(), np.sqrt((1 - abar) / abar), rtol=1e-12)
    t = torch.tensor([0, 7, 199])
    np.testing.assert_allclose(schedule.snr(t).numpy(), (abar / (1 - abar))[t.numpy()], rtol=1e-6)
    assert schedule.snr(t).dtype == torch.float32


def test_posterior_matches_ho_et_al_and_bayes_rule():
    schedule = NoiseSchedule.from_name("linear", 1000)
    betas = schedule.betas.numpy()
    abar = np.cumprod(1 - betas)
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 1, 5, 250, 999])
    x0 = torch.randn(5, 3, 2, 2, generator=gen, dtype=torch.float64)
    x_t = torch.randn(5, 3, 2, 2, generator=gen, dtype=torch.float64)
    mean, var, log_var = schedule.q_posterior(x0, x_t, t)
    assert mean.shape == x0.shape and var.shape == (5, 1, 1, 1)
    for n, tn in enumerate(t.tolist()):
        abar_prev = abar[tn - 1] if tn > 0 else 1.0
        # Ho et al. 2020 eq. 7
        mean_eq7 = (np.sqrt(abar_prev) * betas[tn] / (1 - abar[tn])) * x0[n].numpy() + (
            np.sqrt(1 - betas[tn]) * (1 - abar_prev) / (1 - abar[tn])
        ) * x_t[n].numpy()
        var_eq7 = (1 - abar_prev) / (1 - abar[tn]) * betas[tn]
        np.testing.assert_allclose(mean[n].numpy(), mean_eq7, rtol=1e-10, atol=1e-12)
        assert var[n].item() == pytest.approx(var_eq7, rel=1e-10, abs=1e-300)
        if tn == 0:  # x_{-1} = x_0 is known exactly
            np.testing.assert_allclose(mean[n].numpy(), x0[n].numpy(), atol=1e-12)
            assert var[n].item() == 0.0
            assert log_var[n].item() == pytest.approx(math.log(schedule.posterior_variance[1].item()))
            continue
        # Bayes: prior q(x_{t-1}|x_0) = N(sqrt(abar_prev) x0, 1 - abar_prev), likelihood
        # q(x_t|x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t): product of Gaussians in precision form.
        precision = 1 / (1 - abar_prev) + (1 - betas[tn]) / betas[tn]
        mean_bayes = (
            np.sqrt(abar_prev) * x0[n].numpy() / (1 - abar_prev)
            + np.sqrt(1 - betas[tn]) * x_t[n].numpy() / betas[tn]
        ) / precision
        np.testing.assert_allclose(mean[n].numpy(), mean_bayes, rtol=1e-9)
        assert var[n].item() == pytest.approx(1 / precision, rel=1e-9)
        assert log_var[n].item() == pytest.approx(math.log(1 / precision), rel=1e-9)


def test_q_sample_moments_monte_carlo():
    schedule = NoiseSchedule.from_name("cosine", 1000)
    gen = torch.Generator().manual_seed(1)
    n = 100_000
    x0 = torch.tensor([-0.8, 0.1, 0.6])  # (3,) data values
    for t in (10, 500, 900):
        abar = schedule.alphas_cumprod[t].item()
        x0_batch = x0.expand(n, 3).reshape(n, 3, 1, 1)
        noise = torch.randn(x0_batch.shape, generator=gen)
        x_t = schedule.q_sample(x0_batch, torch.full((n,), t), noise)[:, :, 0, 0]  # (n, 3)
        se_mean = math.sqrt((1 - abar) / n)
        np.testing.assert_allclose(x_t.mean(0).numpy(), math.sqrt(abar) * x0.numpy(), atol=5 * se_mean)
        se_var = (1 - abar) * math.sqrt(2 / n)
        np.testing.assert_allclose(x_t.var(0).numpy(), 1 - abar, atol=5 * se_var)


def test_gather_broadcasts_to_x_dtype_and_rejects_fractional_timesteps():
    schedule = NoiseSchedule.from_name("linear", 1000)
    x = torch.zeros(3, 2, 4, 4, dtype=torch.float16)
    t = torch.tensor([0, 10, 999])
    got = schedule.gather(schedule.alphas_cumprod, t, x)
    assert got.shape == (3, 1, 1, 1) and got.dtype == torch.float16 and got.device == x.device
    np.testing.assert_allclose(got.flatten().float().numpy(), schedule.alphas_cumprod[t].numpy(), rtol=1e-3)
    with pytest.raises(ConfigError, match="integer"):
        schedule.gather(schedule.alphas_cumprod, t.float(), x)


def test_fractional_timesteps_interpolate_log_sigma():
    schedule = NoiseSchedule.from_name("linear", 1000)
    t_int = torch.tensor([0, 1, 17, 500, 999])
    sigma_at_int = schedule.t_to_sigma(t_int.double())
    np.testing.assert_allclose(sigma_at_int.numpy(), schedule.sigmas[t_int].numpy(), rtol=1e-12)
    np.testing.assert_allclose(schedule.sigma_to_t(schedule.sigmas[t_int]).numpy(), t_int.numpy(), atol=1e-9)
    # half way between t = 17 and 18 in t is half way in log sigma
    mid = schedule.t_to_sigma(torch.tensor([17.5], dtype=torch.float64)).item()
    assert mid == pytest.approx(math.sqrt(schedule.sigmas[17].item() * schedule.sigmas[18].item()), rel=1e-12)
    t = torch.rand(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 999
    np.testing.assert_allclose(schedule.sigma_to_t(schedule.t_to_sigma(t)).numpy(), t.numpy(), atol=1e-8)
    # signal / noise scales at fractional t agree with the tables at integer-valued t
    x = torch.zeros(5, 1, 1, 1, dtype=torch.float64)
    a_f, b_f = schedule.signal_noise_scales(t_int.double(), x)
    a_i, b_i = schedule.signal_noise_scales(t_int, x)
    torch.testing.assert_close(a_f, a_i, rtol=1e-10, atol=0)
    torch.testing.assert_close(b_f, b_i, rtol=1e-10, atol=0)
    # out-of-range sigmas clamp to the ends
    assert schedule.sigma_to_t(torch.tensor([1e-6, 1e6])).tolist() == pytest.approx([0.0, 999.0])


def test_respace_keeps_marginals():
    schedule = NoiseSchedule.from_name("cosine", 1000)
    kept = torch.tensor([999, 0, 250, 500, 749])  # any order
    respaced = schedule.respace(kept)
    order = torch.sort(kept).values
    assert respaced.num_timesteps == 5 and respaced.timestep_map.tolist() == order.tolist()
    kept_abar = schedule.alphas_cumprod[order].numpy()
    np.testing.assert_allclose(respaced.alphas_cumprod.numpy(), kept_abar, rtol=1e-8)  # 1 - (1 - r) rounding
    abar = schedule.alphas_cumprod[order].numpy()
    np.testing.assert_allclose(respaced.betas.numpy(), 1 - abar / np.r_[1.0, abar[:-1]], rtol=1e-12)
    # respacing onto every timestep changes nothing
    full = schedule.respace(torch.arange(1000))
    np.testing.assert_allclose(full.betas.numpy(), schedule.betas.numpy(), rtol=1e-9)
    with pytest.raises(ConfigError, match="distinct"):
        schedule.respace(torch.tensor([5, 5, 10]))
    with pytest.raises(ConfigError):
        schedule.respace(torch.tensor([5, 1000]))
