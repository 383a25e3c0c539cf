"""The project's own evaluator classifier: a small CNN for 28x28 grey or 32x32 colour images.

It is the offline feature extractor for FID/KID/PR on MNIST and Fashion-MNIST (where Inception's
ImageNet features say little) and the judge of class-conditional samples (SPEC E1, E4).

Layout, with the default :class:`ClassifierConfig` (``channels=(32, 64)``)::

    [-1, 1] image (N, C, S, S)
    stage 1: conv3x3(32)-BN-ReLU, conv3x3(32)-BN-ReLU, max-pool 2      -> (N, 32, S/2, S/2)
    stage 2: conv3x3(64)-BN-ReLU, conv3x3(64)-BN-ReLU, max-pool 2      -> (N, 64, S/4, S/4)
    adaptive average pool to 4x4, flatten                              -> (N, 1024)
    feature: linear(128)-ReLU                                          -> (N, 128)   = features(x)
    dropout, head: linear(num_classes)                                 -> (N, 10)    = forward(x)

The feature layer is the ReLU output of the 128-unit linear layer, i.e. the input of the last
linear layer (dropout is the identity in eval mode): ``forward(x) == head(features(x))``. The
adaptive pool makes the same weights shapes work for 28 and 32 px inputs. With one input channel
the network has 197,674 parameters (0.79 MB as float32); with three, 198,250.

Two options serve the CIFAR-10 evaluator (a fast-training recipe after Page 2018 and Jordan 2024, airbench):

- ``stage_order="conv-pool-conv"``: each stage is conv3x3(c)-BN-ReLU, max-pool 2, conv3x3(c)-BN-ReLU, so
  the second convolution runs at half the resolution: about half the FLOPs of "conv-conv-pool" for the
  same widths and weights shapes (measured 2x faster per training step on one CPU thread).
- ``flip_average=True``: in eval mode, ``features(x)`` is the mean of the features of x and of its
  mirror image (flip test-time augmentation). The head is linear, so the logits are the mean logits
  too, and every metric built on these features is invariant to horizontal flips. Training (train
  mode) sees single images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from genlab.errors import ConfigError, DataError

__all__ = ["ClassifierConfig", "Classifier"]


@dataclass
class ClassifierConfig:
    """Shape of the evaluator classifier."""

    in_channels: int = 1  # 1 for MNIST / Fashion-MNIST, 3 for CIFAR-10
    image_size: int = 28  # the size it is trained on; extractors resize inputs to it
    num_classes: int = 10
    channels: tuple[int, ...] = (32, 64)  # per stage: two conv3x3-BN-ReLU and a 2x2 max-pool (see stage_order)
    pooled_size: int = 4  # side of the adaptive average pool before the feature layer
    feature_dim: int = 128  # width of the penultimate (feature) layer
    dropout: float = 0.3  # on the features, before the last linear layer (training only)
    stage_order: Literal["conv-conv-pool", "conv-pool-conv"] = "conv-conv-pool"  # where each stage's max-pool sits
    flip_average: bool = False  # eval mode: features averaged over the image and its mirror (flip TTA)

    def __post_init__(self):
        if self.in_channels not in (1, 3):
            raise ConfigError(f"classifier in_channels must be 1 or 3, got {self.in_channels}")
        for name in ("num_classes", "feature_dim", "pooled_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"classifier {name} must be >= 1, got {getattr(self, name)}")
        if not self.channels or any(c < 1 for c in self.channels):
            raise ConfigError(f"classifier channels must be positive widths, got {self.channels}")
        self.channels = tuple(self.channels)
        smallest = self.pooled_size * 2 ** len(self.channels)
        if self.image_size < smallest:
            raise ConfigError(
                f"classifier image_size {self.image_size} is too small for {len(self.channels)} pooling stages "
                f"and pooled_size {self.pooled_size}; use image_size >= {smallest}"
            )
        if self.stage_order not in ("conv-conv-pool", "conv-pool-conv"):
            raise ConfigError(f"classifier stage_order must be 'conv-conv-pool' or 'conv-pool-conv', got {self.stage_order!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"classifier dropout must be in [0, 1), got {self.dropout}")


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 'same' convolution, BatchNorm, ReLU (the conv bias is redundant before BatchNorm)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class Classifier(nn.Module):
    """Small CNN classifier; ``forward`` gives logits, ``features`` the penultimate layer."""

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else ClassifierConfig()
        stages, width = [], config.in_channels
        for out in config.channels:
            if config.stage_order == "conv-pool-conv":
                stages += [_conv_bn_relu(width, out), nn.MaxPool2d(2), _conv_bn_relu(out, out)]
            else:
                stages += [_conv_bn_relu(width, out), _conv_bn_relu(out, out), nn.MaxPool2d(2)]
            width = out
        self.body = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(config.pooled_size), nn.Flatten())
        self.feature = nn.Sequential(nn.Linear(width * config.pooled_size**2, config.feature_dim), nn.ReLU())
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    @property
    def feature_dim(self) -> int:
        """Width D of :meth:`features`."""
        return self.config.feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, feature_dim) of [-1, 1] images (N, in_channels, H, W)."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise DataError(
                f"classifier expects images (N, {self.config.in_channels}, H, W), got shape {tuple(x.shape)}"
            )
        if self.config.flip_average and not self.training:
            both = self.feature(self.body(torch.cat([x, x.flip(-1)])))  # (2N, feature_dim)
            return 0.5 * (both[: len(x)] + both[len(x):])  # (N, feature_dim)
        h = self.body(x)  # (N, channels[-1] * pooled_size**2)
        return self.feature(h)  # (N, feature_dim)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes) from :meth:`features` (the last linear layer)."""
        return self.head(self.dropout(features))  # (N, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes) of [-1, 1] images (N, in_channels, H, W)."""
        return self.logits_from_features(self.features(x))
