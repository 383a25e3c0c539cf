"""The run lifecycle: one writer per folder, honest resumes, per-launch time limits, signals, an honest log."""

from __future__ import annotations

import ast
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from genlab import api
from genlab.errors import ConfigError
from genlab.methods.ddpm import DDPM
from genlab.train.checkpoint import checkpoint_step, latest_checkpoint, list_checkpoints, load_checkpoint
from genlab.train.lock import RunLock, RunLocked
from genlab.train.runlog import read_log

from tiny_configs import TINY_DDPM

SRC = Path(__file__).resolve().parents[2] / "src"


def _train(run_dir: Path, *overrides: str, resume: bool = False):
    return api.train("ddpm", data=None if resume else "digits", overrides=([] if resume else TINY_DDPM) + list(overrides),
                     run_dir=run_dir, resume=resume, progress=False)


def _kinds(run_dir: Path) -> list[tuple[int, str]]:
    return [(r["step"], r["kind"]) for r in read_log(run_dir) if r["kind"] in ("start", "end")]


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    return subprocess.Popen([sys.executable, "-m", "genlab.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(condition, what: str, proc: subprocess.Popen | None = None, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _trained_steps(run_dir: Path) -> int:
    log = run_dir / "log.jsonl"
    return sum('"kind": "train"' in line for line in log.read_text().splitlines()) if log.is_file() else 0


# ---------------------------------------------------------------------------------------------- the writer lock


def test_lock_names_its_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    (tmp_path / "r").mkdir()
    first = RunLock(tmp_path / "r").acquire()
    with pytest.raises(RunLocked) as e:
        RunLock(tmp_path / "r").acquire()  # flock conflicts between two opens, even in one process
    message = str(e.value)
    assert "\n" not in message
    assert f"is being trained by PID {os.getpid()} on host {socket.gethostname()} since " in message
    assert message.endswith("wait for it or stop it")
    first.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "r" / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": "h", "since": 0}))
    with pytest.warns(UserWarning, match=f"took over the lock left by PID {int(dead.stdout)} on host h"):
        with RunLock(tmp_path / "r"):
            pass


def test_demo_does_not_move_aside_a_run_being_trained(tmp_path, capsys, monkeypatch):
    from genlab import cli
    from genlab.errors import GenlabError

    def no_training(*args, **kwargs):
        raise GenlabError("training was not expected")

    monkeypatch.setattr(api, "train", no_training)  # were the demo to go ahead, it would stop right after the move

    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "config.yaml").write_text("method: ddpm\n")
    with RunLock(tmp_path / "demo"):
        assert cli.main(["demo", "--run-dir", str(tmp_path / "demo")]) == 2
    assert "is being trained by PID" in capsys.readouterr().err
    assert (tmp_path / "demo" / "config.yaml").is_file()  # not moved to demo.old-*


@pytest.mark.slow
def test_a_second_writer_fails_at_once_and_a_killed_writers_lock_is_taken_over(tmp_path):
    """Two real processes: the second `train --resume` fails naming the first; after SIGKILL the run resumes."""
    run = tmp_path / "r"
    first = _cli("train", "ddpm", "--data", "digits", "--run-dir", str(run), "--no-progress", *TINY_DDPM,
                 "train.steps=100000", "train.checkpoint_every=2", "train.log_every=1")
    try:
        _wait_for(lambda: latest_checkpoint(run) is not None, "the first checkpoint", first)
        second = _cli("train", "ddpm", "--run-dir", str(run), "--resume", "--no-progress")
        _, err = second.communicate(timeout=180)
        assert second.returncode == 2, err
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"error: {run} is being trained by PID {first.pid} on host {socket.gethostname()} "
                               "since "), err
        assert line.endswith("wait for it or stop it")
    finally:
        first.kill()
        first.wait()
    step = checkpoint_step(latest_checkpoint(run))
    with pytest.warns(UserWarning, match=f"took over the lock left by PID {first.pid} on host"):
        resumed = _train(run, f"train.steps={step + 2}", resume=True)
    assert resumed.step == step + 2
    assert json.loads((run / ".lock").read_text() or "null") is None  # released


# ---------------------------------------------------------------------------------------------- resume with changes


