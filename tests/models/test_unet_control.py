"""UNet.forward's control inputs (down_residuals, mid_residual, adapter_features) against forward hooks."""

from __future__ import annotations

import pytest
import torch

from genlab.errors import ConfigError
from genlab.models.unet import UNet, UNetConfig, UNetLayer


def _unet() -> UNet:
    torch.manual_seed(0)
    net = UNet(UNetConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=2, attention_resolutions=(4,),
                          norm_groups=4, dropout=0.0), in_channels=2, out_channels=2, image_size=8, num_classes=3)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net.eval()


def _randn(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def test_no_control_is_the_plain_forward_bit_for_bit():
    net = _unet()
    x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([3, 7]), torch.tensor([0, 2])
    zeros = [torch.zeros(s) for s in net.skip_shapes(x)]
    plain = net(x, t, y)
    assert torch.equal(net(x, t, y, down_residuals=None, mid_residual=None, adapter_features=None), plain)
    assert torch.equal(net(x, t, y, down_residuals=zeros, mid_residual=torch.zeros(2, 16, 4, 4)), plain)


def test_down_and_mid_residuals_are_added_to_the_skips_and_the_middle_output():
    net = _unet()
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([3, 7])
    shapes = net.skip_shapes(x)
    assert [s[1:] for s in shapes] == [(8, 8, 8), (8, 8, 8), (8, 8, 8), (8, 4, 4), (16, 4, 4), (16, 4, 4)]
    residuals = _randn(shapes, 1)
    mid = torch.randn(2, 16, 4, 4)
    ours = net(x, t, down_residuals=residuals, mid_residual=mid)
    # Reference: hooks. The j-th decoder layer eats the skips in reverse order as the last channels of its input.
    handles = [net.middle[-1].register_forward_hook(lambda m, i, out: out + mid)]
    layers = [m for m in net.up if isinstance(m, UNetLayer)]
    for layer, r in zip(layers, reversed(residuals)):
        def add_to_skip(module, args, r=r):
            h, *rest = args
            return (torch.cat([h[:, : h.shape[1] - r.shape[1]], h[:, h.shape[1] - r.shape[1]:] + r], 1), *rest)
        handles.append(layer.register_forward_pre_hook(add_to_skip))
    reference = net(x, t)
    for h in handles:
        h.remove()
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    assert not torch.allclose(ours, net(x, t))


def test_adapter_features_join_the_encoder_at_the_end_of_each_level():
    net = _unet()
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([3, 7])
    assert [s[1:] for s in net.level_shapes(x)] == [(8, 8, 8), (16, 4, 4)]
    features = _randn(net.level_shapes(x), 2)
    ours = net(x, t, adapter_features=features)
    handles = [net.down[i].register_forward_hook(lambda m, i, out, f=f: out + f)
               for i, f in zip(net.level_ends, features)]
    reference = net(x, t)
    for h in handles:
        h.remove()
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_residuals_of_the_wrong_shape_are_one_line_errors():
    net = _unet()
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([3, 7])
    with pytest.raises(ConfigError, match="down_residuals: got shapes") as e:
        net(x, t, down_residuals=_randn(net.skip_shapes(x)[:-1], 0))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="mid_residual: got shapes"):
        net(x, t, mid_residual=torch.zeros(2, 8, 4, 4))
    with pytest.raises(ConfigError, match="adapter_features: got shapes"):
        net(x, t, adapter_features=_randn(net.level_shapes(x)[::-1], 0))
