"""The StyleGAN method: D and G learn in the right direction, lazy R1 and path length follow the paper,
resume is exact (both optimisers, the G EMA, w_avg and the path-length target), samples are reproducible."""

from __future__ import annotations

import math

import pytest
import torch

from genlab import api
from genlab.config import build_config
from genlab.data import load_data
from genlab.errors import ConfigError
from genlab.methods import DataInfo
from genlab.methods.stylegan import StyleGAN, StyleGANConfig, path_lengths
from genlab.train.checkpoint import latest_checkpoint, load_checkpoint
from step_context import SeededDraws

# A StyleGAN small enough for a few dozen steps in seconds on 8x8 `digits` (4 -> 8 resolutions).
TINY_STYLEGAN = [
    "model.net.z_dim=16",
    "model.net.w_dim=16",
    "model.net.mapping_layers=2",
    "model.net.channels=16",
    "model.net.max_channels=32",
    "model.net.d_channels=16",
    "model.net.d_max_channels=32",
    "model.health.num_samples=32",
    "train.batch_size=32",
    "train.lr=2e-3",
    "train.warmup_steps=0",
    "train.grad_clip=null",
    "train.log_every=3",
    "train.sample_n=4",
    "train.threads=1",
]
DIGITS = DataInfo(channels=1, image_size=8, num_classes=10)


def _method(*overrides: str, data_info: DataInfo = DIGITS, seed: int = 0) -> StyleGAN:
    cfg = build_config("stylegan", StyleGANConfig, overrides=[*TINY_STYLEGAN, "model.health.enabled=false",
                                                              *overrides])
    torch.manual_seed(seed)
    return StyleGAN(cfg.model, data_info)


def _digits(n: int = 32) -> dict[str, torch.Tensor]:
    data = load_data(build_config("stylegan", StyleGANConfig, overrides=["data.source=digits"]).data)
    return {"image": data.to_model_range()[:n], "label": data.labels[:n]}


class _Ctx(SeededDraws):
    """A minimal StepContext: draws from a seeded generator; optimize() steps only the ``trainable`` groups."""

    def __init__(self, step: int, n: int, optimizers: dict, trainable: set[str], seed: int = 0):
        self.step, self.n = step, n
        self.generator = torch.Generator().manual_seed(seed * 7919 + step)
        self.optimizers, self.trainable = optimizers, trainable
        self.losses: dict[str, torch.Tensor] = {}

    def optimize(self, loss, group="main"):
        self.losses[group] = loss.detach()
        opt = self.optimizers[group]
        params = [p for g in opt.param_groups for p in g["params"]]
        loss.backward(inputs=params)
        if group in self.trainable:
            opt.step()
        opt.zero_grad(set_to_none=True)


def _optimizers(method: StyleGAN) -> dict:
    return {name: torch.optim.Adam(spec.params, lr=2e-3, betas=spec.betas)
            for name, spec in method.optimizer_groups().items()}


def _train(method, batch, steps, trainable, optimizers, start=0):
    logs = []
    for step in range(start, start + steps):
        out = method.training_step(batch, _Ctx(step, len(batch["image"]), optimizers, trainable))
        logs.append({k: float(v) for k, v in out.items()})
    return logs


def _mean(logs, key):
    return sum(r[key] for r in logs) / len(logs)


def test_discriminator_learns_to_separate_then_generator_learns_to_fool_it():
    method = _method("model.r1_gamma=0")
    batch, opts = _digits(), _optimizers(method)
    d_logs = _train(method, batch, 30, {"discriminator"}, opts)  # G frozen: D's job is easy
    assert abs(d_logs[0]["d_loss"] - 2 * math.log(2)) < 0.3  # untrained D: logits ~0, BCE = 2 ln 2
    assert _mean(d_logs[-3:], "d_loss") < 0.5 * d_logs[0]["d_loss"]
    assert _mean(d_logs[-3:], "d_real_acc") > 0.9 and _mean(d_logs[-3:], "d_fake_acc") > 0.9
    g_logs = _train(method, batch, 20, {"generator"}, opts, start=30)  # D frozen: G must fool it
    assert _mean(g_logs[-3:], "g_loss") < 0.5 * _mean(g_logs[:3], "g_loss")
    assert _mean(g_logs[-3:], "d_fake_acc") < _mean(g_logs[:3], "d_fake_acc") - 0.3


def test_lazy_r1_is_added_every_r1_every_steps_scaled_by_the_interval():
    gamma, every = 0.5, 2
    with_r1 = _method(f"model.r1_gamma={gamma}", f"model.r1_every={every}")
    without = _method("model.r1_gamma=0")
    without.load_state_dict(with_r1.state_dict())
    batch = _digits(16)
    real = batch["image"].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(with_r1.discriminator(real).sum(), real)
    r1 = grad.flatten(1).square().sum(1).mean()  # E ||grad_x D(x)||^2 on the reals
    for step, expected in ((0, gamma / 2 * every * r1), (1, 0.0)):
        losses = []
        for method in (with_r1, without):
            ctx = _Ctx(step, 16, _optimizers(method), trainable=set())  # no weights change
            method.training_step(batch, ctx)
            losses.append(ctx.losses["discriminator"])
        torch.testing.assert_close(losses[0] - losses[1], torch.as_tensor(expected, dtype=torch.float32),
                                   rtol=1e-4, atol=1e-6)


