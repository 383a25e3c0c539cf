"""The dit method: DDPM's diffusion with a DiT denoiser trains, resumes exactly and samples reproducibly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genlab import api
from genlab.config import build_config
from genlab.data import load_data
from genlab.diffusion import diffusion_loss
from genlab.errors import ConfigError
from genlab.methods import DataInfo
from genlab.methods.ddpm import DDPMConfig
from genlab.methods.dit import DiT
from genlab.models.dit import CONDITIONINGS
from genlab.train.checkpoint import latest_checkpoint, load_checkpoint
from step_context import RecordingContext
from tiny_configs import TINY_DIFFUSION_TRAINING

TINY_DIT = [
    "model.dit.hidden_size=32",
    "model.dit.depth=2",
    "model.dit.num_heads=2",
    "model.dit.patch_size=2",
] + TINY_DIFFUSION_TRAINING
DIGITS = DataInfo(channels=1, image_size=8, num_classes=10)


def _fixed_loss(method: DiT, seed: int = 123) -> float:
    """Eps-MSE of ``method`` on 256 digits with fixed timesteps and noise (a deterministic probe)."""
    g = torch.Generator().manual_seed(seed)
    x0 = load_data(build_config("dit", DiT.Config, overrides=["data.source=digits"]).data).to_model_range()[:256]
    t = torch.randint(0, method.config.num_timesteps, (len(x0),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        return float(diffusion_loss(method.network(method.schedule.q_sample(x0, t, noise), t), noise))


def _method(*overrides: str) -> DiT:
    torch.manual_seed(0)
    return DiT(build_config("dit", DiT.Config, overrides=TINY_DIT + list(overrides)).model, DIGITS)


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_every_conditioning_trains_on_digits_and_lowers_the_loss(tmp_path, conditioning):
    # The bare leaf name must reach model.dit.conditioning (as in `genlab train dit conditioning=adaln`).
    run = api.train("dit", data="digits", overrides=TINY_DIT + ["train.steps=20", "train.ema_decay=null",
                                                                f"conditioning={conditioning}"],
                    run_dir=tmp_path / "r", progress=False)
    assert run.method.dit.config.conditioning == conditioning
    torch.manual_seed(0)
    fresh = DiT(run.config.model, run.method.data_info)
    before, after = _fixed_loss(fresh), _fixed_loss(run.method)
    assert before > 0.9  # an untrained eps-predictor is no better than eps_hat = 0 (MSE = Var(eps) = 1)
    assert after < 0.5 * before


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_checkpoint(run_dir))[0]


def test_resume_gives_the_same_weights_and_samples_are_reproducible(tmp_path):
    common = TINY_DIT + ["train.checkpoint_every=5", "model.class_conditional=true", "train.ema_decay=0.9"]
    a = api.train("dit", data="digits", overrides=common + ["train.steps=10"], run_dir=tmp_path / "a", progress=False)
    api.train("dit", data="digits", overrides=common + ["train.steps=5"], run_dir=tmp_path / "b", progress=False)
    b = api.train("dit", overrides=["train.steps=10"], run_dir=tmp_path / "b", resume=True, progress=False)
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert set(wa) >= {"model", "ema_dit"}
    assert not any(k.startswith("unet") for k in wa["model"])  # no (wasted) U-Net is saved
    for group in ("model", "ema_dit"):
        assert wa[group].keys() == wb[group].keys()
        for k in wa[group]:
            assert torch.equal(wa[group][k], wb[group][k]), (group, k)
    labels = torch.tensor([0, 3, 7, 9])
    first = a.sample(4, seed=1, labels=labels, guidance_scale=2.0)
    assert torch.equal(first, b.sample(4, seed=1, labels=labels, guidance_scale=2.0))
    assert torch.equal(first, api.load_run(tmp_path / "a").sample(4, seed=1, labels=labels, guidance_scale=2.0))
    assert (first - a.sample(4, seed=2, labels=labels, guidance_scale=2.0)).abs().max() > 1e-3


def test_learn_sigma_puts_the_variance_in_the_second_half_of_the_dit_output():
    """DDPM's hybrid loss reads v from output channels [C, 2C); unpatchify puts channel k of a patch at
    linear rows k, k + 2C, ...: with vlb_weight = 0 exactly those rows of the DiT's output layer get no gradient."""
    batch = {"image": torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1}
    rows = {}
    for vlb_weight in (0.0, 0.01):
        method = _method("model.learn_sigma=true", f"model.vlb_weight={vlb_weight}", "conditioning=adaln")
        out = method.network(batch["image"], torch.zeros(8, dtype=torch.long))
        assert out.shape == (8, 2, 8, 8)
        ctx = RecordingContext(8)
        method.training_step(batch, ctx)
        ctx.losses[0].backward()
        grad = method.dit.final.linear.weight.grad.abs().sum(1)  # (p*p*2C,) one entry per output row
        rows[vlb_weight] = (grad[0::2], grad[1::2])  # C = 1: even rows predict eps, odd rows v
    eps_rows, v_rows = rows[0.0]
    assert (eps_rows > 0).all() and (v_rows == 0).all()
    assert (rows[0.01][1] > 0).all()


