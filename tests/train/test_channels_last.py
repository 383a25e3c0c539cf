"""train.channels_last: the denoiser trains in NHWC memory with the NCHW run's maths, and resumes exactly."""

from __future__ import annotations

import shutil

import pytest
import torch

from genlab import api
from genlab.errors import ConfigError
from genlab.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from genlab.train.runlog import read_log
from genlab.train.trainer import match_state_layout

from tiny_configs import TINY_DCGAN, TINY_DDPM

COMMON = [*TINY_DDPM, "train.steps=4", "train.log_every=1", "train.checkpoint_every=2", "train.keep_checkpoints=2"]


def _train(run_dir, *overrides, resume=False):
    return api.train("ddpm", data="digits", overrides=COMMON + list(overrides), run_dir=run_dir, progress=False,
                     resume=resume)


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_checkpoint(run_dir))[0]["model"]


def _losses(run_dir) -> list[float]:
    return [r["values"]["loss"] for r in read_log(run_dir) if r["kind"] == "train"]


def test_channels_last_training_gives_the_nchw_losses(tmp_path, monkeypatch):
    from genlab.train import trainer as trainer_module

    layouts = []
    original = trainer_module.Trainer._train_step

    def spy(self):  # the layout the trainer's network actually trains in
        layouts.append(self.method.backbone.down[0].res.conv1.weight.is_contiguous(memory_format=torch.channels_last))
        return original(self)

    monkeypatch.setattr(trainer_module.Trainer, "_train_step", spy)
    _train(tmp_path / "nchw")
    _train(tmp_path / "nhwc", "train.channels_last=true")
    assert layouts == [False] * 4 + [True] * 4
    nchw, nhwc = _losses(tmp_path / "nchw"), _losses(tmp_path / "nhwc")
    assert len(nchw) == 4 and nhwc == pytest.approx(nchw, rel=1e-4)  # float32 rounding of other kernels only


def test_resumed_channels_last_run_is_the_uninterrupted_run(tmp_path):
    # Checkpoints hold contiguous moments; the fused AdamW kernel reads them as flat memory beside NHWC
    # parameters, so without match_state_layout the resumed steps would update the wrong elements.
    _train(tmp_path / "straight", "train.channels_last=true")
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(list_checkpoints(tmp_path / "resumed")[-1])  # back to the step-2 checkpoint
    assert _train(tmp_path / "resumed", "train.channels_last=true", resume=True).step == 4
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_optimizer_state_takes_its_parameters_layout():
    torch.manual_seed(0)
    weight, grad = torch.randn(8, 4, 3, 3), torch.randn(2, 8, 4, 3, 3)

    def two_steps(layout: torch.memory_format, reload_state: bool) -> torch.Tensor:
        p = torch.nn.Parameter(weight.clone(memory_format=layout))
        opt = torch.optim.AdamW([p], lr=0.1, fused=True)
        for g in grad:
            p.grad = g.contiguous(memory_format=layout)
            opt.step()
            if reload_state:  # as from a checkpoint: contiguous moments
                state = opt.state_dict()
                for key in ("exp_avg", "exp_avg_sq"):
                    state["state"][0][key] = state["state"][0][key].contiguous()
                opt = torch.optim.AdamW([p], lr=0.1, fused=True)
                opt.load_state_dict(state)
                match_state_layout(opt)
        return p.detach()

    expected = two_steps(torch.contiguous_format, reload_state=False)
    assert torch.equal(two_steps(torch.channels_last, reload_state=True), expected)


def test_channels_last_refuses_a_method_without_a_denoiser_network(tmp_path):
    with pytest.raises(ConfigError, match="train.channels_last applies to diffusion methods .* gan has none"):
        api.train("gan", data="digits", overrides=[*TINY_DCGAN, "train.steps=1", "train.channels_last=true"],
                  run_dir=tmp_path / "gan", progress=False)
