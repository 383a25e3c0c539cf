"""AE, DAE, VAE and KL-autoencoder methods: likelihood and ELBO math, corruption, latent scale, training."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from genlab import api
from genlab.config import build_config
from genlab.data import load_data
from genlab.errors import ConfigError
from genlab.methods import DataInfo
from genlab.methods.capabilities import Generates, has
from genlab.methods.autoencoder import (
    VAE,
    Autoencoder,
    DenoisingAutoencoder,
    KLAutoencoder,
    discretized_log_likelihood,
    patch_mask,
)
from genlab.train.checkpoint import latest_checkpoint, load_checkpoint

from tiny_configs import TINY_AE
from step_context import SeededDraws

TINY = {
    "ae": TINY_AE,
    "dae": TINY_AE + ["model.corruption=gaussian+mask", "model.patch_size=2", "model.mask_ratio=0.25"],
    "vae": TINY_AE + ["model.latent_dim=8"],
    "kl-ae": TINY_AE,
}
CLASSES = {"ae": Autoencoder, "dae": DenoisingAutoencoder, "vae": VAE, "kl-ae": KLAutoencoder}
DIGITS = DataInfo(channels=1, image_size=8, num_classes=10)


def _method(name: str, *overrides: str):
    torch.manual_seed(0)
    cfg = build_config(name, CLASSES[name].Config, overrides=TINY[name] + list(overrides)).model
    return CLASSES[name](cfg, DIGITS)


class FakeContext(SeededDraws):
    """A step context with seeded noise whose optimize() only back-propagates (no optimiser)."""

    def __init__(self, n: int, seed: int = 0, step: int = 0):
        self.n, self.step = n, step
        self.generator = torch.Generator().manual_seed(seed)
        self.losses = []

    def optimize(self, loss, group="main"):
        self.losses.append(loss.detach())
        loss.backward()


def _eight_bit(x: torch.Tensor) -> torch.Tensor:
    """Snap [-1, 1] values to the 256 levels 2k/255 - 1."""
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


# ----------------------------------------------------------------------------- discretised likelihood


@pytest.mark.parametrize("kind, dist", [("discretized-gaussian", stats.norm), ("discretized-logistic", stats.logistic)])
def test_discretized_likelihood_matches_the_cdf_and_normalises(kind, dist):
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # every 8-bit value, ends included
    mean = torch.tensor([-1.3, -0.2, 0.0, 0.45, 1.1], dtype=torch.float64)[:, None]
    log_scale = torch.log(torch.tensor([0.02, 0.1, 0.5, 0.004, 0.3], dtype=torch.float64))[:, None]
    logp = discretized_log_likelihood(levels[None], mean, log_scale, kind)  # (5, 256)
    # The 256 bins partition the real line: probabilities sum to one for every (mean, scale).
    assert torch.allclose(logp.exp().sum(1), torch.ones(5, dtype=torch.float64), atol=1e-9)
    lo = np.where(levels.numpy() < -0.999, -np.inf, levels.numpy() - 1 / 255)
    hi = np.where(levels.numpy() > 0.999, np.inf, levels.numpy() + 1 / 255)
    m, s = mean.numpy(), log_scale.exp().numpy()
    # scipy in its accurate form: a difference of CDFs below the mean, of survival functions above it.
    above = levels.numpy() > m
    expected = np.where(above, dist.sf((lo - m) / s) - dist.sf((hi - m) / s),
                        dist.cdf((hi - m) / s) - dist.cdf((lo - m) / s))  # (5, 256)
    keep = expected > 1e-200  # scipy's difference underflows where ours stays finite in log space
    assert np.allclose(logp.numpy()[keep], np.log(expected[keep]), rtol=1e-6, atol=1e-8)
    # ... and far tails keep a finite log-probability with a gradient (no log(0)).
    x = torch.tensor([0.6], requires_grad=True)
    far = discretized_log_likelihood(x, torch.tensor([-0.9]), torch.log(torch.tensor([0.01])), kind)
    far.backward()
    assert torch.isfinite(far).all() and far.item() < -50 and torch.isfinite(x.grad).all() and x.grad.item() < 0


# ----------------------------------------------------------------------------- VAE


@pytest.mark.parametrize("dense", [True, False])
def test_negative_elbo_equals_reconstruction_nll_plus_analytic_kl(dense):
    method = _method("vae", *([] if dense else ["model.latent_dim=null"])).double()
    with torch.no_grad():
        method.log_scale.fill_(math.log(0.2))
    x = _eight_bit(torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1)
    with torch.no_grad():
        nelbo = method.negative_elbo(x, generator=torch.Generator().manual_seed(7))
        # Independent computation: the same eps, the decoder mean, scipy's normal CDF over the bins.
        mu, logvar = method._posterior(x)
        eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float32).double()
        mean = method.decode(mu + torch.exp(0.5 * logvar) * eps).numpy()
    xs = x.numpy()
    lo = np.where(xs < -0.999, -np.inf, xs - 1 / 255)
    hi = np.where(xs > 0.999, np.inf, xs + 1 / 255)
    above = xs > mean  # the accurate form of scipy's bin probability on each side of the mean
    p = np.where(above, stats.norm.sf((lo - mean) / 0.2) - stats.norm.sf((hi - mean) / 0.2),
                 stats.norm.cdf((hi - mean) / 0.2) - stats.norm.cdf((lo - mean) / 0.2))
    nll = -np.log(p).reshape(4, -1).sum(1)
    m, lv = mu.numpy().reshape(4, -1), logvar.numpy().reshape(4, -1)
    kl = 0.5 * (m**2 + np.exp(lv) - 1 - lv).sum(1)
    assert mu.shape[1:] == ((8, 1, 1) if dense else (4, 4, 4))
    assert np.allclose(nelbo.numpy(), nll + kl, rtol=1e-8)


def test_training_step_logs_bits_per_dim_and_a_per_dimension_loss():
    method = _method("vae", "model.beta=0.5")
    digits = load_data(build_config("vae", VAE.Config, overrides=["data.source=digits"]).data)
    x = _eight_bit(digits.to_model_range()[:16])
    logs = method.training_step({"image": x}, FakeContext(16))
    rec, kl = logs["rec"].item(), logs["kl"].item()
    assert logs["elbo"].item() == pytest.approx(-(rec + kl), rel=1e-6)
    assert logs["bpd"].item() == pytest.approx((rec + kl) / (64 * math.log(2)), rel=1e-6)
    assert logs["loss"].item() == pytest.approx((rec + 0.5 * kl) / 64, rel=1e-5)


def test_reparameterised_sample_carries_gradients_to_the_variance():
    # beta = 0: the KL term is off, so any gradient on the log-variance outputs must come through
    # z = mu + exp(logvar / 2) * eps in the reconstruction term.
    method = _method("vae", "model.latent_dim=null", "model.beta=0")
    x = _eight_bit(torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    method.training_step({"image": x}, FakeContext(8))
    conv_out = method.encoder.conv_out.weight.grad  # (2 * latent_channels, C, 3, 3): mean rows, then logvar rows
    assert conv_out[:4].abs().sum() > 0 and conv_out[4:].abs().sum() > 0


def test_vae_sampling_takes_temperature_and_rejects_unknown_options():
    method = _method("vae").eval()
    a = method.sample(6, generator=torch.Generator().manual_seed(3))
    b = method.sample(6, generator=torch.Generator().manual_seed(3))
    c = method.sample(6, generator=torch.Generator().manual_seed(3), temperature=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.abs().max() <= 1
    with pytest.raises(ConfigError, match="guidance_scale"):
        method.sample(2, guidance_scale=2.0)


def test_aggregate_prior_tracks_the_moments_of_q_z_as_an_ema():
    # Known posteriors: means mu ~ N(m, C) per batch, every variance s2; q(z) then has mean m and
    # covariance C + s2 I. The buffers must be the exact EMA of the batch moments, and the fitted
    # Gaussian must approach that closed form.
    method = _method("vae", "model.prior=aggregate", "model.aggregate_decay=0.9")
    g = torch.Generator().manual_seed(0)
    m = torch.linspace(-1, 1, 8)
    a = torch.randn(8, 8, generator=g) * 0.5
    cov, s2 = a @ a.T + 0.2 * torch.eye(8), 0.05
    seen = []

    def posterior(x):
        mu = m + torch.randn(len(x), 8, generator=g) @ torch.linalg.cholesky(cov).T
        seen.append(mu)
        return mu[:, :, None, None], torch.full((len(x), 8, 1, 1), math.log(s2))

    method._posterior = posterior
    x = torch.zeros(400, 1, 8, 8)
    for step in range(80):
        method.training_step({"image": x}, FakeContext(400, step=step))
    ema_mean, ema_second = seen[0].mean(0), seen[0].T @ seen[0] / 400
    for mu in seen[1:]:
        ema_mean = 0.9 * ema_mean + 0.1 * mu.mean(0)
        ema_second = 0.9 * ema_second + 0.1 * mu.T @ mu / 400
    assert torch.allclose(method.aggregate_mean, ema_mean, atol=1e-5)
    assert torch.allclose(method.aggregate_second_moment, ema_second + s2 * torch.eye(8), atol=1e-4)
    assert int(method.aggregate_updates) == 80
    mean, chol = method.aggregate_gaussian()
    assert torch.allclose(mean, m, atol=0.05)
    assert torch.allclose(chol @ chol.T, cov + s2 * torch.eye(8), atol=0.1)


def test_aggregate_prior_moments_stay_float32_under_bf16_autocast():
    # train.mixed_precision=bf16 runs training_step under autocast; the E[z z^T] matmul must not be
    # rounded to bfloat16 (relative error ~4e-3, far above this tolerance).
    g = torch.Generator().manual_seed(1)
    mean, logvar = torch.randn(64, 8, 1, 1, generator=g) * 3, torch.randn(64, 8, 1, 1, generator=g)
    plain, mixed = (_method("vae", "model.prior=aggregate") for _ in range(2))
    plain.update_aggregate(mean, logvar)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed.update_aggregate(mean, logvar)
    assert mixed.aggregate_second_moment.dtype == torch.float32
    assert torch.allclose(mixed.aggregate_second_moment, plain.aggregate_second_moment, rtol=1e-6, atol=1e-6)


def test_aggregate_prior_samples_decode_z_from_the_fitted_gaussian():
    method = _method("vae", "model.prior=aggregate").eval()
    standard = _method("vae").eval()
    # Before any training update the aggregate Gaussian is N(0, I): the same images as the standard prior.
    a = method.sample(6, generator=torch.Generator().manual_seed(3))
    b = standard.sample(6, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a, b, atol=1e-5)
    assert "aggregate_mean" not in standard.state_dict()  # standard runs' checkpoints are unchanged
    m, cov = torch.tensor([2.0, -1.0, 0, 0, 0, 0, 0, 0.5]), torch.diag(torch.tensor([4.0, 0.25, 1, 1, 1, 1, 1, 0.01]))
    cov[0, 1] = cov[1, 0] = 0.5
    method.aggregate_mean.copy_(m)
    method.aggregate_second_moment.copy_(cov + torch.outer(m, m))
    drawn = []
    method.decode = lambda z: drawn.append(z) or torch.zeros(len(z), 1, 8, 8)
    for temperature in (1.0, 0.5):
        method.sample(20000, generator=torch.Generator().manual_seed(0), temperature=temperature)
        z = drawn[-1].flatten(1)
        assert torch.allclose(z.mean(0), m, atol=0.05)
        assert torch.allclose(torch.cov(z.T), temperature**2 * cov, atol=0.06 * temperature**2)


@pytest.mark.parametrize("name", ["ae", "dae", "kl-ae"])
def test_autoencoders_without_prior_refuse_to_sample(name):
    method = _method(name)
    assert not has(method, Generates) and method.latent_prior == "none"
    with pytest.raises(ConfigError, match="no prior.*genlab reconstruct"):
        method.sample(4)


# ----------------------------------------------------------------------------- DAE corruption


@pytest.mark.parametrize("ratio, p, size", [(0.25, 2, 8), (0.5, 4, 28), (0.75, 4, 32), (0.3, 3, 12)])
def test_patch_mask_covers_the_requested_fraction_in_whole_patches(ratio, p, size):
    grid = -(-size // p)
    scores = torch.rand(50, grid * grid, generator=torch.Generator().manual_seed(0))
    mask = patch_mask(scores, ratio, p, (size, size))  # (50, 1, size, size)
    k = round(ratio * grid * grid)
    patches = mask.float().unfold(2, p, p).unfold(3, p, p)  # (50, 1, g, g, p, p) whole patches (size % p == 0)
    per_patch = patches.mean(dim=(-1, -2))
    assert ((per_patch == 0) | (per_patch == 1)).all()  # patches are masked entirely or not at all
    assert (per_patch.flatten(1).sum(1) == k).all()  # exactly round(ratio * P) patches in every image
    assert mask.float().mean().item() == pytest.approx(k / grid**2, abs=1e-6)
    assert len({tuple(m.flatten().tolist()) for m in mask}) > 40  # a fresh random subset per image


def test_dae_trains_on_the_corrupted_clean_pair():
    method = _method("dae", "model.noise_std=0.3", "model.mask_value=-1")
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    seen = {}
    encode = method.encode

    def spy(inp):
        seen["input"] = inp.detach()
        return encode(inp)

    method.encode = spy
    ctx = FakeContext(4, seed=5)
    method.training_step({"image": x}, ctx)
    g = torch.Generator().manual_seed(5)  # replay the context's draws: noise first, then patch scores
    noise, scores = torch.randn(4, 1, 8, 8, generator=g), torch.rand(4, 16, generator=g)
    mask = patch_mask(scores, 0.25, 2, (8, 8))
    expected = torch.where(mask, torch.tensor(-1.0), x + 0.3 * noise)
    assert torch.allclose(seen["input"], expected)
    # The target is the clean image: the logged MSE is that of the reconstruction against x.
    with torch.no_grad():
        x_hat = method.decode(encode(expected))
    assert ctx.losses[0].item() == pytest.approx(((x_hat - x) ** 2).mean().item(), rel=1e-5)


# ----------------------------------------------------------------------------- kl-ae latent scale


def test_latent_scale_is_an_ema_of_the_second_moment_and_converges_to_one_over_std():
    method = _method("kl-ae", "model.latent_scale_decay=0.9")
    g = torch.Generator().manual_seed(0)
    std, moments = 3.0, []

    def posterior(x):  # known latents N(0.5, 3^2): second moment 9.25
        mean = 0.5 + std * torch.randn(len(x), 4, 4, 4, generator=g)
        moments.append(mean.pow(2).mean().item())
        return mean, torch.full_like(mean, -20.0)

    method._posterior = posterior
    x = torch.zeros(16, 1, 8, 8)
    for step in range(60):
        method.training_step({"image": x}, FakeContext(16, step=step))
    ema = moments[0]
    for m in moments[1:]:
        ema = 0.9 * ema + 0.1 * m
    assert method.latent_scale.item() == pytest.approx(1 / math.sqrt(ema), rel=1e-5)
    assert method.latent_scale.item() == pytest.approx(1 / math.sqrt(std**2 + 0.25), rel=0.03)
    assert int(method.latent_updates) == 60
    assert "latent_scale" in method.state_dict()  # saved with the checkpoint


# ----------------------------------------------------------------------------- training on digits


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_checkpoint(run_dir))[0]["model"]


def _probe(method, x: torch.Tensor) -> float:
    """Deterministic quality probe: -ELBO with fixed noise for the VAE, reconstruction MSE otherwise."""
    with torch.no_grad():
        if isinstance(method, VAE):
            return method.negative_elbo(x, generator=torch.Generator().manual_seed(0)).mean().item()
        return ((method.decode(method.encode(x)) - x) ** 2).mean().item()


@pytest.mark.parametrize("name", ["ae", "dae", "vae", "kl-ae"])
def test_trains_on_digits_and_resumes_exactly(name, tmp_path):
    common = TINY[name] + ["train.checkpoint_every=15", "train.grad_accum=2"]
    straight = api.train(name, data="digits", overrides=common + ["train.steps=30"], run_dir=tmp_path / "a",
                         progress=False)
    api.train(name, data="digits", overrides=common + ["train.steps=15"], run_dir=tmp_path / "b", progress=False)
    api.train(name, overrides=["train.steps=30"], run_dir=tmp_path / "b", resume=True, progress=False)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if name == "kl-ae":
        assert int(a["latent_updates"]) == 60 and a["latent_scale"].item() != 1.0  # buffers resumed too
    x = _eight_bit(load_data(straight.config.data).to_model_range()[:256])
    torch.manual_seed(straight.config.train.seed)
    fresh = CLASSES[name](straight.config.model, straight.method.data_info)
    before, after = _probe(fresh, x), _probe(straight.method, x)
    assert after < 0.6 * before, (before, after)
    if name == "vae":
        s1, s2 = straight.sample(8, seed=3), straight.sample(8, seed=3)
        assert torch.equal(s1, s2) and not torch.equal(s1, straight.sample(8, seed=4))


def test_aggregate_prior_statistics_are_saved_and_resumed(tmp_path):
    common = TINY["vae"] + ["model.prior=aggregate", "train.checkpoint_every=10"]
    straight = api.train("vae", data="digits", overrides=common + ["train.steps=20"], run_dir=tmp_path / "a",
                         progress=False)
    api.train("vae", data="digits", overrides=common + ["train.steps=10"], run_dir=tmp_path / "b", progress=False)
    api.train("vae", overrides=["train.steps=20"], run_dir=tmp_path / "b", resume=True, progress=False)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert int(a["aggregate_updates"]) == 20 and not torch.equal(a["aggregate_mean"], torch.zeros(8))
    for k in ("aggregate_mean", "aggregate_second_moment", "aggregate_updates"):
        assert torch.equal(a[k], b[k]), k
    # The loaded run samples from those statistics: the same images as a method rebuilt from them.
    rebuilt = _method("vae", "model.prior=aggregate")
    rebuilt.load_state_dict(a)
    mean, chol = rebuilt.aggregate_gaussian()
    assert torch.equal(mean, a["aggregate_mean"]) and torch.allclose(
        chol @ chol.T, a["aggregate_second_moment"] - torch.outer(mean, mean), atol=1e-5)


def test_wrong_images_are_data_errors():
    from genlab.errors import DataError

    with pytest.raises(DataError, match="dense latent built for 8x8"):
        _method("vae").encode(torch.zeros(2, 1, 16, 16))
    with pytest.raises(DataError, match=r"\(N, 1, H, W\)"):
        _method("ae").reconstruct(torch.zeros(2, 3, 8, 8))
    # A spatial latent works at any size: 12x12 images give 6x6 latents and come back 12x12.
    assert _method("kl-ae").reconstruct(torch.zeros(2, 1, 12, 12)).shape == (2, 1, 12, 12)
