"""Pixel, SSIM, KL and combined reconstruction losses (SPEC L1, L2, L5, L6) against independent formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from genlab.errors import ConfigError, DataError
from genlab.losses import (
    ReconstructionLoss,
    ReconstructionLossConfig,
    charbonnier_loss,
    kl_between_diagonal_gaussians,
    kl_diagonal_gaussian,
    l1_loss,
    ms_ssim_loss,
    mse_loss,
    reparameterize,
    ssim_loss,
)
from genlab.metrics.image_quality import ms_ssim, ssim


def _images(seed: int, shape=(3, 1, 16, 16)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator) * 2 - 1


def test_pixel_losses_match_numpy_formulas():
    x_hat, x = _images(0), _images(1)
    d = (x_hat - x).numpy().astype(np.float64)
    assert mse_loss(x_hat, x).item() == pytest.approx(np.mean(d**2), rel=1e-5)
    assert l1_loss(x_hat, x).item() == pytest.approx(np.mean(np.abs(d)), rel=1e-5)
    eps = 0.1
    assert charbonnier_loss(x_hat, x, eps=eps).item() == pytest.approx(np.mean(np.sqrt(d**2 + eps**2)), rel=1e-5)
    # Charbonnier tends to L1 as eps -> 0 and is smooth at zero error (gradient 0, not a subgradient jump).
    assert charbonnier_loss(x_hat, x, eps=1e-6).item() == pytest.approx(l1_loss(x_hat, x).item(), rel=1e-4)
    same = x.clone().requires_grad_(True)
    charbonnier_loss(same, x).backward()
    assert torch.all(same.grad == 0)


def test_pixel_losses_refuse_mismatched_shapes():
    with pytest.raises(DataError, match="one shape"):
        mse_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5))
    with pytest.raises(ConfigError):
        charbonnier_loss(torch.zeros(1), torch.zeros(1), eps=0.0)


def test_ssim_losses_are_one_minus_the_metrics():
    x = _images(2, (2, 3, 32, 32))
    x_hat = (x + 0.3 * _images(3, (2, 3, 32, 32))).clamp(-1, 1)
    expected_ssim = 1 - ssim(x_hat, x, data_range=2.0)
    assert ssim_loss(x_hat, x).item() == pytest.approx(expected_ssim.item(), abs=1e-6)
    assert ms_ssim_loss(x_hat, x).item() == pytest.approx((1 - ms_ssim(x_hat, x, data_range=2.0)).item(), abs=1e-6)
    assert ssim_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    # Tiny images (8x8 digits) fall back to the largest odd window that fits (7).
    small_hat, small = x_hat[:, :1, :8, :8], x[:, :1, :8, :8]
    assert ssim_loss(small_hat, small).item() == pytest.approx(
        (1 - ssim(small_hat, small, data_range=2.0, window_size=7)).item(), abs=1e-6
    )
    # Differentiable: one gradient step on x_hat lowers the loss.
    leaf = x_hat.clone().requires_grad_(True)
    loss = ssim_loss(leaf, x)
    loss.backward()
    assert ssim_loss(leaf.detach() - 0.5 * leaf.grad, x) < loss.detach()


def test_kl_matches_torch_distributions_and_monte_carlo():
    generator = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 2, 3, generator=generator, dtype=torch.float64)
    logvar = torch.randn(4, 2, 3, generator=generator, dtype=torch.float64)
    q = Normal(mu, torch.exp(0.5 * logvar))
    p = Normal(torch.zeros_like(mu), torch.ones_like(mu))
    reference = kl_divergence(q, p).flatten(1).sum(1)  # (4,)
    kl = kl_diagonal_gaussian(mu, logvar)
    assert kl.shape == (4,)
    torch.testing.assert_close(kl, reference)
    # Monte Carlo: E_q[log q(z) - log p(z)] with 50k samples, within 5 standard errors.
    z = q.sample((50_000,))  # (S, 4, 2, 3)
    log_ratio = (q.log_prob(z) - p.log_prob(z)).flatten(2).sum(2)  # (S, 4)
    standard_error = log_ratio.std(0) / math.sqrt(z.shape[0])
    assert torch.all((log_ratio.mean(0) - kl).abs() < 5 * standard_error)


def test_kl_between_two_diagonal_gaussians():
    generator = torch.Generator().manual_seed(1)
    mu1, logvar1, mu2, logvar2 = torch.randn(4, 3, 5, 5, generator=generator, dtype=torch.float64)
    reference = kl_divergence(
        Normal(mu1, torch.exp(0.5 * logvar1)), Normal(mu2, torch.exp(0.5 * logvar2))
    ).flatten(1).sum(1)
    torch.testing.assert_close(kl_between_diagonal_gaussians(mu1, logvar1, mu2, logvar2), reference)
    zeros = torch.zeros_like(mu1)
    torch.testing.assert_close(kl_between_diagonal_gaussians(mu1, logvar1, zeros, zeros), kl_diagonal_gaussian(mu1, logvar1))
    with pytest.raises(DataError):
        kl_diagonal_gaussian(mu1, logvar1[:, :2])


def test_reparameterized_samples_have_the_requested_moments_and_gradients():
    mu = torch.tensor([[0.5, -2.0, 3.0]], dtype=torch.float64)
    logvar = torch.tensor([[0.0, math.log(4.0), math.log(0.09)]], dtype=torch.float64)
    eps = torch.randn(100_000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = reparameterize(mu.expand(100_000, 3), logvar.expand(100_000, 3), eps)
    std = torch.tensor([1.0, 2.0, 0.3], dtype=torch.float64)
    assert torch.all((z.mean(0) - mu[0]).abs() < 5 * std / math.sqrt(z.shape[0]))
    torch.testing.assert_close(z.var(0), std**2, rtol=0.02, atol=0)

    # Gradients: dz/dmu = 1 and dz/dlogvar = 0.5 exp(logvar / 2) eps, element by element.
    mu_leaf = mu.clone().requires_grad_(True)
    logvar_leaf = logvar.clone().requires_grad_(True)
    e = torch.tensor([[1.5, -0.5, 2.0]], dtype=torch.float64)
    reparameterize(mu_leaf, logvar_leaf, e).sum().backward()
    torch.testing.assert_close(mu_leaf.grad, torch.ones_like(mu))
    torch.testing.assert_close(logvar_leaf.grad, 0.5 * std[None] * e)


def test_reconstruction_loss_is_the_declared_weighted_sum():
    x = _images(4, (2, 1, 16, 16))
    x_hat = _images(5, (2, 1, 16, 16)).requires_grad_(True)
    cfg = ReconstructionLossConfig(mse=0.5, l1=2.0, charbonnier=0.0, ssim=0.25, ms_ssim=0.0, perceptual=0.0)
    loss = ReconstructionLoss(cfg, channels=1)
    total, terms = loss(x_hat, x)
    assert set(terms) == {"mse", "l1", "ssim"}  # zero-weight terms are neither computed nor logged
    expected = {"mse": mse_loss(x_hat, x), "l1": l1_loss(x_hat, x), "ssim": ssim_loss(x_hat, x)}
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-6)
        assert not terms[name].requires_grad
    weighted = 0.5 * expected["mse"] + 2 * expected["l1"] + 0.25 * expected["ssim"]
    assert total.item() == pytest.approx(weighted.item(), rel=1e-6)
    total.backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0


def test_reconstruction_loss_config_refuses_bad_weights():
    with pytest.raises(ConfigError, match=">= 0"):
        ReconstructionLossConfig(mse=1.0, l1=-1.0)
    with pytest.raises(ConfigError, match="every weight"):
        ReconstructionLossConfig(mse=0.0)
