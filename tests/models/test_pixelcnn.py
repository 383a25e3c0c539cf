"""Gated PixelCNN: causal masks of type A and B, and no blind spot (checked with autograd)."""

from __future__ import annotations

import pytest
import torch

from genlab.errors import ConfigError
from genlab.models.pixelcnn import GatedMaskedLayer, GatedPixelCNN, PixelCNNConfig

H = W = 5


def _dependence(fn, x: torch.Tensor) -> torch.Tensor:
    """(H*W, H*W) bool: entry [p, q] says output position p depends on input position q (raster order)."""
    x = x.clone().requires_grad_(True)
    out = fn(x)  # (1, C_out, H, W)
    r = torch.randn(out.shape[1], generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    rows = []
    for p in range(H * W):
        i, j = divmod(p, W)
        (grad,) = torch.autograd.grad((out[0, :, i, j] * r).sum(), x, retain_graph=True)
        rows.append(grad[0].abs().sum(0).flatten() > 0)  # (H*W,)
    return torch.stack(rows)


def _strictly_before() -> torch.Tensor:
    return torch.ones(H * W, H * W, dtype=torch.bool).tril(diagonal=-1)  # [p, q] = q < p


@pytest.mark.parametrize("mask", ["A", "B"])
def test_single_layer_mask_types(mask):
    torch.manual_seed(0)
    layer = GatedMaskedLayer(channels=4, kernel_size=3, mask=mask).double()
    x = torch.randn(1, 4, H, W, dtype=torch.double)
    dep = _dependence(lambda t: layer(t, t)[1], x)  # the horizontal stack's output, both stacks fed x
    eye = torch.eye(H * W, dtype=torch.bool)
    # Never any position after p in raster order, whatever the mask.
    assert not (dep & ~(_strictly_before() | eye)).any()
    # Type A excludes the current position; type B (fed features of positions < p) includes it.
    assert (dep & eye).any(dim=1).tolist() == [mask == "B"] * (H * W)
    # Both see their left neighbour and the row above (through the shifted vertical stack).
    assert dep[2 * W + 2, 2 * W + 1] and dep[2 * W + 2, W + 3]


def test_full_network_is_causal_without_blind_spot():
    # Kernel 3 widens the field by one row/column per layer: 4 layers cover any earlier position of
    # a 5x5 map, including the upper right that a stack of masked 3x3 convolutions never sees.
    torch.manual_seed(0)
    net = GatedPixelCNN(PixelCNNConfig(hidden_channels=8, num_layers=4, kernel_size=3, head_channels=16),
                        num_codes=7).double()
    x = net.embed(torch.randint(0, 7, (1, H, W))).detach()
    dep = _dependence(net.logits_from_embedding, x)
    assert torch.equal(dep, _strictly_before())


def test_shallow_network_sees_only_its_receptive_field():
    # One layer of kernel 3: the vertical conv covers rows i-1..i and is shifted down one row, so
    # position (2, 1) sees rows 0..1 at columns 0..2 and (2, 0) on its left; not column 3, not itself.
    torch.manual_seed(0)
    net = GatedPixelCNN(PixelCNNConfig(hidden_channels=8, num_layers=1, kernel_size=3, head_channels=16),
                        num_codes=7).double()
    dep = _dependence(net.logits_from_embedding, net.embed(torch.randint(0, 7, (1, H, W))).detach())
    seen = {divmod(q, W) for q in torch.nonzero(dep[2 * W + 1]).flatten().tolist()}
    assert seen == {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)}


def test_class_conditioning_changes_logits_and_is_required():
    torch.manual_seed(0)
    net = GatedPixelCNN(PixelCNNConfig(hidden_channels=8, num_layers=2, kernel_size=3, head_channels=16),
                        num_codes=5, num_classes=3)
    codes = torch.randint(0, 5, (2, H, W))
    a = net(codes, torch.tensor([0, 0]))
    b = net(codes, torch.tensor([1, 1]))
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # first position too: the class is its only input
    assert (a[:, :, 0, 0] - b[:, :, 0, 0]).abs().max() > 1e-4
    with pytest.raises(ConfigError, match="labels"):
        net(codes)


def test_even_kernel_is_rejected():
    with pytest.raises(ConfigError, match="kernel_size=4"):
        GatedPixelCNN(PixelCNNConfig(kernel_size=4), num_codes=5)


def test_rows_below_are_never_read():
    # The sampler runs the network on rows 0..i only: the logits of those rows must not change.
    torch.manual_seed(0)
    net = GatedPixelCNN(PixelCNNConfig(hidden_channels=8, num_layers=3, kernel_size=5, head_channels=16), num_codes=7)
    codes = torch.randint(0, 7, (2, H, W))
    full = net(codes)
    for i in range(H):
        assert torch.allclose(net(codes[:, : i + 1]), full[:, :, : i + 1], atol=1e-6)