def test_resume_with_a_new_lr_applies_it_to_the_optimiser_and_logs_the_change(tmp_path):
    _train(tmp_path / "a", "train.steps=10", "train.checkpoint_every=10")
    _train(tmp_path / "b", "train.steps=10", "train.checkpoint_every=10")
    before = load_checkpoint(latest_checkpoint(tmp_path / "a"))[0]["model"]
    _train(tmp_path / "a", "train.steps=11", resume=True)  # the same lr (2e-3)
    _train(tmp_path / "b", "train.steps=11", "train.lr=1e-3", resume=True)
    after_a = load_checkpoint(latest_checkpoint(tmp_path / "a"))[0]["model"]
    after_b = load_checkpoint(latest_checkpoint(tmp_path / "b"))[0]["model"]
    # Same weights, gradient and Adam moments at step 10: an AdamW step is proportional to the LR.
    moved = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after_a[k])]
    assert moved
    for k in moved:
        assert torch.allclose(after_b[k] - before[k], 0.5 * (after_a[k] - before[k]), rtol=1e-3, atol=3e-7), k  # float32 ulp at 1.0
    start = [r for r in read_log(tmp_path / "b") if r["kind"] == "start"][-1]
    assert start["step"] == 10 and start["values"]["changes"] == {"train.lr": [2e-3, 1e-3], "train.steps": [10, 11]}
    assert start["values"]["config"]["train"]["lr"] == 1e-3
    assert [r["values"]["lr"] for r in read_log(tmp_path / "b") if r["kind"] == "train"][-1] == 1e-3


@pytest.mark.parametrize("override, key", [("train.seed=1", "train.seed"),
                                           ("model.unet.base_channels=8", "model.unet.base_channels"),
                                           ("train.batch_size=16", "train.batch_size")])
def test_resume_refuses_a_setting_it_cannot_honour(tmp_path, override, key):
    _train(tmp_path / "r", "train.steps=2")
    with pytest.raises(ConfigError) as e:
        _train(tmp_path / "r", "train.steps=4", override, resume=True)
    assert str(e.value).startswith(f"{key} cannot change on resume (") and "\n" not in str(e.value)
    assert checkpoint_step(latest_checkpoint(tmp_path / "r")) == 2


# ---------------------------------------------------------------------------------------------- an honest log


def test_resuming_a_finished_run_logs_nothing_twice(tmp_path):
    _train(tmp_path / "r", "train.steps=4", "train.checkpoint_every=2")
    _train(tmp_path / "r", resume=True)  # already at train.steps: nothing to do
    _train(tmp_path / "r", "train.steps=6", resume=True)
    assert _kinds(tmp_path / "r") == [(0, "start"), (4, "end"), (4, "start"), (6, "end")]


def test_a_launch_killed_before_its_first_checkpoint_leaves_no_second_start(tmp_path):
    from genlab.train.runlog import RunLog

    with RunLog(tmp_path / "r") as log:  # what a launch killed at step 3, before any checkpoint, left behind
        log.log(0, {"config": {}}, kind="start")
        log.log(3, {"loss": 1.0})
    _train(tmp_path / "r", "train.steps=4")
    assert _kinds(tmp_path / "r") == [(0, "start"), (4, "end")]


