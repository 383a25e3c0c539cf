"""CLIP (Radford et al. 2021): an image tower and a text tower mapped into one embedding space.

    clip = CLIP(CLIPConfig(), text_encoder)
    logits = clip(images, captions)   # (N_images, N_captions) = scale * cos(image_i, caption_j)

The image tower is the project's small CNN (:class:`~genlab.models.classifier.Classifier`) whose
last linear layer is the image projection (``num_classes`` = the embedding width); the text tower
is any :mod:`genlab.text` encoder, whose pooled vector a linear map projects. The logit scale
1/tau is a learned parameter stored as log(1/tau), initialised at tau = 0.07 and clamped so that the
scale never exceeds 100 (section 2.5 of the paper: "to prevent scaling the logits by more than 100").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from genlab.errors import ConfigError
from genlab.models.classifier import Classifier, ClassifierConfig
from genlab.text.encoders import TextEncoder, TextEncoderConfig


@dataclass
class CLIPConfig:
    """Towers, embedding width and the temperature's start and bound."""

    image: ClassifierConfig = field(default_factory=lambda: ClassifierConfig(channels=(32, 64), feature_dim=256, dropout=0.0))
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    embed_dim: int = 128
    init_temperature: float = 0.07  # tau at initialisation (CLIP's value)
    max_logit_scale: float = 100.0  # the bound on 1/tau

    def __post_init__(self):
        if self.embed_dim < 1:
            raise ConfigError(f"model.clip.embed_dim must be >= 1, got {self.embed_dim}")
        if not self.init_temperature > 0:
            raise ConfigError(f"model.clip.init_temperature must be > 0, got {self.init_temperature}")
        if not self.max_logit_scale >= 1.0 / self.init_temperature:
            raise ConfigError(f"model.clip.max_logit_scale={self.max_logit_scale} must be >= 1 / init_temperature = {1 / self.init_temperature:.4g}")


class CLIP(nn.Module):
    """Image and text towers with normalised projections and a clamped learned logit scale."""

    def __init__(self, config: CLIPConfig, text_encoder: TextEncoder):
        super().__init__()
        self.config = config
        self.image_encoder = Classifier(dataclasses.replace(config.image, num_classes=config.embed_dim))  # head = projection
        self.text_encoder = text_encoder
        self.text_projection = nn.Linear(text_encoder.width, config.embed_dim, bias=False)
        nn.init.normal_(self.text_projection.weight, std=text_encoder.width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))

    def scale(self) -> torch.Tensor:
        """1 / tau = exp(logit_scale), clamped at max_logit_scale (no gradient past the bound)."""
        return self.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit embeddings (N, E) of [-1, 1] images (N, C, H, W)."""
        return F.normalize(self.image_encoder(images), dim=-1)

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """Unit embeddings (N, E) of captions."""
        pooled = self.text_encoder.encode(captions).pooled  # (N, D_text)
        return F.normalize(self.text_projection(pooled), dim=-1)

    def forward(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """Logits (N_images, N_captions): scale * cosine similarity."""
        return self.scale() * self.encode_image(images) @ self.encode_text(captions).T
