"""The noise-aware classifier p(y | x_t, t): training on noised digits, presets, guiding a DDPM run."""

from __future__ import annotations

import pytest
import torch

from genlab import api
from genlab.config import build_config, list_presets
from genlab.data import load_data
from genlab.errors import ConfigError
from genlab.methods import DataInfo, get_method
from genlab.methods.capabilities import Generates, NoiseAwareClassifier, has
from genlab.methods.ddpm import DDPM, DDPMConfig
from genlab.methods.noisy_classifier import NoisyClassifier, NoisyClassifierConfig
from genlab.runs import guidance_classifier
from genlab.train.runlog import read_log

TINY_NOISY_CLASSIFIER = [
    "model.schedule=linear",
    "model.num_timesteps=100",
    "model.base_channels=16",
    "model.channel_mult=[1,2]",
    "model.num_res_blocks=1",
    "model.norm_groups=8",
    "train.batch_size=64",
    "train.lr=3e-3",
    "train.lr_schedule=constant",
    "train.warmup_steps=5",
    "train.log_every=10",
    "train.sample_every=0",
    "train.threads=1",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("noisy") / "run"
    run = api.train("noisy-classifier", data="digits", overrides=[*TINY_NOISY_CLASSIFIER, "train.steps=80"],
                    run_dir=path, progress=False)
    return path, run


def test_registered_and_not_an_image_generator():
    assert get_method("noisy-classifier") is NoisyClassifier
    assert not has(NoisyClassifier, Generates) and has(NoisyClassifier, NoiseAwareClassifier)
    method = NoisyClassifier(NoisyClassifierConfig(), DataInfo(channels=1, image_size=8, num_classes=10))
    with pytest.raises(ConfigError, match="does not generate images"):
        method.sample(2)
    with pytest.raises(ConfigError, match="labelled"):
        NoisyClassifier(NoisyClassifierConfig(), DataInfo(channels=1, image_size=8))


def test_training_on_noised_digits_lowers_the_loss_and_beats_chance_at_small_t(trained):
    path, run = trained
    records = [r for r in read_log(path) if r["kind"] == "train"]
    first, last = records[0]["values"], records[-1]["values"]
    # the loss averages over all t, most of which leave little to see: it falls slowly (2.33 -> 2.10)
    assert last["loss"] < 0.93 * first["loss"], (first["loss"], last["loss"])
    test = load_data(source="digits", split="test")
    x0, labels = test.to_model_range(), test.labels
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, 10, (len(x0),), generator=gen)  # small t: images still legible
    x_t = run.method.schedule.q_sample(x0, t, torch.randn(x0.shape, generator=gen))
    with torch.no_grad():
        accuracy = (run.method(x_t, t).argmax(dim=1) == labels).float().mean().item()
    assert accuracy > 0.3, accuracy  # chance is 0.1


def test_log_prob_gradient_is_the_autograd_gradient_of_log_softmax(trained):
    _, run = trained
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t, labels = torch.tensor([0, 10, 50, 99, 30]), torch.tensor([0, 3, 9, 1, 1])
    got = run.method.log_prob_gradient(x, t, labels)
    h = 1e-2  # central differences in float32 on a few coordinates
    for index in [(0, 0, 3, 4), (2, 0, 0, 0), (4, 0, 7, 2)]:
        step = torch.zeros_like(x)
        step[index] = h
        with torch.no_grad():
            up = torch.log_softmax(run.method(x + step, t), dim=1)[index[0], labels[index[0]]]
            down = torch.log_softmax(run.method(x - step, t), dim=1)[index[0], labels[index[0]]]
        assert got[index].item() == pytest.approx(((up - down) / (2 * h)).item(), rel=0.05, abs=1e-3)


def test_guiding_a_ddpm_by_run_path_raises_the_classifier_probability(trained):
    """Sampling a DDPM of the same schedule with --classifier RUN: strong guidance gives samples the
    classifier finds more likely to be the requested class than unguided samples."""
    path, run = trained
    cfg = build_config("ddpm", DDPMConfig, overrides=[
        "model.unet.base_channels=8", "model.unet.channel_mult=[1]", "model.unet.attention_resolutions=[]",
        "model.unet.norm_groups=4", "model.schedule=linear", "model.num_timesteps=100"]).model
    ddpm = DDPM(cfg, DataInfo(channels=1, image_size=8)).eval()
    labels = torch.arange(32) % 10

    def score(images):
        with torch.no_grad():
            log_probs = torch.log_softmax(run.method(images, torch.zeros(len(images), dtype=torch.long)), dim=1)
        return log_probs[torch.arange(len(images)), labels].mean().item()

    for sampler in ("ddpm", "ddim"):
        options = {"generator": torch.Generator().manual_seed(2), "sampler": sampler, "steps": 20}
        plain = ddpm.sample(32, **options)
        guided = ddpm.sample(32, labels=labels, classifier=guidance_classifier(str(path)), classifier_scale=20.0,
                             **options)
        assert score(guided) > score(plain) + 0.5, sampler
    other = DDPM(build_config("ddpm", DDPMConfig, overrides=["model.unet.base_channels=8", "model.unet.channel_mult=[1]",
                 "model.unet.attention_resolutions=[]", "model.unet.norm_groups=4"]).model, DataInfo(channels=1, image_size=8))
    with pytest.raises(ConfigError, match="noise schedule"):
        other.sample(2, labels=labels[:2], classifier=guidance_classifier(str(path)))


def test_small_preset_matches_the_ddpm_small_schedule():
    for preset, ddpm_preset in (("small", "small"), ("mnist_small", "mnist_small"), ("mnist_small", "cfg_mnist_small")):
        assert preset in list_presets("noisy-classifier")
        mine = build_config("noisy-classifier", NoisyClassifierConfig, preset=preset)
        theirs = build_config("ddpm", DDPMConfig, preset=ddpm_preset)
        assert (mine.model.schedule, mine.model.num_timesteps) == (theirs.model.schedule, theirs.model.num_timesteps)
        assert mine.data.source == theirs.data.source
    cfg = build_config("ddpm", DDPMConfig, preset="cfg_mnist_small").model
    assert cfg.class_conditional and cfg.p_uncond > 0


@pytest.mark.parametrize("override, key", [("model.norm_groups=5", "norm_groups"), ("model.dropout=1.0", "dropout"),
                                           ("model.num_res_blocks=0", "num_res_blocks")])
def test_bad_config_values_are_rejected(override, key):
    with pytest.raises(ConfigError, match=key):
        build_config("noisy-classifier", NoisyClassifierConfig, overrides=[override])
