"""StyleGAN2-lite networks: modulated convs against their definition, equalised lr, truncation, mixing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from genlab.errors import ConfigError
from genlab.models.stylegan import (
    EqualLinear,
    Generator,
    ModulatedConv2d,
    StyleGANNetConfig,
    base_resolution,
    minibatch_stddev,
    modulated_conv2d,
)


def _naive_modulated_conv(x, weight, styles, demodulate, eps=1e-8):
    """Karras et al. 2020 eq. 1-3 one sample at a time: w'_oik = s_i w_oik, w'' = w' / sqrt(sum_ik w'^2 + eps)."""
    out = []
    for n in range(x.shape[0]):
        w = weight * styles[n][None, :, None, None]  # (O, I, k, k)
        if demodulate:
            w = w / torch.sqrt(w.square().sum(dim=(1, 2, 3), keepdim=True) + eps)
        out.append(F.conv2d(x[n: n + 1], w, padding=weight.shape[-1] // 2))
    return torch.cat(out)


def _tiny_net(**kw) -> StyleGANNetConfig:
    base = dict(z_dim=16, w_dim=16, mapping_layers=2, channels=8, max_channels=16, d_channels=8, d_max_channels=16)
    return StyleGANNetConfig(**{**base, **kw})


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("demodulate", [True, False])
@pytest.mark.parametrize("k", [3, 1])
def test_modulated_conv_equals_its_per_sample_definition(grouped, demodulate, k):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 6, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(4, 5, k, k, generator=g, dtype=torch.float64)
    styles = torch.randn(3, 5, generator=g, dtype=torch.float64)  # signs and sizes differ per sample
    expected = _naive_modulated_conv(x, weight, styles, demodulate)
    got = modulated_conv2d(x, weight, styles, demodulate=demodulate, grouped=grouped)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_demodulation_gives_unit_output_variance_for_unit_variance_input():
    torch.manual_seed(0)
    layer = ModulatedConv2d(64, 32, 3, w_dim=8, demodulate=True, grouped=False)
    with torch.no_grad():
        layer.weight.mul_(5.0)  # badly scaled weights ...
        layer.affine.weight.mul_(3.0)  # ... and styles far from 1: demodulation must undo both
    x = torch.randn(16, 64, 24, 24)
    w = torch.randn(16, 8)
    y = layer(x, w)[:, :, 1:-1, 1:-1]  # interior: border pixels see zero padding
    per_channel = y.var(dim=(0, 2, 3))  # (32,) each output channel's variance
    assert abs(per_channel.mean().item() - 1.0) < 0.05
    assert (per_channel - 1.0).abs().max() < 0.2
    # Without demodulation the same layer is far from variance-preserving.
    layer.demodulate = False
    assert layer(x, w)[:, :, 1:-1, 1:-1].var() > 4.0


@pytest.mark.parametrize("lr_multiplier", [1.0, 0.01])
def test_equal_linear_effective_weight_scale_and_learning_speed(lr_multiplier):
    torch.manual_seed(0)
    fan_in = 512
    layer = EqualLinear(fan_in, 256, bias_init=1.0, lr_multiplier=lr_multiplier)
    w_eff = layer.effective_weight().detach()
    # He initialisation for the effective weight, whatever the multiplier: std 1 / sqrt(fan_in).
    assert abs(w_eff.std().item() * math.sqrt(fan_in) - 1.0) < 0.02
    x = torch.randn(4, fan_in)
    torch.testing.assert_close(layer(x), x @ w_eff.t() + 1.0, rtol=1e-5, atol=1e-5)  # effective bias = bias_init
    # Adam's first step moves each stored weight by lr (sign of the gradient): the effective weight
    # moves by lr * lr_multiplier / sqrt(fan_in), i.e. the multiplier slows learning by that factor.
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3, eps=1e-12)
    layer(x).square().sum().backward()
    opt.step()
    step = (layer.effective_weight().detach() - w_eff).abs()
    expected = 1e-3 * lr_multiplier / math.sqrt(fan_in)
    assert torch.allclose(step, torch.full_like(step, expected), rtol=1e-3)


def test_truncation_with_psi_zero_returns_w_avg_for_every_z():
    torch.manual_seed(0)
    g = Generator(_tiny_net(), image_size=8, image_channels=1)
    w_batch = torch.randn(32, 16)
    g.update_w_avg(w_batch, beta=0.9)  # from zero: w_avg = (1 - beta) mean(w)
    torch.testing.assert_close(g.w_avg, 0.1 * w_batch.mean(0))
    z = torch.randn(10, 16)
    w = g.mapping(z)
    assert torch.allclose(g.truncate(w, 0.0), g.w_avg.expand(10, -1))
    assert torch.allclose(g.truncate(w, 1.0), w)
    assert torch.allclose(g.truncate(w, 0.5), 0.5 * (w + g.w_avg))
    # Images at psi = 0 (same noise) are one image, the one synthesised from w_avg.
    noise = [torch.randn(1, *s).expand(10, -1, -1, -1) for s in g.noise_shapes()]
    images = g(z, truncation=0.0, noise=noise)
    mean_image = g.synthesize_w(g.w_avg[None], noise=[m[:1] for m in noise])
    torch.testing.assert_close(images, mean_image.expand_as(images), rtol=1e-5, atol=1e-6)


def test_style_mixing_switches_styles_at_the_crossover_layer():
    torch.manual_seed(0)
    g = Generator(_tiny_net(), image_size=32, image_channels=3)
    assert g.num_ws == 8  # 4, 8, 16, 32: 1 + 2 + 2 + 2 convs, + 1 for the last toRGB
    seen = []  # (module, w) in execution order
    hooks = [m.affine.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
             for m in g.modules() if isinstance(m, ModulatedConv2d)]
    # Style index of every modulated layer in execution order (a block's first conv shares the previous toRGB's).
    order = [0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 7]
    w1, w2 = g.mapping(torch.randn(2, 16)), g.mapping(torch.randn(2, 16))
    for crossover in (1, 3, 6):
        seen.clear()
        g.synthesize_w(g.mix_styles(w1, w2, crossover))
        assert len(seen) == len(order)
        for used, index in zip(seen, order):
            assert torch.equal(used, w1 if index < crossover else w2), (crossover, index)
    # Per-sample crossovers: sample 0 switches after layer 2, sample 1 never.
    seen.clear()
    g.synthesize_w(g.mix_styles(w1, w2, torch.tensor([2, g.num_ws])))
    for used, index in zip(seen, order):
        assert torch.equal(used[0], w1[0] if index < 2 else w2[0])
        assert torch.equal(used[1], w1[1])
    for h in hooks:
        h.remove()


def test_noise_inputs_act_through_their_learned_per_channel_strength():
    torch.manual_seed(0)
    g = Generator(_tiny_net(), image_size=8, image_channels=1)
    w = g.mapping(torch.randn(2, 16))
    a, b = g.make_noise(2, torch.Generator().manual_seed(1)), g.make_noise(2, torch.Generator().manual_seed(2))
    assert torch.equal(g.synthesize_w(w, a), g.synthesize_w(w, b))  # strengths start at 0
    with torch.no_grad():
        g.synthesis.convs[-1].noise_strength[0] = 1.0  # one channel of the last layer
    assert not torch.allclose(g.synthesize_w(w, a), g.synthesize_w(w, b))
    # Same generator seed, same noise: reproducible images.
    assert torch.equal(g.synthesize_w(w, generator=torch.Generator().manual_seed(3)),
                       g.synthesize_w(w, generator=torch.Generator().manual_seed(3)))


def test_minibatch_stddev_appends_the_mean_group_std():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 2, 2, generator=g, dtype=torch.float64)
    out = minibatch_stddev(x, group_size=4, eps=0.0)
    assert torch.equal(out[:, :3], x)
    for m in range(2):  # groups {m, m + 2, m + 4, m + 6}
        group = x[m::2]
        expected = group.std(dim=0, unbiased=False).mean()
        for i in range(m, 8, 2):
            assert torch.allclose(out[i, 3], expected.expand(2, 2))
    # A batch of 6 uses groups of 3 (largest divisor <= 4).
    out6 = minibatch_stddev(x[:6], group_size=4, eps=0.0)
    torch.testing.assert_close(out6[0, 3, 0, 0], x[:6][0::2].std(dim=0, unbiased=False).mean())


def test_base_resolution_halves_down_to_at_least_four():
    assert [base_resolution(s) for s in (8, 28, 32, 64, 5)] == [4, 7, 4, 4, 5]
    with pytest.raises(ConfigError, match="at least 4"):
        base_resolution(3)


def test_tanh_output_squashes_the_summed_rgb_and_linear_is_the_papers():
    torch.manual_seed(0)
    linear = Generator(_tiny_net(), image_size=8, image_channels=1)
    tanh = Generator(_tiny_net(output="tanh"), image_size=8, image_channels=1)
    tanh.load_state_dict(linear.state_dict())  # same weights: the output map is the only difference
    with torch.no_grad():
        linear.synthesis.to_rgbs[-1].bias.fill_(3.0)  # push the unbounded output past 1 ...
        tanh.synthesis.to_rgbs[-1].bias.fill_(3.0)
    z = torch.randn(4, 16)
    noise = linear.make_noise(4, torch.Generator().manual_seed(1))
    x_linear, x_tanh = linear(z, noise=noise), tanh(z, noise=noise)
    assert x_linear.max() > 1  # ... which the paper's linear output keeps
    torch.testing.assert_close(x_tanh, torch.tanh(x_linear))
    assert x_tanh.abs().max() < 1
    with pytest.raises(ConfigError, match="model.net.output"):
        Generator(_tiny_net(output="sigmoid"), image_size=8, image_channels=1)
