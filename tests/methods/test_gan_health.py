"""How both GAN methods feed the training-health monitor (methods/gan_health.py): the signals it gets, when
the diversity check runs, and that the fixed batch is fixed and touches neither the run's RNG nor G's state."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from genlab.config import build_config
from genlab.methods import DataInfo
from genlab.methods.gan import GAN, GANConfig
from genlab.methods.stylegan import StyleGAN, StyleGANConfig
from genlab.methods.health import HealthWarning
from methods.test_stylegan_method import TINY_STYLEGAN
from tiny_configs import TINY_DCGAN

DIGITS = DataInfo(channels=1, image_size=8, num_classes=10)
HEALTH = ["model.health.every=3", "model.health.evaluator=none", "model.health.num_samples=20", "model.health.window=4"]


def _gan(*overrides: str) -> GAN:
    torch.manual_seed(0)
    return GAN(build_config("gan", GANConfig, overrides=[*TINY_DCGAN, *HEALTH, *overrides]).model, DIGITS)


def _stylegan(*overrides: str) -> StyleGAN:
    torch.manual_seed(0)
    return StyleGAN(build_config("stylegan", StyleGANConfig, overrides=[*TINY_STYLEGAN, *HEALTH, *overrides]).model,
                    DIGITS)


BUILDERS = {"gan": _gan, "stylegan": _stylegan}


@pytest.mark.parametrize("name", BUILDERS)
def test_the_fixed_batch_is_fixed_and_leaves_rng_and_generator_alone(name):
    method = BUILDERS[name]("model.class_conditional=true")
    method.train()
    rng = torch.random.get_rng_state()
    state = {k: v.clone() for k, v in method.generator.state_dict().items()}  # BatchNorm statistics included
    first, second = method.health_samples(), method.health_samples()
    assert first.shape == (20, 1, 8, 8) and torch.equal(first, second)
    assert torch.equal(torch.random.get_rng_state(), rng)  # draws nothing from the global stream
    assert method.generator.training  # mode restored
    assert all(torch.equal(v, method.generator.state_dict()[k]) for k, v in state.items())
    # Balanced labels 0, 1, ..., 9, 0, ...: the batch is G's eval-mode output for exactly those classes.
    method.generator.eval()
    labels = torch.arange(20) % 10
    assert torch.equal(first, method.sample(20, generator=torch.Generator().manual_seed(1234), labels=labels))
    assert not torch.equal(first, method.sample(20, generator=torch.Generator().manual_seed(1234),
                                                labels=(labels + 1) % 10))


@pytest.mark.parametrize("name", BUILDERS)
def test_watch_health_feeds_d_loss_and_grad_norms_and_checks_diversity_when_due(name):
    method = BUILDERS[name]()
    calls = []
    method.health_samples = lambda: calls.append(1) or torch.zeros(20, 1, 8, 8)  # a collapsed batch
    d_losses = [0.5, 1.5, 1.0, 2.0, 3.0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HealthWarning)
        for step, d in enumerate(d_losses):
            ctx = SimpleNamespace(step=step, logs={"grad_norm_generator": torch.tensor(1.0), "lr": torch.tensor(9e9)})
            logs = method.watch_health(ctx, torch.tensor(d))
    assert calls == [1]  # step 3 only (every = 3, never at step 0)
    assert logs["health_d_loss_mean"] == pytest.approx(sum(d_losses[1:]) / 4)  # window 4
    assert logs["health_diversity"] == 0.0 and logs["health_mode_collapse"] == 1.0
    assert logs["health_grad_explosion"] == 0.0  # lr is not a gradient norm, however large
    assert sum("mode collapse" in str(w.message) for w in caught) == 1


def test_a_critic_feeds_no_d_loss_and_a_disabled_monitor_logs_nothing():
    critic = _gan("model.loss=wgan-gp", "model.norm_d=none")
    logs = critic.watch_health(SimpleNamespace(step=1, logs={}), None)
    assert "health_d_loss_mean" not in logs and "health_grad_explosion" in logs
    off = _stylegan("model.health.enabled=false")
    assert off.health is None and off.watch_health(SimpleNamespace(step=3, logs={}), torch.tensor(1.0)) == {}
