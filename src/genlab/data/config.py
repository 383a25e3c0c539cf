"""The data section of a run's configuration, and where data and decoded caches live on disk."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from genlab.errors import ConfigError
from genlab.fileio import resolve_cache_dir  # noqa: F401  (re-exported: genlab.data.resolve_cache_dir)
from genlab.ranges import PositiveInt

FITS = ("resize", "pad", "center-crop", "buckets")


@dataclass
class DataConfig:
    """Where training images come from and how they are shaped (SPEC DATA1)."""

    source: str = "mnist5k"  # a name from `genlab data list`, or folder:PATH
    root: str | None = None  # data root for mnist / fashion-mnist / cifar10; None: $GENLAB_DATA
    split: str = "train"  # which split of the source to train on
    image_size: PositiveInt | None = None  # pixels of the square images trained on; None: the source's native size
    # how images reach image_size; buckets: folder images of mixed aspect ratios keep theirs (genlab.data.buckets)
    fit: Literal["resize", "pad", "center-crop", "buckets"] = "resize"
    channels: Literal[1, 3] | None = None  # None: native; 1 <-> 3 converts grey <-> RGB
    # Keep only the examples of these class indices (before ``limit``): a base that never saw a class,
    # a few images of one class (Textual Inversion, DreamBooth). None: every class.
    classes: tuple[int, ...] | None = None
    # Captions that never name these classes (genlab.data.captions.UNNAMED_WORDS): "the digit 7, written with a
    # heavy stroke" reads "a digit, written with a heavy stroke". A base that saw the class but has no word for it.
    unnamed_classes: tuple[int, ...] | None = None
    # With unnamed_classes: the share of every OTHER image's captions also written without its class name, so
    # the general word ("a digit") does not come to mean the unnamed class (at 0 it does: only 7s are "a digit").
    generic_share: float = 0.5
    limit: PositiveInt | None = None  # use only the first N examples (quick runs, tests)
    hflip: bool = False  # random horizontal flips; carried here, applied by the trainer
    # SDXL micro-conditioning augmentations (genlab.data.micro), applied by the trainer, which records
    # them in batch["micro"]: random crops shifted by up to this many pixels, and small originals
    # up-scaled (each image shrunk to a random size in [min_original_size, image_size] and back).
    random_shift: int = 0
    min_original_size: PositiveInt | None = None

    def __post_init__(self) -> None:
        if self.image_size is not None and (isinstance(self.image_size, bool) or self.image_size < 1):
            raise ConfigError(f"data.image_size must be a positive integer or None, got {self.image_size!r}")
        if self.fit not in FITS:
            raise ConfigError(f"data.fit must be one of {', '.join(FITS)}, got {self.fit!r}")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"data.channels must be 1 (grey), 3 (RGB) or None (native), got {self.channels!r}")
        if isinstance(self.random_shift, bool) or not isinstance(self.random_shift, int) or self.random_shift < 0:
            raise ConfigError(f"data.random_shift must be a number of pixels >= 0 (0: no random crops), got {self.random_shift!r}")
        if self.classes is not None and (not self.classes or any(isinstance(k, bool) or k < 0 for k in self.classes)):
            raise ConfigError(f"data.classes must be a non-empty list of class indices >= 0 (or None: all), got {list(self.classes)}")
        if self.unnamed_classes is not None and (not self.unnamed_classes or any(isinstance(k, bool) or k < 0 for k in self.unnamed_classes)):
            raise ConfigError(f"data.unnamed_classes must be a non-empty list of class indices >= 0 (or None: all named), got {list(self.unnamed_classes)}")
        if isinstance(self.generic_share, bool) or not 0.0 <= self.generic_share <= 1.0:
            raise ConfigError(f"data.generic_share must be a share in [0, 1] of the named images' captions, got {self.generic_share!r}")
        if self.limit is not None and (isinstance(self.limit, bool) or self.limit < 1):
            raise ConfigError(f"data.limit must be a positive integer or None (all examples), got {self.limit!r}")


def resolve_data_root(root: str | os.PathLike | None = None) -> Path | None:
    """The data root: the argument, else the environment variable GENLAB_DATA, else None."""
    if root is None or str(root) == "":
        root = os.environ.get("GENLAB_DATA") or None
    return None if root is None else Path(root).expanduser()


