"""LoRA layers (genlab.nn.lora): the delta's closed form, zero start, exact merge / unmerge, key checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genlab.errors import ConfigError
from genlab.models.unet import UNet, UNetConfig
from genlab.nn.lora import (LoRALayer, adapter_parameters, adapter_state_dict, inject_adapter, load_adapter,
                            lora_layers, select_targets, unwrap)


def _randomise_b(layer: LoRALayer, name: str = "default", seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        b = layer.lora_B[name].weight
        b.copy_(torch.randn(b.shape, generator=g))


def tiny_unet() -> UNet:
    torch.manual_seed(0)
    cfg = UNetConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                     norm_groups=8, dropout=0.0)
    net = UNet(cfg, in_channels=1, out_channels=1, image_size=8)
    with torch.no_grad():  # zero-initialised output layers would hide adapters behind them
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.1)
    return net


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_delta_is_alpha_over_r_times_b_a(kind):
    torch.manual_seed(0)
    base = nn.Linear(6, 5) if kind == "linear" else nn.Conv2d(3, 5, 3, padding=1, stride=2)
    layer = LoRALayer(base)
    layer.add_adapter("a", r=2, alpha=3.0)
    _randomise_b(layer, "a")
    x = torch.randn(4, 6) if kind == "linear" else torch.randn(4, 3, 7, 7)
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    if kind == "linear":
        expected = base(x) + 1.5 * x @ (B @ A).T
        delta = 1.5 * B @ A
    else:
        delta = 1.5 * torch.einsum("ok,kihw->oihw", B[:, :, 0, 0], A)
        expected = F.conv2d(x, base.weight + delta, base.bias, stride=2, padding=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight("a").float(), delta, rtol=1e-6, atol=1e-6)


def test_b_starts_at_zero_so_the_output_is_the_base():
    net = tiny_unet()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 70])
    before = net(x, t)
    paths = select_targets(net, "attn,conv")
    inject_adapter(net, paths, "default", r=4, alpha=4)
    assert all(float(layer.lora_B["default"].weight.detach().abs().sum()) == 0 for layer in lora_layers(net).values())
    assert all(float(layer.lora_A["default"].weight.detach().abs().sum()) > 0 for layer in lora_layers(net).values())
    assert torch.equal(net(x, t), before)


def test_targets_select_attention_projections_and_convolutions():
    net = tiny_unet()
    attn = select_targets(net, "attn")
    assert attn and all(p.rpartition(".")[2] in ("to_qkv", "to_q", "to_kv", "proj") for p in attn)
    convs = select_targets(net, "conv")
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in net.modules())
    assert select_targets(net, "to_qkv") == [p for p in attn if p.endswith("to_qkv")]
    with pytest.raises(ConfigError, match="nosuch"):
        select_targets(net, "conv,nosuch")


def test_merge_unmerge_round_trip_and_merged_output():
    net = tiny_unet()
    originals = {k: v.clone() for k, v in net.state_dict().items()}
    inject_adapter(net, select_targets(net, "attn,conv"), "a", r=4, alpha=8)
    inject_adapter(net, select_targets(net, "conv"), "b", r=2, alpha=2)
    for i, layer in enumerate(lora_layers(net).values()):
        for name in layer.lora_B:
            _randomise_b(layer, name, seed=i)
            layer.lora_B[name].weight.data.mul_(0.05)
        if "b" in layer.adapter_weight:
            layer.adapter_weight["b"] = 0.3
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 70])
    unmerged = net(x, t)
    assert (unmerged - UNet.forward(tiny_unet(), x, t)).abs().max() > 1e-3  # the adapters do change the output
    for layer in lora_layers(net).values():
        layer.merge()
    merged = net(x, t)
    assert (merged - unmerged).abs().max() / unmerged.abs().max() <= 1e-5
    for layer in lora_layers(net).values():
        layer.unmerge()
    restored = {k.replace(".base_layer", ""): v for k, v in net.state_dict().items() if ".lora_" not in k}
    for key, value in originals.items():
        rel = (restored[key] - value).abs().max() / value.abs().max().clamp_min(1e-12)
        assert rel <= 1e-6, key
    torch.testing.assert_close(net(x, t), unmerged, rtol=0, atol=0)


def test_unwrapped_merged_model_is_a_plain_model_with_the_same_output():
    net = tiny_unet()
    inject_adapter(net, select_targets(net, "attn"), "a", r=2, alpha=2)
    for layer in lora_layers(net).values():
        _randomise_b(layer, "a")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 70])
    expected = net(x, t)
    for layer in lora_layers(net).values():
        layer.merge()
    unwrap(net)
    assert not lora_layers(net)
    assert set(net.state_dict()) == set(tiny_unet().state_dict())
    torch.testing.assert_close(net(x, t), expected, rtol=1e-5, atol=1e-5)


def test_only_adapter_parameters_receive_gradients():
    net = tiny_unet()
    net.requires_grad_(False)
    inject_adapter(net, select_targets(net, "attn,conv"), "default", r=2, alpha=2)
    params = adapter_parameters(net)
    assert {id(p) for p in params} == {id(p) for p in net.parameters() if p.requires_grad}
    base = {k: v.clone() for k, v in net.state_dict().items() if ".lora_" not in k}
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(3):
        loss = net(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is not None for p in params)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in base.items())
    assert any(float(layer.lora_B["default"].weight.detach().abs().sum()) > 0 for layer in lora_layers(net).values())


def test_load_refuses_mismatched_keys_and_shapes_in_one_line():
    net = tiny_unet()
    paths = select_targets(net, "attn")
    inject_adapter(net, paths, "default", r=2, alpha=2)
    tensors = dict(adapter_state_dict(net, "default"))
    other = tiny_unet()
    bad = dict(tensors)
    bad["unet.nothing.lora_A.weight"] = torch.zeros(2, 2)
    first = next(iter(tensors))
    bad[first] = torch.zeros(3, 3)
    with pytest.raises(ConfigError) as e:
        load_adapter(other, bad, "x", 2, 2.0, paths, where="adapter.safetensors")
    message = str(e.value)
    assert "\n" not in message and "unet.nothing.lora_A.weight" in message and first in message
    del bad[first]
    with pytest.raises(ConfigError, match="missing"):
        load_adapter(other, bad, "x", 2, 2.0, paths, where="adapter.safetensors")
    assert not lora_layers(other)  # nothing attached by a refused load
    load_adapter(other, tensors, "x", 2, 2.0, paths, where="adapter.safetensors")
    assert len(lora_layers(other)) == len(paths)


def test_conv1x1_selects_pointwise_convolutions_and_conv_rank_sets_the_spatial_ones():
    """Each adapter costs r (kh kw C_in + C_out) parameters (r (in + out) for a Linear), with conv_rank on kernels > 1x1."""
    from genlab.nn.lora import adapter_ranks, is_spatial_conv

    net = tiny_unet()
    pointwise = select_targets(net, "conv1x1")
    convs = {p: m for p, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    assert pointwise == [p for p, m in convs.items() if m.kernel_size == (1, 1)] and len(pointwise) < len(convs)
    paths = select_targets(net, "attn,conv")
    ranks = adapter_ranks(net, paths, rank=4, conv_rank=1)
    assert {p for p, r in ranks.items() if r == 1} == {p for p in convs if convs[p].kernel_size != (1, 1)}
    assert adapter_ranks(net, paths, rank=4) == dict.fromkeys(paths, 4)
    inject_adapter(net, paths, "default", r=ranks, alpha={p: float(r) for p, r in ranks.items()})
    expected = 0
    for path in paths:
        layer = net.get_submodule(path).base_layer
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            expected += (1 if is_spatial_conv(layer) else 4) * (kh * kw * layer.in_channels + layer.out_channels)
        else:
            expected += 4 * (layer.in_features + layer.out_features)
    assert sum(p.numel() for p in adapter_parameters(net)) == expected
    assert all(layer.scaling("default") == 1.0 for layer in lora_layers(net).values())