def test_a_corrupt_log_line_does_not_block_resume(tmp_path):
    _train(tmp_path / "r", "train.steps=10", "train.checkpoint_every=5")
    lines = (tmp_path / "r" / "log.jsonl").read_text().splitlines()
    lines.insert(2, '{"step": 5, "ti\x00garbage')
    (tmp_path / "r" / "log.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"skipped 1 corrupt line \(3\)"):
        run = _train(tmp_path / "r", "train.steps=12", resume=True)
    assert run.step == 12
    assert [r["step"] for r in read_log(tmp_path / "r") if r["kind"] == "train"] == [5, 10, 12]


# ---------------------------------------------------------------------------------------------- lifecycle


def test_time_limit_counts_this_launch_only(tmp_path):
    _train(tmp_path / "r", "train.steps=4", "train.checkpoint_every=4")
    state_path = latest_checkpoint(tmp_path / "r") / "state.json"
    state = json.loads(state_path.read_text())
    state["elapsed_seconds"] = 10 * 3600.0  # ten hours of earlier launches
    state_path.write_text(json.dumps(state))
    run = _train(tmp_path / "r", "train.steps=7", "train.time_limit=60", resume=True)
    assert run.step == 7


def test_time_limit_stops_with_a_message_and_a_checkpoint(tmp_path, capsys):
    run = _train(tmp_path / "r", "train.steps=50", "train.checkpoint_every=100", "train.time_limit=1e-6")
    assert run.step == 1
    assert checkpoint_step(latest_checkpoint(tmp_path / "r")) == 1
    err = capsys.readouterr().err
    assert (f"stopped at step 1 of 50: train.time_limit=1e-06 min (per launch) reached; the newest checkpoint is "
            f"{tmp_path / 'r' / 'checkpoints' / 'step_000001'} (step 1); continue with --resume") in err
    end = read_log(tmp_path / "r")[-1]
    assert end["kind"] == "end" and end["values"]["stopped_by"] == "time_limit"


def test_time_clock_cpu_counts_process_time_not_wall_time(tmp_path, monkeypatch):
    """A fake CPU clock that runs 30 s per reading: the CPU budget stops the run, the wall budget does not."""
    import types

    from genlab.train import trainer as trainer_module

    readings = iter(range(0, 10**6, 30))
    fake = types.SimpleNamespace(perf_counter=time.perf_counter, time=time.time, sleep=time.sleep,
                                 process_time=lambda: float(next(readings)))
    monkeypatch.setattr(trainer_module, "time", fake)
    wall = _train(tmp_path / "wall", "train.steps=6", "train.time_limit=1")
    assert wall.step == 6  # 1 wall-minute is far away
    cpu = _train(tmp_path / "cpu", "train.steps=6", "train.time_limit=1", "train.time_clock=cpu")
    assert cpu.step == 2  # 30 then 60 fake CPU seconds: the limit is reached after the second step
    state = json.loads((latest_checkpoint(tmp_path / "cpu") / "state.json").read_text())
    assert state["cpu_seconds"] == 60.0 and state["elapsed_seconds"] < 60
    end = read_log(tmp_path / "cpu")[-1]
    assert end["values"]["stopped_by"] == "time_limit" and end["values"]["cpu_s"] == 60.0


def _logged_lrs(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["values"]["lr"] for r in read_log(run_dir) if r["kind"] == "train"}


def test_extending_steps_continues_the_cosine_decay_from_the_current_lr(tmp_path):
    lr, schedule = 2e-3, ["train.lr_schedule=cosine", "train.warmup_steps=2", "train.log_every=1",
                          "train.checkpoint_every=5", "train.keep_checkpoints=10"]
    _train(tmp_path / "r", "train.steps=20", *schedule)
    for later in list_checkpoints(tmp_path / "r")[2:]:  # back to step 10, trained under a total of 20
        later.rename(later.with_name(later.name + ".moved"))
    with pytest.warns(UserWarning, match="decay continues from step 10"):
        _train(tmp_path / "r", "train.steps=30", resume=True)
    lrs = _logged_lrs(tmp_path / "r")
    f0 = 0.5 * (1 + math.cos(math.pi * (10 - 2) / (20 - 2)))  # the old plan's factor at step 10
    assert lrs[10] == pytest.approx(lr * f0, rel=1e-12)
    for step in range(11, 31):  # from the current LR to 0 at the new total: no jump
        assert lrs[step] == pytest.approx(lr * f0 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 20)), rel=1e-9, abs=1e-15)
    start = [r for r in read_log(tmp_path / "r") if r["kind"] == "start"][-1]
    assert start["values"]["lr_plan"] == {"start": 10, "factor": pytest.approx(f0), "warmup": False}


def test_extending_a_finished_cosine_run_warm_restarts_with_a_warning(tmp_path):
    lr, schedule = 2e-3, ["train.lr_schedule=cosine", "train.warmup_steps=2", "train.log_every=1"]
    _train(tmp_path / "r", "train.steps=10", *schedule)
    assert _logged_lrs(tmp_path / "r")[10] == 0.0
    with pytest.warns(UserWarning, match="had reached lr 0, so it restarts: warm-up over 2 steps from step 10"):
        _train(tmp_path / "r", "train.steps=20", resume=True)
    lrs = _logged_lrs(tmp_path / "r")
    assert lrs[11] == pytest.approx(lr)  # warm-up 0.5 lr (the step 10 -> 11), then lr
    for step in range(12, 21):
        assert lrs[step] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * (step - 12) / 8)), abs=1e-15)


