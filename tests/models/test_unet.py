"""U-Net: init invariants, conditioning, DDPM parameter count, diffusers equivalence, config errors."""

import pytest
import torch
import torch.nn.functional as F

from genlab.errors import ConfigError
from genlab.models.unet import UNet, UNetConfig, UNetLayer, unet_ddpm_cifar10
from genlab.nn.blocks import Downsample, Upsample

SMALL = UNetConfig(
    base_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    num_heads=2,
    dropout=0.0,
    norm_groups=4,
)


def small_unet(**kwargs):
    torch.manual_seed(0)
    return UNet(SMALL, in_channels=2, out_channels=3, image_size=8, **kwargs)


def randomise_(model, std=0.05):
    """Perturb every parameter so the zero-initialised layers stop hiding their inputs."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def test_output_is_exactly_zero_at_init():
    model = small_unet(num_classes=3)
    out = model(torch.randn(2, 2, 8, 8), torch.tensor([3, 900]), torch.tensor([0, 2]))
    assert out.shape == (2, 3, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))


def test_gradient_reaches_every_parameter_as_zero_inits_open():
    """At init only conv_out learns; two steps later every parameter gets a gradient.

    Step 1 opens conv_out, step 2 the zero-initialised conv2 / attention projections, after which
    the gradient reaches every layer, including the time, class and context pathways.
    """
    model = small_unet(num_classes=3, context_dim=5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(1)
    x, target = torch.randn(4, 2, 8, 8), torch.randn(4, 3, 8, 8)
    t, y, context = torch.tensor([1, 10, 100, 999]), torch.tensor([0, 1, 2, 1]), torch.randn(4, 3, 5)

    def backward():
        optimizer.zero_grad()
        F.mse_loss(model(x, t, y, context), target).backward()
        return {name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()}

    assert backward() == {n for n, _ in model.named_parameters() if not n.startswith("conv_out.")}
    for _ in range(2):
        optimizer.step()
        silent = backward()
    assert silent == set()


def test_class_label_changes_output_and_none_is_the_null_class():
    model = randomise_(small_unet(num_classes=3))
    assert model.class_embed.num_embeddings == 4  # three classes + the null class
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([5, 5])
    out0 = model(x, t, torch.tensor([0, 0]))
    out1 = model(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(out0, out1, atol=1e-4)
    torch.testing.assert_close(model(x, t, None), model(x, t, torch.tensor([3, 3])), rtol=0, atol=0)


def test_timestep_changes_output_and_accepts_long_float_and_scalar():
    model = randomise_(small_unet())
    x = torch.randn(2, 2, 8, 8)
    out = model(x, torch.tensor([7, 7]))
    torch.testing.assert_close(model(x, torch.tensor([7.0, 7.0])), out)
    torch.testing.assert_close(model(x, torch.tensor(7)), out)
    assert not torch.allclose(model(x, torch.tensor([700, 700])), out, atol=1e-4)


def test_context_changes_output_of_cross_attention_model():
    model = randomise_(small_unet(context_dim=5))
    x, t, context = torch.randn(2, 2, 8, 8), torch.tensor([5, 5]), torch.randn(2, 3, 5)
    assert not torch.allclose(model(x, t, context=context), model(x, t, context=-context), atol=1e-4)


def test_layout_has_attention_only_at_requested_resolution():
    model = small_unet()
    # Walk the encoder and decoder, tracking the feature-map size each layer runs at.
    size, attended = 8, []
    for module in list(model.down) + list(model.up):
        if isinstance(module, Downsample):
            size //= 2
        elif isinstance(module, Upsample):
            size *= 2
        elif isinstance(module, UNetLayer):
            attended.append((size, module.attention is not None))
    assert attended == [(8, False), (4, True), (4, True), (4, True), (8, False), (8, False)]
    assert model.middle[0].attention is not None


def test_ddpm_cifar10_preset_has_35_7m_parameters():
    with torch.device("meta"):  # counts shapes without allocating 143 MB
        model = unet_ddpm_cifar10()
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - 35.7e6) < 0.1e6, count  # Ho et al. 2020, Appendix B: 35.7M


def _copy_to_diffusers(ours, theirs):
    """Load our weights into diffusers' UNet2DModel of the same layout, module by module."""
    pairs = [(ours.time_embed.mlp[0], theirs.time_embedding.linear_1),
             (ours.time_embed.mlp[2], theirs.time_embedding.linear_2),
             (ours.conv_in, theirs.conv_in), (ours.norm_out, theirs.conv_norm_out),
             (ours.conv_out, theirs.conv_out)]

    def layers(blocks, resample_name):
        for block in blocks:
            attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
            yield from zip(block.resnets, attentions)
            for resampler in getattr(block, resample_name) or []:
                yield resampler

    def pair_layer(mine, res, attention):
        pairs.extend([(mine.res.norm1, res.norm1), (mine.res.conv1, res.conv1),
                      (mine.res.emb_proj, res.time_emb_proj), (mine.res.norm2, res.norm2),
                      (mine.res.conv2, res.conv2)])
        if res.conv_shortcut is not None:
            pairs.append((mine.res.skip, res.conv_shortcut))
        assert (mine.attention is None) == (attention is None)
        if attention is not None:
            pairs.extend([(mine.attention.norm, attention.group_norm),
                          (mine.attention.attention.proj, attention.to_out[0])])
            qkv = mine.attention.attention.to_qkv
            with torch.no_grad():
                for name in ("weight", "bias"):
                    fused = getattr(qkv, name).chunk(3)
                    for part, linear in zip(fused, (attention.to_q, attention.to_k, attention.to_v)):
                        getattr(linear, name).copy_(part)

    for blocks, resample, mine in ((theirs.down_blocks, "downsamplers", ours.down),
                                   (theirs.up_blocks, "upsamplers", ours.up)):
        theirs_layers = list(layers(blocks, resample))
        assert len(theirs_layers) == len(mine)
        for module, other in zip(mine, theirs_layers):
            if isinstance(module, UNetLayer):
                pair_layer(module, *other)
            else:
                pairs.append((module.conv, other.conv))
    mid = theirs.mid_block
    pair_layer(ours.middle[0], mid.resnets[0], mid.attentions[0])
    pair_layer(ours.middle[1], mid.resnets[1], None)
    with torch.no_grad():
        for mine, other in pairs:
            for name, p in mine.named_parameters():
                other.get_parameter(name).copy_(p)


