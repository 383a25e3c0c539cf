"""Per-image noise: image i of a seed is a function of (seed, i), whatever the batch it is drawn in."""

from __future__ import annotations


import pytest
import torch

from genlab import api
from genlab.config import build_config
from genlab.diffusion import SAMPLERS
from genlab.methods import DataInfo, get_method
from genlab.noise import ImageNoise
from tiny_configs import TINY_AE, TINY_DCGAN, TINY_DDPM, TINY_VQ

DIGITS = DataInfo(channels=1, image_size=8, num_classes=10)
N = 6


def test_rows_are_the_draws_of_each_image_alone():
    together = ImageNoise.for_indices(7, 0, 4)
    draws = together.randn(2, 3), together.rand(5), together.randint(0, 1000)
    for i in range(4):
        alone = ImageNoise.for_indices(7, i, i + 1)
        assert torch.equal(alone.randn(2, 3)[0], draws[0][i])  # same draws, in the same order
        assert torch.equal(alone.rand(5)[0], draws[1][i])
        assert torch.equal(alone.randint(0, 1000)[0], draws[2][i])
    probs = torch.softmax(torch.randn(4, 50), dim=1)
    assert torch.equal(ImageNoise.for_indices(3, 0, 4).multinomial(probs)[2],
                       ImageNoise.for_indices(3, 2, 3).multinomial(probs[2:3])[0])
    # Different images and different seeds get different numbers.
    assert len({tuple(row.tolist()) for row in draws[0].flatten(1)}) == 4
    assert not torch.equal(ImageNoise.for_indices(8, 0, 4).randn(2, 3), ImageNoise.for_indices(7, 0, 4).randn(2, 3))


def test_one_generator_over_consecutive_batches_gives_the_images_of_one_batch():
    whole = ImageNoise.from_generator(torch.Generator().manual_seed(5), 6).randn(3)
    g = torch.Generator().manual_seed(5)
    parts = [ImageNoise.from_generator(g, m).randn(3) for m in (4, 1, 1)]
    assert torch.equal(torch.cat(parts), whole)


def _randomise(method: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised output layers would hide the noise's path)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return method.eval()


def _build(name: str, overrides: list[str], info: DataInfo = DIGITS, runs: dict | None = None):
    """A randomised method; its frozen parents (``model.<role>=NAME``) are taken from ``runs`` by NAME."""
    cls = get_method(name)
    config = build_config(name, cls.Config, overrides=overrides).model
    parents = {role: runs[getattr(config, role)] for role in getattr(cls, "parents", {})}
    torch.manual_seed(0)
    return _randomise(cls(config, info, parents) if parents else cls(config, info))


@pytest.fixture
def parent_runs():
    """Stand-in parent runs by name: "kl-ae" and "vq" are tiny randomised autoencoders on digits."""
    return {"kl-ae": _build("kl-ae", TINY_AE + ["model.loss.perceptual=0"]), "vq": _build("vqvae", TINY_VQ)}


TINY_DIT = ["model.dit.hidden_size=16", "model.dit.depth=1", "model.dit.num_heads=2", "model.num_timesteps=100",
            "model.sample_steps=4"]
TINY_LDM = ["autoencoder=kl-ae", "model.unet.base_channels=8", "model.unet.channel_mult=[1,2]",
            "model.unet.attention_resolutions=[2]", "model.unet.norm_groups=4", "model.num_timesteps=100",
            "model.sample_steps=4"]
CONDITIONAL = ["model.class_conditional=true"]
GENERATIVE = {  # method -> (overrides, sampling options)
    "vae": (TINY_AE, {}),
    "gan": (TINY_DCGAN + CONDITIONAL, {}),
    "stylegan": (["model.net.z_dim=8", "model.net.w_dim=8", "model.net.mapping_layers=1", "model.net.channels=8",
                  "model.net.max_channels=16", "model.net.d_channels=8", "model.net.d_max_channels=16",
                  "model.health.enabled=false"] + CONDITIONAL, {"truncation": 0.7}),
    "pixelcnn": (["model.codes=vq", "model.net.hidden_channels=8", "model.net.num_layers=2",
                  "model.net.head_channels=8"] + CONDITIONAL, {}),
    "gpt": (["model.codes=vq", "model.net.dim=16", "model.net.num_layers=1", "model.net.num_heads=2"] + CONDITIONAL,
            {"top_k": 5}),
    "dit": (TINY_DIT + CONDITIONAL, {"labels": torch.arange(N) % 10, "guidance_scale": 2.0, "sampler": "ddpm",
                                     "steps": 4}),
    "ldm": (TINY_LDM + CONDITIONAL, {"labels": torch.arange(N) % 10, "guidance_scale": 2.0, "sampler": "ddim",
                                     "eta": 1.0, "rules": ["brightness:20"]}),
}


def _in_batches(method, seed: int, batch_size: int, **options) -> torch.Tensor:
    """N images drawn batch by batch as Run.sample should: image i's noise is ImageNoise.for_indices(seed, i, i + 1)."""
    chunks = []
    for start in range(0, N, batch_size):
        stop = min(N, start + batch_size)
        opts = {k: v[start:stop] if isinstance(v, torch.Tensor) else v for k, v in options.items()}
        chunks.append(method.sample(stop - start, generator=ImageNoise.for_indices(seed, start, stop), **opts))
    return torch.cat(chunks)


# Networks are not bit-exact across batch sizes: CPU convolution and matrix kernels block batches of 1,
# 4 and 6 differently, which moves one forward pass by ~1e-7 relative, and samplers with guidance
# amplify that to <= 5e-5 in 4 steps (measured). Swapped or shared noise moves images by ~0.1 to 2.
ROUNDING = 1e-4


def _assert_batch_size_free(method, tolerance: float = ROUNDING, **options) -> None:
    whole = _in_batches(method, 11, N, **options)
    for batch_size in (4, 1):
        assert (_in_batches(method, 11, batch_size, **options) - whole).abs().max() <= tolerance, batch_size
    # The images differ from each other and from another seed's: the noise reaches the output.
    assert (whole[0] - whole[1]).abs().max() > 1e-3
    assert (_in_batches(method, 12, N, **options) - whole).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(GENERATIVE))
