"""Encoder-based inversion on a real (tiny) GAN run, and the `genlab invert` command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genlab import api
from genlab.cli import main
from genlab.data import DataConfig, load_data
from genlab.errors import ConfigError
from genlab.inversion import render
from genlab.runs import build_method

from tiny_configs import TINY_DCGAN, TINY_ENCODER


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("inv") / "gan"
    api.train("gan", data="digits", overrides=TINY_DCGAN + ["train.steps=10"], run_dir=run_dir, progress=False)
    return run_dir


def _latent_error(encoder, gan, n=256) -> float:
    z = torch.randn(n, gan.latent_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return float(((encoder.invert(render(gan, z, "z")) - z) ** 2).mean())


def test_encoder_learns_the_generator_coordinates_and_leaves_the_gan_frozen(gan_run, tmp_path):
    run = api.train("gan-encoder", overrides=[f"model.gan={gan_run}"] + TINY_ENCODER + ["train.steps=60"],
                    run_dir=tmp_path / "enc", progress=False)
    assert run.config.data.source == "digits"  # the GAN's data by default
    encoder = run.method
    fresh = build_method(run.config, encoder.data_info)
    gan = api.load_run(gan_run).method
    assert _latent_error(encoder, gan) < 0.7 * _latent_error(fresh, gan)
    for (name, p), q in zip(encoder.gan.named_parameters(), gan.parameters()):
        assert torch.equal(p, q), name  # the frozen generator kept its weights
    assert all(not p.requires_grad for p in encoder.gan.parameters())


def test_encoder_needs_a_gan_run():
    with pytest.raises(ConfigError, match="--gan"):
        api.train("gan-encoder", data="digits", overrides=TINY_ENCODER + ["train.steps=1"], run_dir=None, progress=False)


def test_invert_command_reports_the_psnr_of_what_it_saves(gan_run, tmp_path, capsys):
    out = tmp_path / "inv.png"
    assert main(["invert", str(gan_run), "--data", "digits:test", "--n", "4", "--steps", "30",
                 "--perceptual-weight", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[0] == "psnr" and out.is_file()
    grid = np.asarray(Image.open(out))
    target = load_data(DataConfig(source="digits", split="test", limit=4)).images[:, 0].numpy()
    # row 0 holds the targets (scale 2, padding 2)
    for k in range(4):
        tile = grid[4:20:2, (2 + 10 * k) * 2:(10 + 10 * k) * 2:2]
        assert np.array_equal(tile, target[k])
    assert float(printed[1]) > 5.0