def _run_until_training(run: Path, *extra: str) -> subprocess.Popen:
    proc = _cli("train", "ddpm", "--data", "digits", "--run-dir", str(run), "--no-progress", *TINY_DDPM,
                "train.steps=100000", "train.log_every=1", *extra)
    _wait_for(lambda: _trained_steps(run) >= 2, "two training steps", proc)
    return proc


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_the_step_boundary_and_says_where(tmp_path):
    run = tmp_path / "r"
    proc = _run_until_training(run, "train.checkpoint_every=100000")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    last = latest_checkpoint(run)
    step = checkpoint_step(last)
    assert f"stopped by SIGTERM at step {step} of 100000; the newest checkpoint is {last} (step {step}); " \
           "continue with --resume" in err
    assert read_log(run)[-1]["kind"] == "end" and read_log(run)[-1]["values"]["stopped_by"] == "SIGTERM"
    assert _train(run, f"train.steps={step + 1}", resume=True).step == step + 1


@pytest.mark.slow
def test_a_second_signal_stops_at_once_and_claims_no_checkpoint_that_does_not_exist(tmp_path):
    run = tmp_path / "r"
    proc = _run_until_training(run, "train.checkpoint_every=100000")
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)  # a different signal: two of one kind may merge into one delivery
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM), err
    assert "stopped at once by a second signal" in err
    assert "no checkpoint was written, so there is nothing to resume" in err
    assert latest_checkpoint(run) is None and "intact" not in err


# ---------------------------------------------------------------------------------------------- hygiene and progress


def test_the_trainer_imports_neither_api_nor_evaluation():
    tree = ast.parse((SRC / "genlab" / "train" / "trainer.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and m.split(".")[:2] in (["genlab", "api"], ["genlab", "evaluation"])}


def test_periodic_evaluation_is_the_callers_callable(tmp_path):
    from genlab.config import build_config
    from genlab.data import load_data
    from genlab.runs import data_info_for
    from genlab.train.trainer import Trainer

    cfg = build_config("ddpm", DDPM.Config, overrides=["data.source=digits", *TINY_DDPM, "train.steps=4",
                                                       "train.eval_every=2"])
    images = load_data(cfg.data)
    seen = []
    trainer = Trainer(tmp_path / "r", cfg, DDPM(cfg.model, data_info_for(cfg, images)), images, progress=False,
                      evaluate=lambda method: seen.append(method.training) or {"score": float(len(seen))})
    trainer.fit()
    assert seen == [False, False]  # scored in eval mode
    assert [(r["step"], r["values"]["score"]) for r in read_log(tmp_path / "r") if r["kind"] == "eval"] == [(2, 1.0), (4, 2.0)]


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_cli_sets_omp_wait_policy_before_torch_loads(given, expected):
    """OpenMP reads OMP_WAIT_POLICY when torch loads it: the value must be in place by then (the user's wins)."""
    probe = ("import builtins, os\n"
             "real = builtins.__import__\n"
             "seen = []\n"
             "def spy(name, *a, **k):\n"
             "    if name == 'torch' and not seen: seen.append(os.environ.get('OMP_WAIT_POLICY'))\n"
             "    return real(name, *a, **k)\n"
             "builtins.__import__ = spy\n"
             "from genlab import cli\n"
             "cli.main(['methods'])\n"
             "print('AT_TORCH_IMPORT', seen)\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "PYTHONPATH": str(SRC)}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"AT_TORCH_IMPORT ['{expected}']" in out.stdout


def test_a_slow_final_preview_grid_shows_progress(tmp_path, monkeypatch, capsys):
    original = DDPM.sample

    def slow_sample(self, n, **kwargs):
        time.sleep(0.6)
        return original(self, n, **kwargs)

    monkeypatch.setattr(DDPM, "sample", slow_sample)
    api.train("ddpm", data="digits", overrides=TINY_DDPM + ["train.steps=1", "train.sample_n=32"],
              run_dir=tmp_path / "r", progress=True)
    assert "preview grid" in capsys.readouterr().err
