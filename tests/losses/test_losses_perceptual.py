"""Perceptual (LPIPS-style) and style losses (SPEC L3, L7) on the shipped evaluator and a random VGG16."""

from __future__ import annotations

import copy
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VGG16_Weights
from torchvision.models.vgg import cfgs, make_layers
from torchvision.transforms.functional import gaussian_blur

import genlab.losses as losses
from genlab.errors import ConfigError, DataError
from genlab.losses import PerceptualLoss, ReconstructionLoss, ReconstructionLossConfig, gram_matrix, style_loss


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """Eight digit-like stroke images (rings, bars, crosses; white on black) of 28x28 in [-1, 1]: (8, 1, 28, 28)."""
    coordinates = torch.arange(28, dtype=torch.float32) - 13.5
    y, x = coordinates[:, None], coordinates[None, :]
    radius = (x**2 + y**2).sqrt()
    strokes = []
    for i in range(8):
        shift = i - 3.5
        ring = torch.exp(-((radius - 6 - i % 3 * 1.5) ** 2) / 2)  # "0"
        bar = torch.exp(-((x - shift) ** 2) / 2) * (y.abs() < 9)  # "1"
        cross = torch.exp(-((x - y + shift) ** 2) / 2) * (radius < 10)  # a diagonal stroke
        strokes.append([ring, bar, ring + cross, bar + cross][i % 4].clamp(max=1.0))
    return torch.stack(strokes)[:, None] * 2 - 1


@pytest.fixture(scope="module")
def mnist_loss() -> PerceptualLoss:
    return PerceptualLoss("evaluator:mnist", channels=1)


@pytest.fixture
def random_vgg(monkeypatch):
    """VGG16 features with random weights instead of the ImageNet download."""

    def load():
        torch.manual_seed(0)
        return make_layers(cfgs["D"])

    monkeypatch.setattr(losses, "_load_vgg16_features", load)


def test_perceptual_distance_is_zero_for_identical_and_grows_with_blur(digits, mnist_loss):
    assert mnist_loss(digits, digits).item() == 0.0
    blur_1 = gaussian_blur(digits, kernel_size=13, sigma=1.0)
    blur_2 = gaussian_blur(digits, kernel_size=13, sigma=2.0)
    d1, d2 = mnist_loss(blur_1, digits), mnist_loss(blur_2, digits)
    assert 0 < d1 < d2
    assert d2 <= 4.0  # unit-normalised features: each layer's distance is at most 4


def test_perceptual_distance_is_the_weighted_lpips_formula(digits, mnist_loss):
    x_hat = gaussian_blur(digits, kernel_size=13, sigma=1.5)
    features_hat, features = mnist_loss.features(x_hat), mnist_loss.features(digits)
    assert len(features) == 4  # one per conv block of the evaluator's two stages
    distances = []
    for f_hat, f in zip(features_hat, features):
        n_hat = f_hat / f_hat.norm(dim=1, keepdim=True).clamp_min(1e-10)
        n = f / f.norm(dim=1, keepdim=True).clamp_min(1e-10)
        distances.append(((n_hat - n) ** 2).sum(1).mean())
    assert mnist_loss(x_hat, digits).item() == pytest.approx(torch.stack(distances).mean().item(), rel=1e-5)
    weighted = PerceptualLoss("evaluator:mnist", channels=1, layer_weights=(0.0, 2.0, 0.0, 1.0))
    assert weighted(x_hat, digits).item() == pytest.approx((2 * distances[1] + distances[3]).item(), rel=1e-5)
    # The taps are the evaluator's own activations: the last one is its body up to the second stage's last block.
    body = mnist_loss.network.classifier.body
    torch.testing.assert_close(features[-1], body[:5](digits))


def test_perceptual_gradients_reach_x_hat_only(digits, mnist_loss):
    x = digits.clone().requires_grad_(True)
    x_hat = gaussian_blur(digits, kernel_size=13, sigma=1.0).requires_grad_(True)
    mnist_loss(x_hat, x).backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0
    assert x.grad is None
    assert all(p.grad is None for p in mnist_loss.network.parameters())


