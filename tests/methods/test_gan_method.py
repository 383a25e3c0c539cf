"""The GAN method: which network each update moves, loss directions, stabilisers, conditioning, resume, sampling."""

from __future__ import annotations

import warnings

import pytest
import torch

from genlab import api
from genlab.config import TrainConfig, build_config
from genlab.data import DataConfig, load_data
from genlab.errors import ConfigError
from genlab.losses import discriminator_loss, generator_loss
from genlab.methods import DataInfo
from genlab.methods.gan import GAN, GANConfig
from genlab.noise import ImageNoise
from genlab.train.checkpoint import latest_checkpoint, load_checkpoint
from genlab.methods.health import HealthWarning
from genlab.train.trainer import make_optimizer

from tiny_configs import TINY_DCGAN
from step_context import SeededDraws

LOSSES = ["vanilla", "nonsaturating", "hinge", "lsgan", "wgan", "wgan-gp"]
DIGITS = DataInfo(channels=1, image_size=8, num_classes=10)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_data(DataConfig(source="digits"))
    return data.to_model_range()[:64], data.labels[:64]


def _method(loss: str = "nonsaturating", **overrides) -> GAN:
    extra = {"norm_d": "none"} if loss == "wgan-gp" else {}
    extra.update(overrides)
    cfg = build_config("gan", GANConfig, overrides=TINY_DCGAN + [f"model.loss={loss}"]
                       + [f"model.{k}={v}" for k, v in extra.items()]).model
    torch.manual_seed(0)
    return GAN(cfg, DIGITS)


class FakeContext(SeededDraws):
    """A stand-in for the trainer's step context: seeded draws, one optimiser per group, a record of calls."""

    def __init__(self, method: GAN, n: int, step: int = 0, seed: int = 0, lr: float = 2e-4,
                 only: str | None = None, full_backward: bool = False):
        self.step, self.n, self.only = step, n, only
        self.generator = torch.Generator().manual_seed(seed)
        tc = TrainConfig(lr=lr)
        groups = method.optimizer_groups()
        self.params = {name: list(spec.params) for name, spec in groups.items()}
        self.optimizers = {name: make_optimizer(spec, tc) for name, spec in groups.items()}
        self.full_backward = full_backward
        self.calls: list[tuple[str, dict[str, bool]]] = []  # group, {other group: had gradients}
        self.logs: dict[str, torch.Tensor] = {}

    def optimize(self, loss, group="main"):
        if self.full_backward:  # backpropagate into everything, to see where the loss reaches
            loss.backward()
        else:
            loss.backward(inputs=self.params[group])
        reached = {other: any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
                   for other, params in self.params.items() if other != group}
        self.calls.append((group, reached))
        if self.only in (None, group):
            self.optimizers[group].step()
        for params in self.params.values():
            for p in params:
                p.grad = None


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.named_parameters())


# ---------------------------------------------------------------------------------------------- updates


@pytest.mark.parametrize("loss", LOSSES)
def test_each_update_moves_only_its_own_network(loss, digits):
    method = _method(loss)
    groups = method.optimizer_groups()
    d_params, g_params = set(groups["discriminator"].params), set(groups["generator"].params)
    assert d_params == set(method.discriminator.parameters()) and g_params == set(method.generator.parameters())
    assert not d_params & g_params and d_params | g_params == set(method.parameters())
    real, _ = digits
    # D-only steps: the generator's weights stay as they were
    ctx = FakeContext(method, len(real), only="discriminator", full_backward=True)
    g_before, d_before = _snapshot(method.generator), _snapshot(method.discriminator)
    method.training_step({"image": real}, ctx)
    assert _changed(d_before, method.discriminator) and not _changed(g_before, method.generator)
    n_critic = 5 if loss in ("wgan", "wgan-gp") else 1
    assert [group for group, _ in ctx.calls] == ["discriminator"] * n_critic + ["generator"]
    # D's loss is computed on detached fakes: a full backward of it leaves no gradient in G
    assert all(not reached["generator"] for group, reached in ctx.calls if group == "discriminator")
    # G-only steps: D's weights stay as they were
    ctx = FakeContext(method, len(real), only="generator")
    g_before, d_before = _snapshot(method.generator), _snapshot(method.discriminator)
    method.training_step({"image": real}, ctx)
    assert _changed(g_before, method.generator) and not _changed(d_before, method.discriminator)


