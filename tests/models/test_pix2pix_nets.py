"""pix2pix networks: the U-Net keeps the size, reaches a 1x1 bottleneck and uses its skips; PatchGAN fields."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genlab.models.patchgan import PatchDiscriminator, patchgan_output_size, patchgan_receptive_field
from genlab.models.pix2pix import UNetGenerator, UNetGeneratorConfig, patchgan_layers_for, unet_depth

TINY = UNetGeneratorConfig(base_channels=8, max_channels=32)


def _generator(size: int, cfg: UNetGeneratorConfig = TINY, in_channels: int = 2, out_channels: int = 3) -> UNetGenerator:
    torch.manual_seed(0)
    return UNetGenerator(cfg, in_channels, out_channels, size).eval()


@pytest.mark.parametrize("size, depth", [(8, 3), (28, 5), (32, 5)])
def test_unet_keeps_the_size_and_reaches_a_1x1_bottleneck(size, depth):
    g = _generator(size)
    assert unet_depth(size) == depth == len(g.down) == len(g.up)
    seen = {}
    g.down[-1].register_forward_hook(lambda m, args, out: seen.update(bottleneck=tuple(out.shape)))
    a = torch.randn(2, 2, size, size, requires_grad=True)
    b = g(a)
    assert b.shape == (2, 3, size, size) and b.abs().max() <= 1  # tanh output
    assert seen["bottleneck"] == (2, 32, 1, 1)
    # A 1x1 bottleneck sees the whole input: a corner input pixel moves the opposite corner output.
    b[0, :, -1, -1].sum().backward()
    assert a.grad[0, :, 0, 0].abs().sum() > 0 and a.grad[1].abs().sum() == 0  # eval mode: images independent


def test_28px_output_is_the_centre_crop_of_the_padded_32px_pass():
    g = _generator(28)
    a = torch.randn(2, 2, 28, 28)
    padded = F.pad(a, (2, 2, 2, 2), mode="reflect")  # 28 -> 32, the generator's own padding
    assert torch.allclose(g(a), g(padded)[..., 2:30, 2:30], atol=1e-6)


@pytest.mark.parametrize("block", [1, 2, 4])
def test_every_skip_connection_is_used(block):
    # Training mode without dropout: BatchNorm rescales activations (at initialisation, N(0, 0.02)
    # weights with eval-mode BatchNorm shrink deep signals to ~1e-6) and the pass is deterministic.
    g = _generator(32, UNetGeneratorConfig(base_channels=8, max_channels=32, dropout=0.0)).train()
    a = torch.randn(2, 2, 32, 32)
    reference = g(a)
    handle = g.up[block].register_forward_pre_hook(lambda m, args: (args[0], torch.zeros_like(args[1])))
    try:
        without_skip = g(a)
    finally:
        handle.remove()
    assert (reference - without_skip).abs().max() > 1e-3
    assert torch.equal(g(a), reference)  # and the hook really was the only change


def test_dropout_sits_in_the_first_decoder_blocks_and_is_off_in_eval():
    g = _generator(32, UNetGeneratorConfig(base_channels=8, max_channels=32, dropout=0.5, dropout_blocks=2))
    probabilities = [getattr(block.dropout, "p", 0.0) for block in g.up]
    assert probabilities == [0.5, 0.5, 0.0, 0.0, 0.0]
    a = torch.randn(2, 2, 32, 32)
    assert torch.equal(g(a), g(a))
    g.train()
    assert not torch.equal(g(a), g(a))  # the paper's noise: dropout while training


def _empirical_receptive_field(num_layers: int, size: int) -> int:
    """Side of the input region that one central logit depends on (non-zero input gradient)."""
    torch.manual_seed(0)
    d = PatchDiscriminator(2, base_channels=4, num_layers=num_layers, norm="none").eval()
    x = torch.randn(1, 2, size, size, requires_grad=True)
    logits = d(x)
    h, w = logits.shape[-2:]
    logits[0, 0, h // 2, w // 2].backward()
    touched = x.grad[0].abs().sum(0) > 0  # (H, W)
    rows, cols = touched.any(1).nonzero(), touched.any(0).nonzero()
    assert rows.numel() and cols.numel()
    extent_rows, extent_cols = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
    assert extent_rows == extent_cols
    return extent_rows


@pytest.mark.parametrize("num_layers, field", [(1, 16), (2, 34), (3, 70)])
def test_patchgan_receptive_field_matches_the_gradient_support(num_layers, field):
    assert patchgan_receptive_field(num_layers) == field
    assert _empirical_receptive_field(num_layers, size=2 * field + 8) == field  # the central logit is unpadded


@pytest.mark.parametrize("size, layers", [(8, 1), (28, 1), (32, 1), (64, 1), (128, 2), (256, 3), (512, 4)])
def test_patchgan_depth_gives_about_70_of_256(size, layers):
    assert patchgan_layers_for(size) == layers
    d = PatchDiscriminator(4, base_channels=4, num_layers=layers)
    out = d(torch.randn(2, 4, size, size))
    side = patchgan_output_size(size, layers)
    assert out.shape == (2, 1, side, side) and side >= 1
