"""Autoencoder encoder/decoder: padding and cropping for any size, the last layer, config errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genlab.errors import ConfigError
from genlab.models.autoencoder import (
    AutoencoderNetConfig,
    Decoder,
    DenseEncoderHead,
    Encoder,
    crop_to,
    downsampling_factor,
    pad_to_multiple,
)

MULTS = {2: (1, 2), 4: (1, 2, 2), 8: (1, 2, 2, 2)}


def _cfg(f: int, **kw) -> AutoencoderNetConfig:
    return AutoencoderNetConfig(base_channels=8, channel_mult=MULTS[f], norm_groups=4, **kw)


@pytest.mark.parametrize("f", [2, 4, 8])
def test_downsampling_factor_matches_the_network(f):
    cfg = _cfg(f, attention=True)
    assert downsampling_factor(cfg) == f
    enc, dec = Encoder(cfg, 3, 5), Decoder(cfg, 5, 3)
    x = torch.randn(2, 3, 32, 32)
    z = enc(x)
    assert z.shape == (2, 5, 32 // f, 32 // f)
    assert dec(z).shape == (2, 3, 32, 32)
    # f stride-2 stages with attention: every latent position still depends on the input.
    x2 = x.clone()
    x2[0] += 0.5
    moved = (enc(x2) - z).abs().sum(dim=1)  # (N, h, w)
    assert (moved[0] > 0).all() and torch.equal(moved[1], torch.zeros_like(moved[1]))  # images stay independent


@pytest.mark.parametrize("f", [2, 4, 8])
@pytest.mark.parametrize("size", [(28, 28), (27, 30), (9, 16)])
def test_padding_and_cropping_invert_each_other_exactly(f, size):
    # With the network bodies replaced by space-to-depth and its inverse (an exactly invertible
    # "autoencoder"), decode(encode(x), output_size) must return x bit for bit: the decoder crops the
    # very window the encoder padded around.
    cfg = _cfg(f)
    enc, dec = Encoder(cfg, 1, f * f), Decoder(cfg, f * f, 1)
    enc._body = lambda x: F.pixel_unshuffle(x, f)
    dec._body = lambda z: F.pixel_shuffle(z, f)
    x = torch.randn(3, 1, *size)
    z = enc(x)
    assert z.shape[-2:] == (-(-size[0] // f), -(-size[1] // f))
    assert torch.equal(dec(z, output_size=size), x)
    if size[0] % f or size[1] % f:
        assert dec(z).shape[-2:] != size  # without output_size the padded map comes back
        assert torch.equal(crop_to(pad_to_multiple(x, f), size), x)


def test_real_networks_keep_odd_sizes_and_pad_with_zeros():
    cfg = _cfg(4)
    enc, dec = Encoder(cfg, 1, 4), Decoder(cfg, 4, 1)
    x = torch.randn(2, 1, 27, 30)
    assert dec(enc(x), output_size=(27, 30)).shape == (2, 1, 27, 30)
    padded = pad_to_multiple(x, 4)  # 28 x 32: one row of zeros below, a column of zeros on each side
    assert padded.shape[-2:] == (28, 32)
    assert padded[..., -1, :].abs().sum() == 0 and padded[..., 0, 1:-1].abs().min() > 0  # odd margin at the end
    assert padded[..., :, 0].abs().sum() == 0 and padded[..., :, -1].abs().sum() == 0
    assert torch.equal(padded[..., :27, 1:31], x)


def test_last_layer_is_the_final_convolution():
    dec = Decoder(_cfg(4), 4, 1)
    z = torch.randn(2, 4, 7, 7)
    grad = torch.autograd.grad(dec(z).square().sum(), dec.last_layer)[0]
    assert grad.abs().sum() > 0
    with torch.no_grad():
        dec.last_layer.zero_()
        dec.conv_out.bias.fill_(0.25)
    assert torch.equal(dec(z), torch.full((2, 1, 28, 28), 0.25))  # nothing after it


def test_dense_head_sees_every_position():
    head = DenseEncoderHead(4, (7, 7), 16)
    h = torch.randn(1, 4, 7, 7, requires_grad=True)
    head(h).sum().backward()
    assert (h.grad != 0).all()


@pytest.mark.parametrize("bad, match", [
    (dict(channel_mult=()), "channel_mult"),
    (dict(channel_mult=(1, 0)), "channel_mult"),
    (dict(norm_groups=3), "norm_groups"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_settings_are_config_errors(bad, match):
    cfg = AutoencoderNetConfig(**{**dict(base_channels=8, channel_mult=(1, 2), norm_groups=4), **bad})
    with pytest.raises(ConfigError, match=match):
        Encoder(cfg, 1, 4)
