"""Feature extractors: [-1, 1] images -> (features, logits) for FID, KID, IS, PR/DC and accuracy (SPEC E1).

Every extractor has a ``name`` and the ``sha256`` of its weights, so each reported number can name
the exact network that produced it (SPEC E5). Two kinds exist:

- :class:`InceptionExtractor`: the standard FID Inception network (TF 2015-12-05 weights), 2048-d
  pool_3 features, 1008 class logits. Comparable with published FIDs.
- :class:`ClassifierExtractor`: the project's own small classifiers (MNIST, Fashion-MNIST, CIFAR-10),
  shipped as ``src/genlab/evaluators/<name>.safetensors`` plus a ``<name>.json`` card; fully offline.
  Their numbers are comparable only with numbers from the same evaluator (its sha256), never with
  published Inception FIDs: for those, pass ``inception`` with the standard weights.

Input rule, applied batch by batch by every extractor (see :func:`prepare_images`): float images
(N, C, H, W) in [-1, 1]; values a little outside are clamped to [-1, 1] as writing 8-bit pixels
would; channels are matched (grey -> RGB by repetition, RGB -> grey by ITU-R BT.601 luma);
the classifier extractors resize to the size they were trained on with antialiased bilinear
interpolation on pixel centres (``F.interpolate(mode="bilinear", align_corners=False,
antialias=True)``; e.g. 32x32 -> 28x28), while the Inception network does its own TF-style resize
to 299x299 (:func:`genlab.models.inception.resize_bilinear_tf1`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from genlab.errors import ConfigError, DataError
from genlab.fileio import atomic_write_bytes, atomic_write_text, sha256_bytes, sha256_file
from genlab.models.classifier import Classifier, ClassifierConfig
from genlab.models.inception import (
    FEATURE_DIM,
    NUM_CLASSES,
    FIDInceptionV3,
    fid_inception_weights_path,
    load_fid_inception,
)

__all__ = [
    "FeatureExtractor",
    "InceptionExtractor",
    "ClassifierExtractor",
    "sha256_file",
    "sha256_state_dict",
    "prepare_images",
    "save_classifier_evaluator",
    "get_extractor",
    "is_evaluator_name",
    "user_evaluators_dir",
    "SHIPPED_EVALUATORS",
    "DEFAULT_EXTRACTORS",
    "CARD_KEYS",
]

SHIPPED_EVALUATORS = ("mnist", "fashion-mnist", "cifar10")
# Which extractor judges which data by default: the project's own evaluators where they exist
# (offline, and far more telling on grey digits than ImageNet features), else the FID Inception network.
DEFAULT_EXTRACTORS = {"mnist": "mnist", "mnist5k": "mnist", "digits": "mnist", "mnist-bold": "mnist",
                      "fashion-mnist": "fashion-mnist", "cifar10": "cifar10"}
# What an evaluator card must record, so a metric can cite the network that produced it (SPEC E5).
CARD_KEYS = ("name", "architecture", "config", "training_command", "seed", "test_accuracy", "sha256", "feature_layer")
CLASSIFIER_FEATURE_LAYER = "feature: ReLU of the feature_dim-unit linear layer, the input of the last linear layer (head)"
# Beyond this distance from [-1, 1] the images are almost surely in another range ([0, 255], [0, 1] is not
# detectable), so refuse instead of clamping.
RANGE_TOLERANCE = 0.5
# ITU-R BT.601 luma weights, the ones PIL's convert("L") uses.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


@runtime_checkable
class FeatureExtractor(Protocol):
    """What the metrics need from a network: features and class logits of [-1, 1] images."""

    name: str  # e.g. "inception", "mnist"
    sha256: str  # of the weights file (or of the safetensors serialisation of the state dict)
    feature_dim: int  # D
    num_classes: int  # C

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (N, D), logits (N, C)) of images (N, C_in, H, W) in [-1, 1]; eval mode, no grad."""
        ...


