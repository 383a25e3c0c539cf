"""SDXL micro-conditioning: the Fourier + MLP embedding, zero at init, in the U-Net and the DiT."""

from __future__ import annotations

import pytest
import torch

from genlab.errors import ConfigError
from genlab.models.dit import DiT, DiTConfig
from genlab.models.unet import UNet, UNetConfig
from genlab.nn.embeddings import MicroConditionEmbedder, timestep_embedding

MICRO = torch.tensor([[28.0, 28.0, 0.0, 0.0, 28.0, 28.0], [14.0, 20.0, -6.0, 5.0, 24.0, 32.0]])


def test_each_condition_gets_its_own_fourier_features_then_the_mlp():
    torch.manual_seed(0)
    embed = MicroConditionEmbedder(num_conditions=6, frequency_dim=8, embed_dim=16)
    torch.nn.init.normal_(embed.mlp[2].weight)  # away from the zero init, to see the whole map
    out = embed(MICRO)
    assert out.shape == (2, 16)
    # Reference: concat_k timestep_embedding(micro[:, k]) -> Linear -> SiLU -> Linear.
    features = torch.cat([timestep_embedding(MICRO[:, k], 8) for k in range(6)], dim=1)  # (2, 48)
    reference = embed.mlp[2](torch.nn.functional.silu(embed.mlp[0](features)))
    torch.testing.assert_close(out, reference)


def test_the_embedding_starts_at_zero_for_every_condition():
    embed = MicroConditionEmbedder(num_conditions=6, frequency_dim=8, embed_dim=16)
    assert torch.equal(embed(MICRO), torch.zeros(2, 16))


@pytest.mark.parametrize("network", ["unet", "dit"])
def test_a_micro_conditioned_network_equals_the_plain_one_at_init(network):
    def build(micro_conditions: int):
        torch.manual_seed(0)
        if network == "unet":
            config = UNetConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                                norm_groups=8, dropout=0.0)
            return UNet(config, 1, 1, 8, micro_conditions=micro_conditions)
        return DiT(DiTConfig(patch_size=2, hidden_size=32, depth=2, num_heads=4), 1, 1, 8,
                   micro_conditions=micro_conditions)

    plain, micro = build(0), build(6)
    # Zero-initialised output layers and residual branches would make every output 0 (or blind to the
    # embedding): give the shared weights random values, as after training.
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    missing, unexpected = micro.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("micro_embed.") for k in missing)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 1, 8, 8, generator=g), torch.tensor([3, 700])
    with torch.no_grad():
        expected = plain(x, t)
        assert expected.abs().max() > 0
        torch.testing.assert_close(micro(x, t, micro=MICRO), expected, rtol=0, atol=0)
        # Once trained (here: the zero layer moved), the conditions change the output, each sample its own.
        torch.nn.init.normal_(micro.micro_embed.mlp[2].weight, std=0.1)
        moved = micro(x, t, micro=MICRO)
        assert (moved - expected).abs().amax(dim=(1, 2, 3)).min() > 1e-4
        other = micro(x, t, micro=MICRO.flip(0))
        assert (moved - other).abs().max() > 1e-4


def test_micro_conditions_of_the_wrong_shape_or_missing_are_one_line_errors():
    torch.manual_seed(0)
    net = UNet(UNetConfig(base_channels=8, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(),
                          norm_groups=4), 1, 1, 8, micro_conditions=6)
    x, t = torch.zeros(2, 1, 8, 8), torch.tensor([0, 1])
    for bad in (None, torch.zeros(2, 5)):
        with pytest.raises(ConfigError, match=r"micro of shape \(N, 6\)") as e:
            net(x, t, micro=bad)
        assert "\n" not in str(e.value)
    plain = UNet(UNetConfig(base_channels=8, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(),
                            norm_groups=4), 1, 1, 8)
    with pytest.raises(ConfigError, match="micro_conditions=0"):
        plain(x, t, micro=MICRO)
