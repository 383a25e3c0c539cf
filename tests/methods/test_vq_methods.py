"""VQ-VAE, VQ-GAN and the VQ LDM autoencoder: training on digits, exact resume, discriminator schedule, API."""

from __future__ import annotations

import pytest
import torch

from genlab import api
from genlab.config import build_config
from genlab.data import load_data
from genlab.errors import ConfigError
from genlab.methods import DataInfo, get_method
from genlab.methods.capabilities import Generates, has
from genlab.methods.vq import VQGAN, VQVAE, VQAutoencoder
from genlab.train.checkpoint import latest_checkpoint, load_checkpoint

from tiny_configs import TINY_VQ

TINY_GAN = ["model.loss.perceptual=0", "model.disc.base_channels=8", "model.disc.num_layers=1"]
TINY = {"vqvae": TINY_VQ, "vqgan": TINY_VQ + TINY_GAN, "vq-ae": TINY_VQ + TINY_GAN}


def _digits() -> torch.Tensor:
    """256 digits in [-1, 1], (256, 1, 8, 8)."""
    return load_data(build_config("vqvae", VQVAE.Config, overrides=["data.source=digits"]).data).to_model_range()[:256]


def _method(name: str, *overrides: str):
    cls = get_method(name)
    cfg = build_config(name, cls.Config, overrides=TINY[name] + list(overrides)).model
    torch.manual_seed(0)
    return cls(cfg, DataInfo(channels=1, image_size=8, num_classes=10))


def _reconstruction_mse(method, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((method.eval().reconstruct(x) - x).square().mean())


@pytest.mark.parametrize("name, extra", [("vqvae", []), ("vqgan", ["model.disc_start=20"])])
def test_training_on_digits_lowers_the_reconstruction_error(tmp_path, name, extra):
    run = api.train(name, data="digits", overrides=TINY[name] + extra + ["train.steps=40"],
                    run_dir=tmp_path / "r", progress=False)
    x = _digits()
    fresh = get_method(name)(run.config.model, run.method.data_info)
    before, after = _reconstruction_mse(fresh, x), _reconstruction_mse(run.method, x)
    assert after < 0.6 * before, (before, after)
    usage, _ = run.method.code_usage(x)
    assert usage >= 0.75  # EMA + dead-code restart: most of the 16 codes are in use


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_checkpoint(run_dir))[0]


@pytest.mark.parametrize("name", ["vqvae", "vqgan", "vq-ae"])
def test_resume_gives_the_same_weights_as_straight_training(tmp_path, name):
    # The discriminator switches on at step 4, before the break at step 6; dead-code restarts draw
    # through the step context; all of it must replay exactly.
    common = TINY[name] + ["train.checkpoint_every=6"] + (["model.disc_start=4"] if name != "vqvae" else [])
    api.train(name, data="digits", overrides=common + ["train.steps=12"], run_dir=tmp_path / "a", progress=False)
    api.train(name, data="digits", overrides=common + ["train.steps=6"], run_dir=tmp_path / "b", progress=False)
    api.train(name, overrides=["train.steps=12"], run_dir=tmp_path / "b", resume=True, progress=False)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for section in ("model", *(["optim_disc"] if name != "vqvae" else [])):
        assert a[section].keys() == b[section].keys()
        for k in a[section]:
            assert torch.equal(a[section][k], b[section][k]), (section, k)
    if name != "vqvae":  # the discriminator really trained
        assert any("discriminator" in k for k in a["model"])
        assert len(a["optim_disc"]) > 0


class _RecordingContext:
    """A stand-in for the trainer's step context: one Adam per group, records which groups stepped."""

    def __init__(self, method, step: int):
        self.step = step
        self.groups = {g: (spec if isinstance(spec, list) else spec.params) for g, spec in method.optimizer_groups().items()}
        self.optimizers = {g: torch.optim.Adam(p, lr=1e-3) for g, p in self.groups.items()}
        self.calls: list[str] = []
        self.generator = torch.Generator().manual_seed(step)

    def rand(self, *shape):
        return torch.rand(8, *shape, generator=self.generator)

    def optimize(self, loss, group="main"):
        self.calls.append(group)
        loss.backward(inputs=self.groups[group])
        self.optimizers[group].step()
        self.optimizers[group].zero_grad(set_to_none=True)


def test_discriminator_is_off_before_disc_start_and_on_after():
    method = _method("vqgan", "model.disc_start=10").train()
    x = _digits()[:8]
    d_state = {k: v.clone() for k, v in method.discriminator.state_dict().items()}

    ctx = _RecordingContext(method, step=9)
    logs = method.training_step({"image": x}, ctx)
    assert ctx.calls == ["main"]
    assert "g_loss" not in logs and "d_loss" not in logs
    # G's loss is reconstruction + commitment only (EMA codebook: no codebook term).
    assert torch.allclose(logs["loss"], logs["rec_loss"] + logs["commitment"])
    # D was neither stepped nor even run (its BatchNorm statistics are untouched).
    for k, v in method.discriminator.state_dict().items():
        assert torch.equal(v, d_state[k]), k

    ctx = _RecordingContext(method, step=10)
    logs = method.training_step({"image": x}, ctx)
    assert ctx.calls == ["main", "disc"]
    assert float(logs["adaptive_weight"]) > 0
    adversarial = logs["loss"] - logs["rec_loss"] - logs["commitment"]
    assert torch.allclose(adversarial, logs["adaptive_weight"] * logs["g_loss"], atol=1e-6)
    assert any(not torch.equal(v, d_state[k]) for k, v in method.discriminator.state_dict().items())


