"""The ldm method: diffusion on encode(x) * latent_scale of a frozen kl-ae, decoded by decode(z / latent_scale)."""

from __future__ import annotations

import pytest
import torch

from genlab import api
from genlab.config import build_config
from genlab.data import load_data
from genlab.diffusion import diffusion_loss
from genlab.errors import ConfigError
from genlab.methods import DataInfo
from genlab.methods.ddpm import DDPM
from genlab.methods.ldm import LDM
from genlab.runs import build_method
from step_context import RecordingContext
from tiny_configs import TINY_KL_AE, TINY_LDM, TINY_LDM_DIT

DIGITS = DataInfo(channels=1, image_size=8, num_classes=10)


@pytest.fixture(scope="module")
def kl_ae_run(tmp_path_factory):
    """A tiny kl-ae trained for a few steps on digits (its latent_scale estimated from those batches)."""
    path = tmp_path_factory.mktemp("ldm") / "kl-ae"
    api.train("kl-ae", data="digits", overrides=TINY_KL_AE + ["train.steps=15"], run_dir=path, progress=False)
    return path


def _ldm(kl_ae_run, *overrides: str) -> LDM:
    """An ldm on the run ``kl_ae_run`` (built as training builds it), or on a given autoencoder method."""
    torch.manual_seed(0)
    if isinstance(kl_ae_run, torch.nn.Module):
        cfg = build_config("ldm", LDM.Config, overrides=TINY_LDM + ["autoencoder=/a/run", *overrides]).model
        return LDM(cfg, DIGITS, parents={"autoencoder": kl_ae_run})
    return build_method(build_config("ldm", LDM.Config, overrides=TINY_LDM + [f"autoencoder={kl_ae_run}", *overrides]),
                        DIGITS)


def _digits(n: int = 256) -> torch.Tensor:
    return load_data(build_config("ldm", LDM.Config, overrides=["data.source=digits"]).data).to_model_range()[:n]


def test_diffusion_sees_scaled_latents_and_sampling_decodes_them_unscaled(kl_ae_run, monkeypatch):
    method = _ldm(kl_ae_run)
    assert method.latent_shape == (4, 4, 4) and method.data_info == DIGITS
    method.autoencoder.latent_scale.fill_(2.5)
    x = _digits(8)
    seen = {}

    def spy_loss(self, x0, t, noise, y=None):  # what DDPM's objective is taken on
        seen.setdefault("z", []).append(x0)
        return x0.sum() * 0, {}

    monkeypatch.setattr(DDPM, "loss", spy_loss)
    method.training_step({"image": x}, RecordingContext(8))
    method.heldout_loss(x)
    with torch.no_grad():
        for z in seen["z"]:  # training and the held-out loss both see the scaled latents
            torch.testing.assert_close(z, method.autoencoder.encode(x) * 2.5)

    decode = method.autoencoder.decode
    finish = method._finish

    def spy_decode(z, **options):
        seen["decoded"] = z
        return decode(z, **options)

    def spy_finish(z0):  # the sampler's latents, before they are decoded
        seen["z0"] = z0
        return finish(z0)

    monkeypatch.setattr(method.autoencoder, "decode", spy_decode)
    monkeypatch.setattr(method, "_finish", spy_finish)
    images = method.sample(5, generator=torch.Generator().manual_seed(0), sampler="ddim", steps=3)
    assert images.shape == (5, 1, 8, 8)  # pixels of the data size, not latents
    torch.testing.assert_close(seen["decoded"], seen["z0"] / 2.5)
    torch.testing.assert_close(images, decode(seen["z0"] / 2.5).clamp(-1, 1))
    assert images.abs().max() <= 1


