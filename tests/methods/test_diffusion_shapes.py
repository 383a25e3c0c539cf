"""Diffusion networks take their shapes from the data: every source and preset trains without size overrides."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from genlab import api
from genlab.config import build_config
from genlab.errors import ConfigError
from genlab.methods import DataInfo
from genlab.methods.ddpm import DDPM, derived_pixel_patch
from genlab.methods.dit import DiT
from genlab.models.dit import derived_patch_size
from genlab.models.unet import derived_levels

# Tiny training: shapes come from the preset (or the defaults) and the data, never from these.
TINY_RUN = ["train.steps=2", "train.batch_size=8", "data.limit=64", "train.sample_n=2", "model.sample_steps=2",
            "model.num_timesteps=50", "train.checkpoint_every=2", "train.log_every=1", "train.threads=1",
            "train.warmup_steps=0"]


def test_derived_shapes_match_the_hand_sized_presets_they_replace():
    # 28 px: ddpm_small's former 2x2 patches, levels 14 and 7 (channel_mult [1, 2]), attention at 7;
    # dit_small's former patch 4 (7 x 7 tokens); DDPM's CIFAR-10 U-Net has 4 levels at 32 px.
    assert derived_pixel_patch(28) == 2 and derived_levels(14) == 2
    assert derived_patch_size(28) == 4
    assert derived_levels(32) == 4 and derived_pixel_patch(8) == 1 and derived_levels(8) == 2
    method = DDPM(build_config("ddpm", DDPM.Config, preset="small").model, DataInfo(1, 28))
    assert method.config.patch_size == 2
    assert method.config.unet.channel_mult == (1, 2) and method.config.unet.attention_resolutions == (7,)
    assert method.unet.conv_in.in_channels == 4


@pytest.mark.parametrize("size", range(8, 257))
def test_derived_shapes_fit_every_size(size):
    p = derived_pixel_patch(size)
    working = size // p
    assert size % p == 0 and (working <= 16 or p == 4 or working % 2)  # patches stop at 16 px, p = 4 or an odd size
    levels = derived_levels(working)
    lowest = working // 2 ** (levels - 1)
    assert working % 2 ** (levels - 1) == 0 and lowest >= 4 or levels == 1
    assert levels == 6 or lowest % 2 or lowest // 2 < 4  # no further halving was possible
    q = derived_patch_size(size)
    assert size % q == 0 and size // q <= 8
    assert all(size % r or size // r > 8 for r in range(1, q))  # the smallest such patch


@pytest.mark.parametrize("method_name", ["ddpm", "dit"])
@pytest.mark.parametrize("preset", [None, "small"])
@pytest.mark.parametrize("size", [8, 20, 21, 28, 32, 36, 64])
def test_every_preset_builds_for_every_size_and_keeps_the_output_shape(method_name, preset, size):
    cls = DDPM if method_name == "ddpm" else DiT
    cfg = build_config(method_name, cls.Config, preset=preset).model
    method = cls(cfg, DataInfo(3, size))
    assert cfg.patch_size is None  # the caller's config is left as given; the method's is resolved
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert method.network(x, torch.tensor([0, 999])).shape == x.shape


def test_an_explicit_value_that_cannot_work_is_still_a_one_line_error():
    cases = [  # 32 px: derived 2x2 patches, so the U-Net's feature maps are 16, 8 and 4 px
        (32, ["model.unet.attention_resolutions=[7]"], r"includes \[7\], which never occurs"),
        (28, ["model.unet.channel_mult=[1,2,2,2]", "model.patch_size=1"], "image_size=28 is not divisible by 8"),
        (28, ["model.patch_size=3"], "model.patch_size=3 must be a positive divisor"),
    ]
    for size, overrides, match in cases:
        with pytest.raises(ConfigError, match=match) as e:
            DDPM(build_config("ddpm", DDPM.Config, overrides=overrides).model, DataInfo(1, size))
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="patch_size=3 must divide the image size 32"):
        DiT(build_config("dit", DiT.Config, overrides=["model.dit.patch_size=3"]).model, DataInfo(1, 32))


def _image_folder(path, size: int, n: int = 64):
    """A folder of n random RGB PNGs of size x size pixels."""
    path.mkdir()
    rng = np.random.default_rng(size)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path / f"{i:03d}.png")
    return f"folder:{path}"


def _train_and_reload(tmp_path, method: str, source: str, preset: str | None, extra=()):
    run = api.train(method, data=source, preset=preset, overrides=TINY_RUN + list(extra), run_dir=tmp_path / "run",
                    progress=False)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]
    network = saved["network"]
    assert saved["unet" if network == "dit" else "dit"] is None  # the unused section is not carried along
    if network == "unet":  # the derived sizes are recorded, so a reload rebuilds the same network
        assert saved["patch_size"] >= 1 and saved["unet"]["channel_mult"] and saved["unet"]["attention_resolutions"]
    else:
        assert saved["dit"]["patch_size"] >= 1
    again = api.load_run(tmp_path / "run")  # load_state_dict is strict: a different network would fail here
    images = again.sample(2, seed=0)
    info = run.method.data_info
    assert images.shape == (2, info.channels, info.image_size, info.image_size)
    assert torch.equal(images, run.sample(2, seed=0))


@pytest.mark.parametrize("preset", [None, "small"])
@pytest.mark.parametrize("method", ["ddpm", "dit"])
def test_training_without_size_overrides_works_on_digits(tmp_path, method, preset):
    _train_and_reload(tmp_path, method, "digits", preset)


def test_trainings_with_different_mixed_precision_share_one_process(tmp_path):
    # accelerate's process-wide state would refuse the second and third Accelerator (bf16, then back).
    for i, precision in enumerate(["bf16", "no", "bf16"]):
        api.train("ddpm", data="digits", overrides=TINY_RUN + [f"train.mixed_precision='{precision}'"],
                  run_dir=tmp_path / f"run{i}", progress=False)
        assert yaml.safe_load((tmp_path / f"run{i}" / "config.yaml").read_text())["train"]["mixed_precision"] == precision


def test_auto_mixed_precision_trains_in_what_the_machine_computes_natively(tmp_path, monkeypatch):
    from genlab import autotune

    for i, (flags, expected) in enumerate([({"avx512_bf16"}, "bf16"), ({"avx2"}, "no")]):
        monkeypatch.setattr(autotune, "cpu_flags", lambda flags=flags: flags)
        api.train("ddpm", data="digits", overrides=TINY_RUN + ["train.mixed_precision=auto", "train.device=cpu"],
                  run_dir=tmp_path / f"run{i}", progress=False)
        start = next(r for r in map(json.loads, (tmp_path / f"run{i}" / "log.jsonl").read_text().splitlines()) if r["kind"] == "start")
        assert start["values"]["mixed_precision"] == expected and start["values"]["config"]["train"]["mixed_precision"] == "auto"


@pytest.mark.slow
@pytest.mark.parametrize("preset", [None, "small"])
@pytest.mark.parametrize("source", ["mnist5k", "mnist", "fashion-mnist", "cifar10"])
def test_ddpm_trains_on_every_built_in_source(tmp_path, data_root, source, preset):
    _train_and_reload(tmp_path, "ddpm", source, preset, [f"data.root={data_root}"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ddpm", "dit"])
@pytest.mark.parametrize("preset", [None, "small"])
@pytest.mark.parametrize("size", [8, 20, 32, 64, 256])
def test_training_works_on_image_folders_of_any_size(tmp_path, method, preset, size):
    _train_and_reload(tmp_path, method, _image_folder(tmp_path / "images", size), preset)
