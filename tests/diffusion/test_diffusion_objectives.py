"""Prediction targets (eps / x0 / v), their conversions, min-SNR weights and the loss."""

import numpy as np
import pytest
import torch

from genlab.diffusion import (
    PREDICTIONS,
    NoiseSchedule,
    diffusion_loss,
    loss_weight,
    model_output_to_x0_eps,
    training_target,
)
from genlab.errors import ConfigError


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_name("cosine", 1000)


def _batch(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 3, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(n, 3, 4, 4, generator=gen, dtype=torch.float64)
    return x0, eps


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("fractional", [False, True])
def test_targets_round_trip_through_model_output(schedule, prediction, fractional):
    x0, eps = _batch()
    t = torch.tensor([0, 3, 100, 500, 900, 999])
    if fractional:
        t = t.double() + torch.tensor([0.0, 0.25, 0.5, 0.75, 0.1, 0.0], dtype=torch.float64)
    x_t = schedule.q_sample(x0, t, eps)
    target = training_target(prediction, x0, eps, t, schedule)
    x0_back, eps_back = model_output_to_x0_eps(target, x_t, t, schedule, prediction)
    torch.testing.assert_close(x0_back, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(eps_back, eps, rtol=0, atol=1e-9)


def test_v_target_is_salimans_ho_velocity(schedule):
    x0, eps = _batch()
    t = torch.tensor([1, 50, 300, 600, 800, 998])
    abar = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    v = training_target("v", x0, eps, t, schedule)
    torch.testing.assert_close(v, abar.sqrt() * eps - (1 - abar).sqrt() * x0, rtol=1e-12, atol=1e-12)
    # v is the derivative of x_phi = cos(phi) x0 + sin(phi) eps with respect to phi
    x_t = schedule.q_sample(x0, t, eps)
    phi = torch.atan2((1 - abar).sqrt(), abar.sqrt())
    dphi = 1e-6
    x_next = torch.cos(phi + dphi) * x0 + torch.sin(phi + dphi) * eps
    torch.testing.assert_close(v, (x_next - x_t) / dphi, rtol=0, atol=1e-5)


def test_prediction_name_is_checked(schedule):
    x0, eps = _batch(2)
    t = torch.tensor([1, 2])
    with pytest.raises(ConfigError, match="eps, x0, v"):
        training_target("score", x0, eps, t, schedule)
    with pytest.raises(ConfigError, match="score"):
        model_output_to_x0_eps(x0, x0, t, schedule, "score")


def test_min_snr_weights_closed_form(schedule):
    t = torch.tensor([0, 100, 400, 700, 999])
    abar = schedule.alphas_cumprod[t].numpy()
    snr = abar / (1 - abar)
    gamma = 5.0
    expected = {
        "eps": np.minimum(snr, gamma) / snr,
        "x0": np.minimum(snr, gamma),
        "v": np.minimum(snr, gamma) / (snr + 1),
    }
    for prediction in PREDICTIONS:
        weight = loss_weight(t, schedule, prediction, gamma)
        np.testing.assert_allclose(weight.numpy(), expected[prediction], rtol=1e-5)
        assert torch.equal(loss_weight(t, schedule, prediction, None), torch.ones(5))
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        loss_weight(t, schedule, "eps", 0.0)


def test_min_snr_weighted_loss_is_the_same_for_every_parameterisation(schedule):
    """Min-SNR weights the x0 error by min(snr, gamma) whichever target the network regresses."""
    x0, eps = _batch()
    t = torch.tensor([0, 30, 200, 500, 800, 999])
    x_t = schedule.q_sample(x0, t, eps)
    gen = torch.Generator().manual_seed(5)
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=gen, dtype=torch.float64)  # an imperfect model
    eps_hat = model_output_to_x0_eps(x0_hat, x_t, t, schedule, "x0")[1]  # the same model, read as eps
    losses = {}
    for prediction in PREDICTIONS:
        output = training_target(prediction, x0_hat, eps_hat, t, schedule)
        target = training_target(prediction, x0, eps, t, schedule)
        weight = loss_weight(t, schedule, prediction, 5.0).double()
        losses[prediction] = diffusion_loss(output, target, weight)
    snr = schedule.snr(t).double()
    x0_error = ((x0_hat - x0) ** 2).flatten(1).mean(1)  # (N,)
    expected = (snr.clamp(max=5.0) * x0_error).mean()
    for prediction in PREDICTIONS:
        assert losses[prediction].item() == pytest.approx(expected.item(), rel=1e-5)


def test_diffusion_loss_is_weighted_mean_of_per_sample_mse():
    gen = torch.Generator().manual_seed(0)
    output = torch.randn(4, 2, 3, 3, generator=gen)
    target = torch.randn(4, 2, 3, 3, generator=gen)
    weight = torch.tensor([0.0, 1.0, 2.0, 0.5])
    per_sample = [((output[n] - target[n]) ** 2).mean().item() for n in range(4)]
    expected = sum(w * m for w, m in zip(weight.tolist(), per_sample)) / 4
    assert diffusion_loss(output, target, weight).item() == pytest.approx(expected, rel=1e-6)
    assert diffusion_loss(output, target).item() == pytest.approx(sum(per_sample) / 4, rel=1e-6)
    half = diffusion_loss(output.bfloat16(), target.bfloat16(), weight)
    assert half.dtype == torch.float32 and half.item() == pytest.approx(expected, rel=2e-2)
    with pytest.raises(ConfigError, match="shape"):
        diffusion_loss(output, target[:, :1])