MU, S = 1.7, 0.3  # latents ~ N(MU, S^2 I), far outside [-1, 1]: the optimal eps predictor is closed form


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp-2m"])
def test_latents_are_neither_clipped_nor_clamped(kl_ae_run, monkeypatch, sampler):
    # With the exact denoiser for N(MU, S^2) latents, sampled latents must have mean MU: a clip of
    # x0_hat or a final clamp to [-1, 1] (right for pixels, wrong for latents) would cap them at 1.
    method = _ldm(kl_ae_run, "model.schedule=linear")
    assert method.config.clip_denoised is False
    schedule = method.schedule

    def network(x_t, t, y=None):
        abar = schedule.gather(schedule.alphas_cumprod, t.round().long(), x_t)
        return torch.sqrt(1 - abar) * (x_t - torch.sqrt(abar) * MU) / (abar * S**2 + 1 - abar)

    method.network = network
    seen = {}
    decode = method.autoencoder.decode

    def spy_decode(z, **options):
        seen["z"] = z
        return decode(z, **options)

    monkeypatch.setattr(method.autoencoder, "decode", spy_decode)
    method.sample(300, generator=torch.Generator().manual_seed(0), sampler=sampler, steps=50)
    z0 = seen["z"] * method.latent_scale
    assert abs(z0.mean().item() - MU) < 0.05
    assert abs(z0.std().item() - S) < 0.05


@pytest.mark.parametrize("network", ["unet", "dit"])
def test_ldm_trains_on_a_frozen_kl_ae_and_samples_pixels(kl_ae_run, tmp_path, network):
    run = api.train("ldm", data="digits", run_dir=tmp_path / "r", progress=False,
                    overrides=(TINY_LDM_DIT if network == "dit" else TINY_LDM)
                    + [f"autoencoder={kl_ae_run}", "train.steps=30", "train.ema_decay=null"])
    method = run.method
    assert isinstance(method.ema_targets()[network], torch.nn.Module)
    assert (network == "dit") != hasattr(method, "unet")
    # The autoencoder is frozen: our checkpoint holds exactly the parent's weights, and it stays in eval mode.
    parent = api.load_run(kl_ae_run).method
    ours = {k.removeprefix("autoencoder."): v for k, v in method.state_dict().items() if k.startswith("autoencoder.")}
    assert ours.keys() == parent.state_dict().keys()
    assert all(torch.equal(ours[k].cpu(), v.cpu()) for k, v in parent.state_dict().items())
    method.train()
    assert not method.autoencoder.training and method.ema_targets()[network].training
    assert not any(p.requires_grad for p in method.autoencoder.parameters())

    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        z = method.encode_latents(_digits())
    t = torch.randint(0, method.config.num_timesteps, (len(z),), generator=g)
    noise = torch.randn(z.shape, generator=g)
    torch.manual_seed(0)
    fresh = build_method(run.config, run.method.data_info)

    def probe(m):
        with torch.no_grad():
            return float(diffusion_loss(m.network(m.schedule.q_sample(z, t, noise), t), noise))

    before, after = probe(fresh), probe(method.eval())
    assert after < 0.7 * before

    images = run.sample(4, seed=0)
    assert images.shape == (4, 1, 8, 8) and images.abs().max() <= 1
    assert torch.equal(images, api.load_run(tmp_path / "r").sample(4, seed=0))
    assert (images - run.sample(4, seed=1)).abs().max() > 1e-3


def test_missing_or_wrong_autoencoder_is_a_one_line_config_error():
    cfg = build_config("ldm", LDM.Config, overrides=TINY_LDM)
    for build in (lambda: LDM(cfg.model, DIGITS), lambda: build_method(cfg, DIGITS)):
        with pytest.raises(ConfigError, match="--autoencoder RUN .a kl-ae or vq-ae run folder") as e:
            build()
        assert "\n" not in str(e.value)

    class _Classifier(torch.nn.Module):  # a method without the LatentCodec capability
        name = "classifier"

    cfg = build_config("ldm", LDM.Config, overrides=TINY_LDM + ["autoencoder=/some/run"]).model
    with pytest.raises(ConfigError, match="model.autoencoder=/some/run: a classifier run cannot .*'LatentCodec'.*"
                                          "which kl-ae, vq-ae have") as e:
        LDM(cfg, DIGITS, parents={"autoencoder": _Classifier()})
    assert "\n" not in str(e.value)


