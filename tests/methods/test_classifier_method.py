"""The `classifier` method: cross-entropy training through the one trainer, shift augmentation, presets."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch

from genlab import api
from genlab.config import build_config, list_presets
from genlab.data import load_data
from genlab.errors import ConfigError
from genlab.methods import DataInfo, get_method
from genlab.methods.classifier import ClassifierMethod, ClassifierMethodConfig, random_shift
from genlab.train.runlog import read_log

# A classifier small enough to train for a few dozen steps in about a second on 8x8 `digits`.
TINY_CLASSIFIER = [
    "model.net.channels=[8,16]",
    "model.net.pooled_size=2",
    "model.net.feature_dim=32",
    "model.net.dropout=0.0",
    "model.max_shift=1",
    "train.batch_size=64",
    "train.lr=3e-3",
    "train.warmup_steps=5",
    "train.log_every=10",
    "train.threads=1",
]


def test_registered_under_its_name():
    assert get_method("classifier") is ClassifierMethod


def test_training_on_digits_lowers_the_loss_and_classifies_the_test_split(tmp_path):
    run = api.train("classifier", data="digits", overrides=[*TINY_CLASSIFIER, "train.steps=60"],
                    run_dir=tmp_path / "run", progress=False)
    records = [r for r in read_log(tmp_path / "run") if r["kind"] == "train"]
    first, last = records[0]["values"], records[-1]["values"]
    assert last["loss"] < 0.6 * first["loss"], (first["loss"], last["loss"])
    assert last["accuracy"] > first["accuracy"] + 0.2
    # The trained (EMA) network generalises: far above the 10 % of chance on the held-out digits.
    test = load_data(source="digits", split="test")
    with torch.no_grad():
        predictions = run.method(test.to_model_range()).argmax(dim=1)
    assert (predictions == test.labels).float().mean() > 0.5


def test_network_takes_its_shape_from_the_data():
    method = ClassifierMethod(ClassifierMethodConfig(), DataInfo(channels=3, image_size=32, num_classes=7))
    c = method.net.config
    assert (c.in_channels, c.image_size, c.num_classes) == (3, 32, 7)
    assert method(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("dy, dx", [(1, -2), (0, 0), (-3, 2), (2, 0)])
def test_random_shift_is_an_integer_translation_with_black_fill(dy, dx):
    images = torch.rand(3, 2, 9, 7) * 2 - 1
    shifted = random_shift(images, torch.full((3,), dy), torch.full((3,), dx))
    # scipy.ndimage.shift with order 0 and an integer shift is an exact translation filling with cval.
    expected = scipy.ndimage.shift(images.numpy(), (0, 0, dy, dx), order=0, mode="constant", cval=-1.0)
    np.testing.assert_array_equal(shifted.numpy(), expected)


def test_random_shift_moves_each_image_by_its_own_offset():
    images = torch.rand(2, 1, 6, 6)
    shifted = random_shift(images, torch.tensor([1, 0]), torch.tensor([0, -1]))
    assert torch.equal(shifted[0], random_shift(images[:1], torch.tensor([1]), torch.tensor([0]))[0])
    assert torch.equal(shifted[1, 0, :, :5], images[1, 0, :, 1:]) and (shifted[1, 0, :, 5] == -1).all()


def test_sample_is_a_one_line_config_error():
    method = ClassifierMethod(ClassifierMethodConfig(), DataInfo(channels=1, image_size=28, num_classes=10))
    with pytest.raises(ConfigError) as e:
        method.sample(4)
    assert "\n" not in str(e.value) and "classifier" in str(e.value)


@pytest.mark.parametrize(
    "config, info, words",
    [
        (ClassifierMethodConfig(), DataInfo(channels=1, image_size=28, num_classes=None), ["labelled"]),
        (ClassifierMethodConfig(max_shift=8), DataInfo(channels=1, image_size=8, num_classes=10), ["max_shift=8", "8"]),
    ],
)
def test_impossible_settings_are_config_errors(config, info, words):
    with pytest.raises(ConfigError) as e:
        ClassifierMethod(config, info)
    assert all(w in str(e.value) for w in words)


@pytest.mark.parametrize("override, key", [("model.label_smoothing=1.0", "label_smoothing"), ("model.max_shift=-1", "max_shift")])
def test_bad_option_values_are_rejected(override, key):
    with pytest.raises(ConfigError, match=key):
        build_config("classifier", ClassifierMethodConfig, overrides=[override])


@pytest.mark.parametrize("preset, source", [("mnist_small", "mnist"), ("fashion_mnist_small", "fashion-mnist"),
                                            ("cifar10_small", "cifar10")])
def test_shipped_presets_build_valid_configs(preset, source):
    assert preset in list_presets("classifier")
    cfg = build_config("classifier", ClassifierMethodConfig, preset=preset)
    assert cfg.data.source == source and cfg.model.max_shift > 0
    # The evaluators must stay small enough to ship inside the package (< 2 MB of float32).
    channels, size = (3, 32) if source == "cifar10" else (1, 28)
    method = ClassifierMethod(cfg.model, DataInfo(channels=channels, image_size=size, num_classes=10))
    assert sum(p.numel() for p in method.parameters()) * 4 < 2_000_000


@pytest.mark.parametrize("dy, dx", [(1, -2), (0, 0), (-2, 2), (2, 1)])
def test_reflect_padded_shift_is_a_random_crop_of_the_mirror_padded_image(dy, dx):
    images = torch.rand(3, 2, 9, 7) * 2 - 1
    shifted = random_shift(images, torch.full((3,), dy), torch.full((3,), dx), padding="reflect")
    # numpy's "reflect" mirrors about the edge pixel without repeating it, as torch's does.
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    expected = padded[:, :, 2 - dy: 2 - dy + 9, 2 - dx: 2 - dx + 7]
    np.testing.assert_array_equal(shifted.numpy(), expected)


def test_sgd_option_builds_nesterov_sgd_and_refuses_nesterov_without_momentum():
    from genlab.train.trainer import make_optimizer

    cfg = build_config("classifier", ClassifierMethodConfig, overrides=["model.optimizer=sgd", "train.weight_decay=5e-4"])
    method = ClassifierMethod(cfg.model, DataInfo(channels=3, image_size=32, num_classes=10))
    optimizer = make_optimizer(method.optimizer_groups()["main"], cfg.train)
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, True, 5e-4)
    with pytest.raises(ConfigError, match="nesterov"):
        build_config("classifier", ClassifierMethodConfig, overrides=["model.optimizer=sgd", "model.momentum=0"])


def test_channels_last_changes_the_layout_not_the_training_step():
    """One SGD step with and without channels_last: the same loss and (to float rounding) the same weights."""
    from genlab.train.trainer import make_optimizer

    results = []
    for channels_last in (False, True):
        cfg = build_config("classifier", ClassifierMethodConfig, overrides=[
            "model.optimizer=sgd", f"model.channels_last={str(channels_last).lower()}", "model.net.channels=[8,16]",
            "model.net.pooled_size=1", "model.net.dropout=0.0", "model.net.stage_order=conv-pool-conv"])
        torch.manual_seed(0)
        method = ClassifierMethod(cfg.model, DataInfo(channels=3, image_size=16, num_classes=10))
        conv = method.net.body[0][0].weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        optimizer = make_optimizer(method.optimizer_groups()["main"], cfg.train)
        images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
        loss = torch.nn.functional.cross_entropy(method(images if not channels_last else
                                                        images.contiguous(memory_format=torch.channels_last)),
                                                 torch.arange(8))
        loss.backward()
        optimizer.step()
        results.append((loss.item(), conv.detach().contiguous().clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)
