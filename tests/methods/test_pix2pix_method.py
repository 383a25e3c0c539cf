"""pix2pix: task inputs, the cGAN + L1 objective, training on digits and on a paired folder, exact resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from genlab import api
from genlab.config import build_config
from genlab.data import load_data
from genlab.data.paired import lowres, luminance, sobel_edges
from genlab.errors import ConfigError
from genlab.methods import DataInfo
from genlab.methods.capabilities import Generates, Translates, has
from genlab.methods.pix2pix import Pix2Pix, Pix2PixConfig, evaluate_pairs
from genlab.train.checkpoint import latest_checkpoint, load_checkpoint
from genlab.train.runlog import read_log

# Small enough for a few dozen steps in seconds on 8x8 digits.
TINY_PIX2PIX = [
    "model.generator.base_channels=8",
    "model.generator.max_channels=32",
    "model.disc_base_channels=8",
    "train.batch_size=16",
    "train.lr=5e-3",
    "train.warmup_steps=0",
    "train.grad_clip=null",
    "train.ema_decay=0.9",
    "train.log_every=4",
    "train.threads=1",
]


def _method(task: str, channels: int = 1, size: int = 8, **overrides) -> Pix2Pix:
    items = [f"model.task={task}", *TINY_PIX2PIX[:3], *(f"model.{k}={v}" for k, v in overrides.items())]
    torch.manual_seed(0)
    return Pix2Pix(build_config("pix2pix", Pix2PixConfig, overrides=items).model, DataInfo(channels, size))


def _targets(n: int = 4, channels: int = 1, size: int = 8) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(3)) * 2 - 1


def test_derived_inputs_are_the_data_transforms():
    b = _targets()
    assert torch.equal(_method("edges").make_input(b), sobel_edges(b, 0.25))
    assert torch.equal(_method("edges", edge_threshold="null").make_input(b), sobel_edges(b, None))
    assert torch.equal(_method("lowres").make_input(b), lowres(b, 2, "bilinear"))
    rgb = _targets(channels=3)
    colour = _method("grey2colour", channels=3)
    assert colour.input_channels == 1 and torch.equal(colour.make_input(rgb), luminance(rgb))
    with pytest.raises(ConfigError, match="grey2colour needs RGB"):
        _method("grey2colour", channels=1)
    with pytest.raises(ConfigError, match="paired"):
        _method("paired").make_input(b)


def test_masked_input_hides_a_square_and_carries_the_mask():
    b = _targets(n=64, channels=3)
    method = _method("masked", channels=3, mask_fraction=0.25)
    a = method.make_input(b, torch.Generator().manual_seed(0))
    assert a.shape == (64, 4, 8, 8) and method.input_channels == 4
    hidden = a[:, 3:] > 0  # (N, 1, H, W) mask channel: +1 hidden, -1 visible
    assert torch.equal(a[:, 3:].abs(), torch.ones_like(a[:, 3:]))
    assert (hidden.flatten(1).sum(1) == 16).all()  # side = sqrt(0.25) * 8 = 4
    assert (a[:, :3][hidden.expand(-1, 3, -1, -1)] == -1).all()
    assert torch.equal(a[:, :3][~hidden.expand(-1, 3, -1, -1)], b[~hidden.expand(-1, 3, -1, -1)])
    assert torch.equal(a, method.make_input(b, torch.Generator().manual_seed(0)))  # the generator decides
    assert not torch.equal(a, method.make_input(b, torch.Generator().manual_seed(1)))
    # translate() generates the hole only: visible pixels come back exactly from the input.
    b_hat = method.eval().translate(a)
    visible = ~hidden.expand(-1, 3, -1, -1)
    assert torch.equal(b_hat[visible], b[visible]) and not torch.equal(b_hat[~visible], a[:, :3][~visible])


def test_translate_and_sample_contract():
    method = _method("lowres").eval()
    out = method.translate(_targets())
    assert out.shape == (4, 1, 8, 8) and out.abs().max() <= 1
    assert not has(Pix2Pix, Generates) and has(Pix2Pix, Translates)
    with pytest.raises(ConfigError, match="genlab translate"):
        method.sample(4)
    with pytest.raises(ConfigError, match=r"\(N, 1, H, W\)"):
        method.translate(_targets(channels=3))
    assert method.receptive_field == 16 and method.disc_layers == 1


class _RecordingContext:
    """A stand-in StepContext: plain backward (no `inputs=`), records the order and the grads it saw."""

    step = 0

    def __init__(self, method: Pix2Pix, n: int):
        self.method, self.n, self.calls = method, n, []

    def rand(self, *shape):
        return torch.rand(self.n, *shape, generator=torch.Generator().manual_seed(5))

    def optimize(self, loss, group):
        loss.backward()
        g_grads = [p.grad for p in self.method.generator.parameters() if p.grad is not None]
        self.calls.append((group, float(loss.detach()), len(g_grads)))
        self.method.zero_grad(set_to_none=True)


def test_training_step_is_halved_bce_for_d_then_nonsaturating_gan_plus_100_l1_for_g():
    method = _method("lowres")
    b = _targets(n=6)
    a = lowres(b)
    torch.manual_seed(1)
    with torch.no_grad():
        fake = method.generator(a)
        real_logits = method.discriminator(torch.cat([a, b], 1))
        fake_logits = method.discriminator(torch.cat([a, fake], 1))
        disc = method.discriminator(torch.cat([a, fake], 1))
    expected_d = 0.5 * (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                        + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
    expected_l1 = (fake - b).abs().mean()
    ctx = _RecordingContext(method, 6)
    torch.manual_seed(1)  # the same dropout masks as above
    out = method.training_step({"image": b}, ctx)
    assert [c[0] for c in ctx.calls] == ["discriminator", "generator"]
    assert ctx.calls[0][2] == 0  # D's loss sees detached fakes: no gradient reaches G
    assert ctx.calls[1][2] > 0
    assert math.isclose(float(out["loss_d"]), float(expected_d), rel_tol=1e-5)
    assert math.isclose(float(out["l1"]), float(expected_l1), rel_tol=1e-5)
    # G's adversarial term is computed with D as it is before its update here (no optimiser step).
    assert math.isclose(float(out["loss_gan"]), float(F.softplus(-disc).mean()), rel_tol=1e-5)
    assert math.isclose(float(out["loss_g"]), float(out["loss_gan"]) + 100 * float(out["l1"]), rel_tol=1e-6)


def _log_values(run_dir, name):
    return [r["values"][name] for r in read_log(run_dir / "log.jsonl") if r["kind"] == "train"]


def test_masked_digits_train_and_resume_exactly_with_both_optimisers(tmp_path):
    common = [*TINY_PIX2PIX, "model.task=masked", "train.checkpoint_every=8"]
    straight = api.train("pix2pix", data="digits", overrides=[*common, "train.steps=16"], run_dir=tmp_path / "a", progress=False)
    api.train("pix2pix", data="digits", overrides=[*common, "train.steps=8"], run_dir=tmp_path / "b", progress=False)
    api.train("pix2pix", overrides=["train.steps=16"], run_dir=tmp_path / "b", resume=True, progress=False)
    a, _ = load_checkpoint(latest_checkpoint(tmp_path / "a"))
    b, _ = load_checkpoint(latest_checkpoint(tmp_path / "b"))
    assert {"optim_generator", "optim_discriminator", "ema_generator"} <= set(a)
    for part in ("model", "optim_generator", "optim_discriminator", "ema_generator"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    l1 = _log_values(tmp_path / "a", "l1")
    assert l1[-1] < 0.7 * l1[0]
    # Held-out digits: the trained generator (raw output, before the visible pixels are pasted
    # back) reconstructs masked images much better than the untrained one.
    from genlab.metrics import psnr

    test = load_data(source="digits", split="test").to_model_range()[:128]
    a = straight.method.make_input(test, torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = psnr(_method("masked").eval().generator(a), test)
        after = psnr(straight.method.eval().generator(a), test)
    assert after > before + 2


def test_evaluate_pairs_scores_translations_and_the_input_baseline(monkeypatch):
    from genlab.metrics import psnr, ssim

    method = _method("lowres")
    b = _targets(n=8)
    monkeypatch.setattr(method, "translate", lambda a: a.clamp(-1, 1))  # a "model" that returns its input
    scores = evaluate_pairs(method, b, batch_size=3)
    a = lowres(b)
    assert scores["n"] == 8
    assert math.isclose(scores["psnr"], float(psnr(a, b)), rel_tol=1e-5) and scores["psnr"] == scores["psnr_input"]
    assert math.isclose(scores["ssim"], float(ssim(a, b)), rel_tol=1e-5)  # the one small-image rule


def _paired_folder(root, n=48):
    """A (grey digits) -> B (a fixed colouring of them) pairs as PNGs, like a user's A/B folders."""
    digits = load_data(source="digits").images[:n, 0].numpy()  # (n, 8, 8)
    for i, grey in enumerate(digits):
        colour = np.stack([grey, 255 - grey, grey // 2], axis=-1)
        for side, array in (("A", grey), ("B", colour)):
            (root / side).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / side / f"{i:03d}.png")
    return digits


def test_trains_on_a_paired_folder(tmp_path):
    _paired_folder(tmp_path / "pairs")
    source = f"paired:{tmp_path / 'pairs'}"
    run = api.train("pix2pix", data=source, run_dir=tmp_path / "r", progress=False,
                    overrides=[*TINY_PIX2PIX, "model.task=paired", "model.input_channels=1", "train.steps=24"])
    l1 = _log_values(tmp_path / "r", "l1")
    assert l1[-1] < 0.7 * l1[0]
    data = load_data(source=source)
    scores = evaluate_pairs(run.method, data.images, images_a=data.conditions)
    assert scores["n"] == 48 and scores["psnr"] > 10
    with pytest.raises(ConfigError, match="model.task=paired"):  # paired data, derived task
        api.train("pix2pix", data=source, run_dir=tmp_path / "s", progress=False,
                  overrides=[*TINY_PIX2PIX, "model.task=edges", "train.steps=1"])
    with pytest.raises(ConfigError, match="paired:PATH"):  # paired task, unpaired data
        api.train("pix2pix", data="digits", run_dir=tmp_path / "t", progress=False,
                  overrides=[*TINY_PIX2PIX, "model.task=paired", "train.steps=1"])
