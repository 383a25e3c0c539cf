"""Learned variance (improved DDPM): the vlb terms against closed forms, and the sampler's variance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from genlab.diffusion import (
    NoiseSchedule,
    discretized_gaussian_log_likelihood,
    learned_log_variance,
    make_timesteps,
    normal_kl,
    sample_ddim,
    sample_ddpm,
    vlb_terms,
)


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_name("cosine", 1000)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_normal_kl_matches_torch_distributions():
    m1, m2, lv1, lv2 = _randn(50, seed=1), _randn(50, seed=2), _randn(50, seed=3), _randn(50, seed=4)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-10, atol=1e-12)


def test_discretized_gaussian_likelihood_integrates_the_normal_over_each_bin():
    """Interior bins: Phi((x + 1/255 - mu) / sd) - Phi((x - 1/255 - mu) / sd); edge bins open-ended.
    Over all 256 bins the probabilities sum to one."""
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    mean, log_scale = torch.tensor(0.13, dtype=torch.float64), torch.tensor(math.log(0.2), dtype=torch.float64)
    log_p = discretized_gaussian_log_likelihood(bins, mean, log_scale)
    cdf = scipy.stats.norm(0.13, 0.2).cdf
    b = bins.numpy()
    expected = np.where(b < -0.999, cdf(b + 1 / 255), np.where(b > 0.999, 1 - cdf(b - 1 / 255), cdf(b + 1 / 255) - cdf(b - 1 / 255)))
    np.testing.assert_allclose(log_p.exp().numpy(), expected, rtol=1e-9, atol=1e-15)
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_vlb_kl_term_is_the_closed_form_kl_between_the_gaussians(schedule):
    """For t > 0, L_t = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) per dimension in bits, with
    both Gaussians built here from the betas (Ho et al. eq. 7, Nichol & Dhariwal eq. 15)."""
    x0, eps, eps_hat = _randn(4, 1, 3, 3, seed=5).clamp(-1, 1), _randn(4, 1, 3, 3, seed=6), _randn(4, 1, 3, 3, seed=7)
    v = torch.rand(4, 1, 3, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    t = torch.tensor([1, 50, 500, 999])
    x_t = schedule.q_sample(x0, t, eps)
    got = vlb_terms(schedule, x0, x_t, t, eps_hat, v)
    betas = schedule.betas
    abar = torch.cumprod(1 - betas, 0)
    for i, ti in enumerate(t.tolist()):
        ab, ab_prev, beta = abar[ti], abar[ti - 1], betas[ti]
        coef0, coef_t = ab_prev.sqrt() * beta / (1 - ab), (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)
        beta_tilde = (1 - ab_prev) / (1 - ab) * beta
        x0_hat = (x_t[i] - (1 - ab).sqrt() * eps_hat[i]) / ab.sqrt()
        q = torch.distributions.Normal(coef0 * x0[i] + coef_t * x_t[i], beta_tilde.sqrt())
        model_var = torch.exp(v[i] * beta.log() + (1 - v[i]) * beta_tilde.log())
        p = torch.distributions.Normal(coef0 * x0_hat + coef_t * x_t[i], model_var.sqrt())
        expected = torch.distributions.kl_divergence(q, p).mean() / math.log(2)
        assert got[i].item() == pytest.approx(expected.item(), rel=1e-9)


def test_vlb_at_t0_is_the_decoder_nll(schedule):
    x0 = (torch.randint(0, 256, (3, 1, 4, 4), generator=torch.Generator().manual_seed(9)).double() / 127.5 - 1)
    eps, eps_hat, v = _randn(3, 1, 4, 4, seed=10), _randn(3, 1, 4, 4, seed=11), torch.full((3, 1, 4, 4), 0.3, dtype=torch.float64)
    t = torch.zeros(3, dtype=torch.long)
    x_t = schedule.q_sample(x0, t, eps)
    got = vlb_terms(schedule, x0, x_t, t, eps_hat, v)
    # at t = 0 the posterior mean of x_{-1} given x0_hat is x0_hat itself; the variance is the
    # interpolation of beta_0 and the clipped log beta_tilde (= log beta_tilde_1)
    x0_hat = (x_t - schedule.sqrt_one_minus_alphas_cumprod[0] * eps_hat) / schedule.sqrt_alphas_cumprod[0]
    log_var = 0.3 * schedule.betas[0].log() + 0.7 * schedule.posterior_variance[1].log()
    sd = float((0.5 * log_var).exp())
    cdf = scipy.stats.norm(x0_hat.numpy(), sd).cdf
    b = x0.numpy()
    prob = np.where(b < -0.999, cdf(b + 1 / 255), np.where(b > 0.999, 1 - cdf(b - 1 / 255), cdf(b + 1 / 255) - cdf(b - 1 / 255)))
    expected = -np.log(np.maximum(prob, 1e-12)).reshape(3, -1).mean(1) / math.log(2)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-7)


def test_learned_log_variance_interpolates_between_the_bounds():
    v = torch.tensor([0.0, 1.0, 0.25], dtype=torch.float64)
    got = learned_log_variance(v, 0.02, 0.01)
    torch.testing.assert_close(got.exp(), torch.tensor([0.01, 0.02, 0.02**0.25 * 0.01**0.75], dtype=torch.float64))


@pytest.mark.parametrize("fraction, bound", [(1.0, "betas"), (0.0, "posterior_variance")])
def test_ddpm_sampler_uses_the_learned_variance(schedule, fraction, bound):
    """v = 1 gives Sigma = beta_t and v = 0 beta_tilde_t of the respaced chain at every noisy step
    (read through the mean_shift hook, which receives Sigma); with v = 0 the samples equal fixed-variance
    DDPM's (same generator), up to rounding of exp(log beta_tilde)."""
    timesteps = make_timesteps(1000, 10, "trailing")
    chain = schedule.respace(timesteps)
    x = _randn(16, 1, 2, 2, seed=12)

    def eps_only(x_t, t):
        return 0.3 * x_t

    def with_v(x_t, t):
        return 0.3 * x_t, torch.full_like(x_t, fraction)

    seen = []

    def spy(x_t, t, variance):
        seen.append((int(t[0]), variance))
        return torch.zeros_like(x_t)

    learned = sample_ddpm(with_v, x, schedule, timesteps, generator=torch.Generator().manual_seed(0), mean_shift=spy)
    assert [t for t, _ in seen] == timesteps[:-1].tolist()  # every step but the last, which adds no noise
    table = getattr(chain, bound)
    for j, (_, variance) in zip(range(len(timesteps) - 1, 0, -1), seen):
        torch.testing.assert_close(variance, torch.full_like(variance, float(table[j])), rtol=1e-12, atol=0)
    fixed = sample_ddpm(eps_only, x, schedule, timesteps, generator=torch.Generator().manual_seed(0))
    if fraction == 0.0:
        torch.testing.assert_close(learned, fixed, rtol=1e-12, atol=1e-12)
    else:
        assert (learned - fixed).abs().max() > 1e-3


def test_ddim_ignores_the_learned_variance(schedule):
    x = _randn(8, 1, 2, 2, seed=13)
    timesteps = make_timesteps(1000, 10)
    plain = sample_ddim(lambda x_t, t: 0.3 * x_t, x, schedule, timesteps)
    learned = sample_ddim(lambda x_t, t: (0.3 * x_t, torch.full_like(x_t, 0.7)), x, schedule, timesteps)
    assert torch.equal(plain, learned)
