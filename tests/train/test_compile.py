"""train.compile: the denoiser compiled for training gives the eager step's loss and gradients, and falls back."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

from genlab import api
from genlab.compiling import compile_network, is_compiled
from genlab.errors import ConfigError
from genlab.train.checkpoint import latest_checkpoint, load_checkpoint
from genlab.train.runlog import read_log

from tiny_configs import TINY_DCGAN, TINY_DDPM

COMMON = [*TINY_DDPM, "train.steps=3", "train.log_every=1", "train.ema_decay=null"]


def _train(run_dir: Path, *overrides: str):
    return api.train("ddpm", data="digits", overrides=COMMON + list(overrides), run_dir=run_dir, progress=False)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_checkpoint(run_dir))[0]["model"]


def _losses(run_dir: Path) -> list[tuple[float, float]]:
    return [(r["values"]["loss"], r["values"]["grad_norm"]) for r in read_log(run_dir) if r["kind"] == "train"]


def _failing_compile(calls_before_failure: int):
    """A stand-in for torch.compile whose compiled callable works ``calls_before_failure`` times, then fails
    as inductor does without a C++ compiler (at a first call, or at a later recompilation)."""
    def fake_compile(fn, *args, **kwargs):
        count = [0]

        def call(*a, **k):
            count[0] += 1
            if count[0] > calls_before_failure:
                raise RuntimeError("no working C++ compiler\nsecond line")
            return fn(*a, **k)
        return call
    return fake_compile


@pytest.mark.parametrize("calls_before_failure", [0, 2])  # the first step fails; the third step fails
def test_training_falls_back_to_the_eager_network_with_one_warning(tmp_path, monkeypatch, calls_before_failure):
    _train(tmp_path / "eager")
    monkeypatch.setattr(torch, "compile", _failing_compile(calls_before_failure))
    with pytest.warns(RuntimeWarning, match=r"^torch.compile failed \(RuntimeError: no working C\+\+ compiler\); "
                                            "training with the eager network$") as caught:
        _train(tmp_path / "compiled", "train.compile=true")
    assert len([w for w in caught if "torch.compile" in str(w.message)]) == 1  # once, then eager for good
    # The failed step is redone from its own (seed, step) randomness: the run is the eager run, bit for bit.
    assert len(_losses(tmp_path / "eager")) == 3 and _losses(tmp_path / "compiled") == _losses(tmp_path / "eager")
    eager, compiled = _weights(tmp_path / "eager"), _weights(tmp_path / "compiled")
    assert eager.keys() == compiled.keys()
    assert all(torch.equal(eager[k], compiled[k]) for k in eager)


def test_compile_refuses_a_method_without_a_denoiser_network(tmp_path):
    with pytest.raises(ConfigError, match="train.compile applies to diffusion methods .* gan has none"):
        api.train("gan", data="digits", overrides=[*TINY_DCGAN, "train.steps=1", "train.compile=true"],
                  run_dir=tmp_path / "gan", progress=False)


@pytest.mark.slow
def test_compiled_training_step_gives_the_eager_loss_and_gradients(tmp_path):
    run = _train(tmp_path / "eager")
    method = run.method.train()
    compiled = copy.deepcopy(method)
    compile_network(compiled.backbone)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(32, 1, 8, 8, generator=g) * 2 - 1
    t = torch.randint(0, method.config.num_timesteps, (32,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    losses = []
    for m in (method, compiled):
        m.zero_grad(set_to_none=True)
        loss, _ = m.loss(x0, t, noise)
        loss.backward()
        losses.append(loss.detach())
    assert is_compiled(compiled.backbone) and torch.allclose(losses[0], losses[1], rtol=1e-5, atol=0)
    for (name, p), q in zip(method.named_parameters(), compiled.parameters()):
        scale = float(p.grad.abs().max())  # float32 reassociation: relative to the tensor's gradient scale
        assert float((p.grad - q.grad).abs().max()) <= 1e-4 * scale + 1e-7, name


@pytest.mark.slow
def test_compiled_training_logs_the_eager_losses_and_keeps_checkpoints_interchangeable(tmp_path):
    from torch._dynamo.utils import counters

    _train(tmp_path / "eager")
    torch._dynamo.reset()  # a graph compiled by an earlier test of this process would be reused, not counted
    graphs = counters["stats"]["unique_graphs"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback: the compiled graph trained
        _train(tmp_path / "compiled", "train.compile=true")
    assert counters["stats"]["unique_graphs"] > graphs  # dynamo captured the network
    for (loss_e, norm_e), (loss_c, norm_c) in zip(_losses(tmp_path / "eager"), _losses(tmp_path / "compiled")):
        assert loss_c == pytest.approx(loss_e, rel=1e-4) and norm_c == pytest.approx(norm_e, rel=1e-3)
    eager, compiled = _weights(tmp_path / "eager"), _weights(tmp_path / "compiled")
    assert eager.keys() == compiled.keys()  # a compiled run's checkpoint loads into an eager one and back
    resumed = api.train("ddpm", overrides=["train.steps=4", "train.compile=false"], run_dir=tmp_path / "compiled",
                        resume=True, progress=False)
    assert resumed.step == 4
