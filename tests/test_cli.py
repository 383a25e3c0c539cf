"""The command line: train -> sample round trip, and one-line errors on bad input (SPEC P1, P7)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genlab import api
from genlab.cli import main
from genlab.imageio import load_npz

from oneline import one_line_error
from tiny_configs import TINY_DDPM


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "ddpm", "--data", "digits", "--run-dir", str(run_dir), "--no-progress",
                 *TINY_DDPM, "train.steps=6"]) == 0
    return run_dir


def test_train_prints_the_run_folder_last(tiny_run, capsys):
    assert (tiny_run / "config.yaml").is_file() and (tiny_run / "log.jsonl").is_file()
    assert any((tiny_run / "samples").glob("step_*.png"))


def test_sample_npz_is_uint8_nhwc_and_reproducible(tiny_run, tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    for out in (a, b):
        assert main(["sample", str(tiny_run), "--n", "5", "--seed", "3", "--steps", "4", "--out", str(out)]) == 0
    with np.load(a) as fa, np.load(b) as fb:
        assert fa["images"].dtype == np.uint8 and fa["images"].shape == (5, 8, 8, 1)
        assert np.array_equal(fa["images"], fb["images"])
    # ... and equal to the Python API with the same seed and options (the CLI adds no logic).
    images = api.load_run(tiny_run).sample(5, seed=3, steps=4)
    assert torch.equal(load_npz(a), ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    c = tmp_path / "c.npz"
    assert main(["sample", str(tiny_run), "--n", "5", "--seed", "4", "--steps", "4", "--out", str(c)]) == 0
    with np.load(a) as fa, np.load(c) as fc:
        assert not np.array_equal(fa["images"], fc["images"])


def test_sample_png_grid(tiny_run, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", str(tiny_run), "--n", "4", "--sampler", "ddpm", "--steps", "3", "--out", str(out)]) == 0
    img = Image.open(out)
    assert img.size == (2 + 2 * 10, 2 + 2 * 10)  # 2x2 grid of 8x8 tiles with 2-pixel padding


@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "ddpm", "--data", "digits", "train.lrr=1"], ["train.lrr", "train.lr"]),
        (["train", "nosuchmethod"], ["nosuchmethod", "ddpm"]),
        (["train", "ddpm", "--data", "nosuchdata"], ["nosuchdata", "mnist5k"]),
        (["train", "ddpm", "--data", "folder:/no/such/folder"], ["/no/such/folder"]),
        (["sample", "/no/such/run", "--out", "x.png"], ["/no/such/run"]),
        (["sample", "/tmp", "--out", "x.jpg"], ["x.jpg", ".png", ".npz"]),
    ],
)
def test_bad_input_gives_one_line_errors(argv, words, capsys):
    assert main(argv) == 2
    err = one_line_error(capsys)
    for w in words:
        assert w in err


def test_missing_mnist_files_name_the_folder_and_files(tmp_path, capsys, monkeypatch):
    import socket

    def no_network(*a, **k):
        raise socket.gaierror("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    assert main(["train", "ddpm", "--data", "mnist", "--data-root", str(tmp_path)]) == 2
    err = one_line_error(capsys)
    assert "train-images-idx3-ubyte" in err and str(tmp_path) in err


def test_corrupt_image_in_a_folder_is_named(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "good.png")
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    assert main(["train", "ddpm", "--data", f"folder:{folder}", *TINY_DDPM]) == 2
    assert "bad.png" in one_line_error(capsys)


def test_data_list_names_every_source(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("digits", "mnist5k", "mnist", "fashion-mnist", "cifar10", "folder:PATH"):
        assert name in out


@pytest.mark.parametrize("argv", [
    ["eval", "RUN"], ["reconstruct", "RUN", "--out", "o.png"], ["interpolate", "RUN", "--out", "o.png"],
    ["translate", "RUN", "--out", "o.png"], ["invert", "RUN", "--out", "o.png"], ["export-evaluator", "RUN", "NAME"],
])
def test_every_command_on_a_run_takes_the_same_data_root_and_weights_options(argv):
    from genlab.cli import _parser

    a = _parser().parse_args([*argv, "--data-root", "/d", "--weights", "raw"])
    assert (a.data_root, a.weights) == ("/d", "raw")
    assert _parser().parse_args(argv).weights == "ema"
    with pytest.raises(SystemExit):
        _parser().parse_args([*argv, "--weights", "best"])


def test_python_dash_m_genlab_is_the_command_line():
    """`python -m genlab` runs the same CLI as the `genlab` script (exit code and the one-line usage error)."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    ok = subprocess.run([sys.executable, "-m", "genlab", "--version"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and ok.stdout.startswith("genlab ")
    bad = subprocess.run([sys.executable, "-m", "genlab", "bogus"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "invalid choice: 'bogus'" in bad.stderr and "Traceback" not in bad.stderr
