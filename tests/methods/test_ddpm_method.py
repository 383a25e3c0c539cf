"""The DDPM method: its sampling path with a known denoiser, patching, and conditioning errors."""

from __future__ import annotations

import math

import pytest
import torch

from genlab.config import build_config
from genlab.errors import ConfigError
from genlab.methods import DataInfo
from genlab.methods.ddpm import DDPM, DDPMConfig

MU, S = 0.3, 0.2  # data ~ N(MU, S^2 I): the optimal eps predictor is closed form


def _gaussian_method(bias: float, **overrides) -> DDPM:
    """A DDPM whose network is replaced by the exact Gaussian eps predictor plus a constant error."""
    tiny = ["model.unet.base_channels=8", "model.unet.channel_mult=[1]", "model.unet.attention_resolutions=[]",
            "model.unet.norm_groups=4"]
    model = build_config("ddpm", DDPMConfig, overrides=tiny + [f"model.{k}={v}" for k, v in overrides.items()]).model
    method = DDPM(model, DataInfo(channels=1, image_size=4))
    schedule = method.schedule

    def network(x_t, t, y=None):
        abar = schedule.gather(schedule.alphas_cumprod, t.round().long(), x_t)
        eps = torch.sqrt(1 - abar) * (x_t - torch.sqrt(abar) * MU) / (abar * S**2 + 1 - abar)
        return eps + bias

    method.network = network
    return method


@pytest.mark.parametrize("sampler, steps", [("ddim", 50), ("ddpm", 100)])
def test_cosine_schedule_sampling_survives_a_small_eps_error(sampler, steps):
    # At t = T-1 the cosine schedule has alpha_bar ~ 1e-9: without clipping x0, an eps error of 0.01
    # is amplified ~3e4 times and DDIM returns noise (the bug this guards against).
    method = _gaussian_method(0.01, schedule="cosine")
    x = method.sample(2000, generator=torch.Generator().manual_seed(0), sampler=sampler, steps=steps)
    assert abs(x.mean().item() - MU) < 0.05
    assert abs(x.std().item() - S) < 0.05


def test_without_clipping_the_same_setting_fails():
    method = _gaussian_method(0.01, schedule="cosine", clip_denoised=False)
    x = method.sample(500, generator=torch.Generator().manual_seed(0), sampler="ddim", steps=50)
    assert abs(x.mean().item() - MU) > 0.1 or abs(x.std().item() - S) > 0.1


def test_patch_size_two_network_sees_a_half_size_image_and_preserves_layout():
    cfg = build_config("ddpm", DDPMConfig, overrides=[
        "model.patch_size=2", "model.unet.base_channels=8", "model.unet.channel_mult=[1]",
        "model.unet.attention_resolutions=[]", "model.unet.norm_groups=4"]).model
    method = DDPM(cfg, DataInfo(channels=1, image_size=8))
    assert method.unet.conv_in.in_channels == 4  # 2x2 patches of one channel
    seen = {}

    def spy(h, t, y=None):
        seen["shape"] = tuple(h.shape)
        return h  # identity network: unshuffle then shuffle must give the input back
    method.unet.forward = spy
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(method.network(x, torch.zeros(3, dtype=torch.long)), x)
    assert seen["shape"] == (3, 4, 4, 4)
    with pytest.raises(ConfigError, match="patch_size"):
        DDPM(cfg, DataInfo(channels=1, image_size=7))


def test_class_conditional_needs_labels():
    cfg = build_config("ddpm", DDPMConfig, overrides=["model.class_conditional=true"]).model
    with pytest.raises(ConfigError, match="labelled"):
        DDPM(cfg, DataInfo(channels=1, image_size=8, num_classes=None))


def test_invert_then_sample_returns_the_image():
    # The exact Gaussian denoiser, linear schedule (no clipping involved): DDIM(invert(x0)) ~= x0.
    method = _gaussian_method(0.0, schedule="linear", clip_denoised=False)
    x0 = MU + S * torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    noise = method.invert(x0, steps=200)
    assert noise.std() > 0.8  # really went to the noise end
    back = method.sample(64, noise=noise, sampler="ddim", steps=200)
    assert (back - x0).abs().mean() < 0.02