def test_path_lengths_equal_the_jacobian_closed_form():
    # A linear "generator" images = A ws: J_w^T y = A^T y exactly.
    g = torch.Generator().manual_seed(0)
    n, num_ws, w_dim, pixels = 3, 4, 5, 2 * 3 * 3
    a = torch.randn(pixels, num_ws * w_dim, generator=g, dtype=torch.float64)
    ws = torch.randn(n, num_ws, w_dim, generator=g, dtype=torch.float64, requires_grad=True)
    images = (ws.reshape(n, -1) @ a.t()).reshape(n, 2, 3, 3)
    y = torch.randn(n, 2, 3, 3, generator=g, dtype=torch.float64)
    jty = (y.reshape(n, -1) @ a).reshape(n, num_ws, w_dim)  # (n, num_ws, w_dim)
    expected = torch.sqrt(jty.square().sum(2).mean(1))
    lengths = path_lengths(images, ws, y)
    torch.testing.assert_close(lengths, expected)


def test_path_length_target_is_a_running_mean_and_the_penalty_is_logged():
    method = _method("model.pl_weight=2", "model.pl_every=2", "model.pl_decay=0.5")
    batch, opts = _digits(16), _optimizers(method)
    _train(method, batch, 1, set(), opts)  # step 0 is a path-length step
    first = float(method.pl_mean)
    assert first > 0  # a <- 0 + 0.5 (mean length - 0)
    logs = _train(method, batch, 2, set(), opts, start=1)  # step 1 skips, step 2 updates
    assert logs[0]["pl"] == logs[0]["pl"] and float(method.pl_mean) != first
    assert 0.5 * first < float(method.pl_mean) < 2.5 * first  # moved halfway toward similar lengths


def test_style_mixing_draws_one_crossover_per_sample():
    batch_n = 64
    for prob in (0.0, 1.0):
        method = _method(f"model.style_mixing_prob={prob}")
        num_ws = method.num_ws
        ws = method._training_styles(_Ctx(0, batch_n, {}, set()), None, update_w_avg=False)  # (n, num_ws, w_dim)
        same_as_first = (ws == ws[:, :1]).all(dim=2)  # (n, num_ws)
        if prob == 0.0:
            assert same_as_first.all()
        else:
            switch = same_as_first.sum(dim=1)  # layers before the crossover use w1
            assert ((switch >= 1) & (switch < num_ws)).all()
            assert torch.equal(same_as_first, torch.arange(num_ws)[None] < switch[:, None])  # one switch, no return
            assert len(set(switch.tolist())) == num_ws - 1  # every crossover 1..num_ws-1 occurs


def test_resume_is_exact_and_samples_are_reproducible(tmp_path):
    common = TINY_STYLEGAN + ["train.checkpoint_every=3", "train.ema_decay=0.9", "model.r1_every=2",
                              "model.pl_weight=2", "model.pl_every=2", "model.health.every=3"]
    api.train("stylegan", data="digits", overrides=common + ["train.steps=6"], run_dir=tmp_path / "a", progress=False)
    api.train("stylegan", data="digits", overrides=common + ["train.steps=3"], run_dir=tmp_path / "b", progress=False)
    run = api.train("stylegan", overrides=["train.steps=6"], run_dir=tmp_path / "b", resume=True, progress=False)
    a = load_checkpoint(latest_checkpoint(tmp_path / "a"))[0]
    b = load_checkpoint(latest_checkpoint(tmp_path / "b"))[0]
    for section in ("model", "ema_generator", "optim_generator", "optim_discriminator"):
        assert a[section].keys() == b[section].keys(), section
        for k in a[section]:
            assert torch.equal(a[section][k], b[section][k]), (section, k)
    assert float(a["model"]["pl_mean"]) > 0 and a["model"]["generator.w_avg"].abs().sum() > 0
    # Sampling: same seed, same images (also after reloading the folder); another seed differs.
    x = run.sample(6, seed=1)
    assert x.shape == (6, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, api.load_run(tmp_path / "b").sample(6, seed=1))
    assert not torch.equal(x, run.sample(6, seed=2))
    # Truncation psi = 0 with shared noise: every sample is the mean-w image.
    noise = [m[:1].expand(6, -1, -1, -1) for m in run.method.generator.make_noise(1, torch.Generator().manual_seed(0))]
    x0 = run.method.sample(6, generator=torch.Generator().manual_seed(3), truncation=0.0, noise=noise)
    assert torch.allclose(x0, x0[:1].expand_as(x0), atol=1e-6)


def test_class_conditional_sampling_uses_the_labels_and_bad_options_are_rejected():
    method = _method("model.class_conditional=true").eval()
    z = torch.randn(4, method.latent_dim)
    noise = method.generator.make_noise(4, torch.Generator().manual_seed(0))
    a = method.sample(4, z=z, noise=noise, labels=torch.tensor([1, 1, 1, 1]))
    b = method.sample(4, z=z, noise=noise, labels=torch.tensor([1, 1, 1, 1]))
    c = method.sample(4, z=z, noise=noise, labels=torch.tensor([2, 2, 2, 2]))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    with pytest.raises(ConfigError, match="steps"):
        method.sample(2, steps=10)
    with pytest.raises(ConfigError, match="class-conditional"):
        _method().sample(2, labels=torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="labelled"):
        _method("model.class_conditional=true", data_info=DataInfo(1, 8, None))
