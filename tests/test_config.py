"""Configs: layering, type checking, and errors that name the key (SPEC P3)."""

from __future__ import annotations

import pytest
import yaml

from genlab.config import build_config, list_presets, parse_override, to_dict
from genlab.errors import ConfigError
from genlab.methods.ddpm import DDPMConfig


def build(*overrides, preset=None):
    return build_config("ddpm", DDPMConfig, preset=preset, overrides=list(overrides))


def test_overrides_are_typed_and_layered_over_the_preset():
    cfg = build("train.lr=3e-4", "model.unet.channel_mult=[1,2]", "train.grad_clip=null", "steps=77", preset="small")
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.unet.channel_mult == (1, 2)
    assert cfg.train.grad_clip is None
    assert cfg.train.steps == 77  # bare leaf name resolved to train.steps
    small = yaml.safe_load(open(list_presets.__globals__["preset_dir"]() / "ddpm_small.yaml"))
    assert cfg.model.unet.base_channels == small["model"]["unet"]["base_channels"]  # preset applied
    assert cfg.train.batch_size == small["train"]["batch_size"]


def test_yaml_one_e_minus_four_without_dot_is_a_float():
    # YAML 1.1 reads "1e-4" as a string; a float field must still accept it.
    assert build("train.lr=1e-4").train.lr == 1e-4


def test_saved_config_round_trips():
    cfg = build("train.lr=5e-4", "model.prediction=v", preset="small")
    again = build_config("ddpm", DDPMConfig, base=yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    assert again == cfg


@pytest.mark.parametrize(
    "override, must_mention",
    [
        ("train.lrr=1", ["train.lrr", "train.lr"]),  # unknown key: named, valid ones listed, a suggestion
        ("model.unet.base_chanels=8", ["model.unet.base_chanels", "base_channels"]),
        ("nosuchkey=1", ["nosuchkey", "train.steps"]),
        ("train.steps=many", ["train.steps", "int", "many"]),  # ill-typed
        ("train.steps=true", ["train.steps"]),  # a bool is not an int
        ("model.prediction=noise", ["model.prediction", "eps", "x0", "v"]),  # not in the Literal
        ("model.unet.channel_mult=3", ["model.unet.channel_mult", "list"]),
        ("train.lr", ["key=value"]),
    ],
)
def test_bad_keys_and_values_name_the_key(override, must_mention):
    with pytest.raises(ConfigError) as e:
        build(override)
    message = str(e.value)
    assert "\n" not in message
    for word in must_mention:
        assert word in message


def test_ambiguous_bare_key_is_rejected_with_the_candidates():
    from dataclasses import dataclass

    @dataclass
    class WithSteps:  # a model section that also has a field named "steps"
        steps: int = 1

    with pytest.raises(ConfigError, match="ambiguous") as e:
        parse_override("steps=3", WithSteps)
    assert "train.steps" in str(e.value) and "model.steps" in str(e.value)
    assert parse_override("model.steps=3", WithSteps) == (["model", "steps"], 3)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="small"):
        build(preset="huge")


def test_full_preset_is_the_35_7m_ddpm_cifar10_model():
    from genlab.methods import DataInfo
    from genlab.methods.ddpm import DDPM

    cfg = build(preset="cifar10_full")
    method = DDPM(cfg.model, DataInfo(channels=3, image_size=32))
    n = sum(p.numel() for p in method.parameters())
    assert abs(n - 35.7e6) < 0.1e6, n  # Ho et al. 2020, CIFAR-10 model
    assert cfg.data.source == "cifar10" and cfg.train.lr == 2e-4 and cfg.train.ema_decay == 0.9999


def test_presets_of_a_longer_method_name_are_not_listed_under_the_shorter_one():
    from genlab.config import list_presets

    assert "small" in list_presets("gan-encoder")
    assert not any(p.startswith("encoder") for p in list_presets("gan"))
    assert "wgan_gp_small" in list_presets("gan")


def test_or_null_is_offered_only_for_the_key_that_may_be_null():
    """model.unet is an optional section, its keys are not: an error about a key inside it must not say
    "or null" (it used to, e.g. "pooled_text must be bool or null, got None"); an optional key still does."""
    with pytest.raises(ConfigError, match=r"'model\.unet\.pooled_text' must be bool, got None$"):
        build("model.unet.pooled_text=null")
    with pytest.raises(ConfigError, match=r"'model\.unet\.num_res_blocks' must be >= 0, got -1$"):
        build("model.unet.num_res_blocks=-1")
    with pytest.raises(ConfigError, match=r"'model\.unet\.num_head_channels' must be >= 1 or null, got 0$"):
        build("model.unet.num_head_channels=0")


def test_a_bare_no_reaches_a_choice_that_offers_no():
    """YAML 1.1 reads `no` as false: `train.mixed_precision=no` (and a preset's `mixed_precision: no`) must still
    mean the choice "no", not an error; a boolean where the choices have no "no" stays an error."""
    assert build("train.mixed_precision=no").train.mixed_precision == "no"
    assert build("train.mixed_precision=bf16").train.mixed_precision == "bf16"
    with pytest.raises(ConfigError, match=r"'train.lr_schedule' must be one of .*got False$"):
        build("train.lr_schedule=no")