def test_vq_ae_latents_are_snapped_to_the_codebook_before_decoding(monkeypatch):
    # Rombach et al.'s VQ-regularised LDM decodes through the quantiser: every latent vector the
    # decoder sees after sampling is a codebook entry (divided out of the scale, as for kl-ae).
    from genlab.methods.vq import VQAutoencoder

    cfg = build_config("vq-ae", VQAutoencoder.Config, overrides=[
        "model.net.base_channels=8", "model.net.channel_mult=[1,2]", "model.net.num_res_blocks=0",
        "model.net.norm_groups=4", "model.quantizer.codebook_size=16", "model.quantizer.dim=4",
        "model.loss.perceptual=0", "model.disc.base_channels=8", "model.disc.num_layers=1"]).model
    torch.manual_seed(0)
    parent = VQAutoencoder(cfg, DIGITS)
    parent.latent_scale.fill_(0.5)

    method = _ldm(parent)
    assert method.latent_shape == (4, 4, 4)
    seen = {}
    convolve = parent.post_quant_conv.forward
    monkeypatch.setattr(parent.post_quant_conv, "forward", lambda z: (seen.__setitem__("z", z), convolve(z))[1])
    images = method.sample(3, generator=torch.Generator().manual_seed(0), steps=3)
    assert images.shape == (3, 1, 8, 8)
    vectors = seen["z"].permute(0, 2, 3, 1).reshape(-1, 4)  # (3 * 16, 4)
    distance = torch.cdist(vectors, parent.quantizer.lookup(torch.arange(16).view(1, 4, 4)).permute(0, 2, 3, 1).reshape(16, 4))
    assert distance.min(1).values.max() < 1e-3  # codes are ~0.1 apart; cdist round-off is ~1e-5


def _stand_in_kl_ae(ae_preset, info) -> dict:
    """The parents of an ldm: an untrained kl-ae built from one of its presets."""
    from genlab.methods.autoencoder import KLAutoencoder

    ae_cfg = build_config("kl-ae", KLAutoencoder.Config, preset=ae_preset, overrides=["model.loss.perceptual=0"]).model
    return {"autoencoder": KLAutoencoder(ae_cfg, info)}


@pytest.mark.parametrize("preset, ae_preset, info", [
    ("small", "small", DataInfo(1, 28, None)),
    ("mnist_small", "mnist_small", DataInfo(1, 28, 10)),
    ("full", "full", DataInfo(3, 32, 10)),
])
def test_presets_fit_the_latents_of_the_matching_kl_ae_preset(preset, ae_preset, info):
    # ldm_small's single-level U-Net must fit kl_ae_small's 7x7x4 latents, ldm_full's 3 levels the 8x8x4 of kl_ae_full.
    cfg = build_config("ldm", LDM.Config, preset=preset, overrides=["autoencoder=/some/kl-ae-run"]).model
    method = LDM(cfg, info, parents=_stand_in_kl_ae(ae_preset, info))
    assert method.latent_shape == ((4, 7, 7) if info.image_size == 28 else (4, 8, 8))
    assert cfg.clip_denoised is False and cfg.schedule == "linear"
    z = torch.randn(2, *method.latent_shape)
    assert method.network(z, torch.tensor([0, 999])).shape == z.shape


def test_dit_patches_must_divide_the_latent_size():
    parents = _stand_in_kl_ae("small", DataInfo(1, 28, None))
    cfg = build_config("ldm", LDM.Config, preset="small", overrides=["autoencoder=/run", "model.network=dit"]).model
    # The preset's U-Net section is dropped for network=dit; the DiT's patch size is derived from the
    # 7x7 latents (1: 7 x 7 tokens) and recorded in the method's config.
    method = LDM(cfg, DataInfo(1, 28, None), parents)
    assert cfg.unet is None and method.dit.grid == 7 and method.config.dit.patch_size == 1
    cfg = build_config("ldm", LDM.Config, preset="small", overrides=["autoencoder=/run", "model.network=dit",
                                                                     "model.dit.patch_size=2"]).model
    with pytest.raises(ConfigError, match="latent size 7"):
        LDM(cfg, DataInfo(1, 28, None), parents)  # patch 2 does not divide 7
    cfg = build_config("ldm", LDM.Config, preset="small", overrides=["autoencoder=/run", "model.network=dit",
                                                                     "model.dit.patch_size=7"]).model
    assert LDM(cfg, DataInfo(1, 28, None), parents).dit.grid == 1


