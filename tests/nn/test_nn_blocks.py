"""Residual block, down- and upsampling against explicit formulas and their init invariants."""

import pytest
import torch
import torch.nn.functional as F

from genlab.errors import ConfigError
from genlab.nn.blocks import Downsample, ResBlock, Upsample, group_norm


def randomise_(module):
    """Give every parameter (including zero-initialised ones) a random value."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.2)
    return module


@pytest.mark.parametrize("scale_shift", [False, True])
def test_resblock_is_identity_at_init(scale_shift):
    torch.manual_seed(0)
    block = ResBlock(16, 16, emb_dim=10, use_scale_shift_norm=scale_shift, norm_groups=8)
    x, emb = torch.randn(2, 16, 5, 5), torch.randn(2, 10)
    assert torch.equal(block(x, emb), x)


def test_resblock_with_new_width_is_its_skip_projection_at_init():
    torch.manual_seed(0)
    block = ResBlock(8, 16, emb_dim=10, norm_groups=4)
    x, emb = torch.randn(2, 8, 5, 5), torch.randn(2, 10)
    expected = F.conv2d(x, block.skip.weight, block.skip.bias)
    torch.testing.assert_close(block(x, emb), expected)


@pytest.mark.parametrize("scale_shift", [False, True])
def test_resblock_matches_explicit_formula(scale_shift):
    torch.manual_seed(0)
    block = randomise_(ResBlock(8, 12, emb_dim=6, use_scale_shift_norm=scale_shift, norm_groups=4))
    block.eval()
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 6)
    h = F.conv2d(F.silu(F.group_norm(x, 4, block.norm1.weight, block.norm1.bias)),
                 block.conv1.weight, block.conv1.bias, padding=1)
    e = F.linear(F.silu(emb), block.emb_proj.weight, block.emb_proj.bias)[:, :, None, None]
    norm2 = lambda z: F.group_norm(z, 4, block.norm2.weight, block.norm2.bias)  # noqa: E731
    if scale_shift:  # ADM: GN(h) * (1 + scale) + shift
        h = norm2(h) * (1 + e[:, :12]) + e[:, 12:]
    else:  # DDPM: GN(h + W e)
        h = norm2(h + e)
    h = F.conv2d(F.silu(h), block.conv2.weight, block.conv2.bias, padding=1)
    expected = F.conv2d(x, block.skip.weight, block.skip.bias) + h
    torch.testing.assert_close(block(x, emb), expected)


def test_resblock_dropout_only_in_training():
    torch.manual_seed(0)
    block = randomise_(ResBlock(8, 8, emb_dim=4, dropout=0.5, norm_groups=4))
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 4)
    block.eval()
    assert torch.equal(block(x, emb), block(x, emb))
    block.train()
    assert not torch.equal(block(x, emb), block(x, emb))


def test_downsample_and_upsample():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    down, up = Downsample(4), Upsample(4)
    torch.testing.assert_close(down(x), F.conv2d(x, down.conv.weight, down.conv.bias, stride=2, padding=1))
    assert down(x).shape == (2, 4, 3, 3)
    doubled = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest neighbour
    torch.testing.assert_close(up(x), F.conv2d(doubled, up.conv.weight, up.conv.bias, padding=1))


def test_group_norm_rejects_groups_that_do_not_divide():
    with pytest.raises(ConfigError, match="norm_groups=32 does not divide the channel count 48"):
        group_norm(48, 32)
