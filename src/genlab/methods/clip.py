"""CLIP training (SPEC M2): symmetric InfoNCE on captioned images, zero-shot classification, retrieval.

    genlab train clip --data mnist-captions --preset small
    genlab zero-shot RUN --data mnist:test --prompts "a photo of the digit {}"
    genlab retrieve RUN --data mnist-pairs:test --gallery 100

Each training step pairs every image with one of its captions (drawn through the step context, so a
resumed run sees the same captions) and minimises the mean of the image->text and text->image
cross-entropies of the (N, N) similarity logits, whose diagonal holds the matching pairs (Radford et
al. 2021, Figure 3; van den Oord et al. 2018 for InfoNCE). Random translations by up to
``max_shift`` pixels augment the images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from genlab.errors import ConfigError
from genlab.methods.base import DataInfo, Method
from genlab.methods.classifier import random_shift
from genlab.models.clip import CLIP, CLIPConfig
from genlab.text.encoders import CORPUS_KINDS, build_text_encoder


def info_nce(logits: torch.Tensor, hard_negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of (N, N) image x text logits whose diagonal holds the positive pairs.

    The mean of the image->text and text->image cross-entropies. ``hard_negatives`` (N, K) are
    logits of image i against K captions written to be wrong for it (-inf where there is none):
    they join image i's softmax over captions only (NegCLIP, Yuksekgonul et al. 2023, section 4),
    since they describe no image of the batch. Without them this is CLIP's loss.
    """
    targets = torch.arange(len(logits), device=logits.device)
    image_rows = logits if hard_negatives is None else torch.cat([logits, hard_negatives], 1)  # (N, N + K)
    return 0.5 * (F.cross_entropy(image_rows, targets) + F.cross_entropy(logits.T, targets))


@dataclass
class CLIPMethodConfig:
    """The CLIP model and its augmentation. ``clip.image.in_channels`` / ``image_size`` come from the data."""

    clip: CLIPConfig = field(default_factory=CLIPConfig)
    max_shift: int = 2  # random translation of each training image by -max_shift..max_shift pixels per axis
    # "swap_digits": each caption with two different digits also enters the batch with them exchanged, as a
    # negative of its image (word order matters: "3 left of 8" is not "8 left of 3"); "none": plain CLIP.
    hard_negatives: Literal["none", "swap_digits"] = "none"

    def __post_init__(self):
        if self.max_shift < 0:
            raise ConfigError(f"model.max_shift must be >= 0 pixels, got {self.max_shift}")
        if self.hard_negatives not in ("none", "swap_digits"):
            raise ConfigError(f"model.hard_negatives must be 'none' or 'swap_digits', got {self.hard_negatives!r}")


def training_corpus(source: str | None) -> list[str]:
    """Texts the tokenizer of a run on ``source`` is trained on (built-in templates, or a folder's captions)."""
    from genlab.data.captions import caption_corpus, folder_caption_texts

    if source and source.startswith("folder:"):
        return folder_caption_texts(source[len("folder:"):])
    corpus = caption_corpus(source or "")
    if len(corpus) <= 1:
        raise ConfigError(f"{source!r} has no captions, and a text encoder's tokenizer is trained on them; use mnist-captions, "
                          "fashion-mnist-captions, cifar10-captions, mnist-pairs or folder:PATH with captions")
    return corpus