def test_unconditional_guidance_branch_is_the_dit_null_class():
    # guidance_scale 0 keeps only the branch DDPM labels with the null class (num_classes); the DiT
    # must read that label as its extra embedding row, i.e. the same as sampling with label 10.
    method = _method("model.class_conditional=true", "conditioning=adaln").eval()
    labels = torch.tensor([1, 2, 3])
    unconditional = method.sample(3, generator=torch.Generator().manual_seed(0), labels=labels, guidance_scale=0.0)
    null = method.sample(3, generator=torch.Generator().manual_seed(0), labels=torch.full((3,), 10))
    conditional = method.sample(3, generator=torch.Generator().manual_seed(0), labels=labels)
    torch.testing.assert_close(unconditional, null, rtol=1e-4, atol=1e-5)
    assert (conditional - null).abs().max() > 1e-3


def test_pixel_patching_is_rejected_and_the_dit_patch_must_divide_the_image():
    with pytest.raises(ConfigError, match="model.dit.patch_size"):
        _method("model.patch_size=2")
    with pytest.raises(ConfigError, match="patch_size=3"):
        _method("model.dit.patch_size=3")


def test_presets_build_and_dit_s_has_the_papers_size():
    for preset in ("small", "mnist_small"):
        cfg = build_config("dit", DiT.Config, preset=preset).model
        method = DiT(cfg, DataInfo(1, 28, 10))
        assert method.dit.grid ** 2 == 49  # patch 4 on 28x28
    # DiT-S/2: 33M parameters in Peebles & Xie's table 1 (for 4-channel 32x32 latents, 1000 classes;
    # here 3-channel 32x32 CIFAR-10 with learned sigma: a few hundred thousand fewer in the embeddings).
    cfg = build_config("dit", DiT.Config, preset="S").model
    method = DiT(cfg, DataInfo(3, 32, 10))
    assert abs(sum(p.numel() for p in method.parameters()) / 1e6 - 33.0) < 1.0


def test_a_dit_run_refuses_unet_keys_with_a_one_line_error():
    for override, key in [("model.unet.base_channels=8", "model.unet.base_channels=8"),
                          ("base_channels=8", "model.unet.base_channels=8")]:  # a bare name reaches the same key
        with pytest.raises(ConfigError, match="applies to network=unet") as e:
            build_config("dit", DiT.Config, overrides=[override])
        assert key in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="model.patch_size=2: a DiT cuts its own patches"):
        build_config("dit", DiT.Config, overrides=["model.patch_size=2"])
    with pytest.raises(ConfigError, match="must be one of"):  # a dit run's network is the DiT
        build_config("dit", DiT.Config, overrides=["model.network=unet"])


def test_presets_and_saved_configs_keep_only_the_chosen_networks_section():
    # ddpm's U-Net preset switched to the DiT drops the preset's U-Net section (a user's unet key would not be)...
    cfg = build_config("ddpm", DDPMConfig, preset="small", overrides=["model.network=dit"]).model
    assert cfg.network == "dit" and cfg.unet is None and cfg.dit is not None
    with pytest.raises(ConfigError, match="applies to network=unet"):
        build_config("ddpm", DDPMConfig, preset="small", overrides=["model.network=dit",
                                                                                "model.unet.num_res_blocks=1"])
    # ... and a config.yaml saved before the composition (a dit run carried an unused unet block) still loads.
    old = {"method": "dit", "model": {"unet": {"base_channels": 64, "channel_mult": [1, 2, 2, 2]},
                                      "dit": {"patch_size": 2, "hidden_size": 32, "depth": 1, "num_heads": 2}}}
    cfg = build_config("dit", DiT.Config, base=old).model
    assert cfg.unet is None and cfg.dit.hidden_size == 32
    method = DiT(cfg, DIGITS)
    assert method.network_name == "dit" and not hasattr(method, "unet") and method.dit.grid == 4
