"""Hostile input (issue 12): every bad value, damaged file and failed write is one line naming the cause and the fix."""

from __future__ import annotations

import errno
import json
import pathlib
import shutil
import tarfile
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from genlab import api, cli
from genlab.cli import main
from genlab.errors import ConfigError, GenlabError
from genlab.runs import checkpoint_choice, load_run
from genlab.train.checkpoint import list_checkpoints, load_checkpoint

from oneline import one_line, one_line_error
from tiny_configs import TINY_DDPM

CLASS_DDPM = [*TINY_DDPM, "model.class_conditional=true", "train.checkpoint_every=2", "train.keep_checkpoints=3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A class-conditional tiny DDPM on digits (10 classes) with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("reliability") / "run"
    assert main(["train", "ddpm", "--data", "digits", "--run-dir", str(run_dir), "--no-progress", *CLASS_DDPM,
                 "train.steps=4"]) == 0
    return run_dir


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "copy"))


def _steps(run: Path) -> list[int]:
    return [int(p.name.split("_")[1]) for p in list_checkpoints(run)]


# ---------------------------------------------------------------------------------------------
# 1. Config values: checked when the config is built, before any file is written.


@pytest.mark.parametrize("override, words", [
    ("train.checkpoint_every=0", ["train.checkpoint_every", ">= 1", "got 0"]),
    ("train.log_every=0", ["train.log_every", ">= 1", "got 0"]),
    ("train.batch_size=0", ["train.batch_size", ">= 1", "got 0"]),
    ("train.lr=nan", ["train.lr", "> 0", "nan"]),
    ("train.lr=-1", ["train.lr", "> 0", "-1"]),
    ("train.steps=-5", ["train.steps", ">= 1", "-5"]),
    ("train.keep_checkpoints=0", ["train.keep_checkpoints", ">= 1"]),
    ("train.ema_decay=1.5", ["train.ema_decay", "[0, 1]", "or null", "1.5"]),
    ("train.grad_clip=inf", ["train.grad_clip", "> 0", "inf"]),
    ("train.adam_betas=[0.9]", ["train.adam_betas", "two numbers"]),
    ("train.device=tpu", ["train.device", "cuda", "tpu"]),
    ("train.seed=-1", ["train.seed", "-1"]),
    ("model.unet.base_channels=0", ["model.unet.base_channels", ">= 1"]),
    ("model.p_uncond=2", ["model.p_uncond", "[0, 1]"]),
    ("model.eta=-.5", ["model.eta", "[0, 1]"]),
    ("model.unet.channel_mult=[1,0]", ["model.unet.channel_mult[1]", ">= 1"]),
    ("data.limit=0", ["data.limit", ">= 1"]),
])
def test_bad_config_values_are_refused_before_a_run_folder_is_written(tmp_path, capsys, override, words):
    run_dir = tmp_path / "run"
    assert main(["train", "ddpm", "--data", "digits", "--run-dir", str(run_dir), "--no-progress", *TINY_DDPM,
                 override]) == 2
    err = one_line_error(capsys)
    assert all(w in err for w in words), err
    assert not run_dir.exists()


def test_cuda_device_without_cuda_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run_dir = tmp_path / "run"
    assert main(["train", "ddpm", "--data", "digits", "--run-dir", str(run_dir), *TINY_DDPM, "train.device=cuda"]) == 2
    assert "no CUDA GPU" in one_line_error(capsys) and not run_dir.exists()


# ---------------------------------------------------------------------------------------------
# 2. Sampling options.


@pytest.mark.parametrize("options, words", [
    (["--class", "99"], ["--class 99", "10 classes", "0 to 9"]),
    (["--class", "-1"], ["--class -1", "10 classes"]),
    (["--negative-class", "10", "--class", "1"], ["--negative-class 10"]),
    (["--batch-size", "0"], ["--batch-size", ">= 1", "got 0"]),
    (["--steps", "0"], ["--steps", "[1, 100000]", "got 0"]),
    (["--n", "0"], ["--n", ">= 1"]),
    (["--seed", "-1"], ["--seed", "-1"]),
    (["--class", "1", "--guidance-scale", "-2"], ["--guidance-scale", ">= 0", "-2"]),
    (["--eta", "-0.5"], ["--eta", "[0, 1]"]),
])
def test_bad_sampling_options_are_one_line_errors(run, tmp_path, capsys, options, words):
    out = tmp_path / "x.png"
    assert main(["sample", str(run), "--n", "2", "--out", str(out), *options]) == 2
    err = one_line_error(capsys)
    assert all(w in err for w in words), err
    assert not out.exists()


