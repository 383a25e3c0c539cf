"""Training health: diversity scores against closed forms, and warnings that fire once per episode."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist
from scipy.stats import entropy

from genlab.data import DataConfig, load_data
from genlab.methods.health import HealthConfig, HealthWarning, TrainingHealth, class_entropy, pixel_diversity


def _quiet_health(**overrides) -> TrainingHealth:
    return TrainingHealth(HealthConfig(**overrides), channels=1, image_size=28)


def _feed(health: TrainingHealth, start: int, values: list[dict]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HealthWarning)
        for i, logs in enumerate(values):
            health.observe(start + i, logs)


def test_class_entropy_matches_scipy_and_its_extremes():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 10, generator=g) * 3
    mean_p = torch.softmax(logits.double(), 1).mean(0).numpy()
    assert class_entropy(logits).item() == pytest.approx(entropy(mean_p), rel=1e-6)
    assert class_entropy(torch.zeros(7, 10)).item() == pytest.approx(math.log(10), rel=1e-6)  # uniform
    one_class = torch.full((7, 10), -50.0)
    one_class[:, 3] = 50.0
    assert class_entropy(one_class).item() < 1e-6
    even = torch.full((10, 10), -50.0)
    even[range(10), range(10)] = 50.0  # ten confident predictions, one per class
    assert class_entropy(even).item() == pytest.approx(math.log(10), rel=1e-6)


def test_pixel_diversity_matches_scipy_pdist():
    x = torch.rand(12, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    expected = pdist(x.flatten(1).double().numpy()).mean() / math.sqrt(16)
    assert pixel_diversity(x).item() == pytest.approx(expected, rel=1e-6)
    assert pixel_diversity(x[:1].expand(5, -1, -1, -1)).item() == 0.0


def test_mode_collapse_fires_on_one_repeated_image_and_not_on_real_digits():
    images = load_data(DataConfig(source="mnist5k")).to_model_range()  # (5000, 1, 28, 28), bundled
    health = _quiet_health(num_samples=200)
    assert health.evaluator_name == "mnist"
    real = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:200]]
    with warnings.catch_warnings():
        warnings.simplefilter("error", HealthWarning)  # any warning here fails the test
        score = health.check_samples(100, real)
    assert score > 2.0  # real digits cover ten classes: close to ln 10 = 2.30
    collapsed = images[:1].expand(200, -1, -1, -1)
    with pytest.warns(HealthWarning, match="mode collapse"):
        score = health.check_samples(200, collapsed)
    assert score < 0.3
    assert health.observe(201, {})["health_mode_collapse"] == 1.0
    # the same collapse at the next check is the same episode: no second warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", HealthWarning)
        health.check_samples(300, lambda: collapsed)
    assert len(health.warnings) == 1


def test_without_an_evaluator_pixel_distances_judge_diversity():
    health = TrainingHealth(HealthConfig(evaluator="auto"), channels=1, image_size=8)  # digits: no evaluator
    assert health.evaluator_name is None
    noise = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", HealthWarning)
        assert health.check_samples(1, noise) > 0.5
    with pytest.warns(HealthWarning, match="pixel distance"):
        health.check_samples(2, noise[:1].expand(64, -1, -1, -1) + 1e-3 * noise)


def test_discriminator_collapse_warns_once_per_episode():
    health = _quiet_health(window=10, d_loss_floor=0.01)
    _feed(health, 0, [{"d_loss": 1.2}] * 30)
    assert health.warnings == []
    _feed(health, 30, [{"d_loss": 1e-4}] * 40)  # the running mean crosses the floor once and stays below
    assert len(health.warnings) == 1 and "discriminator loss collapsed" in health.warnings[0]
    assert health.observe(70, {"d_loss": 1e-4})["health_d_collapse"] == 1.0
    _feed(health, 71, [{"d_loss": 1.0}] * 20)  # recovers: the episode ends
    assert health.observe(91, {"d_loss": 1.0})["health_d_collapse"] == 0.0
    _feed(health, 92, [{"d_loss": 0.0}] * 20)  # a second collapse is a second episode
    assert len(health.warnings) == 2
    mean = health.observe(112, {"d_loss": 0.0})["health_d_loss_mean"]
    assert mean.item() == pytest.approx(0.0)


def test_exploding_gradients_warn_once_per_episode_relative_and_absolute():
    health = _quiet_health(window=50, grad_norm_factor=20.0, grad_norm_max=1e4)
    rng = np.random.default_rng(0)
    healthy = [{"grad_norm_discriminator": float(v), "grad_norm_generator": 1.0} for v in rng.uniform(1, 3, 40)]
    _feed(health, 0, healthy)
    assert health.warnings == []
    spike = {"grad_norm_discriminator": 100.0, "grad_norm_generator": 1.0}  # > 20 x median (~2), < 1e4
    _feed(health, 40, [spike] * 5)
    assert len(health.warnings) == 1 and "grad_norm_discriminator" in health.warnings[0]
    assert health.observe(45, spike)["health_grad_explosion"] == 1.0
    _feed(health, 46, healthy[:5])
    assert health.observe(51, healthy[0])["health_grad_explosion"] == 0.0
    _feed(health, 52, [{"grad_norm_discriminator": 2.0, "grad_norm_generator": float("inf")}])  # absolute limit
    assert len(health.warnings) == 2 and "grad_norm_generator" in health.warnings[1]


def test_diversity_checks_run_every_k_steps_but_not_at_step_zero():
    health = _quiet_health(every=50)
    assert [s for s in range(201) if health.due(s)] == [50, 100, 150, 200]
    assert not _quiet_health(every=0).due(100)
    assert not _quiet_health(enabled=False).due(100)
