"""The trainer: learning happens, resume is exact, a NaN stops cleanly, two processes equal one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genlab import api
from genlab.config import build_config
from genlab.data import load_data
from genlab.diffusion import diffusion_loss
from genlab.errors import ConfigError, TrainingDiverged
from genlab.methods.ddpm import DDPM
from genlab.train.checkpoint import checkpoint_step, latest_checkpoint, load_checkpoint

from tiny_configs import TINY_DDPM


def _fixed_loss(method: DDPM, seed: int = 123) -> float:
    """Eps-MSE of ``method`` on 256 digits with fixed timesteps and noise (a deterministic probe)."""
    g = torch.Generator().manual_seed(seed)
    x0 = load_data(build_config("ddpm", DDPM.Config, overrides=["data.source=digits"]).data).to_model_range()[:256]
    t = torch.randint(0, method.config.num_timesteps, (len(x0),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        return float(diffusion_loss(method.network(method.schedule.q_sample(x0, t, noise), t), noise))


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(latest_checkpoint(run_dir))
    return tensors["model"]


def test_training_on_digits_lowers_the_loss(tmp_path):
    run = api.train("ddpm", data="digits", overrides=TINY_DDPM + ["train.steps=60", "train.ema_decay=null"],
                    run_dir=tmp_path / "r", progress=False)
    fresh = DDPM(run.config.model, run.method.data_info)
    before, after = _fixed_loss(fresh), _fixed_loss(run.method)
    assert before > 0.9  # untrained eps-prediction: MSE ~ Var(eps) = 1 (zero-initialised output)
    assert after < 0.6 * before


def test_resume_gives_the_same_weights_as_straight_training(tmp_path):
    common = TINY_DDPM + ["train.checkpoint_every=10", "train.grad_accum=2"]
    api.train("ddpm", data="digits", overrides=common + ["train.steps=20"], run_dir=tmp_path / "a", progress=False)
    api.train("ddpm", data="digits", overrides=common + ["train.steps=10"], run_dir=tmp_path / "b", progress=False)
    api.train("ddpm", overrides=["train.steps=20"], run_dir=tmp_path / "b", resume=True, progress=False)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ema_a = load_checkpoint(latest_checkpoint(tmp_path / "a"))[0]["ema_unet"]
    ema_b = load_checkpoint(latest_checkpoint(tmp_path / "b"))[0]["ema_unet"]
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    # The log of the resumed run is continuous: each step logged once.
    from genlab.train.runlog import read_log

    steps = [r["step"] for r in read_log(tmp_path / "b" / "log.jsonl") if r["kind"] == "train"]
    assert steps == sorted(set(steps)) == [5, 10, 15, 20]


def test_nan_loss_stops_training_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    original = DDPM.training_step

    def poisoned(self, batch, ctx):
        if ctx.step >= 12:  # the data turns bad after the step-10 checkpoint
            batch = {**batch, "image": batch["image"] * float("nan")}
        return original(self, batch, ctx)

    monkeypatch.setattr(DDPM, "training_step", poisoned)
    with pytest.raises(TrainingDiverged) as e:
        api.train("ddpm", data="digits", overrides=TINY_DDPM + ["train.steps=30", "train.checkpoint_every=10"],
                  run_dir=tmp_path / "r", progress=False)
    message = str(e.value)
    assert "\n" not in message and "step 12" in message and "step_000010" in message
    last = latest_checkpoint(tmp_path / "r")
    assert checkpoint_step(last) == 10
    weights = load_checkpoint(last)[0]["model"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    # ... and those weights are exactly a clean run's step-10 weights.
    monkeypatch.setattr(DDPM, "training_step", original)
    api.train("ddpm", data="digits", overrides=TINY_DDPM + ["train.steps=10"], run_dir=tmp_path / "clean", progress=False)
    clean = _weights(tmp_path / "clean")
    assert all(torch.equal(weights[k], clean[k]) for k in clean)


def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    api.train("ddpm", data="digits", overrides=TINY_DDPM + ["train.steps=2"], run_dir=tmp_path / "r", progress=False)
    before = _weights(tmp_path / "r")
    with pytest.raises(ConfigError, match="--resume"):
        api.train("ddpm", data="digits", overrides=TINY_DDPM + ["train.steps=2"], run_dir=tmp_path / "r", progress=False)
    after = _weights(tmp_path / "r")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_batch_not_divisible_by_accumulation_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="grad_accum"):
        api.train("ddpm", data="digits", overrides=TINY_DDPM + ["train.grad_accum=3"], run_dir=tmp_path / "r",
                  progress=False)


def test_two_processes_give_the_same_weights_as_one(tmp_path):
    """torchrun --nproc_per_node 2 with the same global batch equals one process (gloo on CPU)."""
    args = ["train", "ddpm", "--data", "digits", "--no-progress", *TINY_DDPM, "train.steps=8",
            "train.checkpoint_every=100", "train.sample_n=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "genlab.cli", *args, "--run-dir", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "genlab.cli", *args, "--run-dir", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    log = (tmp_path / "two" / "log.jsonl").read_text()
    assert '"world_size": 2' in log  # really ran as two processes
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    # Gradients are summed in a different order across processes: float32 round-off, amplified
    # a little by 8 Adam steps, stays far below the size of one update (lr 2e-3).
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=2e-5), (k, (a[k] - b[k]).abs().max())


def test_periodic_eval_is_logged_and_needs_a_reference(tmp_path, monkeypatch):
    import genlab.evaluation as evaluation
    from genlab.train.runlog import read_log

    calls = []

    def fake_periodic_eval(method, *, ref, n, data_root=None):
        calls.append((ref, n, method.training))  # scored in eval mode, with the EMA weights
        return {"fid": 1.5, "eval_n": n}

    monkeypatch.setattr(evaluation, "periodic_eval", fake_periodic_eval)
    api.train("ddpm", data="digits", run_dir=tmp_path / "r", progress=False,
              overrides=TINY_DDPM + ["train.steps=10", "train.eval_every=5", "train.eval_ref=digits:test",
                                     "train.eval_n=7"])
    evals = [r for r in read_log(tmp_path / "r" / "log.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [5, 10] and evals[0]["values"]["fid"] == 1.5
    assert calls == [("digits:test", 7, False)] * 2
    with pytest.raises(ConfigError, match="eval_ref"):
        api.train("ddpm", data="digits", run_dir=tmp_path / "s", progress=False,
                  overrides=TINY_DDPM + ["train.steps=5", "train.eval_every=5"])