@pytest.mark.parametrize("scale_shift", [True, False])
def test_matches_diffusers_unet2dmodel_with_the_same_weights(scale_shift):
    """A reference implementation: diffusers' UNet2DModel computes the same function."""
    diffusers = pytest.importorskip("diffusers")
    config = UNetConfig(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=2,
                        attention_resolutions=(2,), num_heads=2, dropout=0.0,
                        use_scale_shift_norm=scale_shift, norm_groups=4)
    torch.manual_seed(0)
    ours = randomise_(UNet(config, in_channels=1, out_channels=1, image_size=8)).eval()
    theirs = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16, 16),
        layers_per_block=2, down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=8,
        norm_num_groups=4, attn_norm_num_groups=4,  # diffusers drops the mid GroupNorm otherwise
        resnet_time_scale_shift="scale_shift" if scale_shift else "default",
        flip_sin_to_cos=True, freq_shift=0,
    ).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    _copy_to_diffusers(ours, theirs)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 17, 999])
    with torch.no_grad():
        expected = theirs(x, t).sample
        got = ours(x, t)
    assert expected.abs().max() > 1e-2  # a non-trivial output
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_config_errors_name_the_value():
    with pytest.raises(ConfigError, match="image_size=30 is not divisible by 4"):
        UNet(UNetConfig(channel_mult=(1, 2, 2), attention_resolutions=()), 1, 1, image_size=30)
    with pytest.raises(ConfigError, match="norm_groups=32 does not divide the channel count 48"):
        UNet(UNetConfig(base_channels=48, attention_resolutions=()), 1, 1, image_size=32)
    with pytest.raises(ConfigError, match=r"includes \[16\], which never occurs"):
        UNet(UNetConfig(base_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(16,)), 1, 1, image_size=28)
    with pytest.raises(ConfigError, match="num_heads=3"):
        UNet(UNetConfig(base_channels=32, num_heads=3), 1, 1, image_size=32)
    with pytest.raises(ConfigError, match="dropout=1.5"):
        UNet(UNetConfig(dropout=1.5), 1, 1, image_size=32)
    model = small_unet()
    with pytest.raises(ConfigError, match="num_classes=None"):
        model(torch.randn(1, 2, 8, 8), torch.tensor([1]), torch.tensor([0]))
    with pytest.raises(ConfigError, match="input of size 7x7 is not divisible by 2"):
        model(torch.randn(1, 2, 7, 7), torch.tensor([1]))


def test_coordinate_channels_run_left_to_right_and_top_to_bottom():
    from genlab.models.unet import coordinate_channels

    grid = coordinate_channels(torch.zeros(3, 5, 4, 6))  # (3, 2, 4, 6)
    assert grid.shape == (3, 2, 4, 6)
    assert torch.allclose(grid[1, 0, 2], torch.linspace(-1, 1, 6)) and torch.allclose(grid[1, 1, :, 5], torch.linspace(-1, 1, 4))
    assert torch.equal(grid[:, 0], grid[:, 0, :1].expand(3, 4, 6)) and torch.equal(grid[:, 1], grid[:, 1, :, :1].expand(3, 4, 6))


def test_a_unet_with_coordinates_is_one_reading_them_as_two_more_input_channels():
    from dataclasses import replace

    from genlab.models.unet import coordinate_channels

    torch.manual_seed(0)
    with_coordinates = UNet(replace(SMALL, coordinates=True), in_channels=2, out_channels=3, image_size=8)
    randomise_(with_coordinates)
    plain = UNet(SMALL, in_channels=4, out_channels=3, image_size=8)
    plain.load_state_dict(with_coordinates.state_dict())  # the same weights: conv_in takes 2 + 2 channels
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        out = with_coordinates(x, t)
        assert torch.equal(out, plain(torch.cat([x, coordinate_channels(x)], 1), t))
        # ... and they are read: blank coordinate channels change the output
        assert (plain(torch.cat([x, torch.zeros_like(x)], 1), t) - out).abs().max() > 1e-3


@pytest.mark.parametrize("key, value", [("context_layers", 2), ("context_width", 64), ("pooled_text", False),
                                        ("query_positions", True)])
def test_text_only_options_on_a_model_without_text_are_refused_in_one_line(key, value):
    config = UNetConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8, **{key: value})
    with pytest.raises(ConfigError) as info:
        UNet(config, 1, 1, 16)
    message = str(info.value)
    assert "\n" not in message and f"model.unet.{key}" in message and "model.text" in message
    UNet(config, 1, 1, 16, context_dim=32)  # with a context they build