def test_steps_zero_is_refused_not_replaced_by_the_default(run):
    loaded = load_run(run)
    with pytest.raises(ConfigError, match="steps"):
        loaded.sample(2, steps=0)
    with pytest.raises(ConfigError, match="num_steps=0"):  # the method itself, called directly
        loaded.method.sample(2, steps=0, labels=torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# 3. Checkpoint choice and fallback.


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_with_a_warning(run, tmp_path, capsys):
    r = _copy(run, tmp_path)
    _flip_a_byte(r / "checkpoints" / "step_000004" / "model.safetensors")
    with pytest.warns(UserWarning, match="skipping damaged checkpoint step_000004"):
        assert load_run(r).step == 2
    with pytest.warns(UserWarning, match="skipping damaged checkpoint step_000004: .*sha256 mismatch") as caught:
        assert main(["sample", str(r), "--n", "2", "--steps", "2", "--out", str(tmp_path / "s.png")]) == 0
    one_line(cli._format_warning(caught[0].message, UserWarning, "", 0))
    # resume continues from the intact step 2 (and replaces the damaged step 4)
    assert main(["train", "ddpm", "--run-dir", str(r), "--resume", "--no-progress", "train.steps=4"]) == 0
    assert _steps(r) == [2, 4] and load_checkpoint(r / "checkpoints" / "step_000004")[1]["step"] == 4
    fresh = load_run(run, weights="raw").method.state_dict()
    resumed = load_run(r, weights="raw").method.state_dict()
    assert all(torch.equal(fresh[k], resumed[k]) for k in fresh)  # exact resume from the fallback


def test_every_checkpoint_damaged_is_one_line(run, tmp_path, capsys):
    r = _copy(run, tmp_path)
    for step in ("step_000002", "step_000004"):
        _flip_a_byte(r / "checkpoints" / step / "model.safetensors")
    assert main(["sample", str(r), "--n", "2", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: every checkpoint of") and "is damaged (step_000004, step_000002" in err[-1]


def test_checkpoint_option_picks_a_step_for_sample_eval_and_resume(run, tmp_path, capsys, monkeypatch):
    assert load_run(run, checkpoint=2).step == 2 and load_run(run, checkpoint="latest").step == 4
    with checkpoint_choice("2"):  # what `genlab eval --checkpoint 2` sets for the evaluation's load_run
        assert load_run(run).step == 2
    assert load_run(run).step == 4
    loaded = []  # the step of every run `genlab sample` loads
    real = api.load_run
    monkeypatch.setattr(api, "load_run", lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    out = str(tmp_path / "a.npz")
    assert main(["sample", str(run), "--n", "2", "--steps", "2", "--checkpoint", "2", "--out", out]) == 0
    assert main(["sample", str(run), "--n", "2", "--steps", "2", "--out", out]) == 0
    assert [r.step for r in loaded] == [2, 4]
    r = _copy(run, tmp_path)
    assert main(["train", "ddpm", "--run-dir", str(r), "--resume", "--checkpoint", "2", "--no-progress",
                 "train.steps=3"]) == 0
    assert _steps(r) == [2, 3]  # resumed from 2: step 4 belonged to the abandoned future


@pytest.mark.parametrize("argv, words", [
    (["sample", "RUN", "--checkpoint", "3", "--out", "x.png"], ["step 3", "available steps: 2, 4"]),
    (["sample", "RUN", "--checkpoint", "abc", "--out", "x.png"], ["'abc'", "step number", "latest"]),
    (["train", "ddpm", "--run-dir", "RUN", "--checkpoint", "2"], ["--checkpoint 2", "--resume"]),
])
def test_bad_checkpoint_choices_are_one_line_errors(run, capsys, argv, words):
    assert main([str(run) if a == "RUN" else a for a in argv]) == 2
    err = one_line_error(capsys)
    assert all(w in err for w in words), err


# ---------------------------------------------------------------------------------------------
# 4. Damaged config.yaml and state.json.


def _truncate_after(path: Path, needle: str) -> None:
    """Cut the file after the line holding ``needle``: still valid YAML, but the rest of the model is gone."""
    lines = path.read_text().splitlines(keepends=True)
    cut = next(i for i, line in enumerate(lines) if needle in line)
    path.write_text("".join(lines[: cut + 1]))


@pytest.mark.parametrize("damage", ["bad-bytes", "bad-yaml", "truncated", "truncated-at-a-section"])
@pytest.mark.parametrize("command", ["sample", "eval", "resume"])
def test_a_damaged_config_yaml_is_one_line_naming_the_file(run, tmp_path, capsys, damage, command):
    r = _copy(run, tmp_path)
    config = r / "config.yaml"
    if damage == "bad-bytes":
        config.write_bytes(b"\xff\xfe\x00\x9c garbage")
    elif damage == "bad-yaml":
        config.write_text(config.read_text()[:-40] + "\n  unet: [1, {")
    elif damage == "truncated":
        _truncate_after(config, "base_channels")
    else:  # valid YAML that ends before the train and model sections: defaults must not stand in for them
        text = config.read_text()
        config.write_text(text[: text.index("\ntrain:") + 1])
    argv = {"sample": ["sample", str(r), "--n", "2", "--out", str(tmp_path / "s.png")],
            "eval": ["eval", str(r), "--ref", "digits:test", "--n", "2", "--no-progress"],
            "resume": ["train", "ddpm", "--run-dir", str(r), "--resume", "--no-progress", "train.steps=5"]}[command]
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert "config.yaml" in err and ("damaged" in err or "restore" in err), err


@pytest.mark.parametrize("key", ["skeletons", "step", "data_info"])
def test_a_state_json_missing_a_key_is_one_line(run, tmp_path, capsys, key):
    r = _copy(run, tmp_path)
    for step in ("step_000002", "step_000004"):
        state_path = r / "checkpoints" / step / "state.json"
        state = json.loads(state_path.read_text())
        del state[key]
        state_path.write_text(json.dumps(state))
    if key == "data_info":  # optional: the run reloads its data to learn the shapes
        assert load_run(r).step == 4
        return
    assert main(["sample", str(r), "--n", "2", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and f"'{key}'" in err and "state.json" in err, err


# ---------------------------------------------------------------------------------------------
# 5. Write failures: one line naming the folder and its free space; earlier checkpoints intact.


@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, ["No space left", "free some space"]),
    (errno.EFBIG, ["too large", "ulimit -f"]),
    (errno.EROFS, ["Read-only", "writable"]),
])
@pytest.mark.parametrize("target", ["safetensors", "config.yaml"])
def test_a_failed_write_is_one_line_and_keeps_earlier_checkpoints(run, tmp_path, capsys, monkeypatch, code, words,
                                                                   target):
    r = _copy(run, tmp_path)
    real = pathlib.Path.write_bytes

    def failing(self, data):
        if target in self.name:
            raise OSError(code, __import__("os").strerror(code), str(self))
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", failing)
    assert main(["train", "ddpm", "--run-dir", str(r), "--resume", "--no-progress", "train.steps=6"]) == 2
    monkeypatch.undo()
    err = one_line_error(capsys)
    folder = r / "checkpoints" if target == "safetensors" else r
    assert f"in {folder} (" in err and " free there" in err and all(w in err for w in words), err
    assert _steps(r) == [2, 4] and load_run(r).step == 4  # nothing lost, nothing half-written
    assert not [p for p in (r / "checkpoints").iterdir() if ".tmp-" in p.name]


# ---------------------------------------------------------------------------------------------
# 6. Anything unexpected: one line and a traceback file, or the traceback with --debug; --version.


def test_an_unexpected_error_is_one_line_with_the_traceback_in_a_file(tmp_path, capsys, monkeypatch):
    def broken(a):
        return 1 // 0

    monkeypatch.setattr(cli, "_cmd_methods", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["methods"]) == 1
    err = one_line(capsys.readouterr().err)
    assert err.startswith("error: unexpected ZeroDivisionError: integer division or modulo by zero") and "--debug" in err
    saved = list(tmp_path.glob("genlab-traceback-*.txt"))
    assert len(saved) == 1 and str(saved[0]) in err
    assert "Traceback" in saved[0].read_text() and "1 // 0" in saved[0].read_text()
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "methods"])


def test_version(capsys):
    import genlab

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"genlab {genlab.__version__}"


def test_a_config_key_given_as_a_flag_gets_the_override_spelling(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "ddpm", "--data", "digits", "--steps", "100", "--base-channels=8"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "write train.steps=100 model.unet.base_channels=8" in err


# ---------------------------------------------------------------------------------------------
# 7. Data files: a hostile tar archive, a zero-byte or non-image file.


def _hostile_tar(path: Path, kind: str, outside: Path) -> None:
    """A tar whose one bad member would write ``outside`` (dest/../escaped.txt) or the absolute path ``outside``."""
    import io

    def add(tar, name: str, data: bytes = b"x", type_=tarfile.REGTYPE, link: str = "") -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.size = type_, link, len(data) if type_ == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if type_ == tarfile.REGTYPE else None)

    with tarfile.open(path, "w:gz") as tar:
        add(tar, "cifar-10-batches-bin/readme.html", b"fine")
        if kind == "dotdot":
            add(tar, "../escaped.txt", b"up and out")
        elif kind == "symlink":  # a link to the parent, then a file written through it
            add(tar, "up", type_=tarfile.SYMTYPE, link="..")
            add(tar, "up/escaped.txt", b"through the link")
        else:  # an absolute name: must not land at that absolute path
            add(tar, str(outside), b"absolute")


@pytest.mark.parametrize("data_filter", [True, False])
@pytest.mark.parametrize("kind", ["dotdot", "symlink", "absolute"])
def test_extract_tar_never_writes_outside_the_folder(tmp_path, monkeypatch, data_filter, kind):
    from genlab.data.sources import extract_tar

    if not data_filter:  # the member check used where Python has no tarfile data filter
        monkeypatch.delattr(tarfile, "data_filter")
    archive, dest = tmp_path / "cifar-10-binary.tar.gz", tmp_path / "root" / "data"
    dest.mkdir(parents=True)
    outside = tmp_path / "root" / "escaped.txt" if kind != "absolute" else tmp_path / "abs" / "escaped.txt"
    _hostile_tar(archive, kind, outside)
    try:
        extract_tar(archive, dest)
        refused = False
    except GenlabError as e:
        assert str(archive) in one_line(str(e))
        refused = True
    assert not outside.exists() and not (tmp_path / "abs").exists()
    assert refused or kind == "absolute"  # the data filter extracts /x as dest/x: inside, harmless


@pytest.mark.parametrize("content", [b"", b"just some text, not pixels"])
def test_a_zero_byte_or_non_image_file_is_named_without_a_python_repr(tmp_path, capsys, content):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "good.png")
    (folder / "bad.png").write_bytes(content)
    assert main(["train", "ddpm", "--data", f"folder:{folder}", "--run-dir", str(tmp_path / "r"), *TINY_DDPM]) == 2
    err = one_line_error(capsys)
    assert "bad.png" in err and "object at 0x" not in err and "<_io" not in err, err


# ---------------------------------------------------------------------------------------------
# 8. `genlab config`: each key's value, default, source layer, type and meaning.


def test_genlab_config_prints_value_default_source_type_and_meaning(capsys):
    assert main(["config", "ddpm", "--data", "digits", "--preset", "small", "train.steps=7"]) == 0
    rows = {line.split()[0]: line.split(None, 4) for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["train.steps"][1:4] == ["7", "2000", "override"] and rows["train.steps"][4].startswith("int >= 1")
    assert rows["train.steps"][4].endswith("optimiser steps")
    assert rows["data.source"][1:4] == ["digits", "mnist5k", "override"]
    assert rows["train.lr"][3] == "preset" and rows["train.weight_decay"][3] == "default"
    assert "AdamW's decoupled weight decay" in rows["train.weight_decay"][4]
    assert rows["model.unet.base_channels"][4].startswith("int >= 1")


def test_field_comments_read_trailing_and_block_comments():
    from dataclasses import dataclass

    from genlab.config import field_comments

    @dataclass
    class Base:
        a: int = 1  # the a
        # b explained
        # over two lines
        b: float = 0.5

    @dataclass
    class Child(Base):
        c: str = "x"  # the c: with a colon

    assert field_comments(Child) == {"a": "the a", "b": "b explained over two lines", "c": "the c: with a colon"}


def test_config_errors_inside_bare_leaf_names_and_optional_types_say_the_range():
    from genlab.config import build_config
    from genlab.methods import get_method

    with pytest.raises(ConfigError, match=r"'train.threads' must be >= 1 or null, got 0"):
        build_config("ddpm", get_method("ddpm").Config, overrides=["threads=0"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = build_config("ddpm", get_method("ddpm").Config, overrides=["lr=1e-3", "steps=1e4", "threads=null"])
    assert cfg.train.lr == 1e-3 and cfg.train.steps == 10000 and cfg.train.threads is None


@pytest.mark.parametrize("command", ["sample", "resume"])
def test_a_config_yaml_that_no_longer_fits_the_weights_is_one_line(run, tmp_path, capsys, command):
    r = _copy(run, tmp_path)
    config = r / "config.yaml"
    config.write_text(config.read_text().replace("base_channels: 16", "base_channels: 8"))  # valid, other shapes
    argv = {"sample": ["sample", str(r), "--n", "2", "--out", str(tmp_path / "s.png")],
            "resume": ["train", "ddpm", "--run-dir", str(r), "--resume", "--no-progress", "train.steps=5"]}[command]
    assert main(argv) == 2
    err = one_line_error(capsys)
    if command == "resume":  # the trainer compares the edited config with the one saved in the checkpoint
        assert "model.unet.base_channels cannot change on resume (16 -> 8)" in err, err
    else:
        assert "does not fit the model" in err and "config.yaml" in err and "in the checkpoint" in err, err
    assert _steps(r) == [2, 4]
