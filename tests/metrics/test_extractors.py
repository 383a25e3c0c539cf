"""Feature extractors: consistency with the networks, batching, input rule, weights hashes, registry."""

import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

from genlab.errors import ConfigError, DataError
from genlab.metrics import extractors
from genlab.metrics.extractors import (
    CARD_KEYS,
    ClassifierExtractor,
    FeatureExtractor,
    InceptionExtractor,
    get_extractor,
    prepare_images,
    save_classifier_evaluator,
    sha256_file,
    sha256_state_dict,
)
from genlab.models.classifier import Classifier, ClassifierConfig
from genlab.models.inception import FIDInceptionV3


def _classifier(config: ClassifierConfig | None = None, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    model = Classifier(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _images(n: int, channels: int = 1, size: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def small_inception() -> FIDInceptionV3:
    """FID Inception with well-scaled random weights, resizing to 75 px so that a forward pass is fast."""
    g = torch.Generator().manual_seed(0)
    model = FIDInceptionV3(input_size=75)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(0, math.sqrt(2 / module.weight[0].numel()), generator=g)
            elif isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 1 / math.sqrt(module.in_features), generator=g)
                module.bias.normal_(0, 1, generator=g)
    return model.eval()


@pytest.fixture
def evaluator_files(tmp_path):
    model = _classifier()
    weights, card = save_classifier_evaluator(
        model, tmp_path, "mnist", training_command="genlab train ...", seed=0, test_accuracy=0.99, dataset="mnist"
    )
    return model, weights, card


def test_sha256_file_and_state_dict_agree_with_the_saved_file(tmp_path, evaluator_files):
    (tmp_path / "abc.txt").write_bytes(b"abc")
    assert sha256_file(tmp_path / "abc.txt") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    model, weights, _ = evaluator_files
    assert sha256_state_dict(model.state_dict()) == sha256_file(weights)


def test_card_records_what_the_spec_asks(evaluator_files):
    model, weights, card = evaluator_files
    data = json.loads(card.read_text())
    assert set(CARD_KEYS) <= set(data)
    assert data["sha256"] == sha256_file(weights) and data["seed"] == 0 and data["test_accuracy"] == 0.99
    assert data["config"] == {**model.config.__dict__, "channels": list(model.config.channels)}
    assert data["dataset"] == "mnist"


def test_classifier_extractor_matches_the_model_forward(evaluator_files):
    model, weights, card = evaluator_files
    extractor = ClassifierExtractor.from_files(weights, card)
    assert isinstance(extractor, FeatureExtractor)
    assert (extractor.name, extractor.sha256, extractor.feature_dim, extractor.num_classes) == (
        "mnist", sha256_file(weights), 128, 10,
    )
    x = _images(9)
    features, logits = extractor.features_and_logits(x)
    with torch.no_grad():
        torch.testing.assert_close(features, model.features(x))
        torch.testing.assert_close(logits, model(x))
    assert features.dtype == logits.dtype == torch.float32 and not features.requires_grad


def test_features_are_batch_size_invariant(evaluator_files):
    _, weights, card = evaluator_files
    x = _images(11)
    results = [ClassifierExtractor.from_files(weights, card, batch_size=b).features_and_logits(x) for b in (1, 4, 64)]
    for features, logits in results[1:]:
        torch.testing.assert_close(features, results[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits, results[0][1], atol=1e-5, rtol=1e-5)
    # And the network really sees batches of at most batch_size images (bounded memory).
    extractor = ClassifierExtractor.from_files(weights, card, batch_size=4)
    seen, features = [], extractor.model.features
    extractor.model.features = lambda x: seen.append(len(x)) or features(x)
    extractor.features_and_logits(x)
    assert seen == [4, 4, 3]


def test_extractor_runs_in_eval_mode_even_if_the_model_was_switched_to_training(evaluator_files):
    model, weights, card = evaluator_files
    extractor = ClassifierExtractor.from_files(weights, card)
    x = _images(4)
    expected = extractor.features_and_logits(x)
    extractor.model.train()  # dropout and batch statistics would change the numbers
    features, logits = extractor.features_and_logits(x)
    torch.testing.assert_close(features, expected[0])
    torch.testing.assert_close(logits, expected[1])


def test_sha256_mismatch_is_a_one_line_error(evaluator_files):
    model, weights, card = evaluator_files
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # flip one bit of the last weight
    weights.write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256 mismatch") as info:
        ClassifierExtractor.from_files(weights, card)
    assert "\n" not in str(info.value) and info.value.__cause__ is None


def test_incomplete_or_unreadable_card_is_refused(evaluator_files):
    _, weights, card = evaluator_files
    data = json.loads(card.read_text())
    del data["feature_layer"]
    card.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"lacks \['feature_layer'\]"):
        ClassifierExtractor.from_files(weights, card)
    card.write_text("{not json")
    with pytest.raises(DataError, match="cannot read evaluator card"):
        ClassifierExtractor.from_files(weights, card)


def test_weights_that_do_not_fit_the_card_config_are_refused(evaluator_files):
    _, weights, card = evaluator_files
    data = json.loads(card.read_text())
    data["config"]["feature_dim"] = 64
    card.write_text(json.dumps(data))
    with pytest.raises(DataError, match="do not fit the card's config"):
        ClassifierExtractor.from_files(weights, card)


def test_prepare_images_channel_rules():
    rgb = torch.tensor([0.5, -0.2, 1.0])[None, :, None, None].expand(2, 3, 4, 4)
    grey = prepare_images(rgb, channels=1)
    torch.testing.assert_close(grey, torch.full((2, 1, 4, 4), 0.299 * 0.5 - 0.587 * 0.2 + 0.114 * 1.0))  # BT.601 luma
    single = _images(2, channels=1, size=4)
    torch.testing.assert_close(prepare_images(single, channels=3), single.expand(2, 3, 4, 4))
    with pytest.raises(DataError, match="cannot convert 2-channel"):
        prepare_images(torch.zeros(1, 2, 4, 4), channels=3)


def test_prepare_images_resize_rule():
    # Antialiased bilinear on pixel centres: constants stay constant, and shrinking 32 -> 28 averages.
    torch.testing.assert_close(prepare_images(torch.full((1, 1, 32, 32), 0.25), size=28), torch.full((1, 1, 28, 28), 0.25))
    x = _images(2, size=32)
    expected = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(prepare_images(x, size=28), expected)
    # Pixel-centre alignment keeps an antisymmetric ramp antisymmetric (TF1's legacy mapping would shift it).
    ramp = torch.linspace(-1, 1, 14).expand(1, 1, 14, 14)
    upsampled = prepare_images(ramp, size=28)
    torch.testing.assert_close(upsampled.flip(-1), -upsampled)


def test_prepare_images_range_rule():
    x = _images(2) * 1.2  # slightly outside [-1, 1]: clamped, as writing 8-bit pixels would
    torch.testing.assert_close(prepare_images(x), x.clamp(-1, 1))
    with pytest.raises(DataError, match=r"must be in \[-1, 1\], got values in \[0, 255\]"):
        prepare_images(torch.tensor([0.0, 255.0]).reshape(1, 1, 1, 2))
    with pytest.raises(DataError, match="must be float"):
        prepare_images(torch.zeros(1, 1, 2, 2, dtype=torch.uint8))
    with pytest.raises(DataError, match="nan"):
        prepare_images(torch.tensor([float("nan")]).reshape(1, 1, 1, 1))
    with pytest.raises(DataError, match=r"\(N, C, H, W\), got \(2, 28, 28\)"):
        prepare_images(torch.zeros(2, 28, 28))


def test_classifier_extractor_applies_the_input_rule(evaluator_files):
    # 32x32 RGB images are turned into 28x28 grey ones by the documented rule before the network sees them.
    model, weights, card = evaluator_files
    extractor = ClassifierExtractor.from_files(weights, card)
    x = _images(3, channels=3, size=32)
    features, logits = extractor.features_and_logits(x)
    with torch.no_grad():
        torch.testing.assert_close(features, model.features(prepare_images(x, channels=1, size=28)))
    with pytest.raises(DataError, match="must be in"):
        extractor.features_and_logits(x * 127.5 + 127.5)
    with pytest.raises(DataError, match=r"got \(3, 32, 32\)"):
        extractor.features_and_logits(x[:, 0])


def test_inception_extractor_matches_the_network(small_inception):
    extractor = InceptionExtractor(small_inception, sha256="0" * 64, batch_size=1)
    assert isinstance(extractor, FeatureExtractor)
    assert (extractor.name, extractor.feature_dim, extractor.num_classes) == ("inception", 2048, 1008)
    x = _images(2, channels=1, size=28)
    features, logits = extractor.features_and_logits(x)
    with torch.no_grad():
        expected_features = small_inception.features(x)
    torch.testing.assert_close(features, expected_features, atol=1e-5, rtol=1e-5)  # batch sizes 1 and 2 agree
    # Logits without the fc bias (Salimans et al.'s Inception Score input); with it, the network's own logits.
    torch.testing.assert_close(logits, expected_features @ small_inception.fc.weight.T, atol=1e-5, rtol=1e-5)
    with_bias = InceptionExtractor(small_inception, sha256="0" * 64, logits_bias=True)
    _, full_logits = with_bias.features_and_logits(x)
    with torch.no_grad():
        torch.testing.assert_close(full_logits, small_inception.fc(expected_features), atol=1e-5, rtol=1e-5)


def test_inception_extractor_from_file_hashes_the_weights_file(tmp_path, small_inception):
    path = tmp_path / "fid.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in small_inception.state_dict().items()}, str(path))
    extractor = InceptionExtractor.from_file(path)
    assert extractor.sha256 == sha256_file(path)
    assert torch.equal(extractor.model.fc.weight, small_inception.fc.weight)


def test_registry_names_paths_and_missing_evaluators(tmp_path, monkeypatch, evaluator_files):
    model, weights, card = evaluator_files
    monkeypatch.setattr(extractors, "_evaluators_dir", lambda: tmp_path / "empty")
    with pytest.raises(DataError, match=r"shipped 'fashion-mnist' evaluator is missing .*fashion-mnist\.safetensors") as info:
        get_extractor("fashion_mnist")
    assert "\n" not in str(info.value)
    monkeypatch.setattr(extractors, "_evaluators_dir", lambda: weights.parent)
    shipped = get_extractor("mnist")
    assert isinstance(shipped, ClassifierExtractor) and shipped.sha256 == sha256_file(weights)
    by_path = get_extractor(card)
    assert by_path.name == "mnist" and by_path.sha256 == shipped.sha256
    with pytest.raises(ConfigError, match="unknown feature extractor 'vgg'"):
        get_extractor("vgg")
    with pytest.raises(DataError, match="FID Inception weights not found"):
        get_extractor(tmp_path / "missing.pth")
    card.unlink()  # a .safetensors without its card is taken for Inception weights, and these are not
    with pytest.raises(DataError, match=r"has no evaluator card mnist\.json beside it and is not FID Inception weights"):
        get_extractor(weights)


def test_registry_reads_inception_safetensors(tmp_path, small_inception):
    from safetensors.torch import save_file

    path = tmp_path / "fid.safetensors"
    save_file({k: v.contiguous() for k, v in small_inception.state_dict().items()}, str(path))
    extractor = get_extractor(path)
    assert isinstance(extractor, InceptionExtractor) and extractor.sha256 == sha256_file(path)
