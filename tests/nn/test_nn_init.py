"""The DCGAN initialisation: moments of the drawn weights, zero biases, every layer kind and nesting depth."""

from __future__ import annotations

import torch
from torch import nn

from genlab.nn.init import dcgan_init_


def test_weights_are_normal_0_002_norm_scales_normal_1_002_and_biases_zero():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(64, 128, 4), nn.BatchNorm2d(4096),
        nn.Sequential(nn.ConvTranspose2d(128, 64, 4), nn.InstanceNorm2d(4096, affine=True)),  # nested
        nn.Linear(512, 512), nn.InstanceNorm2d(8),  # the last one has no parameters
    )
    for p in net.parameters():  # start far from the target so that nothing passes by accident
        nn.init.constant_(p, 5.0)
    assert dcgan_init_(net) is net
    weighted = [net[0], net[2][0], net[3]]
    for m in weighted:  # >= 131k draws each: the std estimate is within ~0.5% of 0.02
        w = m.weight.double()
        assert abs(w.mean()) < 3 * 0.02 / w.numel() ** 0.5, m
        assert abs(w.std() / 0.02 - 1) < 0.01, m
        assert torch.equal(m.bias, torch.zeros_like(m.bias)), m
    for m in (net[1], net[2][1]):
        assert abs(m.weight.double().mean() - 1) < 3 * 0.02 / 4096**0.5
        assert abs(m.weight.double().std() / 0.02 - 1) < 0.05
        assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_draws_follow_module_order_from_the_global_rng():
    """Per-layer calls in construction order equal one call on the whole network (PatchGAN's usage)."""
    layers = [nn.Conv2d(3, 8, 4), nn.BatchNorm2d(8), nn.Conv2d(8, 1, 4, bias=False)]
    torch.manual_seed(1)
    whole = dcgan_init_(nn.Sequential(*layers)).state_dict()
    whole = {k: v.clone() for k, v in whole.items()}
    torch.manual_seed(1)
    for m in layers:
        dcgan_init_(m)
    assert all(torch.equal(whole[k], v) for k, v in nn.Sequential(*layers).state_dict().items())
