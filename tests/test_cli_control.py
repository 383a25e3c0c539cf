"""The command line of ControlNet and T2I-Adapter: train on a frozen base run, sample from control maps."""

from __future__ import annotations

import json
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


def test_eval_of_a_control_run_scores_controlled_samples_of_held_out_maps(runs, tmp_path, capsys, monkeypatch):
    """`genlab eval CONTROLNET` scores what the run makes, samples steered by the maps of its held-out split (here
    digits:test), not its frozen base's uncontrolled samples: its FID is that of `genlab sample --control-from
    digits:test` saved as .npz, and differs from the base's."""
    from test_evaluation import _tiny_evaluator

    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))
    extractor = str(_tiny_evaluator(tmp_path / "evaluators"))
    # 3 steps at a high learning rate: zero convolutions far enough from 0 that the maps change 8-bit samples
    strong = tmp_path / "strong"
    assert main(["train", "controlnet", "--base", str(runs["base"]), "--control", "edges", "--run-dir", str(strong),
                 "--no-progress", *CHILD_TRAINING, "train.lr=0.05", "train.ema_decay=null"]) == 0
    runs = {**runs, "controlnet": strong}
    common = ["--n", "16", "--steps", "2", "--class", "3"]
    scale = ["--control-scale", "2"]

    def fid(target: str, *flags: str, json_path: Path | None = None) -> float:  # full precision, from --json
        json_path = json_path or tmp_path / "last.json"
        argv = ["eval", target, "--ref", "digits:train", "--metrics", "fid", "--extractor", extractor, "--no-progress"]
        assert main(argv + list(flags) + ["--json", str(json_path)]) == 0
        capsys.readouterr()
        return json.loads(json_path.read_text())["metrics"]["fid"]

    def sampled(run: Path, out: Path, *flags: str) -> str:
        assert main(["sample", str(run), *common, "--out", str(out), *flags]) == 0
        return capsys.readouterr().out

    printed = sampled(runs["controlnet"], tmp_path / "controlled.npz", "--control-from", "digits:test", *scale)
    sampled(runs["base"], tmp_path / "base.npz")
    assert not torch.equal(load_npz(tmp_path / "controlled.npz"), load_npz(tmp_path / "base.npz"))
    controlled, base = fid(str(tmp_path / "controlled.npz"), "--n", "16"), fid(str(tmp_path / "base.npz"), "--n", "16")
    assert controlled != base
    result_path = tmp_path / "r.json"
    assert fid(str(runs["controlnet"]), *common, *scale, json_path=result_path) == controlled  # default: digits:test
    result = json.loads(result_path.read_text())
    assert result["protocol"]["control"] == {"maps_from": "digits:test[:16]", "scale": 2.0, "kind": "edges",
                                             "adherence_metric": "edges F1 (tolerance 0 px)"}
    assert result["protocol"]["sampler"] is not None  # the base's sampler, recorded
    assert abs(result["metrics"]["adherence"] - float(printed.split("adherence ")[1].split()[0])) <= 5e-4
    # Other control sources are taken as `genlab sample` takes them; a run that is not a control run refuses them.
    assert fid(str(runs["controlnet"]), *common, *scale, "--control-from", "digits:train") != controlled
    assert main(["eval", str(runs["base"]), "--ref", "digits:train", "--metrics", "fid", "--extractor", extractor,
                 *common, "--control-from", "digits:test", "--no-progress"]) != 0
    assert "--control-from is for controlnet and t2i-adapter runs" in one_line_error(capsys)


def test_periodic_eval_of_a_control_run_uses_the_maps_of_held_out_images(runs, monkeypatch):
    """train.eval_every of a control run scores controlled samples: the maps of its first eval_n held-out images,
    each chunk of samples with its own rows."""
    from genlab import evaluation
    from genlab.config import build_config
    from genlab.methods.control import ControlNetMethod

    seen = []
    monkeypatch.setattr(evaluation, "periodic_eval", lambda method, **kw: seen.append(kw["sample_options"]) or {})
    cfg = build_config("controlnet", ControlNetMethod.Config, overrides=[
        f"base={runs['base']}", "data.source=digits", "train.eval_every=1", "train.eval_ref=digits:train",
        "train.eval_n=10"])
    evaluate = api._periodic_evaluator(cfg)
    run = api.load_run(runs["controlnet"])
    evaluate(run.method)
    expected = edges(load_data(DataConfig(source="digits", split="test", limit=10)).to_model_range())
    assert torch.equal(seen[0]["control"], expected)
    monkeypatch.undo()
    # the real periodic_eval with a batch smaller than n: each chunk takes its maps (no shape error)
    from genlab.evaluation.periodic import periodic_eval

    calls = []
    sample = run.method.sample
    monkeypatch.setattr(run.method, "sample", lambda m, **kw: calls.append(kw["control"]) or sample(m, steps=2, **kw))
    monkeypatch.setattr("genlab.evaluation.periodic.score_images", lambda *a, **k: ({"fid": 0.0}, {}))
    monkeypatch.setattr("genlab.evaluation.periodic.reference_stats", lambda *a, **k: None)
    monkeypatch.setattr("genlab.evaluation.periodic.resolve_extractor", lambda *a, **k: None)
    periodic_eval(run.method, ref="digits:train", n=10, batch_size=4, sample_options={"control": expected})
    assert [len(c) for c in calls] == [4, 4, 2] and torch.equal(torch.cat(calls), expected)
