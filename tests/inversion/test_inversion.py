"""GAN inversion by optimisation and latent editing directions (SPEC G8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from genlab.errors import ConfigError
from genlab.inversion import edit_along, principal_directions, project
from genlab.methods.capabilities import GANLatent
from genlab.metrics import psnr


class _LinearGAN(nn.Module, GANLatent):
    """G(z) = tanh(A z + b) as a 1x4x4 image: inverting it is a smooth problem with a unique answer."""

    latent_dim = 3

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.linear = nn.Linear(3, 16)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(16, 3, generator=g) * 0.4)
            self.linear.bias.zero_()

    @property
    def device(self):
        return self.linear.weight.device

    def synthesize(self, z, labels=None):
        return torch.tanh(self.linear(z)).view(-1, 1, 4, 4)


def test_projection_recovers_the_latent_of_a_generated_image_and_leaves_g_unchanged():
    gan = _LinearGAN()
    before = {k: v.clone() for k, v in gan.state_dict().items()}
    z_true = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = gan.synthesize(z_true)
    result = project(gan, target, steps=400, lr=0.05, perceptual_weight=0.0, prior_weight=0.0)
    torch.testing.assert_close(result.latents, z_true, atol=2e-2, rtol=0)
    assert psnr(result.images, target, reduction="none").min() > 40
    assert result.losses[-1] < 1e-3 * result.losses[0]
    for k, v in gan.state_dict().items():
        assert torch.equal(v, before[k])
        assert gan.linear.weight.grad is None


def test_projection_starts_from_the_given_init():
    gan = _LinearGAN()
    z = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        target = gan.synthesize(z)
    result = project(gan, target, steps=0, perceptual_weight=0.0, init=z)
    assert torch.equal(result.latents, z)
    torch.testing.assert_close(result.images, target)


def test_w_space_needs_a_stylegan():
    with pytest.raises(ConfigError, match="StyleGAN"):
        project(_LinearGAN(), torch.zeros(1, 1, 4, 4), space="w", steps=1, perceptual_weight=0.0)


def test_principal_directions_match_a_reference_pca():
    from sklearn.decomposition import PCA

    g = torch.Generator().manual_seed(3)
    latents = torch.randn(500, 4, generator=g) * torch.tensor([3.0, 2.0, 1.0, 0.5]) @ torch.linalg.qr(
        torch.randn(4, 4, generator=g))[0]
    mean, directions, stds = principal_directions(latents, k=2)
    reference = PCA(n_components=2).fit(latents.numpy().astype(np.float64))
    for mine, theirs in zip(directions.numpy(), reference.components_):
        assert abs(abs(float(np.dot(mine, theirs))) - 1) < 1e-5  # same axis up to sign
    np.testing.assert_allclose(stds.numpy() ** 2, reference.explained_variance_, rtol=1e-4)
    np.testing.assert_allclose(mean.numpy(), reference.mean_, atol=1e-5)


def test_edit_at_zero_strength_is_the_inversion_and_moves_linearly_in_latent():
    gan = _LinearGAN()
    z = torch.randn(2, 3, generator=torch.Generator().manual_seed(4))
    direction = torch.tensor([1.0, 0.0, 0.0])
    edits = edit_along(gan, z, direction, std=0.5, space="z", strengths=torch.tensor([-2.0, 0.0, 2.0]))
    with torch.no_grad():
        torch.testing.assert_close(edits[:, 1], gan.synthesize(z))
        torch.testing.assert_close(edits[:, 2], gan.synthesize(z + torch.tensor([1.0, 0, 0])))


def test_projection_reports_every_optimisation_step():
    gan = _LinearGAN()
    target = gan.synthesize(torch.randn(2, 3, generator=torch.Generator().manual_seed(2))).detach()
    seen = []
    result = project(gan, target, steps=7, perceptual_weight=0.0, progress=True,
                     callback=lambda step, loss: seen.append((step, loss)))
    assert [s for s, _ in seen] == list(range(7)) and [l for _, l in seen] == result.losses
