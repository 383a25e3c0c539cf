"""A loaded dataset held in memory as uint8, and the map between uint8 pixels and the model range.

Images are stored as uint8 (N, C, H, W): MNIST is 47 MB and CIFAR-10 150 MB that way, four times
less than float32. Models see floats in [-1, 1]: x = u / 127.5 - 1, the DDPM convention (Ho et al.
2020, section 3.3), whose inverse u = round((x + 1) * 127.5) gives back every uint8 value exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def to_model_range(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 pixels in [0, 255] -> floats in [-1, 1] (x = u / 127.5 - 1), on the same device."""
    if images.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects uint8 pixels, got {images.dtype}")
    return images.to(dtype) / 127.5 - 1.0


def from_model_range(x: Tensor) -> Tensor:
    """Floats in [-1, 1] -> uint8 pixels (u = round((x + 1) * 127.5)); out-of-range values are clipped."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


@dataclass
class ImageSet:
    """Images of one split of one source, as uint8 (N, C, H, W), with optional class labels."""

    images: Tensor  # (N, C, H, W) uint8
    labels: Tensor | None  # (N,) int64 class indices, or None when unlabelled
    class_names: list[str] | None  # class_names[k] names label k
    source: str  # e.g. "mnist", "folder:/photos"
    split: str  # e.g. "train", "test"
    origin: str | None = None  # the file or folder the images were read from (for protocols)
    # Paired data (paired:PATH, image-to-image translation): conditions[i] is the input image whose
    # target is images[i]; uint8 (N, C', H, W), same N, H, W as images, C' may differ from C.
    conditions: Tensor | None = None
    # Captioned data (SPEC DATA2): captions[i] holds one or more captions of image i, and
    # attributes[name] (N, ...) the values measured on the images that the captions state.
    captions: list[tuple[str, ...]] | None = None
    attributes: dict[str, Tensor] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"ImageSet.images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.conditions is not None:
            c = self.conditions
            if c.dtype != torch.uint8 or c.ndim != 4 or c.shape[0] != len(self.images) or c.shape[-2:] != self.images.shape[-2:]:
                raise ValueError(
                    f"ImageSet.conditions must be uint8 ({len(self.images)}, C', {self.images.shape[2]}, {self.images.shape[3]}) "
                    f"aligned with the images, got {c.dtype} {tuple(c.shape)}"
                )
        if self.captions is not None and len(self.captions) != len(self.images):
            raise ValueError(f"ImageSet.captions must hold one tuple per image ({len(self.images)}), got {len(self.captions)}")
        for name, values in (self.attributes or {}).items():
            if len(values) != len(self.images):
                raise ValueError(f"ImageSet.attributes[{name!r}] must have {len(self.images)} rows, got {len(values)}")
        if self.labels is not None:
            if self.labels.shape != (len(self.images),) or self.labels.dtype != torch.long:
                raise ValueError(f"ImageSet.labels must be int64 ({len(self.images)},), got {self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        """1 for grey, 3 for RGB."""
        return self.images.shape[1]

    @property
    def image_size(self) -> int | tuple[int, int]:
        """Side length for square images, else (height, width)."""
        h, w = self.images.shape[-2:]
        return h if h == w else (h, w)

    @property
    def num_classes(self) -> int:
        """Number of classes (0 when unlabelled)."""
        if self.class_names is not None:
            return len(self.class_names)
        if self.labels is not None and len(self.labels):
            return int(self.labels.max()) + 1
        return 0

    @property
    def info(self) -> dict:
        """What a model needs to know about the data: channels, image_size, num_classes, and provenance."""
        return {
            "source": self.source,
            "split": self.split,
            "n": len(self),
            "channels": self.channels,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
        }

    def to_model_range(self, idx: Tensor | slice | int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Images ``images[idx]`` (all when idx is None) as floats in [-1, 1]."""
        images = self.images if idx is None else self.images[idx]
        return to_model_range(images, dtype)

    def subset(self, idx: Tensor | slice) -> ImageSet:
        """A new ImageSet holding the examples ``idx`` (a slice, an index tensor or a boolean mask)."""
        return ImageSet(
            images=self.images[idx],
            labels=None if self.labels is None else self.labels[idx],
            class_names=self.class_names,
            source=self.source,
            split=self.split,
            origin=self.origin,
            conditions=None if self.conditions is None else self.conditions[idx],
            captions=None if self.captions is None else _take(self.captions, idx),
            attributes=None if self.attributes is None else {k: v[idx] for k, v in self.attributes.items()},
        )


def _take(items: list, idx: Tensor | slice) -> list:
    """``items[idx]`` for a Python list, with idx a slice, an index tensor or a boolean mask."""
    if isinstance(idx, slice):
        return items[idx]
    idx = torch.as_tensor(idx)
    if idx.dtype == torch.bool:
        idx = idx.nonzero().flatten()
    return [items[i] for i in idx.tolist()]