@pytest.mark.parametrize("network", ["unet", "dit"])
@pytest.mark.parametrize("size", [8, 20, 36, 64])
def test_the_small_preset_fits_the_latents_of_any_image_size(monkeypatch, size, network):
    # kl_ae_small (f = 4) gives size/4 latents: 2, 5, 9, 16 px; the denoiser's shapes follow them.
    info = DataInfo(3, size, None)
    parents = _stand_in_kl_ae("small", info)
    cfg = build_config("ldm", LDM.Config, preset="small", overrides=["autoencoder=/run", f"model.network={network}"]).model
    method = LDM(cfg, info, parents)
    z = torch.randn(2, *method.latent_shape)
    assert method.latent_shape[1] == size // 4
    with torch.no_grad():
        assert method.network(z, torch.tensor([0, 999])).shape == z.shape


def test_a_fully_convolutional_kl_ae_serves_data_of_another_size(kl_ae_run):
    # The tiny kl-ae (convolutions only, f = 2) was trained on 8 px digits; an ldm on 16 px data
    # diffuses its 8x8 latents of the 16 px images and decodes samples back to 16 px, uncropped.
    cfg = build_config("ldm", LDM.Config, overrides=TINY_LDM + [f"autoencoder={kl_ae_run}",
                                                               "model.unet.attention_resolutions=[4]"])
    method = build_method(cfg, DataInfo(channels=1, image_size=16, num_classes=10))
    ae = method.autoencoder
    assert ae.fully_convolutional and ae.data_info.image_size == 8 and method.latent_shape == (4, 8, 8)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        z = method.encode_latents(x)
        assert torch.equal(z, ae.encode(x) * ae.latent_scale) and z.shape == (3, 4, 8, 8)
        assert method.decode_latents(z).shape == (3, 1, 16, 16)
    images = method.sample(2, generator=torch.Generator().manual_seed(0), steps=2)
    assert images.shape == (2, 1, 16, 16) and images.abs().max() <= 1


def test_an_autoencoder_is_refused_at_another_size_unless_fully_convolutional():
    from genlab.methods.autoencoder import KLAutoencoder
    from genlab.methods.vq import VQAutoencoder

    def ldm_on(parent, size, channels=1, attention=2):
        cfg = build_config("ldm", LDM.Config, overrides=TINY_LDM + ["autoencoder=/ae/run",
                                                                   f"model.unet.attention_resolutions=[{attention}]"])
        return LDM(cfg.model, DataInfo(channels=channels, image_size=size, num_classes=10), parents={"autoencoder": parent})

    net = ["model.net.base_channels=8", "model.net.channel_mult=[1,2]", "model.net.num_res_blocks=0",
           "model.net.norm_groups=4", "model.loss.perceptual=0"]
    kl = {a: KLAutoencoder(build_config("kl-ae", KLAutoencoder.Config, overrides=net + [f"model.net.attention={a}"]).model,
                           DIGITS) for a in (False, True)}
    vq = {a: VQAutoencoder(build_config("vq-ae", VQAutoencoder.Config, overrides=net + [
        f"model.net.attention={a}", "model.quantizer.codebook_size=16", "model.quantizer.dim=4",
        "model.disc.base_channels=8", "model.disc.num_layers=1"]).model, DIGITS) for a in (False, True)}
    for family in (kl, vq):
        assert family[False].fully_convolutional and not family[True].fully_convolutional
        assert ldm_on(family[False], 16, attention=4).latent_shape == (4, 8, 8)  # convolutions only: any multiple of f
        assert ldm_on(family[True], 8).latent_shape == (4, 4, 4)  # self-attention: its own size still works
        with pytest.raises(ConfigError, match=r"trained on 1x8px images, the data is 1x16px, and its latent depends on "
                                              r"the image size \(a dense bottleneck or self-attention\)") as e:
            ldm_on(family[True], 16, attention=4)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="multiples of its downsampling factor f = 2"):
        ldm_on(kl[False], 9)  # 9 px would be padded to 10 and the decoder could not crop back
    with pytest.raises(ConfigError, match="1x8px images, the data is 3x8px: train ldm on data with the autoencoder's channels"):
        ldm_on(kl[False], 8, channels=3)