def test_frozen_network_is_not_owned_and_stays_in_eval_mode(digits):
    class Owner(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = nn.Conv2d(1, 1, 3, padding=1)
            self.reconstruction = ReconstructionLoss(ReconstructionLossConfig(mse=1.0, perceptual=1.0), channels=1)

    owner = Owner()
    assert [id(p) for p in owner.parameters()] == [id(p) for p in owner.decoder.parameters()]
    assert set(owner.state_dict()) == {"decoder.weight", "decoder.bias"}
    perceptual = owner.reconstruction.perceptual
    network = perceptual.network
    running_mean = network.classifier.body[0][1].running_mean.clone()
    owner.train()
    assert not network.training and not any(m.training for m in network.modules())
    total, terms = owner.reconstruction(owner.decoder(digits), digits)
    assert set(terms) == {"mse", "perceptual"} and terms["perceptual"] > 0
    torch.testing.assert_close(network.classifier.body[0][1].running_mean, running_mean)  # BN stats untouched
    # EMA copies share the frozen network rather than duplicating it.
    assert copy.deepcopy(owner).reconstruction.perceptual.network is network


def test_rgb_inputs_use_the_luminance_and_other_sizes_are_resized(digits, mnist_loss):
    rgb = PerceptualLoss("evaluator:mnist", channels=3)
    tint = torch.tensor([1.0, 0.6, 0.2]).view(1, 3, 1, 1)
    x, x_hat = (digits * tint), (gaussian_blur(digits, 13, 1.0) * tint)
    luma = torch.tensor([0.299, 0.587, 0.114])
    grey = lambda images: torch.einsum("nchw,c->nhw", images, luma)[:, None]  # noqa: E731
    assert rgb(x_hat, x).item() == pytest.approx(mnist_loss(grey(x_hat), grey(x)).item(), rel=1e-5)
    small, small_hat = F.avg_pool2d(digits, 2), F.avg_pool2d(gaussian_blur(digits, 13, 2.0), 2)  # 14x14
    up = lambda images: F.interpolate(images, size=(28, 28), mode="bilinear", antialias=True)  # noqa: E731
    assert mnist_loss(small_hat, small).item() == pytest.approx(mnist_loss(up(small_hat), up(small)).item(), rel=1e-5)
    with pytest.raises(DataError, match="expects images"):
        mnist_loss(x_hat, x)


def test_vgg16_path_with_random_weights(random_vgg, digits):
    loss = PerceptualLoss("auto", channels=3)
    assert loss.network_name == "auto" and isinstance(loss.network, losses._VGGFeatures)
    assert list(loss.parameters()) == [] and len(loss.state_dict()) == 0
    x = digits[:2, :, :8, :8].expand(-1, 3, -1, -1) * torch.tensor([1.0, 0.5, -0.5]).view(1, 3, 1, 1)
    features = loss.features(x)
    # 8x8 inputs are upsampled to 32x32, so relu5_3 (1/16) still has 2x2 positions.
    assert [tuple(f.shape[1:]) for f in features] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2)]
    # [-1, 1] -> ImageNet normalisation before the first block.
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    big = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)
    torch.testing.assert_close(features[0], loss.network.features[:4](((big + 1) / 2 - mean) / std))
    assert loss(x, x).item() == 0.0 and loss(x.flip(-1), x).item() > 0
    # Grey images are repeated to RGB.
    grey = PerceptualLoss("vgg16", channels=1)
    g = digits[:2]
    g_hat = gaussian_blur(g, 13, 1.0)
    assert grey.features(g)[-1].shape[-2:] == (2, 2)  # 28x28 is upsampled to 32x32 as well
    assert grey(g_hat, g).item() == pytest.approx(loss(g_hat.expand(-1, 3, -1, -1), g.expand(-1, 3, -1, -1)).item(), rel=1e-5)


def test_vgg16_offline_raises_a_one_line_config_error(monkeypatch, tmp_path):
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(VGG16_Weights, "get_state_dict", offline)
    with pytest.raises(ConfigError) as error:
        PerceptualLoss("vgg16", channels=3)
    message = str(error.value)
    assert "\n" not in message and "evaluator:mnist" in message and str(tmp_path) in message


def test_bad_perceptual_settings_are_config_errors():
    with pytest.raises(ConfigError, match="unknown perceptual network"):
        PerceptualLoss("resnet50", channels=1)
    with pytest.raises(ConfigError, match="unknown perceptual network"):
        PerceptualLoss("evaluator:cifar", channels=1)
    with pytest.raises(ConfigError, match="'auto' picks by channels"):
        PerceptualLoss("auto", channels=2)
    with pytest.raises(ConfigError, match="layer_weights"):
        PerceptualLoss("evaluator:mnist", channels=1, layer_weights=(1.0, 1.0))


def test_gram_matrix_and_style_loss():
    generator = torch.Generator().manual_seed(0)
    f = torch.randn(2, 3, 4, 5, generator=generator, dtype=torch.float64)
    expected = torch.stack([
        torch.tensor([[(f[n, i] * f[n, j]).sum() for j in range(3)] for i in range(3)], dtype=torch.float64) for n in range(2)
    ]) / (3 * 4 * 5)
    torch.testing.assert_close(gram_matrix(f), expected)
    # Gram matrices ignore where features are: a spatial shuffle has zero style loss, other features do not.
    shuffled = f.flatten(2)[..., torch.randperm(20, generator=generator)].view_as(f)
    other = torch.randn(2, 3, 4, 5, generator=generator, dtype=torch.float64)
    assert style_loss([f], [shuffled]).item() == pytest.approx(0.0, abs=1e-12)
    expected_loss = ((gram_matrix(f) - gram_matrix(other)) ** 2).sum((1, 2)).mean()
    assert style_loss([f, f], [other, f], layer_weights=(3.0, 1.0)).item() == pytest.approx(3 * expected_loss.item())


def test_perceptual_style_loss_broadcasts_one_style_image(digits, mnist_loss):
    x_hat, style = digits[:4], digits[4:5]
    one = mnist_loss.style(x_hat, style)
    assert one.item() > 0 and mnist_loss.style(style, style).item() == 0.0
    assert one.item() == pytest.approx(mnist_loss.style(x_hat, style.expand(4, -1, -1, -1)).item(), rel=1e-6)