def _fixed_losses(method: GAN, real: torch.Tensor, z: torch.Tensor) -> tuple[float, float, float]:
    """(D loss, D's margin mean D(real) - mean D(fake), G loss) on a fixed real batch and fixed z.

    Training-mode BatchNorm, as D sees its batches during training.
    """
    kind = method.config.loss
    with torch.no_grad():
        fake = method.generator(z)
        real_logits, fake_logits = method.discriminator(real), method.discriminator(fake)
        margin = (real_logits.mean() - fake_logits.mean()).item()
        d_loss = discriminator_loss(kind, real_logits, fake_logits).item()
        g_loss = generator_loss(kind, fake_logits).item()
    return d_loss, margin, g_loss


@pytest.mark.parametrize("loss", LOSSES)
def test_discriminator_steps_lower_its_loss_and_generator_steps_lower_theirs(loss, digits):
    real, _ = digits
    z = torch.randn(64, 16, generator=torch.Generator().manual_seed(5))
    method = _method(loss, n_critic=1)
    d0, margin0, _ = _fixed_losses(method, real, z)
    ctx = FakeContext(method, len(real), only="discriminator", lr=2e-3)
    for step in range(8):
        ctx.step = step
        method.training_step({"image": real}, ctx)
    d1, margin1, g1 = _fixed_losses(method, real, z)
    assert d1 < d0 - 0.05 * abs(d0) - 1e-3, (d0, d1)
    assert margin1 > margin0 + 0.01, (margin0, margin1)  # D separates real from fake better
    ctx = FakeContext(method, len(real), only="generator", lr=2e-3, seed=1)
    for step in range(8):
        ctx.step = step
        method.training_step({"image": real}, ctx)
    _, _, g2 = _fixed_losses(method, real, z)
    assert g2 < g1, (g1, g2)


def test_wgan_weight_clipping_keeps_every_critic_weight_in_bounds(digits):
    method = _method("wgan", clip_value=0.01)
    assert method.n_critic == 5
    assert max(p.abs().max() for p in method.discriminator.parameters()) > 0.01  # N(0, 0.02) init, BN scales ~1
    real, _ = digits
    method.training_step({"image": real}, FakeContext(method, len(real), lr=0.5))  # huge steps
    for name, p in method.discriminator.named_parameters():
        assert p.abs().max() <= 0.01, name