def test_each_distinct_training_image_is_encoded_once_alone(kl_ae_run, monkeypatch):
    import genlab.methods.ldm as ldm_module

    method = _ldm(kl_ae_run)
    ae = method.autoencoder
    calls = []
    encode = ae.encode
    monkeypatch.setattr(ae, "encode", lambda x: (calls.append(len(x)), encode(x))[1])
    x = _digits(6)
    with torch.no_grad():
        alone = torch.cat([encode(x[i: i + 1]) for i in range(6)]) * ae.latent_scale
        batched = encode(x) * ae.latent_scale
    z = method._diffused(x[:4])
    assert calls == [1] * 4 and torch.equal(z, alone[:4])  # each image alone: independent of its batch
    assert torch.allclose(z, batched[:4], atol=1e-5)  # ... and what the batch would give, up to rounding
    calls.clear()
    z = method._diffused(x[[5, 0, 4, 0, 3]])  # two new images; 0 (twice) and 3 are cached
    assert calls == [1, 1] and torch.equal(z, alone[[5, 0, 4, 0, 3]])
    calls.clear()
    assert torch.equal(method._diffused(x), alone) and calls == []  # all six cached now
    # A full cache keeps what it holds and encodes the rest every time.
    method = _ldm(kl_ae_run)
    monkeypatch.setattr(method.autoencoder, "encode", lambda x: (calls.append(len(x)), encode(x))[1])
    monkeypatch.setattr(ldm_module, "LATENT_CACHE_BYTES", 2 * alone[0].numel() * 4)
    for _ in range(2):
        assert torch.equal(method._diffused(x), alone)
    assert calls == [1] * 6 + [1] * 4 and len(method._latent_cache.latents) == 2


def test_heldout_loss_of_a_text_ldm_scores_the_latents_under_the_given_prompt(kl_ae_run):
    """The held-out loss with a prompt (what personalization.py's ti-loss compares prompts by) is the diffusion
    loss on the images' scaled latents, every image conditioned on that prompt, with t then noise drawn from the
    seed; the batch size does not change it, and another prompt gives another loss."""
    from methods.test_text_conditioning import TINY_TEXT

    cfg = build_config("ldm", LDM.Config, overrides=TINY_LDM + TINY_TEXT + [f"autoencoder={kl_ae_run}"])
    torch.manual_seed(0)
    method = build_method(cfg, DataInfo(channels=1, image_size=8, num_classes=10, source="mnist-captions")).eval()
    with torch.no_grad():  # zero-initialised outputs would hide the text
        for p in method.backbone.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = _digits(10)
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, method.config.num_timesteps, (10,), generator=g)
    noise = torch.randn((10, *method.latent_shape), generator=g)
    with torch.no_grad():
        z = method.autoencoder.encode(x) * method.latent_scale
        expected = {p: float(method.loss(z, t, noise, method.encode_prompts([p] * 10))[0])
                    for p in ("a thick seven", "the digit 1")}
    for p, loss in expected.items():
        assert method.heldout_loss(x, seed=5, batch_size=3, prompt=p) == pytest.approx(loss, rel=1e-5)
    assert expected["a thick seven"] != pytest.approx(expected["the digit 1"], rel=1e-4)
