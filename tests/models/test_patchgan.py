"""PatchGAN: logit-map size, receptive field measured by gradients, spectral normalisation."""

from __future__ import annotations

import pytest
import torch

from genlab.errors import ConfigError
from genlab.models.patchgan import PatchDiscriminator, patchgan_output_size, patchgan_receptive_field


def test_pix2pix_numbers():
    # Isola et al. 2017: the 3-layer discriminator sees 70x70 patches and maps 256x256 to 30x30.
    assert patchgan_receptive_field(3) == 70
    assert patchgan_output_size(256, 3) == 30


@pytest.mark.parametrize("num_layers, size", [(1, 8), (2, 28), (3, 32)])
def test_output_shape(num_layers, size):
    d = PatchDiscriminator(1, base_channels=4, num_layers=num_layers)
    out = d(torch.randn(2, 1, size, size))
    assert out.shape == (2, 1, patchgan_output_size(size, num_layers), patchgan_output_size(size, num_layers))
    assert out.shape[-1] >= 1


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_receptive_field_measured_by_the_gradient_of_one_logit(num_layers):
    rf = patchgan_receptive_field(num_layers)
    d = PatchDiscriminator(1, base_channels=4, num_layers=num_layers).eval()  # BN eval: no batch coupling
    size = 2 * rf + 8
    x = torch.randn(1, 1, size, size, requires_grad=True)
    logits = d(x)
    c = logits.shape[-1] // 2
    logits[0, 0, c, c].backward()
    seen = x.grad[0, 0].abs() > 0
    rows = torch.nonzero(seen.any(1)).squeeze(1)
    cols = torch.nonzero(seen.any(0)).squeeze(1)
    assert 0 < rows[0] and rows[-1] < size - 1  # the patch lies inside the image (no border effects)
    assert rows[-1] - rows[0] + 1 == rf
    assert cols[-1] - cols[0] + 1 == rf


def test_spectral_norm_makes_every_layer_one_lipschitz():
    d = PatchDiscriminator(3, base_channels=8, num_layers=2, norm="none", spectral_norm=True)
    x = torch.randn(4, 3, 32, 32)
    for _ in range(30):  # power iteration runs once per training-mode forward
        d(x)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4
    for conv in convs:
        sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
        assert abs(float(sigma) - 1.0) < 1e-2
    plain = PatchDiscriminator(3, base_channels=8, num_layers=2, norm="none")
    sigmas = [float(torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)) for m in plain.modules()
              if isinstance(m, torch.nn.Conv2d)]
    assert max(abs(s - 1.0) for s in sigmas) > 0.1


def test_too_small_images_and_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="num_layers"):
        PatchDiscriminator(1, num_layers=3)(torch.randn(1, 1, 8, 8))
    with pytest.raises(ConfigError, match="norm"):
        PatchDiscriminator(1, norm="layer")
    with pytest.raises(ConfigError, match="num_layers"):
        PatchDiscriminator(1, num_layers=0)