def test_every_generative_method_samples_the_same_images_in_any_batch_size(parent_runs, name):
    overrides, options = GENERATIVE[name]
    _assert_batch_size_free(_build(name, overrides, runs=parent_runs), **options)


GUIDANCE = {
    "none": {},
    "cfg": {"labels": torch.arange(N) % 10, "guidance_scale": 3.0},
    "classifier": {"labels": torch.arange(N) % 10, "classifier_scale": 5.0},
    "rule": {"rules": ["symmetry:10"]},
}


def _elementwise_network(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """A denoiser computed pixel by pixel (its rounding cannot depend on the batch): eps_hat = tanh(a x_t + b)."""
    label = torch.zeros_like(t, dtype=x_t.dtype) if y is None else y.to(x_t.dtype) / 10
    return torch.tanh(0.8 * x_t + (t.to(x_t.dtype) / 100 + label)[:, None, None, None])


@pytest.mark.parametrize("guidance", list(GUIDANCE))
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_ddpm_sampler_and_guidance_samples_the_same_images_in_any_batch_size(sampler, guidance):
    common = ["model.num_timesteps=100", "model.schedule=linear"]
    method = _build("ddpm", TINY_DDPM + CONDITIONAL + common)
    method.network = _elementwise_network  # exact arithmetic per image: the test can ask for <= 1e-6
    options = dict(GUIDANCE[guidance], sampler=sampler, steps=4)
    tolerance = 1e-6
    if sampler == "ddim":
        options["eta"] = 1.0  # stochastic DDIM draws noise at every step
    if guidance == "classifier":  # a real network's gradient: the batched kernels' rounding again
        options["classifier"] = _build("noisy-classifier", ["model.base_channels=8", "model.channel_mult=[1,2]",
                                                            "model.norm_groups=4"] + common)
        tolerance = ROUNDING
    _assert_batch_size_free(method, tolerance, **options)


@pytest.mark.parametrize("name", ["ldm", "gan"])
def test_run_sample_gives_the_same_images_for_a_seed_whatever_the_batch_size(parent_runs, name, tmp_path):
    # Run.sample hands every batch one torch.Generator(seed); each image takes one seed from it in turn.
    overrides, options = GENERATIVE[name]
    run = api.Run(path=tmp_path, config=None, method=_build(name, overrides, runs=parent_runs), step=0, weights="raw")
    whole = run.sample(N, seed=3, batch_size=N, **options)
    for batch_size in (4, 1):
        assert (run.sample(N, seed=3, batch_size=batch_size, **options) - whole).abs().max() <= ROUNDING
    assert (run.sample(N, seed=4, batch_size=N, **options) - whole).abs().max() > 1e-3