class CLIPMethod(Method):
    """Contrastive language-image pre-training on captioned data."""

    name = "clip"
    Config = CLIPMethodConfig
    default_source = "mnist-captions"

    def __init__(self, config: CLIPMethodConfig, data_info: DataInfo):
        super().__init__(config, data_info)
        if config.max_shift >= data_info.image_size:
            raise ConfigError(f"model.max_shift={config.max_shift} must be smaller than the image size {data_info.image_size}")
        clip_config = dataclasses.replace(
            config.clip, image=dataclasses.replace(config.clip.image, in_channels=data_info.channels, image_size=data_info.image_size)
        )
        corpus = training_corpus(data_info.source) if clip_config.text.kind in CORPUS_KINDS else []
        self.clip = CLIP(clip_config, build_text_encoder(clip_config.text, corpus))

    def ema_targets(self) -> dict[str, torch.nn.Module]:
        """The whole model, or, with a frozen text encoder (minilm: 22.7M constant weights), the trained parts only.

        Without the frozen encoder the logit scale (a scalar) is used as trained, not averaged.
        """
        if any(p.requires_grad for p in self.clip.text_encoder.parameters()):
            return {"clip": self.clip}
        return {"image_encoder": self.clip.image_encoder, "text_projection": self.clip.text_projection}

    def training_step(self, batch: dict[str, Any], ctx) -> dict[str, torch.Tensor]:
        """Symmetric InfoNCE on the batch with one caption per image; logs loss, accuracy and the scale."""
        if "captions" not in batch:
            raise ConfigError("the clip method needs captioned data (mnist-captions, fashion-mnist-captions, cifar10-captions, "
                              "mnist-pairs, or folder:PATH with captions)")
        images, options = batch["image"], batch["captions"]  # (n, C, H, W), n tuples of captions
        pick = ctx.randint(0, 1 << 30).tolist()  # (n,) which caption of each image
        captions = [caps[k % len(caps)] for caps, k in zip(options, pick)]
        s = self.config.max_shift
        if s > 0:
            images = random_shift(images, ctx.randint(-s, s + 1), ctx.randint(-s, s + 1))
        logits, hard = self._logits(images, captions)  # (n, n), (n, 1) or None
        loss = info_nce(logits, hard)
        ctx.optimize(loss)
        accuracy = (logits.detach().argmax(1) == torch.arange(len(logits), device=logits.device)).float().mean()
        return {"loss": loss.detach(), "accuracy": accuracy, "logit_scale": self.clip.scale().detach()}

    def _logits(self, images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Batch logits (n, n) and, with ``hard_negatives``, each image's logit against its swapped caption (n, 1).

        The swapped caption is a negative of its own image only: for another image of the batch it
        might be the right description.
        """
        if self.config.hard_negatives == "none":
            return self.clip(images, captions), None
        from genlab.data.captions import swap_digits

        swapped = [swap_digits(c) for c in captions]
        rows = [i for i, c in enumerate(swapped) if c is not None]
        image_emb = self.clip.encode_image(images)  # (n, E)
        text_emb = self.clip.encode_text(captions + [swapped[i] for i in rows])  # (n + m, E)
        scale, n = self.clip.scale(), len(captions)
        hard = torch.full((n, 1), float("-inf"), device=image_emb.device)
        hard[rows, 0] = scale * (image_emb[rows] * text_emb[n:]).sum(-1)  # (m,)
        return scale * image_emb @ text_emb[:n].T, hard

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, **options: Any) -> torch.Tensor:
        raise ConfigError("a clip run does not generate images; use genlab zero-shot / retrieve, or it as a CLIP evaluator")


@torch.no_grad()
def embed_images(clip: CLIP, images_u8: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Unit image embeddings (N, E) of uint8 images (N, C, H, W), fitted to the model's input size."""
    from genlab.data import to_model_range
    from genlab.data.transforms import convert_channels, fit_size

    cfg = clip.image_encoder.config
    if images_u8.shape[-1] != cfg.image_size or images_u8.shape[-2] != cfg.image_size:
        images_u8 = fit_size(images_u8, cfg.image_size, "resize")
    images_u8 = convert_channels(images_u8, cfg.in_channels)
    device = next(clip.parameters()).device
    return torch.cat([clip.encode_image(to_model_range(x).to(device)).cpu() for x in images_u8.split(batch_size)])


@torch.no_grad()
def embed_texts(clip: CLIP, texts: Sequence[str], batch_size: int = 500) -> torch.Tensor:
    """Unit text embeddings (N, E)."""
    texts = list(texts)
    return torch.cat([clip.encode_text(texts[i: i + batch_size]).cpu() for i in range(0, len(texts), batch_size)])


@torch.no_grad()
def class_embeddings(clip: CLIP, class_words: Sequence[Sequence[str]], prompts: Sequence[str]) -> torch.Tensor:
    """One unit embedding per class (K, E): the normalised mean over prompts x words (prompt ensembling, CLIP 3.1.4)."""
    if not prompts or any("{}" not in p for p in prompts):
        raise ConfigError(f"every prompt needs a {{}} where the class name goes, got {list(prompts)}")
    rows = []
    for words in class_words:
        texts = [p.replace("{}", w) for p in prompts for w in words]
        rows.append(F.normalize(embed_texts(clip, texts).mean(0), dim=-1))
    return torch.stack(rows)


def zero_shot_predict(image_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """The class (N,) whose embedding is most similar to each image's."""
    return (image_emb @ class_emb.T).argmax(1)
