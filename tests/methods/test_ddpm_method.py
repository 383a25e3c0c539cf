"""The DDPM method: its sampling path with a known denoiser, patching, and conditioning errors."""

from __future__ import annotations

import math

import pytest
import torch

from genlab.config import build_config
from genlab.errors import ConfigError
from genlab.methods import DataInfo
from genlab.methods.capabilities import NoiseAwareClassifier
from genlab.methods.ddpm import DDPM, DDPMConfig
from step_context import RecordingContext

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


def test_heldout_loss_of_the_exact_denoiser_is_the_closed_form():
    """x0 ~ N(MU, S^2): the optimal eps predictor's error per pixel is abar S^2 / (abar S^2 + 1 - abar);
    the held-out loss (t uniform over 0..T-1) must be its mean over t, whatever the batch size."""
    method = _gaussian_method(0.0)
    images = MU + S * torch.randn(4000, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    abar = method.schedule.alphas_cumprod.double()
    expected = float((abar * S**2 / (abar * S**2 + 1 - abar)).mean())
    loss = method.heldout_loss(images, seed=3, batch_size=500)
    assert abs(loss - expected) < 0.01 * expected + 4e-3, (loss, expected)
    assert method.heldout_loss(images, seed=3, batch_size=37) == pytest.approx(loss, rel=1e-6)
    # ... and an eps error of 0.05 adds its square to every pixel's error
    # (up to the cross term 2 b mean(error), which is Monte-Carlo small)
    assert _gaussian_method(0.05).heldout_loss(images, seed=3) == pytest.approx(loss + 0.05**2, abs=3e-4)


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


# ---------------------------------------------------------------------------------------------
# Learned variance and guidance options (issue 6)

TINY_UNET = ["model.unet.base_channels=8", "model.unet.channel_mult=[1]", "model.unet.attention_resolutions=[]",
             "model.unet.norm_groups=4", "model.num_timesteps=100"]


def _tiny(info, *overrides):
    cfg = build_config("ddpm", DDPMConfig, overrides=TINY_UNET + list(overrides)).model
    return DDPM(cfg, info)


def test_learn_sigma_doubles_the_output_and_trains_only_the_variance_through_the_vlb():
    """Hybrid loss = MSE + vlb_weight * T * L_t with the mean detached in L_t: the gradient on the
    prediction channels is exactly the MSE's, and the variance channels get the vlb's."""
    method = _tiny(DataInfo(channels=1, image_size=4), "model.learn_sigma=true", "model.vlb_weight=0.01")
    assert method.unet.conv_out.out_channels == 2
    batch = {"image": torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1}
    outputs = []

    def network(x_t, t, y=None):
        out = (0.1 * torch.randn(6, 2, 4, 4, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
        outputs.append(out)
        return out

    method.network = network
    ctx = RecordingContext(6)
    logs = method.training_step(batch, ctx)
    loss, out = ctx.losses[0], outputs[0]
    assert loss.item() == pytest.approx(logs["mse"].item() + 0.01 * 100 * logs["vlb"].item(), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, out)
    replay = RecordingContext(6)
    t, noise = replay.randint(0, 100), replay.randn(1, 4, 4)
    mse_grad = 2 * (out[:, :1].detach() - noise) / noise.numel()  # d mean((eps_hat - eps)^2) / d eps_hat
    torch.testing.assert_close(grad[:, :1], mse_grad, rtol=1e-5, atol=1e-7)
    assert grad[:, 1:].abs().sum() > 0
    assert t.shape == (6,)


def _conditional_method(**overrides):
    method = _tiny(DataInfo(channels=1, image_size=4, num_classes=3), "model.class_conditional=true",
                   *[f"model.{k}={v}" for k, v in overrides.items()])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # zero-initialised convs (output, residual branches) would hide x and y
        for parameter in method.parameters():
            if parameter.dim() > 1 and not parameter.any():
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=gen))
    return method.eval()


class _ZeroGradientClassifier(torch.nn.Module, NoiseAwareClassifier):
    """A stand-in noisy classifier whose logits ignore x_t (zero gradient), with the DDPM's schedule."""

    def __init__(self, method):
        super().__init__()
        self.schedule, self.data_info, self.config = method.schedule, method.data_info, method.config
        self.bias = torch.nn.Parameter(torch.tensor([0.5, -0.2, 0.1]))

    def forward(self, x_t, t):
        return 0 * x_t.flatten(1).sum(1, keepdim=True) + self.bias

    def log_prob_gradient(self, x_t, t, labels):
        raise AssertionError("not used by DDPM.sample")


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "euler", "heun", "dpmpp-2m"])
def test_sample_no_op_guidance_options_equal_plain_sampling(sampler, learn_sigma):
    method = _conditional_method(eta=0.5, learn_sigma=str(learn_sigma).lower())
    labels = torch.tensor([0, 1, 2, 1])

    def draw(**options):
        return method.sample(4, generator=torch.Generator().manual_seed(3), sampler=sampler, steps=4, labels=labels, **options)

    plain = draw()
    assert torch.equal(draw(guidance_scale=1.0), plain)
    assert torch.equal(draw(classifier=_ZeroGradientClassifier(method), classifier_scale=7.0), plain)
    assert torch.equal(draw(rules=["symmetry:0", (lambda x0: x0.flatten(1).mean(1), 0.0)]), plain)
    assert (draw(guidance_scale=4.0) - plain).abs().max() > 1e-4
    assert (draw(rules=["brightness:100:target=1"]) - plain).abs().max() > 1e-4


def test_sample_cfg_runs_one_batched_pass_per_step():
    method = _conditional_method()
    batches = []
    network = method.network

    def counting(x_t, t, y=None):
        batches.append((len(x_t), None if y is None else y.tolist()))
        return network(x_t, t, y)

    method.network = counting
    method.sample(2, generator=torch.Generator().manual_seed(0), sampler="ddim", steps=5, labels=torch.tensor([0, 2]),
                  guidance_scale=3.0, negative_labels=torch.tensor([1, 1]))
    assert batches == [(4, [0, 2, 1, 1])] * 5
    batches.clear()
    method.sample(2, generator=torch.Generator().manual_seed(0), sampler="heun", steps=3, labels=torch.tensor([0, 2]),
                  guidance_scale=3.0)
    assert batches == [(4, [0, 2, 3, 3])] * 5  # null class = num_classes; heun: 2 * 3 - 1 calls


def test_sample_option_errors():
    method = _conditional_method()
    unconditional = _tiny(DataInfo(channels=1, image_size=4, num_classes=3))
    with pytest.raises(ConfigError, match="cfg_scale"):
        method.sample(2, cfg_scale=3.0)
    with pytest.raises(ConfigError, match="labels"):
        method.sample(2, guidance_scale=3.0)
    with pytest.raises(ConfigError, match="class-conditional"):
        unconditional.sample(2, labels=torch.tensor([0, 1]), guidance_scale=3.0)
    with pytest.raises(ConfigError, match="unknown rule"):
        method.sample(2, labels=torch.tensor([0, 1]), rules=["sparkle"])
    other = _tiny(DataInfo(channels=1, image_size=4, num_classes=3), "model.schedule=cosine")
    with pytest.raises(ConfigError, match="noise schedule"):
        method.sample(2, labels=torch.tensor([0, 1]), classifier=_ZeroGradientClassifier(other))
    with pytest.raises(ConfigError, match="noise-aware"):
        method.sample(2, labels=torch.tensor([0, 1]), classifier=torch.nn.Linear(2, 2))