def test_penalties_enter_the_d_loss_with_their_weights(digits):
    real, _ = digits
    fake = torch.rand(real.shape, generator=torch.Generator().manual_seed(3)) * 2 - 1
    # R1 (Mescheder et al. 2018): + gamma / 2 * mean ||grad_x D(x)||^2 on real images
    method = _method("nonsaturating", r1_gamma=4.0, norm_d="none")
    loss, logs = method.discriminator_step_loss(real, fake, None, FakeContext(method, len(real)))
    d = method.discriminator
    x = real.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(d(x).sum(), x)
    r1 = grad.square().sum(dim=(1, 2, 3)).mean()
    base = discriminator_loss("nonsaturating", d(real), d(fake))
    assert logs["r1"].item() == pytest.approx(r1.item(), rel=1e-4)
    assert loss.item() == pytest.approx(base.item() + 2.0 * r1.item(), rel=1e-5)
    # WGAN-GP (Gulrajani et al. 2017): + 10 * mean (||grad D(x_hat)|| - 1)^2, x_hat on real-fake lines
    method = _method("wgan-gp")
    loss, logs = method.discriminator_step_loss(real, fake, None, FakeContext(method, len(real), seed=7))
    d = method.discriminator
    mix = FakeContext(method, len(real), seed=7).rand(1, 1, 1)  # the step's only draw
    x_hat = (mix * real + (1 - mix) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(d(x_hat).sum(), x_hat)
    gp = (grad.flatten(1).norm(dim=1) - 1).square().mean()
    base = d(fake).mean() - d(real).mean()
    assert logs["gp"].item() == pytest.approx(gp.item(), rel=1e-4)
    assert loss.item() == pytest.approx(base.item() + 10.0 * gp.item(), rel=1e-4, abs=1e-5)


def test_label_smoothing_targets_lie_in_the_stated_ranges():
    method = _method("nonsaturating", label_smoothing="true")
    real_t, fake_t = method.discriminator_targets(FakeContext(method, 20000))
    assert real_t.min() >= 0.7 and real_t.max() <= 1.2 and fake_t.min() >= 0.0 and fake_t.max() <= 0.3
    # uniform over the whole range, not a constant inside it
    assert real_t.mean().item() == pytest.approx(0.95, abs=0.01) and real_t.std().item() == pytest.approx(0.5 / 12**0.5, abs=0.01)
    assert fake_t.mean().item() == pytest.approx(0.15, abs=0.01) and fake_t.std().item() == pytest.approx(0.3 / 12**0.5, abs=0.01)
    flipping = _method("lsgan", label_flip_prob=0.2)
    real_t, fake_t = flipping.discriminator_targets(FakeContext(flipping, 20000))
    assert set(real_t.unique().tolist()) == {0.0, 1.0} and set(fake_t.unique().tolist()) == {0.0, 1.0}
    assert (real_t == 0).float().mean().item() == pytest.approx(0.2, abs=0.015)
    assert (fake_t == 1).float().mean().item() == pytest.approx(0.2, abs=0.015)
    assert _method("nonsaturating").discriminator_targets(FakeContext(flipping, 4)) == (1.0, 0.0)


def test_instance_noise_decays_linearly_and_reaches_d_inputs(digits):
    method = _method("nonsaturating", instance_noise=0.5, instance_noise_steps=100)
    assert [method.instance_noise_std(s) for s in (0, 50, 100, 150)] == [0.5, 0.25, 0.0, 0.0]
    seen = []
    forward = method.discriminator.forward
    method.discriminator.forward = lambda x, y=None: (seen.append(x.detach().clone()), forward(x, y))[1]
    real, _ = digits
    method.training_step({"image": real}, FakeContext(method, len(real), step=0))
    noise = seen[0] - real  # the first D input is the noisy real batch
    assert noise.std().item() == pytest.approx(0.5, rel=0.05)
    seen.clear()
    method.training_step({"image": real}, FakeContext(method, len(real), step=100))
    assert torch.equal(seen[0], real)


@pytest.mark.parametrize("separate", [True, False])
def test_separate_batches_controls_how_real_and_fake_meet_d(separate, digits):
    method = _method("nonsaturating", separate_batches=str(separate).lower())
    sizes = []
    forward = method.discriminator.forward
    method.discriminator.forward = lambda x, y=None: (sizes.append(len(x)), forward(x, y))[1]
    real, _ = digits
    method.training_step({"image": real}, FakeContext(method, len(real)))
    n = len(real)
    assert sizes == ([n, n, n] if separate else [2 * n, n])  # D step(s), then the G step on fakes


# ---------------------------------------------------------------------------------------------- options


def test_inconsistent_options_are_refused():
    with pytest.raises(ConfigError, match="norm_d"):
        _method("wgan-gp", norm_d="batch")
    with pytest.raises(ConfigError, match="hinge"):
        _method("hinge", label_smoothing="true")
    cfg = build_config("gan", GANConfig, overrides=["model.class_conditional=true"]).model
    with pytest.raises(ConfigError, match="labelled"):
        GAN(cfg, DataInfo(channels=1, image_size=8, num_classes=None))


def test_ttur_and_sgd_discriminator_reach_the_optimisers():
    method = _method("hinge", lr_g="1e-4", lr_d="4e-4", betas_g="[0.0,0.9]", d_optimizer="sgd", d_momentum=0.5)
    opts = {name: make_optimizer(spec, TrainConfig(lr=1e-3)) for name, spec in method.optimizer_groups().items()}
    d, g = opts["discriminator"].param_groups[0], opts["generator"].param_groups[0]
    assert isinstance(opts["discriminator"], torch.optim.SGD) and d["lr"] == 4e-4 and d["momentum"] == 0.5
    assert isinstance(opts["generator"], torch.optim.AdamW) and g["lr"] == 1e-4 and g["betas"] == (0.0, 0.9)


def test_conditional_gan_gives_g_and_d_the_labels(digits):
    method = _method("hinge", class_conditional="true", spectral_norm="true", norm_d="none")
    seen_g, seen_d = [], []
    g_forward, d_forward = method.generator.forward, method.discriminator.forward
    method.generator.forward = lambda z, y=None: (seen_g.append(y), g_forward(z, y))[1]
    method.discriminator.forward = lambda x, y=None: (seen_d.append(y), d_forward(x, y))[1]
    real, labels = digits
    method.training_step({"image": real, "label": labels}, FakeContext(method, len(real)))
    assert seen_g and all(torch.equal(y, labels) for y in seen_g + seen_d)
    seen_g.clear()
    wanted = torch.tensor([3, 3, 7, 0, 9])
    method.sample(5, generator=torch.Generator().manual_seed(0), labels=wanted)
    assert torch.equal(seen_g[-1], wanted)
    method.sample(400, generator=torch.Generator().manual_seed(0))  # no labels: uniform random classes
    assert seen_g[-1].bincount(minlength=10).min() > 20
    with pytest.raises(ConfigError, match="class-conditional"):
        _method().sample(2, labels=torch.tensor([1, 2]))


def test_sampling_options():
    method = _method().eval()
    g = torch.Generator().manual_seed(0)
    x = method.sample(6, generator=g)
    assert x.abs().max() <= 1
    z = ImageNoise.from_generator(torch.Generator().manual_seed(0), 6).randn(16)
    assert torch.equal(method.sample(6, z=z), x)  # the prior draw is z ~ N(0, I), per image, from the generator
    assert torch.equal(method.synthesize(z), method.sample(6, z=z))
    with pytest.raises(ConfigError, match="truncation"):
        method.sample(2, truncation=0.7)
    with pytest.raises(ConfigError, match="steps"):
        method.sample(2, steps=10)
    uniform = _method(latent="uniform").eval()
    z = ImageNoise.from_generator(torch.Generator().manual_seed(0), 6).rand(16) * 2 - 1
    assert torch.equal(uniform.sample(6, generator=torch.Generator().manual_seed(0)), uniform.sample(6, z=z))


# ---------------------------------------------------------------------------------------------- health


def test_a_collapsed_generator_triggers_the_health_warning_from_training_step(digits):
    method = _method("nonsaturating", **{"health.every": 3, "health.evaluator": "none", "health.num_samples": 16})
    real, _ = digits
    ctx = FakeContext(method, len(real), only="discriminator")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(3):
            ctx.step = step
            method.training_step({"image": real}, ctx)
    with torch.no_grad():  # collapse: G ignores z
        method.generator.stem.weight.zero_()
    ctx.step = 3
    with pytest.warns(HealthWarning, match="mode collapse"):
        logs = method.training_step({"image": real}, ctx)
    assert logs["health_mode_collapse"] == 1.0 and logs["health_diversity"] < 0.1


# ---------------------------------------------------------------------------------------------- with the trainer


@pytest.mark.parametrize("loss", LOSSES)
def test_trains_on_digits_with_every_loss(loss, tmp_path):
    extra = ["model.norm_d=none"] if loss == "wgan-gp" else []
    run = api.train("gan", data="digits", overrides=TINY_DCGAN + extra + [f"model.loss={loss}", "train.steps=5"],
                    run_dir=tmp_path / "r", progress=False)
    from genlab.train.runlog import read_log

    rows = [r["values"] for r in read_log(tmp_path / "r" / "log.jsonl") if r["kind"] == "train"]
    first = rows[0]
    # An untrained D outputs logits ~ 0: its loss is the loss's value at 0 (BCE 2 ln 2, hinge 2, LSGAN 1/2, W 0)
    at_zero = {"vanilla": 1.386, "nonsaturating": 1.386, "hinge": 2.0, "lsgan": 0.5, "wgan": 0.0, "wgan-gp": None}[loss]
    if at_zero is not None:
        assert first["d_loss"] == pytest.approx(at_zero, abs=0.1)
    else:
        assert first["gp"] > 0 and first["d_loss"] > 5.0  # lambda (||grad|| - 1)^2 dominates at first
    for key in ("d_loss", "g_loss", "d_real_acc", "d_fake_acc", "grad_norm_discriminator", "grad_norm_generator"):
        assert all(key in r for r in rows), key
    assert 0 <= first["d_real_acc"] <= 1
    assert run.method.sample(4, generator=torch.Generator().manual_seed(0)).shape == (4, 1, 8, 8)


def _state(run_dir) -> dict[str, dict[str, torch.Tensor]]:
    return load_checkpoint(latest_checkpoint(run_dir))[0]


def test_resume_gives_the_same_weights_optimisers_and_ema_as_straight_training(tmp_path):
    common = TINY_DCGAN + ["train.checkpoint_every=4", "train.ema_decay=0.9", "model.label_smoothing=true",
                         "model.instance_noise=0.1", "model.dropout_g=0.1", "model.d_optimizer=sgd",
                         "model.d_momentum=0.9", "model.lr_d=1e-2", "model.class_conditional=true",
                         "model.health.every=3", "model.health.evaluator=none"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HealthWarning)
        api.train("gan", data="digits", overrides=common + ["train.steps=8"], run_dir=tmp_path / "a", progress=False)
        api.train("gan", data="digits", overrides=common + ["train.steps=4"], run_dir=tmp_path / "b", progress=False)
        api.train("gan", overrides=["train.steps=8"], run_dir=tmp_path / "b", resume=True, progress=False)
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    for section in ("model", "ema_generator", "optim_discriminator", "optim_generator"):
        assert a[section].keys() == b[section].keys() and a[section], section
        for k in a[section]:
            assert torch.equal(a[section][k], b[section][k]), (section, k)
    assert any(k.startswith("discriminator.") for k in a["model"])  # both networks are checkpointed


def test_the_health_monitor_does_not_change_training(tmp_path):
    """Diversity checks use their own generator and eval mode: weights and BN statistics are untouched."""
    common = TINY_DCGAN + ["train.steps=6", "train.checkpoint_every=100", "model.health.evaluator=none"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HealthWarning)
        api.train("gan", data="digits", overrides=common + ["model.health.every=1"], run_dir=tmp_path / "a",
                  progress=False)
    api.train("gan", data="digits", overrides=common + ["model.health.enabled=false"], run_dir=tmp_path / "b",
              progress=False)
    a, b = _state(tmp_path / "a")["model"], _state(tmp_path / "b")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # buffers (BN running stats) included


def test_sampling_a_run_is_reproducible(tmp_path):
    run = api.train("gan", data="digits", overrides=TINY_DCGAN + ["train.steps=3"], run_dir=tmp_path / "r", progress=False)
    again = api.load_run(tmp_path / "r")
    x = run.sample(10, seed=4)
    assert torch.equal(x, run.sample(10, seed=4)) and torch.equal(x, again.sample(10, seed=4))
    assert not torch.equal(x, run.sample(10, seed=5))


def test_several_critic_updates_refuse_gradient_accumulation(tmp_path):
    with pytest.raises(ConfigError, match="grad_accum"):
        api.train("gan", data="digits", overrides=TINY_DCGAN + ["model.loss=wgan", "train.grad_accum=2", "train.steps=2"],
                  run_dir=tmp_path / "r", progress=False)
    assert latest_checkpoint(tmp_path / "r") is None