def test_without_a_discriminator_weight_there_is_one_optimiser():
    method = _method("vqgan", "model.disc_weight=0")
    assert method.discriminator is None and set(method.optimizer_groups()) == {"main"}
    groups = _method("vqgan").optimizer_groups()
    d_params = {id(p) for p in groups["disc"].params}
    assert d_params and not d_params & {id(p) for p in groups["main"]}


def test_codes_api_is_consistent():
    method = _method("vqvae").eval()
    x = _digits()[:16]
    codes = method.encode_codes(x)
    assert codes.shape == (16, *method.code_shape) == (16, 4, 4) and codes.dtype == torch.long
    z_q = method.encode(x)
    assert torch.equal(z_q, method.quantizer.lookup(codes))
    assert torch.allclose(method.decode_codes(codes), method.reconstruct(x))
    assert torch.allclose(method.decode(z_q + 1e-4, quantize=True), method.decode(z_q))
    usage, ppl = method.code_usage(x, batch_size=5)
    assert usage == len(codes.unique()) / method.codebook_size
    p = torch.bincount(codes.flatten(), minlength=method.codebook_size).float() / codes.numel()
    assert abs(ppl - float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))) < 1e-4
    # Encoding never changes the codebook, even in training mode.
    before = method.quantizer.embedding.clone()
    method.train().encode(x)
    assert torch.equal(method.quantizer.embedding, before)


def test_sampling_points_to_the_priors():
    for name in ("vqvae", "vqgan", "vq-ae"):
        method = _method(name)
        assert not has(method, Generates)
        with pytest.raises(ConfigError, match="pixelcnn --codes"):
            method.sample(4)


def test_latent_scale_is_one_over_the_std_of_the_latents():
    method = _method("vq-ae", "model.latent_scale_decay=0.9")
    g = torch.Generator().manual_seed(0)
    first = 0.5 + 2.0 * torch.randn(16, 4, 4, 4, generator=g)
    method.update_latent_scale(first)
    # One batch: the debiased EMA is exactly that batch's moments.
    assert torch.allclose(method.latent_scale, 1 / first.std(unbiased=False), rtol=1e-5)
    for _ in range(60):
        method.update_latent_scale(0.5 + 2.0 * torch.randn(16, 4, 4, 4, generator=g))
    assert abs(float(method.latent_scale) - 0.5) < 0.02
    assert "latent_scale" in method.state_dict()


def test_impossible_settings_are_config_errors():
    with pytest.raises(ConfigError, match="f in"):
        _method("vq-ae", "model.net.channel_mult=[1]")  # f = 1
    with pytest.raises(ConfigError, match="num_layers"):
        _method("vqgan", "model.disc.num_layers=3")  # too deep for 8x8
    with pytest.raises(ConfigError, match="exceeds the image size"):
        _method("vqvae", "model.net.channel_mult=[1,1,1,1,1]")  # f = 16 > 8


@pytest.mark.parametrize("name", ["vqvae", "vqgan", "vq-ae"])
def test_presets_build_and_give_the_documented_code_maps(name):
    from genlab.config import list_presets

    cls = get_method(name)
    assert set(list_presets(name)) >= {"small", "mnist_small", "fashion_mnist_small", "full"}
    for preset in ("small", "mnist_small", "fashion_mnist_small", "full"):
        cfg = build_config(name, cls.Config, preset=preset)
        if cfg.model.loss.perceptual_network == "vgg16":  # ImageNet weights: not downloaded in tests
            cfg = build_config(name, cls.Config, preset=preset, overrides=["model.loss.perceptual=0"])
        rgb = cfg.data.source == "cifar10"
        method = cls(cfg.model, DataInfo(channels=3 if rgb else 1, image_size=32 if rgb else 28))
        expected = {"vq-ae": (16, 16)}.get(name, (8, 8)) if rgb else (7, 7)  # f = 4 (vq-ae full: f = 2)
        assert method.code_shape == expected, (preset, method.code_shape)
        assert method.quantizer.use_ema and method.quantizer.dead_code_threshold > 0


@pytest.mark.parametrize("name", ["vqgan", "vq-ae"])
def test_the_discriminator_depth_follows_the_image_size_unless_set(name):
    from genlab.models.patchgan import patchgan_output_size

    cls = get_method(name)
    for size, layers in [(8, 1), (20, 2), (28, 2), (32, 3), (64, 3)]:  # the deepest <= 3 leaving >= 2x2 logits
        cfg = build_config(name, cls.Config, overrides=TINY_VQ + ["model.loss.perceptual=0",
                                                                  "model.disc.base_channels=8"]).model
        method = cls(cfg, DataInfo(1, size))
        assert method.config.disc.num_layers == layers and cfg.disc.num_layers is None  # recorded, caller's kept
        assert patchgan_output_size(size, layers) >= 2 and (layers == 3 or patchgan_output_size(size, layers + 1) < 2)
        assert method.discriminator(torch.zeros(1, 1, size, size)).shape[-1] == patchgan_output_size(size, layers)
