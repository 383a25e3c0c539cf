"""The evaluator classifier: feature layer, size budget, config checks, and (slow) the MNIST accuracy target."""

import dataclasses
import gzip
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genlab.errors import ConfigError, DataError
from genlab.models.classifier import Classifier, ClassifierConfig


def _eval_model(config: ClassifierConfig | None = None, seed: int = 0) -> Classifier:
    """A classifier in eval mode with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = Classifier(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_logits_are_the_last_linear_layer_of_the_features():
    model = _eval_model()
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    features = model.features(x)
    logits = model(x)
    torch.testing.assert_close(logits, features @ model.head.weight.T + model.head.bias)
    # The feature layer is the ReLU output of the 128-unit linear layer fed by the pooled conv maps.
    torch.testing.assert_close(features, F.relu(model.feature[0](model.body(x))))
    assert features.shape == (5, 128) and (features >= 0).all() and (features > 0).any()


def test_dropout_acts_between_features_and_logits_only_in_training():
    model = _eval_model(ClassifierConfig(dropout=0.5))
    x = torch.rand(64, 1, 28, 28) * 2 - 1
    model.train()
    features = model.features(x)
    torch.manual_seed(1)
    logits = model.logits_from_features(features)
    torch.manual_seed(1)
    mask = F.dropout(torch.ones_like(features), p=0.5, training=True)  # same RNG draw as the model's dropout
    torch.testing.assert_close(logits, model.head(features * mask))


def _parameter_count(config: ClassifierConfig) -> int:
    """Closed form: conv3x3 weights (no bias) + BatchNorm scale/shift per stage, then two linear layers."""
    total, width = 0, config.in_channels
    for out in config.channels:
        total += 9 * width * out + 2 * out + 9 * out * out + 2 * out
        width = out
    flat = width * config.pooled_size**2
    return total + flat * config.feature_dim + config.feature_dim + config.feature_dim * config.num_classes + config.num_classes


@pytest.mark.parametrize("config", [ClassifierConfig(), ClassifierConfig(in_channels=3, image_size=32)])
def test_parameter_count_is_as_documented_and_well_under_two_megabytes(config):
    model = Classifier(config)
    count = sum(p.numel() for p in model.parameters())
    assert count == _parameter_count(config)
    assert count == {1: 197_674, 3: 198_250}[config.in_channels]  # the numbers stated in the module docstring
    assert count * 4 < 1_000_000  # float32 bytes: under 1 MB


def test_same_weights_shapes_at_28_and_32_pixels():
    # The adaptive pool makes the feature layer independent of the input size: only the first conv sees channels.
    grey, colour = Classifier(ClassifierConfig()), Classifier(ClassifierConfig(in_channels=3, image_size=32))
    a, b = grey.state_dict(), colour.state_dict()
    assert set(a) == set(b)
    assert [k for k in a if a[k].shape != b[k].shape] == ["body.0.0.weight"]
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert colour.eval().features(x).shape == (2, 128)


def test_eval_mode_is_per_sample():
    # With BatchNorm's running statistics, a sample's features don't depend on the rest of the batch.
    model = _eval_model()
    x = torch.rand(6, 1, 28, 28) * 2 - 1
    together = model.features(x)
    alone = torch.cat([model.features(x[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_config_and_input_errors():
    with pytest.raises(ConfigError, match="in_channels must be 1 or 3, got 2"):
        ClassifierConfig(in_channels=2)
    with pytest.raises(ConfigError, match="image_size 8 is too small"):
        ClassifierConfig(image_size=8)
    with pytest.raises(ConfigError, match="dropout"):
        ClassifierConfig(dropout=1.0)
    with pytest.raises(DataError, match=r"expects images \(N, 1, H, W\), got shape \(2, 3, 28, 28\)"):
        Classifier().features(torch.zeros(2, 3, 28, 28))
    assert ClassifierConfig(channels=[8, 16]).channels == (8, 16)  # lists from YAML/JSON become tuples


# --- slow: the accuracy target --------------------------------------------------------------------------------


def _data_root() -> Path:
    return Path(os.environ.get("GENLAB_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def _read_idx(path: Path) -> np.ndarray:
    """Minimal IDX reader (private stand-in for genlab.data): magic 0x0000 <dtype 0x08> <ndim>, big-endian dims."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    assert raw[:3] == b"\x00\x00\x08", f"{path}: not an unsigned-byte IDX file"
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = _read_idx(root / f"{split}-images-idx3-ubyte.gz")
    labels = _read_idx(root / f"{split}-labels-idx1-ubyte.gz")
    x = torch.from_numpy(images.copy()).float().div(127.5).sub(1)[:, None]  # (N, 1, 28, 28) in [-1, 1]
    return x, torch.from_numpy(labels.copy()).long()


