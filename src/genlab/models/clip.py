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
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genlab.errors import ConfigError, GenlabError
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


# CLIP evaluators: a JSON card (configuration, training command, scores, sha256) beside its safetensors weights,
# shipped in src/genlab/evaluators or exported by `genlab export-evaluator CLIP_RUN NAME` to the user's folder.


def clip_evaluator_card(name: str) -> Path | None:
    """The card of the CLIP evaluator ``name``: a shipped one first, then the user's own; None if neither."""
    from genlab.metrics.extractors import _evaluators_dir, user_evaluators_dir

    return next((d / f"{name}.json" for d in (_evaluators_dir(), user_evaluators_dir()) if (d / f"{name}.json").is_file()), None)


def clip_evaluator_choices() -> str:
    """What may name a CLIP evaluator, for error messages."""
    from genlab.metrics.extractors import _evaluators_dir

    shipped = sorted(p.stem for p in _evaluators_dir().glob("clip-*.json"))
    return f"a name exported with genlab export-evaluator, or one of {', '.join(shipped) or '(none shipped)'}"


def load_clip_evaluator(name: str, device: str | torch.device = "cpu") -> tuple[CLIP, str]:
    """(CLIP in eval mode, "name (sha256 ...)") of the evaluator ``name``."""
    card_path = clip_evaluator_card(name)
    if card_path is None:
        raise ConfigError(f"no CLIP evaluator {name!r}: give {clip_evaluator_choices()}")
    return load_clip_card(card_path, device)


def load_clip_card(card_path: Path, device: str | torch.device = "cpu") -> tuple[CLIP, str]:
    """A CLIP evaluator from its card and the weights beside it, after checking their sha256."""
    from safetensors.torch import load_file

    from genlab.config import from_dict
    from genlab.fileio import sha256_file
    from genlab.text.encoders import CORPUS_KINDS, build_text_encoder

    card = json.loads(card_path.read_text())
    if card.get("architecture") != "genlab.models.clip.CLIP":
        raise ConfigError(f"{card_path} is not a CLIP evaluator (architecture {card.get('architecture')!r})")
    weights = card_path.with_name(card["weights"])
    if sha256_file(weights) != card["sha256"]:
        raise GenlabError(f"{weights} does not match the sha256 in {card_path.name}; reinstall genlab or export it again")
    config = from_dict(CLIPConfig, card["config"])
    # The corpus only seeds a placeholder vocabulary: the saved tokenizer replaces it on loading.
    clip = CLIP(config, build_text_encoder(config.text, corpus=["a"] if config.text.kind in CORPUS_KINDS else ()))
    clip.load_state_dict(load_file(str(weights)))
    return clip.to(device).eval(), f"{card['name']} (sha256 {card['sha256'][:12]})"
