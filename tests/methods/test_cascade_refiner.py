"""Cascade (base + super-resolution with conditioning augmentation) and refiner (ensemble of experts, SDEdit)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from genlab import api
from genlab.config import build_config
from genlab.diffusion import NoiseSchedule, make_timesteps, sample_ddim
from genlab.diffusion.experts import handoff_denoiser, sdedit
from genlab.errors import ConfigError
from genlab.methods import DataInfo
from genlab.methods.cascade import LEVEL_SCALE, SuperResolution, augment_condition
from genlab.methods.ddpm import DDPM
from genlab.methods.refiner import Refiner
from step_context import RecordingContext
from tiny_configs import TINY_DDPM

DIGITS = DataInfo(channels=1, image_size=8, num_classes=10)
LOW = DataInfo(channels=1, image_size=4, num_classes=10)


def _ddpm(info: DataInfo = DIGITS, *overrides: str) -> DDPM:
    torch.manual_seed(0)
    return DDPM(build_config("ddpm", DDPM.Config, overrides=TINY_DDPM + list(overrides)).model, info)


def _sr(*overrides: str) -> SuperResolution:
    base = _ddpm(LOW, "model.unet.attention_resolutions=[]")
    torch.manual_seed(0)
    cfg = build_config("sr", SuperResolution.Config, overrides=TINY_DDPM + ["base=/a/run", *overrides]).model
    return SuperResolution(cfg, DIGITS, parents={"base": base})


# ------------------------------------------------------------------ cascade


def test_conditioning_augmentation_is_variance_preserving_and_the_identity_at_level_0():
    g = torch.Generator().manual_seed(0)
    x, noise = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, torch.randn(4, 1, 8, 8, generator=g)
    assert torch.equal(augment_condition(x, torch.zeros(4), noise), x)
    a = torch.tensor([0.0, 0.3, 0.6, 0.9])
    z = augment_condition(x, a, noise)
    for i in range(4):
        torch.testing.assert_close(z[i], math.sqrt(1 - a[i] ** 2) * x[i] + a[i] * noise[i])
    # Unit-variance input and noise give a unit-variance output at every level.
    big = torch.randn(2, 1, 200, 200, generator=g)
    out = augment_condition(big, torch.tensor([0.5, 0.8]), torch.randn(2, 1, 200, 200, generator=g))
    assert abs(float(out[0].var()) - 1) < 0.02 and abs(float(out[1].var()) - 1) < 0.02


def test_noise_augmentation_at_level_0_equals_the_plain_sr_model():
    plain, augmented = _sr(), _sr("max_augmentation=0.5")
    assert plain.num_micro == 0 and augmented.num_micro == 1
    missing, unexpected = augmented.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("unet.micro_embed.") for k in missing) and missing
    with torch.no_grad():
        for p in plain.unet.parameters():  # trained-looking weights: a zero-init output would hide everything
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    augmented.load_state_dict(plain.state_dict(), strict=False)
    g = torch.Generator().manual_seed(1)
    x_t, low = torch.randn(2, 1, 8, 8, generator=g), torch.rand(2, 1, 4, 4, generator=g) * 2 - 1
    condition, noise, t = augmented.upsample(low), torch.randn(2, 1, 8, 8, generator=g), torch.tensor([5, 80])

    def at(level: float):
        levels = torch.full((2,), level)
        return augmented.denoiser(condition=augment_condition(condition, levels, noise),
                                  micro=LEVEL_SCALE * levels[:, None])(x_t, t)

    with torch.no_grad():
        expected = plain.denoiser(condition=condition)(x_t, t)
        torch.testing.assert_close(at(0.0), expected, rtol=0, atol=0)
        assert (at(0.3) - expected).abs().max() > 1e-3  # a real level changes the input


def test_sr_training_draws_levels_within_the_maximum_and_feeds_them_as_micro_conditions():
    sr = _sr("max_augmentation=0.4")
    x0 = torch.rand(64, 1, 8, 8) * 2 - 1
    inputs = sr._network_inputs({"image": x0}, x0, RecordingContext(64))
    level = inputs["micro"][:, 0] / LEVEL_SCALE
    assert 0 <= float(level.min()) and float(level.max()) <= 0.4 and float(level.std()) > 0.05
    clean = sr.upsampled_low_res(x0)
    # Recover the noise from the condition: it must be the VP mix of the clean input at that level.
    a = level.view(-1, 1, 1, 1)
    noise = (inputs["condition"] - torch.sqrt(1 - a * a) * clean) / a
    assert abs(float(noise.std()) - 1) < 0.1
    # The low-res input is the image shrunk to the base's size as PIL's bilinear filter does (the base's
    # data.image_size resize), then bilinearly up-sampled back.
    import numpy as np
    from PIL import Image

    shrunk = torch.stack([torch.from_numpy(np.array(Image.fromarray(x.numpy(), mode="F").resize((4, 4), Image.BILINEAR)))
                          for x in x0[:8, 0]])[:, None]  # (8, 1, 4, 4)
    torch.testing.assert_close(clean[:8], sr.upsample(shrunk), atol=1e-5, rtol=0)


def test_sr_refuses_a_base_as_large_as_its_data():
    base = _ddpm(DIGITS)
    cfg = build_config("sr", SuperResolution.Config, overrides=TINY_DDPM + ["base=/a/run"]).model
    with pytest.raises(ConfigError, match="larger data than its base") as e:
        SuperResolution(cfg, DIGITS, parents={"base": base})
    assert "\n" not in str(e.value)


def test_the_sr_child_samples_end_to_end_after_its_base_folder_is_deleted(tmp_path):
    tiny = [o for o in TINY_DDPM if "attention" not in o] + ["model.unet.attention_resolutions=[]"]
    base = api.train("ddpm", data="digits", run_dir=tmp_path / "base", progress=False,
                     overrides=tiny + ["train.steps=2", "data.image_size=4"])
    assert base.method.data_info.image_size == 4
    sr = api.train("sr", data=None, run_dir=tmp_path / "sr", progress=False,
                   overrides=TINY_DDPM + [f"model.base={tmp_path / 'base'}", "train.steps=2", "model.max_augmentation=0.3"])
    assert sr.config.data.source == "digits" and sr.method.data_info.image_size == 8  # the base's data, full size
    before = sr.sample(3, seed=0, steps=2)
    shutil.rmtree(tmp_path / "base")
    again = api.load_run(tmp_path / "sr")
    after = again.sample(3, seed=0, steps=2)
    assert after.shape == (3, 1, 8, 8) and torch.equal(before, after)
    # The cascade really runs the stored base: its samples feed the SR stage.
    low = again.method.base.sample(3, generator=torch.Generator().manual_seed(5))
    assert low.shape == (3, 1, 4, 4)


# ------------------------------------------------------------------ refiner


class Recorder:
    """A denoiser that records the timesteps it is called with and answers a fixed eps."""

    def __init__(self, value: float):
        self.value, self.calls = value, []

    def __call__(self, x_t, t):
        self.calls.append(t.tolist())
        return torch.full_like(x_t, self.value)


def test_the_handoff_uses_the_base_at_and_above_t_switch_and_the_refiner_below():
    schedule = NoiseSchedule.from_name("cosine", 1000)
    base, refiner = Recorder(0.1), Recorder(-0.1)
    timesteps = make_timesteps(1000, 10)  # 999, 899, ..., 99
    sample_ddim(handoff_denoiser(base, refiner, 299), torch.zeros(2, 1, 4, 4), schedule, timesteps)
    assert [c[0] for c in base.calls] == [t for t in timesteps.tolist() if t >= 299]
    assert [c[0] for c in refiner.calls] == [t for t in timesteps.tolist() if t < 299]
    assert len(base.calls) + len(refiner.calls) == 10  # equal NFE: one call per step
    # A mixed batch: each row goes to its expert.
    base, refiner = Recorder(0.1), Recorder(-0.1)
    eps = handoff_denoiser(base, refiner, 300)(torch.zeros(3, 1, 2, 2), torch.tensor([500, 300, 299]))
    assert eps[:, 0, 0, 0].tolist() == pytest.approx([0.1, 0.1, -0.1])
    assert base.calls == [[500, 300]] and refiner.calls == [[299]]


def _refiner(t_switch: int = 40, *overrides: str, base: DDPM | None = None) -> Refiner:
    base = _ddpm(DIGITS, "model.schedule=cosine") if base is None else base
    torch.manual_seed(1)
    cfg = build_config("refiner", Refiner.Config,
                       overrides=TINY_DDPM + ["base=/a/run", f"t_switch={t_switch}", *overrides]).model
    return Refiner(cfg, DIGITS, parents={"base": base})


def test_the_refiner_trains_below_t_switch_on_the_base_noise_schedule():
    refiner = _refiner(40)
    assert refiner.config.schedule == "cosine" and torch.equal(refiner.schedule.betas, refiner.base.schedule.betas)
    seen = []
    refiner.loss = lambda x0, t, noise, y=None, **inputs: (seen.append(t) or (x0.sum() * 0, {}))
    refiner.training_step({"image": torch.zeros(500, 1, 8, 8), "label": torch.zeros(500, dtype=torch.long)},
                          RecordingContext(500))
    assert int(seen[0].max()) == 39 and int(seen[0].min()) == 0
    for bad in (0, 100):
        with pytest.raises(ConfigError, match="t_switch"):
            _refiner(bad)


def _record_handoff(refiner: Refiner, monkeypatch) -> dict[str, list[int]]:
    """The timesteps at which the base's and the refiner's own networks are called (one entry per call)."""
    calls = {"base": [], "refiner": []}
    base_denoise, own_denoise = refiner.base._denoise, DDPM._denoise

    def base_recording(x_t, t, y=None, **inputs):
        calls["base"].append(int(t[0]))
        return base_denoise(x_t, t, y, **inputs)

    def own_recording(self, x_t, t, y=None, **inputs):
        if self is refiner:
            calls["refiner"].append(int(t[0]))
        return own_denoise(self, x_t, t, y, **inputs)

    monkeypatch.setattr(refiner.base, "_denoise", base_recording)
    monkeypatch.setattr(DDPM, "_denoise", own_recording)
    return calls


def test_refiner_sampling_hands_over_from_the_base_to_the_refiner(monkeypatch):
    refiner = _refiner(40)
    calls = _record_handoff(refiner, monkeypatch)
    refiner.sample(2, steps=5, generator=torch.Generator().manual_seed(0))
    timesteps = make_timesteps(100, 5).tolist()  # 99, 79, 59, 39, 19
    assert calls["base"] == [t for t in timesteps if t >= 40] and calls["refiner"] == [t for t in timesteps if t < 40]


@pytest.mark.parametrize("how", ["argument", "config"])
def test_a_sampling_switch_below_t_switch_keeps_the_base_down_to_it(monkeypatch, how):
    # Trained on t < 40; handing over at 25 must run the base at 39 (inside the refiner's range) too.
    refiner = _refiner(40, "sample_switch=25") if how == "config" else _refiner(40)
    calls = _record_handoff(refiner, monkeypatch)
    refiner.sample(2, steps=10, generator=torch.Generator().manual_seed(0), **({"switch": 25} if how == "argument" else {}))
    timesteps = make_timesteps(100, 10).tolist()  # 99, 89, ..., 29, 19, 9
    assert calls["base"] == [t for t in timesteps if t >= 25] == [99, 89, 79, 69, 59, 49, 39, 29]
    assert calls["refiner"] == [19, 9]
    assert refiner.switch == (25 if how == "config" else 40)  # an argument lasts one call


def test_a_switch_above_the_trained_range_is_refused():
    refiner = _refiner(40)
    for bad in (41, 0):
        with pytest.raises(ConfigError, match=r"hand over at a step in \[1, 40\]"):
            refiner.sample(1, steps=2, switch=bad)
    with pytest.raises(ConfigError, match="model.sample_switch=41"):
        _refiner(40, "sample_switch=41")
    assert refiner.switch == 40


def test_a_refiner_initialised_from_the_base_samples_exactly_as_the_base():
    base = _ddpm(DIGITS, "model.schedule=cosine")
    with torch.no_grad():  # a base with nonzero outputs (its last layer starts at zero)
        for q in base.parameters():
            q.add_(0.1 * torch.randn(q.shape, generator=torch.Generator().manual_seed(q.numel())))
    fresh, copied = _refiner(40, base=base), _refiner(40, "init_from_base=true", base=base)
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 30])
    assert torch.equal(copied.backbone(x, t), copied.base.backbone(x, t))
    assert not torch.allclose(fresh.backbone(x, t), fresh.base.backbone(x, t))
    assert all(q.requires_grad for q in copied.backbone.parameters())  # it trains; the base stays frozen
    alone = copied.base.sample(2, steps=5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(copied.sample(2, steps=5, generator=torch.Generator().manual_seed(3)), alone, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="init_from_base=true needs the base's network"):
        _refiner(40, "init_from_base=true", "model.unet.base_channels=8")


def test_sdedit_with_the_exact_denoiser_of_one_image_returns_that_image():
    schedule = NoiseSchedule.from_name("cosine", 100)
    target = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def oracle(x_t, t):  # the data is the single image ``target``: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
        abar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1).float()
        return (x_t - abar.sqrt() * target) / (1 - abar).sqrt()

    start = torch.zeros_like(target)  # SDEdit from another image: the oracle pulls it to the target
    out = sdedit(oracle, start, schedule, t_start=99, num_steps=5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, target, atol=1e-4, rtol=0)
    # One step from t_start with eps = 0: x_0 = x_t / sqrt(abar) = x0 + sqrt((1 - abar) / abar) noise (then clipped).
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(2))
    near = sdedit(lambda x, t: torch.zeros_like(x), target, schedule, t_start=2, num_steps=1, noise=noise)
    abar = float(schedule.alphas_cumprod[2])
    torch.testing.assert_close(near, (target + math.sqrt((1 - abar) / abar) * noise).clamp(-1, 1))


def test_refine_runs_the_refiner_alone_below_t_switch():
    refiner = _refiner(40)
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    out = refiner.refine(images, t_start=20, steps=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.abs().max() <= 1
    with pytest.raises(ConfigError, match="t < t_switch=40"):
        refiner.refine(images, t_start=40)