def train_classifier(model, x, y, epochs: int, batch_size: int = 128, seed: int = 0, lr: float = 3e-3) -> None:
    """AdamW with a one-cycle learning rate, plain cross-entropy, no augmentation."""
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * (len(x) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for i in range(len(x) // batch_size):
            batch = order[i * batch_size : (i + 1) * batch_size]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    """Top-1 accuracy in eval mode."""
    model.eval()
    return sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in zip(x.split(1000), y.split(1000))) / len(y)


@pytest.mark.slow
@pytest.mark.data
def test_trains_to_99_percent_on_mnist_in_two_epochs():
    root = _data_root() / "mnist"
    if not (root / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST IDX files not found under {root} (set GENLAB_DATA)")
    x_train, y_train = _load_split(root, "train")
    x_test, y_test = _load_split(root, "t10k")
    torch.manual_seed(0)
    model = Classifier(ClassifierConfig())
    start = time.perf_counter()
    train_classifier(model, x_train, y_train, epochs=2)
    test_accuracy = accuracy(model, x_test, y_test)
    print(f"MNIST test accuracy {test_accuracy:.4f} after 2 epochs in {time.perf_counter() - start:.0f} s")
    assert test_accuracy >= 0.99


# ---------------------------------------------------------------------------------------------
# The CIFAR-10 evaluator's options: conv-pool-conv stages and flip-averaged features.

CIFAR_LIKE = ClassifierConfig(in_channels=3, image_size=32, channels=(8, 16, 32), pooled_size=1, feature_dim=16,
                              dropout=0.0, stage_order="conv-pool-conv")


def test_conv_pool_conv_runs_the_second_conv_at_half_resolution_with_the_same_weight_shapes():
    vgg, cpc = Classifier(dataclasses.replace(CIFAR_LIKE, stage_order="conv-conv-pool")), Classifier(CIFAR_LIKE)
    shapes = lambda m: sorted(tuple(p.shape) for p in m.parameters())  # noqa: E731
    assert shapes(vgg) == shapes(cpc)
    sizes = {}
    for name, module in cpc.body.named_children():
        if isinstance(module, torch.nn.Sequential):
            module.register_forward_hook(lambda m, i, o, name=name: sizes.__setitem__(name, o.shape[-1]))
    cpc.eval()(torch.zeros(1, 3, 32, 32))
    # Stage s: first conv at 32 / 2^s, second conv after the pool at 32 / 2^(s+1).
    assert list(sizes.values()) == [32, 16, 16, 8, 8, 4]


def test_flip_average_is_the_mean_of_the_features_of_the_image_and_its_mirror():
    averaged = _eval_model(dataclasses.replace(CIFAR_LIKE, flip_average=True))
    plain = Classifier(CIFAR_LIKE)
    plain.load_state_dict(averaged.state_dict())
    plain.eval()
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = 0.5 * (plain.features(x) + plain.features(x.flip(-1)))
        torch.testing.assert_close(averaged.features(x), expected)
        torch.testing.assert_close(averaged.features(x.flip(-1)), averaged.features(x))  # flip-invariant
        torch.testing.assert_close(averaged(x), plain.head(expected))
        assert not torch.allclose(plain.features(x), plain.features(x.flip(-1)), atol=1e-4)  # the flip matters
    averaged.train()  # training sees single images
    torch.manual_seed(0)
    with torch.no_grad():
        assert averaged.features(x).shape == (5, 16)
        assert not torch.allclose(averaged.features(x), averaged.features(x.flip(-1)), atol=1e-4)


def test_stage_order_must_be_known():
    with pytest.raises(ConfigError, match="stage_order"):
        ClassifierConfig(stage_order="pool-conv-conv")
