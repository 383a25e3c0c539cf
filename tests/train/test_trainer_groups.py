"""Optimiser groups: each group's own settings, and gradients that reach only the group being stepped."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from genlab.config import RunConfig, TrainConfig
from genlab.data import DataConfig, load_data
from genlab.errors import ConfigError
from genlab.methods.base import DataInfo, Method, OptimizerSpec
from genlab.train.trainer import Trainer


@dataclass
class _ToyConfig:
    d_kind: str = "sgd"
    n_critic: int = 1


class _ToyGAN(Method):
    """A two-network method: D steps on its own loss, then G steps on a loss computed through D."""

    name = "toy-gan"
    Config = _ToyConfig

    def __init__(self, config, data_info):
        super().__init__(config, data_info)
        size = data_info.channels * data_info.image_size ** 2
        self.generator = nn.Linear(4, size)
        self.discriminator = nn.Linear(size, 1)
        self.d_before_g_step = None

    def optimizer_groups(self):
        return {"generator": OptimizerSpec(list(self.generator.parameters()), lr=1e-2, betas=(0.5, 0.999)),
                "discriminator": OptimizerSpec(list(self.discriminator.parameters()), lr=3e-2, kind=self.config.d_kind)}

    def training_step(self, batch, ctx):
        real = batch["image"].flatten(1)
        fake = self.generator(ctx.randn(4))
        for _ in range(self.config.n_critic):
            d_loss = nn.functional.softplus(-self.discriminator(real)).mean() + \
                nn.functional.softplus(self.discriminator(fake.detach())).mean()
            ctx.optimize(d_loss, "discriminator")
        self.d_before_g_step = [p.detach().clone() for p in self.discriminator.parameters()]
        g_loss = nn.functional.softplus(-self.discriminator(fake)).mean()
        ctx.optimize(g_loss, "generator")
        return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach()}


def _trainer(tmp_path, d_kind="sgd", n_critic=1, **train):
    cfg = RunConfig(method="toy-gan", data=DataConfig(source="digits"),
                    train=TrainConfig(**{"steps": 3, "batch_size": 16, "warmup_steps": 0, "ema_decay": None,
                                         "threads": 1, "grad_clip": None, **train}),
                    model=_ToyConfig(d_kind=d_kind, n_critic=n_critic))
    data = load_data(cfg.data)
    method = _ToyGAN(cfg.model, DataInfo(channels=1, image_size=8))
    return Trainer(tmp_path / "run", cfg, method, data, progress=False)


def test_each_group_gets_its_own_optimiser_settings(tmp_path):
    trainer = _trainer(tmp_path)
    g_opt, d_opt = trainer.optimizers["generator"], trainer.optimizers["discriminator"]
    assert isinstance(g_opt, torch.optim.AdamW) and g_opt.param_groups[0]["betas"] == (0.5, 0.999)
    assert g_opt.param_groups[0]["lr"] == pytest.approx(1e-2)
    assert isinstance(d_opt, torch.optim.SGD) and d_opt.param_groups[0]["lr"] == pytest.approx(3e-2)


def test_generator_step_leaves_the_discriminator_untouched(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.fit()
    method = trainer.method
    # D changed only in its own step: after the last G step its weights equal those right after its step,
    # and no gradient of G's loss is left on D for its next step.
    for before, after in zip(method.d_before_g_step, method.discriminator.parameters()):
        assert torch.equal(before, after)
        assert after.grad is None


def test_sgd_discriminator_step_is_plain_gradient_descent(tmp_path):
    trainer = _trainer(tmp_path)
    method = trainer.method
    d0 = [p.detach().clone() for p in method.discriminator.parameters()]
    grads = {}

    original = trainer._optimize

    def spy(loss, group, ctx):
        if group == "discriminator" and not grads:
            grads["g"] = torch.autograd.grad(loss, list(method.discriminator.parameters()), retain_graph=True)
        original(loss, group, ctx)

    trainer._optimize = spy
    trainer.cfg.train.steps = 1
    trainer.fit()
    for p0, g, p1 in zip(d0, grads["g"], method.discriminator.parameters()):
        torch.testing.assert_close(p1.detach(), p0 - 3e-2 * g)


def test_unknown_optimiser_kind_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="adamw, sgd"):
        _trainer(tmp_path, d_kind="rmsprop")


def test_grad_norms_are_logged_per_group(tmp_path):
    import json

    trainer = _trainer(tmp_path, log_every=1)
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train_rows = [r["values"] for r in rows if "grad_norm_generator" in r["values"]]
    assert len(train_rows) == 3 and all(r["grad_norm_discriminator"] > 0 for r in train_rows)


def test_schedule_advances_once_per_step_however_often_a_group_steps(tmp_path):
    # Warm-up over 10 steps: after 3 training steps both groups are at 4/10 of their lr, although the
    # critic stepped 3 times per training step.
    trainer = _trainer(tmp_path, n_critic=3, warmup_steps=10)
    trainer.fit()
    assert trainer.optimizers["discriminator"].param_groups[0]["lr"] == pytest.approx(3e-2 * 4 / 10)
    assert trainer.optimizers["generator"].param_groups[0]["lr"] == pytest.approx(1e-2 * 4 / 10)
