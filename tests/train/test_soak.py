"""Soak test (issue 12 point 8): SIGKILL a training run 20 times at random moments, then compare with a clean run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from genlab.train.checkpoint import checkpoint_step, latest_checkpoint, load_checkpoint
from genlab.train.runlog import read_log

from tiny_configs import TINY_DDPM

SRC = Path(__file__).resolve().parents[2] / "src"
STEPS = 400
CONFIG = [*TINY_DDPM, f"train.steps={STEPS}", "train.checkpoint_every=2", "train.log_every=1"]
KILLS = 20


def _launch(run: Path, resume: bool) -> subprocess.Popen:
    args = ["--resume"] if resume else ["--data", "digits", *CONFIG]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    return subprocess.Popen([sys.executable, "-m", "genlab.cli", "train", "ddpm", "--run-dir", str(run), "--no-progress",
                             *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _train_lines(run: Path) -> int:
    log = run / "log.jsonl"
    return log.read_text(errors="replace").count('"kind": "train"') if log.is_file() else 0


def _wait(condition, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)


def _tensors(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    tensors, _ = load_checkpoint(latest_checkpoint(run))
    return {group: t for group, t in tensors.items() if group in ("model", "ema_unet")}


@pytest.mark.slow
def test_twenty_random_sigkills_resume_to_bit_identical_weights_and_a_clean_log(tmp_path):
    seed = int(os.environ.get("GENLAB_SOAK_SEED", "0"))
    rng = random.Random(seed)
    reference = _launch(tmp_path / "reference", resume=False)
    assert reference.wait(timeout=1200) == 0, reference.stderr.read()[-2000:]

    run, kills, moments = tmp_path / "killed", 0, []
    while kills < KILLS:
        proc = _launch(run, resume=latest_checkpoint(run) is not None)
        moment = ("startup", "checkpoint write", "training", "training")[kills % 4]
        if moment == "startup":  # anywhere from process start into the first steps
            time.sleep(rng.uniform(0.0, 4.0))
        elif moment == "checkpoint write":  # while a step folder is being written (or renamed into place)
            already = _train_lines(run)
            _wait(lambda: _train_lines(run) > already, proc, 300)
            ckpt = run / "checkpoints"
            mine = (f".tmp-{proc.pid}", f".old-{proc.pid}")  # this launch's write, not a dead one's leftovers
            _wait(lambda: ckpt.is_dir() and any(p.endswith(mine) for p in os.listdir(ckpt)), proc, 30)
        else:  # a random moment after this launch's first logged step
            already = _train_lines(run)
            _wait(lambda: _train_lines(run) > already, proc, 300)
            time.sleep(rng.uniform(0.0, 1.0))
        if proc.poll() is not None:  # finished before the kill: the run is complete
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        last = latest_checkpoint(run)
        moments.append((moment, None if last is None else checkpoint_step(last)))
    assert kills == KILLS, f"the run finished after only {kills} kills ({moments}); raise STEPS"
    final = _launch(run, resume=latest_checkpoint(run) is not None)
    assert final.wait(timeout=1200) == 0, final.stderr.read()[-2000:]

    expected, got = _tensors(tmp_path / "reference"), _tensors(run)
    assert expected.keys() == got.keys()
    for group in expected:
        for name in expected[group]:
            assert torch.equal(expected[group][name], got[group][name]), (group, name, moments)
    records = read_log(run)
    starts = [r["step"] for r in records if r["kind"] == "start"]
    assert starts == sorted(set(starts)) and starts[0] == 0, starts  # one start per surviving launch
    assert [r["step"] for r in records if r["kind"] == "end"] == [STEPS]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, STEPS + 1))
    print(f"soak seed {seed}: {kills} kills at {moments}; {len(starts)} launches kept in the log")
