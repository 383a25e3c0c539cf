"""DCGAN networks: sizing, projection discriminator formula, spectral norm, per-sample norms, conditioning."""

from __future__ import annotations

import pytest
import torch

from genlab.errors import ConfigError
from genlab.models.dcgan import Discriminator, Generator, base_grid


@pytest.mark.parametrize("size, expected", [(8, (4, 1)), (28, (7, 2)), (32, (4, 3)), (64, (4, 4)), (12, (6, 1))])
def test_base_grid_factors_the_image_size(size, expected):
    s, k = base_grid(size)
    assert (s, k) == expected and s * 2**k == size


@pytest.mark.parametrize("size", [7, 9, 2, 50 * 2 + 1])
def test_unsizable_images_are_refused(size):
    with pytest.raises(ConfigError, match=str(size)):
        base_grid(size)


@pytest.mark.parametrize("size, upsample", [(8, "transposed"), (28, "upsample"), (32, "transposed")])
def test_generator_levels_and_range(size, upsample):
    torch.manual_seed(0)
    g = Generator(16, 3, size, base_channels=8, upsample=upsample).eval()
    s, k = base_grid(size)
    x = g(torch.randn(5, 16) * 30)  # large z: tanh saturates but never leaves [-1, 1]
    assert x.shape == (5, 3, size, size) and x.abs().max() <= 1
    ups = [m for m in g.modules() if isinstance(m, (torch.nn.ConvTranspose2d, torch.nn.Upsample))]
    assert len(ups) == k  # one x2 level per factor of 2 between the base grid and the image
    assert g.stem.out_features == 8 * 2 ** (k - 1) * s * s  # widest at the base grid


def test_projection_discriminator_equals_its_formula():
    torch.manual_seed(0)
    d = Discriminator(1, 8, base_channels=8, norm="none", num_classes=10).eval()
    torch.nn.init.normal_(d.class_embed.weight)  # make the projection term large
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 3, 3, 9, 1, 0])
    phi = d.features(x)  # (6, F)
    expected = phi @ d.head.weight[0] + d.head.bias[0] + (d.class_embed.weight[y] * phi).sum(1)
    assert torch.allclose(d(x, y), expected, atol=1e-5)
    # The class enters only through <V y, phi(x)>: the difference between two labels is linear in V.
    y2 = (y + 1) % 10
    diff = ((d.class_embed.weight[y] - d.class_embed.weight[y2]) * phi).sum(1)
    assert torch.allclose(d(x, y) - d(x, y2), diff, atol=1e-5) and diff.abs().min() > 1e-3


def test_spectral_norm_bounds_every_weight_of_the_discriminator():
    torch.manual_seed(0)
    d = Discriminator(1, 28, base_channels=8, norm="none", spectral_norm=True, num_classes=10)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    for _ in range(60):  # one power iteration per training-mode forward
        d(x, y)
    d.eval()
    layers = [m for m in d.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Embedding))]
    assert len(layers) == 4  # 2 convs, head, projection
    for m in layers:
        sigma = torch.linalg.matrix_norm(m.weight.reshape(m.weight.shape[0], -1), ord=2)
        assert abs(sigma.item() - 1.0) < 0.02, (m, sigma)
        raw = m.parametrizations.weight.original
        assert abs(torch.linalg.matrix_norm(raw.reshape(raw.shape[0], -1), ord=2) - 1) > 0.1  # SN did the work


def test_instance_and_no_norm_treat_samples_independently_but_batchnorm_does_not():
    torch.manual_seed(0)
    z = torch.randn(4, 16)
    for norm, independent in [("instance", True), ("none", True), ("batch", False)]:
        g = Generator(16, 1, 8, base_channels=8, norm=norm).train()
        d = Discriminator(1, 8, base_channels=8, norm=norm).train()
        x = g(z)
        alone, together = g(z[:1]), x[:1]
        logits_alone, logits_together = d(x[:2])[:1], d(x)[:1]
        if independent:
            assert torch.allclose(alone, together, atol=1e-5) and torch.allclose(logits_alone, logits_together, atol=1e-5)
        else:  # batch statistics couple the samples (why separate_batches and wgan-gp care)
            assert not torch.allclose(alone, together, atol=1e-4)


def test_conditional_generator_uses_the_label_and_requires_it():
    torch.manual_seed(0)
    g = Generator(16, 1, 8, base_channels=8, num_classes=10).eval()
    z = torch.randn(3, 16)
    a, b = g(z, torch.tensor([1, 1, 1])), g(z, torch.tensor([2, 2, 2]))
    assert (a - b).abs().max() > 1e-3
    # the label enters through its embedding only: equal embeddings give equal images
    with torch.no_grad():
        g.class_embed.weight[2] = g.class_embed.weight[1]
    assert torch.allclose(g(z, torch.tensor([2, 2, 2])), a)
    with pytest.raises(ConfigError):
        g(z)
    with pytest.raises(ConfigError):
        Generator(16, 1, 8)(z, torch.tensor([1, 1, 1]))


def test_generator_dropout_is_random_in_training_and_off_in_eval():
    torch.manual_seed(0)
    g = Generator(16, 1, 28, base_channels=8, norm="none", dropout=0.5)
    z = torch.randn(2, 16)
    assert not torch.equal(g(z), g(z))
    g.eval()
    assert torch.equal(g(z), g(z))
