"""Image classifier trained with cross-entropy: the project's own evaluators for FID/KID/PR on MNIST-like data (SPEC E1).

Not a generative model: the same trainer, configs, checkpoints and EMA train it, and
``genlab export-evaluator RUN NAME`` turns a finished run into an evaluator (``NAME.safetensors``
plus its JSON card in ``$GENLAB_CACHE/evaluators``) that ``genlab eval --extractor NAME`` uses.

Augmentation is a random translation by up to ``max_shift`` pixels (the canvas border fills with
black, -1, or, with ``shift_padding: reflect``, with the mirrored image: the padded random crop of
CIFAR training recipes), drawn per image through the trainer's step context so that a resumed run
sees exactly the same shifts. Random horizontal flips (useful for Fashion-MNIST and CIFAR-10, wrong
for digits) are the data section's ``data.hflip``.

``optimizer: sgd`` (with ``momentum`` and ``nesterov``) gives the SGD-Nesterov recipe of fast CIFAR-10
training (Page 2018; Jordan 2024, airbench); ``train.weight_decay`` is then SGD's L2 penalty.
``channels_last`` keeps the network and its inputs in NHWC memory layout, oneDNN's fast layout on
CPUs (measured 1.6x faster per step for the CIFAR-10 evaluator on one thread); the values are the same.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from genlab.errors import ConfigError
from genlab.methods.base import DataInfo, Method, OptimizerSpec
from genlab.models.classifier import Classifier, ClassifierConfig


@dataclass
class ClassifierMethodConfig:
    """A classifier network and how it is trained.

    ``net.in_channels``, ``net.image_size`` and ``net.num_classes`` are taken from the training data
    (the values written here are replaced); the other ``net`` fields shape the network.
    """

    net: ClassifierConfig = field(default_factory=ClassifierConfig)
    label_smoothing: float = 0.0  # Szegedy et al. 2016: target 1 - s on the label, s / C spread over all classes
    max_shift: int = 0  # random translation of each training image by -max_shift..max_shift pixels per axis
    shift_padding: Literal["constant", "reflect"] = "constant"  # what fills the uncovered border: black (-1) or the mirror
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = 0.9  # SGD only
    nesterov: bool = True  # SGD only
    channels_last: bool = False  # NHWC memory layout for the network and its inputs (faster convolutions on CPU)

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"model.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.max_shift < 0:
            raise ConfigError(f"model.max_shift must be >= 0 pixels, got {self.max_shift}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"model.momentum must be in [0, 1), got {self.momentum}")
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise ConfigError("model.nesterov needs model.momentum > 0; set model.momentum=0.9 or model.nesterov=false")


def random_shift(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, fill: float = -1.0,
                 padding: str = "constant") -> torch.Tensor:
    """Translate each image (N, C, H, W) by integer (dy[i], dx[i]) pixels; uncovered pixels become ``fill``.

    ``out[i, :, y, x] = images[i, :, y - dy[i], x - dx[i]]`` where that pixel exists, else ``fill``;
    with ``padding="reflect"`` an uncovered pixel is the image's mirror across its border instead
    (row -1 is row 1, row H is row H - 2): a random crop of the reflect-padded image.
    """
    n, c, h, w = images.shape
    pad = int(max(dy.abs().max(), dx.abs().max())) if n else 0
    if pad == 0:
        return images
    if padding == "reflect":
        padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")  # (N, C, H + 2p, W + 2p)
    else:
        padded = F.pad(images, (pad, pad, pad, pad), value=fill)
    rows = torch.arange(h, device=images.device)[None, :] + pad - dy[:, None].to(images.device)  # (N, H)
    cols = torch.arange(w, device=images.device)[None, :] + pad - dx[:, None].to(images.device)  # (N, W)
    batch = torch.arange(n, device=images.device)[:, None, None]  # (N, 1, 1)
    # Advanced indexing over (batch, row, col) moves the channel axis last: (N, H, W, C).
    shifted = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return shifted.permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)


class ClassifierMethod(Method):
    """Supervised classification with cross-entropy; its network becomes a feature extractor."""

    name = "classifier"
    Config = ClassifierMethodConfig

    def __init__(self, config: ClassifierMethodConfig, data_info: DataInfo):
        super().__init__(config, data_info)
        if not data_info.num_classes:
            raise ConfigError("the classifier method needs a labelled data source (e.g. mnist, fashion-mnist, digits)")
        if config.max_shift >= data_info.image_size:
            raise ConfigError(f"model.max_shift={config.max_shift} must be smaller than the image size {data_info.image_size}")
        net_config = dataclasses.replace(
            config.net,
            in_channels=data_info.channels,
            image_size=data_info.image_size,
            num_classes=data_info.num_classes,
        )
        self.net = Classifier(net_config)
        if config.channels_last:
            self.net.to(memory_format=torch.channels_last)

    def optimizer_groups(self) -> dict[str, list[torch.nn.Parameter] | OptimizerSpec]:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.config.optimizer == "sgd":
            return {"main": OptimizerSpec(params, kind="sgd", momentum=self.config.momentum, nesterov=self.config.nesterov)}
        return {"main": params}

    def ema_targets(self) -> dict[str, torch.nn.Module]:
        return {"net": self.net}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes) of [-1, 1] images (N, C, H, W)."""
        return self.net(images)

    def training_step(self, batch: dict[str, torch.Tensor], ctx) -> dict[str, torch.Tensor]:
        """Cross-entropy on (optionally shifted) images; logs the loss and the batch accuracy."""
        images, labels = batch["image"], batch["label"]  # (n, C, H, W), (n,)
        s = self.config.max_shift
        if s > 0:
            dy, dx = ctx.randint(-s, s + 1), ctx.randint(-s, s + 1)  # (n,) each
            images = random_shift(images, dy, dx, padding=self.config.shift_padding)
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = self.net(images)  # (n, num_classes)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.config.label_smoothing)
        ctx.optimize(loss)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return {"loss": loss.detach(), "accuracy": accuracy}

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, **options: Any) -> torch.Tensor:
        """Not available: a classifier does not generate images."""
        raise ConfigError("the classifier method does not generate images; export it as an evaluator "
                          "(genlab export-evaluator RUN NAME) or sample from a generative run")
