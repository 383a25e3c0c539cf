"""The command line of the autoencoder family: reconstruct, interpolate, eval on reconstructions, --codes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genlab import api
from genlab.cli import main
from genlab.config import read_config_file
from genlab.data import DataConfig, from_model_range, load_data, to_model_range
from genlab.evaluation import read_metrics

from oneline import one_line_error
from tiny_configs import TINY_AE, TINY_VQ


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("fam") / "vae"
    assert main(["train", "vae", "--data", "digits", "--run-dir", str(run_dir), "--no-progress",
                 *TINY_AE, "model.latent_dim=8", "train.steps=20"]) == 0
    return run_dir


def _digits_test(n=None):
    return load_data(DataConfig(source="digits", split="test", limit=n)).to_model_range()


def test_reconstruct_shows_inputs_above_and_their_reconstructions_below(vae_run, tmp_path, capsys):
    out = tmp_path / "recon.png"
    assert main(["reconstruct", str(vae_run), "--n", "5", "--out", str(out)]) == 0
    grid = np.asarray(Image.open(out))  # scale 2, padding 2: tiles of 8 px at (2 + 10 k) * 2
    x = _digits_test(5)
    x_hat = api.load_run(vae_run).reconstruct(x)
    tile = lambda row, col: grid[(2 + 10 * row) * 2:(10 + 10 * row) * 2:2, (2 + 10 * col) * 2:(10 + 10 * col) * 2:2]
    for k in range(5):
        assert np.array_equal(tile(0, k), from_model_range(x[k])[0].numpy())
        assert np.array_equal(tile(1, k), from_model_range(x_hat[k])[0].numpy())
    printed = float(capsys.readouterr().out.split()[1])
    from genlab.metrics import psnr
    assert printed == pytest.approx(psnr(x_hat, x).item(), abs=0.01)


def test_eval_of_an_autoencoder_scores_reconstructions_of_the_test_split(vae_run, capsys):
    assert main(["eval", str(vae_run), "--kind", "reconstruction", "--no-progress"]) == 0
    entry = [e for e in read_metrics(vae_run) if e["protocol"].get("kind") == "reconstruction"][-1]
    x = _digits_test()
    run = api.load_run(vae_run)
    x_hat = to_model_range(from_model_range(run.reconstruct(x))).double()
    mse = ((x_hat - x.double()) ** 2).flatten(1).mean(1)
    assert entry["protocol"]["data"] == "digits:test" and entry["protocol"]["n"] == len(x)
    assert entry["metrics"]["mse"] == pytest.approx(float(mse.mean()), rel=1e-9)
    assert entry["metrics"]["psnr_dataset"] == pytest.approx(float(10 * torch.log10(4 / mse.mean())), rel=1e-9)
    assert entry["metrics"]["psnr"] >= entry["metrics"]["psnr_dataset"]  # Jensen
    # the VAE's bound, in both units, on the same images
    assert entry["metrics"]["bits_per_dim"] == pytest.approx(entry["metrics"]["nll_nats"] / (64 * np.log(2)))
    assert "fid" not in entry["metrics"]


def test_interpolation_rows_run_from_one_reconstruction_to_the_other(vae_run):
    run = api.load_run(vae_run)
    x = _digits_test(4)
    path = run.interpolate(x[:2], x[2:], steps=5)  # (2, 5, 1, 8, 8)
    with torch.no_grad():
        ends = run.method.decode(run.method.encode(x)).clamp(-1, 1)
    torch.testing.assert_close(path[:, 0], ends[:2])
    torch.testing.assert_close(path[:, -1], ends[2:])
    with torch.no_grad():  # the middle is the decoded midpoint of the encodings
        mid = run.method.decode((run.method.encode(x[:2]) + run.method.encode(x[2:])) / 2).clamp(-1, 1)
    torch.testing.assert_close(path[:, 2], mid)


def test_interpolate_command_writes_one_row_per_pair(vae_run, tmp_path):
    out = tmp_path / "lerp.png"
    assert main(["interpolate", str(vae_run), "--pairs", "3", "--steps", "6", "--out", str(out)]) == 0
    assert Image.open(out).size == ((6 * 10 + 2) * 2, (3 * 10 + 2) * 2)


def test_a_prior_trains_on_the_codes_of_a_vq_run_and_defaults_to_its_data(tmp_path):
    vq = tmp_path / "vq"
    assert main(["train", "vqvae", "--data", "digits", "--run-dir", str(vq), "--no-progress", *TINY_VQ,
                 "train.steps=4"]) == 0
    prior = tmp_path / "prior"
    assert main(["train", "pixelcnn", "--codes", str(vq), "--run-dir", str(prior), "--no-progress",
                 "train.steps=2", "train.batch_size=16", "train.threads=1"]) == 0
    saved = read_config_file(prior / "config.yaml")
    assert saved["data"]["source"] == "digits"  # the parent's data, not the preset default
    assert saved["model"]["codes"] == str(vq.resolve())
    out = tmp_path / "s.npz"
    assert main(["sample", str(prior), "--n", "3", "--out", str(out)]) == 0


def test_requests_a_run_cannot_serve_name_the_missing_capability(tmp_path, capsys):
    from tiny_configs import TINY_DDPM

    run = tmp_path / "ddpm"
    assert main(["train", "ddpm", "--data", "digits", "--run-dir", str(run), "--no-progress", *TINY_DDPM,
                 "train.steps=2"]) == 0
    capsys.readouterr()
    out = str(tmp_path / "r.png")
    # Each request names the capability a ddpm lacks (and the methods that have it), in one line.
    for argv, capability, offered in ((["reconstruct", str(run), "--out", out], "'Reconstructs'", "vae"),
                                      (["interpolate", str(run), "--out", out], "'Encodes'", "stylegan"),
                                      (["translate", str(run), "--out", out], "'Translates'", "pix2pix"),
                                      (["invert", str(run), "--out", out], "'GANLatent'", "gan")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {run}: a ddpm run cannot ") and "\n" not in err, err
        assert f"needs the capability {capability}" in err and offered in err, err


def test_pix2pix_translate_and_eval_score_the_same_held_out_pairs(tmp_path, capsys):
    run = tmp_path / "p2p"
    assert main(["train", "pix2pix", "--data", "digits", "--run-dir", str(run), "--no-progress", "model.task=lowres",
                 "model.generator.base_channels=8", "model.disc_base_channels=8", "train.steps=3", "train.batch_size=16",
                 "train.threads=1"]) == 0
    capsys.readouterr()
    assert main(["translate", str(run), "--n", "8", "--out", str(tmp_path / "t.png")]) == 0
    printed = capsys.readouterr().out.split()
    psnr_translate = float(printed[printed.index("psnr") + 1])
    assert main(["eval", str(run), "--n", "8"]) == 0
    entry = [e for e in read_metrics(run) if e["protocol"].get("kind") == "translation"][-1]
    assert entry["protocol"]["task"] == "lowres" and entry["protocol"]["n"] == 8
    assert entry["metrics"]["psnr"] == pytest.approx(psnr_translate, abs=1e-3)
    # an independent computation of the same number
    from genlab.data.paired import lowres
    r = api.load_run(run)
    b = _digits_test(8)
    with torch.no_grad():
        b_hat = r.method.translate(lowres(b))
    mse = ((b_hat - b) ** 2).flatten(1).mean(1)
    assert entry["metrics"]["psnr"] == pytest.approx(float((10 * torch.log10(4 / mse)).mean()), abs=1e-3)


def test_translate_shows_the_one_channel_edge_input_of_an_rgb_run_as_grey(tmp_path):
    """Edges of RGB images are one channel: the input row is that map in grey (it crashed on torch.cat)."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        folder = tmp_path / "imgs" / split / "a"
        folder.mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    run, out = tmp_path / "p2p", tmp_path / "t.png"
    assert main(["train", "pix2pix", "--data", f"folder:{tmp_path / 'imgs'}", "--run-dir", str(run), "--no-progress",
                 "model.task=edges", "model.generator.base_channels=8", "model.disc_base_channels=8", "train.steps=1",
                 "train.batch_size=8", "train.threads=1"]) == 0
    assert main(["translate", str(run), "--n", "8", "--out", str(out)]) == 0
    grid = np.asarray(Image.open(out).convert("RGB")).astype(int)  # rows: input, output, target
    top, bottom = grid[: grid.shape[0] // 3], grid[2 * grid.shape[0] // 3:]
    assert (top[..., 0] == top[..., 1]).all() and (top[..., 1] == top[..., 2]).all()
    assert (bottom[..., 0] != bottom[..., 1]).any()  # the coloured targets
