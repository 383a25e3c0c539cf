"""The command line of ControlNet and T2I-Adapter: train on a frozen base run, sample from control maps."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genlab import api
from genlab.cli import main
from genlab.config import read_config_file
from genlab.data import DataConfig, load_data
from genlab.data.controls import edges
from genlab.imageio import load_npz

from oneline import one_line_error
from tiny_configs import TINY_DDPM

CHILD_TRAINING = ["train.steps=3", "train.batch_size=16", "train.threads=1", "train.sample_n=2",
                  "train.warmup_steps=0", "train.checkpoint_every=3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny class-conditional DDPM on digits and a ControlNet (edges) trained on it for a few steps."""
    root = tmp_path_factory.mktemp("control")
    base = root / "base"
    assert main(["train", "ddpm", "--data", "digits", "--run-dir", str(base), "--no-progress", *TINY_DDPM,
                 "model.class_conditional=true", "train.steps=4", "train.sample_n=2"]) == 0
    child = root / "controlnet"
    assert main(["train", "controlnet", "--base", str(base), "--control", "edges", "--run-dir", str(child),
                 "--no-progress", *CHILD_TRAINING]) == 0
    return {"base": base, "controlnet": child}


def test_a_controlnet_trains_on_the_base_data_and_samples_from_a_split(runs, tmp_path, capsys):
    saved = read_config_file(runs["controlnet"] / "config.yaml")
    assert saved["data"]["source"] == "digits" and saved["model"]["base"] == str(runs["base"].resolve())
    assert saved["model"]["control"] == "edges"
    out = tmp_path / "s.npz"
    capsys.readouterr()
    assert main(["sample", str(runs["controlnet"]), "--n", "3", "--steps", "2", "--class", "4",
                 "--control-from", "digits:test", "--control-scale", "0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "adherence" in printed and "edges F1" in printed
    # The same images from the API, with the control maps of the first 3 test digits.
    run = api.load_run(runs["controlnet"])
    maps = edges(load_data(DataConfig(source="digits", split="test", limit=3)).to_model_range())
    expected = run.sample(3, steps=2, labels=torch.full((3,), 4), control=maps, control_scale=0.5)
    from genlab.data import from_model_range
    assert torch.equal(load_npz(out), from_model_range(expected))


def test_a_child_keeps_working_after_its_base_folder_moves(runs, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(runs["base"], moved / "base")
    shutil.copytree(runs["controlnet"], moved / "controlnet")
    shutil.rmtree(moved / "base")  # the child rebuilds the base from its own checkpoint
    run = api.load_run(moved / "controlnet")
    assert run.sample(2, steps=2, control=torch.full((2, 1, 8, 8), -1.0)).shape == (2, 1, 8, 8)


def test_control_image_file_of_the_right_size_is_used_for_every_sample(runs, tmp_path, capsys):
    png = tmp_path / "map.png"
    Image.fromarray(np.where(np.eye(8, dtype=bool), 255, 0).astype(np.uint8)).save(png)
    out = tmp_path / "s.npz"
    assert main(["sample", str(runs["controlnet"]), "--n", "2", "--steps", "2", "--control-image", str(png),
                 "--out", str(out)]) == 0
    run = api.load_run(runs["controlnet"])
    diagonal = torch.where(torch.eye(8, dtype=torch.bool), 1.0, -1.0).expand(2, 1, 8, 8)
    from genlab.data import from_model_range
    assert torch.equal(load_npz(out), from_model_range(run.sample(2, steps=2, control=diagonal)))


def test_bad_control_inputs_are_one_line_errors(runs, tmp_path, capsys):
    child = str(runs["controlnet"])
    wrong = tmp_path / "wrong.png"
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(wrong)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"this is not a png")
    cases = [
        (["--control-image", str(wrong)], "map is 10x12 px, the run makes 8x8 px images; resize it to 8x8"),
        (["--control-image", str(corrupt)], "corrupt.png"),
        (["--control-image", str(tmp_path / "missing.png")], "missing.png: no such file"),
        ([], "samples from control maps: give --control-from SOURCE:SPLIT"),
        (["--control-from", "digits:test", "--control-image", str(wrong)], "not both"),
        (["--control-from", "digits:test", "--control-scale", "-1"], "--control-scale must be a number >= 0"),
    ]
    for flags, message in cases:
        capsys.readouterr()
        assert main(["sample", child, "--n", "2", "--steps", "2", "--out", str(tmp_path / "x.png"), *flags]) != 0
        assert message in one_line_error(capsys)
    capsys.readouterr()
    assert main(["sample", str(runs["base"]), "--n", "2", "--out", str(tmp_path / "x.png"),
                 "--control-from", "digits:test"]) != 0
    assert "--control-from is for controlnet and t2i-adapter runs" in one_line_error(capsys)


def test_a_t2i_adapter_trains_and_samples_from_the_command_line(runs, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    assert main(["train", "t2i-adapter", "--base", str(runs["base"]), "--control", "mask", "--run-dir",
                 str(adapter), "--no-progress", *CHILD_TRAINING]) == 0
    capsys.readouterr()
    assert main(["sample", str(adapter), "--n", "2", "--steps", "2", "--control-from", "digits:test",
                 "--out", str(tmp_path / "a.png")]) == 0
    assert "mask IoU" in capsys.readouterr().out
