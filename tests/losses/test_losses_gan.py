"""Adversarial losses and penalties (SPEC L4) against their formulas, and which network each term trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genlab.errors import ConfigError, DataError
from genlab.losses import (
    GAN_LOSSES,
    adaptive_weight,
    clip_weights_,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
    r1_penalty,
)


REAL = torch.tensor([2.0, -1.0, 0.5, 3.0], dtype=torch.float64)
FAKE = torch.tensor([-0.5, 1.5, 0.0, -2.0], dtype=torch.float64)


def _log_d(logits):
    """log D = log sigmoid, written without softplus so the check is independent of the implementation."""
    return torch.log(1 / (1 + torch.exp(-logits)))


def _log_one_minus_d(logits):
    return torch.log(1 - 1 / (1 + torch.exp(-logits)))


@pytest.mark.parametrize("kind", GAN_LOSSES)
def test_discriminator_losses_match_their_formulas(kind):
    expected = {
        "vanilla": -_log_d(REAL).mean() - _log_one_minus_d(FAKE).mean(),
        "nonsaturating": -_log_d(REAL).mean() - _log_one_minus_d(FAKE).mean(),
        "hinge": torch.clamp(1 - REAL, min=0).mean() + torch.clamp(1 + FAKE, min=0).mean(),
        "lsgan": 0.5 * ((REAL - 1) ** 2).mean() + 0.5 * (FAKE**2).mean(),
        "wgan": FAKE.mean() - REAL.mean(),
        "wgan-gp": FAKE.mean() - REAL.mean(),
    }[kind]
    torch.testing.assert_close(discriminator_loss(kind, REAL, FAKE), expected)


@pytest.mark.parametrize("kind", GAN_LOSSES)
def test_generator_losses_match_their_formulas_and_push_fakes_towards_real(kind):
    expected = {
        "vanilla": _log_one_minus_d(FAKE).mean(),  # minimise log(1 - D(G(z)))
        "nonsaturating": -_log_d(FAKE).mean(),  # minimise -log D(G(z))
        "hinge": -FAKE.mean(),
        "lsgan": 0.5 * ((FAKE - 1) ** 2).mean(),
        "wgan": -FAKE.mean(),
        "wgan-gp": -FAKE.mean(),
    }[kind]
    fake = FAKE.clone().requires_grad_(True)
    loss = generator_loss(kind, fake)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    if kind == "lsgan":  # pulls every fake score towards the real target 1
        assert torch.all(torch.sign(fake.grad) == torch.sign(FAKE - 1))
    else:  # G lowers its loss by raising D's score of its samples
        assert torch.all(fake.grad < 0)


def test_discriminator_losses_push_real_up_and_fake_down():
    for kind in GAN_LOSSES:
        real = torch.tensor([0.3, -0.2], requires_grad=True)
        fake = torch.tensor([0.1, 0.4], requires_grad=True)  # above the lsgan fake target 0
        discriminator_loss(kind, real, fake).backward()
        assert torch.all(real.grad < 0) and torch.all(fake.grad > 0), kind


def test_smoothed_and_flipped_targets_broadcast_over_patch_logits():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(3, 1, 2, 2, generator=generator, dtype=torch.float64)
    fake = torch.randn(3, 1, 2, 2, generator=generator, dtype=torch.float64)
    a = torch.tensor([0.9, 0.0, 1.1], dtype=torch.float64)  # smoothed, one flipped to 0
    b = torch.tensor([0.2, 1.0, 0.0], dtype=torch.float64)
    a_map, b_map = a.view(3, 1, 1, 1), b.view(3, 1, 1, 1)

    def bce(logits, t):
        return -(t * _log_d(logits) + (1 - t) * _log_one_minus_d(logits)).mean()

    torch.testing.assert_close(discriminator_loss("nonsaturating", real, fake, a, b), bce(real, a_map) + bce(fake, b_map))
    torch.testing.assert_close(
        discriminator_loss("lsgan", real, fake, a, b), 0.5 * ((real - a_map) ** 2).mean() + 0.5 * ((fake - b_map) ** 2).mean()
    )
    constant_targets = 0.5 * ((real - 0.9) ** 2).mean() + 0.5 * ((fake - 0.1) ** 2).mean()
    torch.testing.assert_close(discriminator_loss("lsgan", real, fake, 0.9, 0.1), constant_targets)
    # hinge and wgan ignore targets
    torch.testing.assert_close(discriminator_loss("hinge", real, fake, a, b), discriminator_loss("hinge", real, fake))
    with pytest.raises(ConfigError, match="unknown GAN loss"):
        generator_loss("wasserstein", fake)


def test_each_loss_updates_only_its_network():
    torch.manual_seed(0)
    G, D = nn.Linear(2, 3), nn.Linear(3, 1)
    z, real = torch.randn(5, 2), torch.randn(5, 3)
    fake = G(z)
    # D step: fakes are detached, so G gets no gradient at all.
    discriminator_loss("nonsaturating", D(real), D(fake.detach())).backward()
    assert all(p.grad is None for p in G.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in D.parameters())
    D.zero_grad(set_to_none=True)
    # G step: the loss depends on D's weights too, but backward(inputs=G params) (what ctx.optimize does)
    # leaves D untouched and gives G exactly the autograd gradient.
    g_loss = generator_loss("nonsaturating", D(fake))
    expected = torch.autograd.grad(g_loss, list(G.parameters()), retain_graph=True)
    d_grads = torch.autograd.grad(g_loss, list(D.parameters()), retain_graph=True)
    assert all(g.abs().sum() > 0 for g in d_grads)  # the G loss does depend on D
    g_loss.backward(inputs=list(G.parameters()))
    assert all(p.grad is None for p in D.parameters())
    for parameter, grad in zip(G.parameters(), expected):
        torch.testing.assert_close(parameter.grad, grad)


def test_gradient_penalty_on_a_linear_critic_is_the_weight_norm_penalty():
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Flatten(), nn.Linear(12, 1))
    with torch.no_grad():
        critic[1].weight.mul_(3.0)
    real, fake = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2, requires_grad=True)
    mix = torch.rand(4, 1, 1, 1)
    w = critic[1].weight  # grad_x critic(x) = w at every x
    penalty = gradient_penalty(critic, real, fake, mix)
    norm = w.detach().norm()
    assert penalty.item() == pytest.approx(((norm - 1) ** 2).item(), rel=1e-5)
    assert gradient_penalty(critic, real, fake, mix, target_norm=0.0).item() == pytest.approx((norm**2).item(), rel=1e-5)
    # create_graph: the penalty trains the critic, d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||; never G.
    penalty.backward()
    torch.testing.assert_close(w.grad, 2 * (norm - 1) * w.detach() / norm)
    assert fake.grad is None


def test_gradient_penalty_interpolates_real_and_fake_with_mix():
    # critic(x) = sum x^2 has gradient 2 x_hat: the penalty shows where x_hat = mix real + (1 - mix) fake is.
    real, fake = torch.full((2, 1, 2, 2), 1.0), torch.full((2, 1, 2, 2), 0.0)
    mix = torch.tensor([0.25, 1.0]).view(2, 1, 1, 1)
    penalty = gradient_penalty(lambda x: x.square().flatten(1).sum(1), real, fake, mix)
    x_hat_values = torch.tensor([0.25, 1.0])  # per image (mix real + (1 - mix) fake), all 4 pixels equal
    norms = 2 * x_hat_values * 2  # |2 x_hat| times sqrt(4 pixels)
    assert penalty.item() == pytest.approx(((norms - 1) ** 2).mean().item(), rel=1e-6)
    with pytest.raises(DataError, match="mix"):
        gradient_penalty(lambda x: x.sum(), real, fake, torch.rand(2))


def test_r1_penalty_matches_the_gradient_norm():
    scale = torch.tensor(0.7, requires_grad=True)
    images = torch.randn(3, 1, 4, 4).requires_grad_(True)
    logits = scale * images.square().flatten(1).sum(1)  # grad_x = 2 scale x
    penalty = r1_penalty(logits, images)
    expected = (4 * 0.7**2 * images.detach().square().flatten(1).sum(1)).mean()
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)
    penalty.backward()  # d/dscale of 4 scale^2 E||x||^2 = 8 scale E||x||^2 (create_graph trains D)
    assert scale.grad.item() == pytest.approx((expected * 2 / 0.7).item(), rel=1e-5)
    with pytest.raises(ConfigError, match="requires_grad"):
        r1_penalty(logits, images.detach())


def test_weight_clipping_keeps_every_critic_weight_in_bounds():
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Conv2d(1, 4, 3), nn.LeakyReLU(0.2), nn.Conv2d(4, 1, 3))
    with torch.no_grad():
        for p in critic.parameters():
            p.mul_(100)
    inside = {name: p.detach().clone() for name, p in critic.named_parameters()}
    clip_weights_(critic, 0.01)
    for name, p in critic.named_parameters():
        assert p.abs().max() <= 0.01
        kept = inside[name].abs() <= 0.01
        torch.testing.assert_close(p[kept], inside[name][kept])  # weights already inside are unchanged
        assert torch.all(p[~kept].abs() == 0.01)
    with pytest.raises(ConfigError):
        clip_weights_(critic, 0.0)


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_last_layer():
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6))
    critic = nn.Linear(6, 1)
    z, target = torch.randn(5, 4), torch.randn(5, 6)
    x_hat = decoder(z)
    rec_loss = (x_hat - target).abs().mean()
    g_loss = -critic(x_hat).mean()
    last = decoder[2].weight
    rec_grad = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    expected = rec_grad.norm() / (g_grad.norm() + 1e-4)
    weight = adaptive_weight(rec_loss, g_loss, last)
    assert weight.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not weight.requires_grad
    # Clamped: a vanishing adversarial gradient would otherwise give a huge weight.
    assert adaptive_weight(rec_loss, 1e-12 * g_loss, last, max_weight=50.0).item() == 50.0
    # The graphs survive for the real backward pass afterwards.
    (rec_loss + weight * g_loss).backward()
    assert last.grad is not None