def sha256_state_dict(state: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 of a state dict's safetensors serialisation: equals :func:`sha256_file` of ``save_file(state)``."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    return sha256_bytes(safetensors_bytes(tensors))


def _first_line(error: BaseException) -> str:
    """The first line of an exception's message (errors shown to people are one line)."""
    return (str(error).splitlines() or [type(error).__name__])[0]


def _check_image_batch(images) -> None:
    """Refuse anything but a float tensor (N, C, H, W)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DataError(f"feature extractors take image batches (N, C, H, W), got {shape}")
    if not images.is_floating_point():
        raise DataError(f"images must be float in [-1, 1], got dtype {images.dtype}; convert with x / 127.5 - 1")


def prepare_images(images: torch.Tensor, channels: int | None = None, size: int | None = None) -> torch.Tensor:
    """Validate [-1, 1] images (N, C, H, W), clamp, and match ``channels`` and ``size`` (see module docstring)."""
    _check_image_batch(images)
    if images.numel():
        low, high = float(images.min()), float(images.max())
        if not (-1 - RANGE_TOLERANCE <= low and high <= 1 + RANGE_TOLERANCE):  # also catches NaN
            raise DataError(
                f"images must be in [-1, 1], got values in [{low:.3g}, {high:.3g}]; map [0, 255] pixels with x / 127.5 - 1"
            )
    x = images.clamp(-1, 1)  # (N, C, H, W)
    if channels is not None and x.shape[1] != channels:
        if x.shape[1] == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)  # grey -> RGB
        elif x.shape[1] == 3 and channels == 1:
            luma = torch.tensor(LUMA_WEIGHTS, dtype=x.dtype, device=x.device)
            x = torch.einsum("nchw,c->nhw", x, luma)[:, None]  # (N, 1, H, W); weights sum to 1, so [-1, 1] stays
        else:
            raise DataError(f"cannot convert {x.shape[1]}-channel images to the extractor's {channels} channels")
    if size is not None and x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


class _ModelExtractor:
    """Shared machinery: batching, device handling, eval mode and no_grad around a network."""

    name: str
    sha256: str
    feature_dim: int
    num_classes: int

    def __init__(self, model: torch.nn.Module, batch_size: int):
        if batch_size < 1:
            raise ConfigError(f"extractor batch_size must be >= 1, got {batch_size}")
        self.model = model.eval().requires_grad_(False)
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        """Device of the network's weights (where features are computed)."""
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> _ModelExtractor:
        """Move the network to ``device``; returns self."""
        self.model.to(device)
        return self

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Images on the network's device, in the channels and size it expects."""
        raise NotImplementedError

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits from features."""
        raise NotImplementedError

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (N, D), logits (N, C)) in float32 on the images' device; batched, eval mode, no grad."""
        _check_image_batch(images)
        self.model.eval()
        dtype = next(self.model.parameters()).dtype
        features, logits = [], []
        with torch.no_grad():
            for batch in images.split(self.batch_size):
                x = self._prepare(batch.to(device=self.device, dtype=dtype))
                f = self.model.features(x)  # (B, D)
                features.append(f.float().to(images.device))
                logits.append(self._logits(f).float().to(images.device))
        if not features:  # N = 0
            empty = images.new_zeros((0,), dtype=torch.float32)
            return empty.reshape(0, self.feature_dim), empty.reshape(0, self.num_classes)
        return torch.cat(features), torch.cat(logits)


class InceptionExtractor(_ModelExtractor):
    """The FID Inception network: 2048-d pool_3 features and 1008 ImageNet logits.

    The logits are ``features @ fc.weight.T`` *without* the bias by default: the reference Inception
    Score code (Salimans et al. 2016, improved-gan) takes the softmax of this product, read from the
    graph's ``softmax/logits/MatMul``, and torch-fidelity/torchmetrics follow it ("logits_unbiased").
    Pass ``logits_bias=True`` for the network's full logits ``model(x)``.
    """

    name = "inception"
    feature_dim = FEATURE_DIM
    num_classes = NUM_CLASSES

    def __init__(self, model: FIDInceptionV3, sha256: str, batch_size: int = 32, logits_bias: bool = False):
        super().__init__(model, batch_size)
        self.sha256 = sha256
        self.logits_bias = logits_bias

    @classmethod
    def from_file(cls, path: str | os.PathLike | None = None, **kwargs) -> InceptionExtractor:
        """Load the TF 2015-12-05 weights (``path``, ``$GENLAB_INCEPTION_WEIGHTS`` or the torch.hub cache)."""
        path = fid_inception_weights_path(path)
        return cls(load_fid_inception(path), sha256_file(path), **kwargs)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return prepare_images(x)  # the network resizes and repeats grey channels itself, as the TF graph does

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        fc = self.model.fc
        return F.linear(features, fc.weight, fc.bias if self.logits_bias else None)  # (B, 1008)


class ClassifierExtractor(_ModelExtractor):
    """One of the project's evaluator classifiers: features of its penultimate layer and its logits."""

    def __init__(self, model: Classifier, name: str, sha256: str, card: dict | None = None, batch_size: int = 256):
        super().__init__(model, batch_size)
        self.name = name
        self.sha256 = sha256
        self.card = card if card is not None else {}
        self.feature_dim = model.config.feature_dim
        self.num_classes = model.config.num_classes

    @classmethod
    def from_files(
        cls, weights: str | os.PathLike, card: str | os.PathLike | None = None, **kwargs
    ) -> ClassifierExtractor:
        """Load ``<name>.safetensors`` and its card (default: ``<name>.json`` beside it), verifying the sha256."""
        weights = Path(weights)
        card_path = Path(card) if card is not None else weights.with_suffix(".json")
        for path, what in ((weights, "weights"), (card_path, "card")):
            if not path.is_file():
                raise DataError(f"evaluator {what} file not found: {path}")
        try:
            card_data = json.loads(card_path.read_text())
        except (OSError, ValueError) as error:
            raise DataError(f"cannot read evaluator card {card_path}: {_first_line(error)}") from None
        if not isinstance(card_data, dict):
            raise DataError(f"evaluator card {card_path} must hold a JSON object, got {type(card_data).__name__}")
        missing = [key for key in CARD_KEYS if key not in card_data]
        if missing:
            raise DataError(f"evaluator card {card_path} lacks {missing}; write cards with save_classifier_evaluator")
        sha256 = sha256_file(weights)
        if sha256 != card_data["sha256"]:
            raise DataError(
                f"sha256 mismatch for {weights}: file is {sha256[:12]}..., card {card_path.name} records "
                f"{str(card_data['sha256'])[:12]}...; the weights were changed or corrupted: restore them or re-save the evaluator"
            )
        config_fields = card_data["config"]
        if not isinstance(config_fields, dict):
            raise DataError(f"evaluator card {card_path}: 'config' must be an object of ClassifierConfig fields")
        known = {f.name for f in dataclasses.fields(ClassifierConfig)}
        unknown = sorted(set(config_fields) - known)
        if unknown:
            raise ConfigError(f"evaluator card {card_path}: unknown classifier config keys {unknown}; valid: {sorted(known)}")
        model = Classifier(ClassifierConfig(**config_fields))
        try:
            model.load_state_dict(load_file(str(weights)), strict=True)
        except Exception as error:
            raise DataError(f"evaluator weights {weights} do not fit the card's config: {_first_line(error)}") from None
        return cls(model, name=str(card_data["name"]), sha256=sha256, card=card_data, **kwargs)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        config = self.model.config
        return prepare_images(x, channels=config.in_channels, size=config.image_size)

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.logits_from_features(features)  # (B, num_classes)


def save_classifier_evaluator(
    model: Classifier,
    directory: str | os.PathLike,
    name: str,
    *,
    training_command: str,
    seed: int,
    test_accuracy: float,
    **extra,
) -> tuple[Path, Path]:
    """Write ``<directory>/<name>.safetensors`` and its ``<name>.json`` card; returns both paths.

    The card records the architecture config, how it was trained, its test accuracy, the feature
    layer and the sha256 of the weights file; ``extra`` keys (e.g. ``dataset``, ``epochs``) are added.
    """
    directory = Path(directory)
    weights, card = directory / f"{name}.safetensors", directory / f"{name}.json"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(weights, safetensors_bytes(state))
    card_data = {
        "name": name,
        "architecture": f"{Classifier.__module__}.{Classifier.__qualname__}",
        "config": dataclasses.asdict(model.config),
        "training_command": training_command,
        "seed": seed,
        "test_accuracy": test_accuracy,
        "sha256": sha256_file(weights),
        "feature_layer": CLASSIFIER_FEATURE_LAYER,
        "weights": weights.name,
        **extra,
    }
    atomic_write_text(card, json.dumps(card_data, indent=2) + "\n")
    return weights, card


def _evaluators_dir() -> Path:
    """Folder of the shipped evaluator weights and cards (``src/genlab/evaluators``)."""
    return Path(str(resources.files("genlab") / "evaluators"))


def user_evaluators_dir() -> Path:
    """Folder of the user's own evaluators (``genlab export-evaluator``): ``$GENLAB_CACHE/evaluators``
    (default ~/.cache/genlab/evaluators); ``--extractor NAME`` looks there after the shipped names."""
    from genlab.data.config import resolve_cache_dir

    return resolve_cache_dir() / "evaluators"


def is_evaluator_name(text: str) -> bool:
    """Whether ``text`` can name an evaluator file: letters, digits, '-' and '_' (no folder, no suffix)."""
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", text))


def get_extractor(name_or_path: str | os.PathLike, device: torch.device | str | None = None) -> FeatureExtractor:
    """The extractor called ``"inception"``, ``"mnist"``, ``"fashion-mnist"`` or ``"cifar10"``, a user evaluator's name, or a path.

    Names other than the shipped ones are looked up in :func:`user_evaluators_dir`. Paths: ``*.json``
    or ``*.safetensors`` with a ``.json`` card beside it (an evaluator), else ``*.safetensors`` /
    ``*.pth`` / ``*.pt`` (FID Inception weights).
    """
    key = str(name_or_path)
    normalised = key.lower().replace("_", "-")
    if normalised == "inception":
        extractor = InceptionExtractor.from_file()
    elif normalised in SHIPPED_EVALUATORS:
        weights = _evaluators_dir() / f"{normalised}.safetensors"
        if not weights.is_file():
            raise DataError(
                f"the shipped '{normalised}' evaluator is missing ({weights} does not exist; it has not been trained "
                "yet): train one and write it with save_classifier_evaluator, or use extractor 'inception'"
            )
        extractor = ClassifierExtractor.from_files(weights)
    elif is_evaluator_name(key) and (user_evaluators_dir() / f"{key}.safetensors").is_file():
        extractor = ClassifierExtractor.from_files(user_evaluators_dir() / f"{key}.safetensors")
    else:
        path = Path(key).expanduser()
        card = path.with_suffix(".json")
        if path.suffix == ".json" or (path.suffix == ".safetensors" and card.is_file()):
            extractor = ClassifierExtractor.from_files(path.with_suffix(".safetensors"), card)
        elif path.suffix == ".safetensors" and path.is_file():  # no card beside it: FID Inception weights?
            try:
                extractor = InceptionExtractor.from_file(path)
            except DataError as error:
                raise DataError(
                    f"{path} has no evaluator card {card.name} beside it and is not FID Inception weights ({error})"
                ) from None
        elif path.suffix in (".safetensors", ".pth", ".pt"):
            extractor = InceptionExtractor.from_file(path)
        else:
            raise ConfigError(
                f"unknown feature extractor '{key}'; use 'inception', "
                + ", ".join(f"'{n}'" for n in SHIPPED_EVALUATORS)
                + f", an evaluator exported into {user_evaluators_dir()} (genlab export-evaluator RUN NAME), "
                "a <name>.safetensors evaluator with its .json card, or a .pth file of FID Inception weights"
            )
    if device is not None:
        extractor.to(device)
    return extractor
