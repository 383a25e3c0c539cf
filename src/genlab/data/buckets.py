"""Multi-aspect training data (SDXL, Podell et al. 2023, sec. 2.3): images bucketed by aspect ratio.

``data.fit=buckets`` with ``data.image_size=N`` and a ``folder:PATH`` source: every image goes to the
bucket whose aspect ratio (width / height) is nearest its own (on a log scale, so 1:2 and 2:1 are
equally far from 1:1) and is resized to that bucket's size. Buckets have about N x N pixels, sides
multiples of ``BUCKET_MULTIPLE`` (what a 2x2 pixel patch and one U-Net downsampling need), e.g. for
N = 28: 40x20, 32x24, 28x28, 24x32, 20x40 (height x width). A training batch is drawn from one bucket
(:meth:`BucketedImageSet.epoch_order`), so its images share one shape, and the micro-conditions
record the image's native size as its original size and the bucket as the target size
(:mod:`genlab.data.micro`); at sampling ``--target-size HxW`` asks for a bucket's shape.

Images are stored on one canvas of the largest height and width, top-left aligned; the trainer cuts
each batch to its bucket (:meth:`BucketedImageSet.bucket_shape`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from genlab.data.folder import ImageTree, decode_image
from genlab.data.imageset import ImageSet
from genlab.errors import DataError

ASPECTS = (1 / 2, 3 / 4, 1.0, 4 / 3, 2.0)  # width / height of the buckets
BUCKET_MULTIPLE = 4


def bucket_sizes(image_size: int, aspects: tuple[float, ...] = ASPECTS, multiple: int = BUCKET_MULTIPLE
                 ) -> list[tuple[int, int]]:
    """(height, width) of each aspect's bucket: about image_size^2 pixels, sides rounded to ``multiple``."""
    out = []
    for a in aspects:
        h = max(multiple, round(image_size / math.sqrt(a) / multiple) * multiple)
        w = max(multiple, round(image_size * math.sqrt(a) / multiple) * multiple)
        out.append((image_size, image_size) if a == 1 else (h, w))
    return out


def bucket_of(height: int, width: int, buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest width / height, on a log scale."""
    aspect = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - aspect))


@dataclass
class BucketedImageSet(ImageSet):
    """An ImageSet of mixed aspect ratios: images on a common canvas, each with its bucket's size."""

    sizes: Tensor | None = None  # (N, 2) long: (height, width) of each image's bucket
    original_sizes: Tensor | None = None  # (N, 2) long: each image's native (height, width)
    base_size: int = 0  # data.image_size: the square bucket, and what the model's sizes derive from

    @property
    def image_size(self) -> int:
        """The square bucket's side (the networks are sized for it; every bucket has about its area)."""
        return self.base_size

    def bucket_shape(self, idx: Tensor) -> tuple[int, int]:
        """(height, width) of a batch's bucket; the batch must be from one bucket."""
        shapes = {tuple(s) for s in self.sizes[idx].tolist()}
        if len(shapes) != 1:
            raise DataError(f"a batch mixes aspect buckets {sorted(shapes)}: draw batches with epoch_order")
        return shapes.pop()

    def epoch_order(self, generator: torch.Generator, batch: int) -> Tensor:
        """A shuffled order of image indices whose consecutive chunks of ``batch`` are each one bucket.

        Each bucket is shuffled and cut into chunks; a bucket's last, partial chunk is completed with
        other images of the same bucket (redrawn), so no image is skipped; the chunks are shuffled.
        """
        chunks = []
        for size in sorted({tuple(s) for s in self.sizes.tolist()}):
            members = (self.sizes == torch.tensor(size)).all(1).nonzero().flatten()
            members = members[torch.randperm(len(members), generator=generator)]
            short = -len(members) % batch
            if short:
                members = torch.cat([members, members[torch.randint(len(members), (short,), generator=generator)]])
            chunks.extend(members.split(batch))
        order = torch.randperm(len(chunks), generator=generator)
        return torch.cat([chunks[i] for i in order.tolist()])


def load_buckets(tree: ImageTree, paths: list[str], labels: list[int] | None, class_names: list[str] | None,
                 image_size: int | None, source: str, split: str) -> BucketedImageSet:
    """Decode the images of a folder at their native sizes and fit each to its aspect bucket."""
    if image_size is None:
        raise DataError("data.fit=buckets needs data.image_size=N: the buckets have about N x N pixels")
    buckets = bucket_sizes(image_size)
    canvas_h, canvas_w = max(h for h, _ in buckets), max(w for _, w in buckets)
    fitted, sizes, originals = [], [], []
    for relpath in paths:
        pixels = decode_image(tree.read(relpath), f"{tree.origin}/{relpath}")  # (H, W, C) uint8
        h, w = pixels.shape[:2]
        bh, bw = buckets[bucket_of(h, w, buckets)]
        chw = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]  # (1, C, H, W)
        chw = torch.nn.functional.interpolate(chw, size=(bh, bw), mode="bilinear", antialias=True, align_corners=False) \
            if (h, w) != (bh, bw) else chw
        fitted.append(chw[0])
        sizes.append((bh, bw))
        originals.append((h, w))
    channels = max(f.shape[0] for f in fitted)
    images = torch.zeros(len(fitted), channels, canvas_h, canvas_w, dtype=torch.uint8)
    for i, f in enumerate(fitted):
        images[i, :, : f.shape[1], : f.shape[2]] = f.expand(channels, -1, -1)  # grey repeated to RGB when mixed
    return BucketedImageSet(images, None if labels is None else torch.tensor(labels, dtype=torch.long), class_names,
                            source, split, tree.origin, sizes=torch.tensor(sizes), original_sizes=torch.tensor(originals),
                            base_size=image_size)


__all__ = ["ASPECTS", "BUCKET_MULTIPLE", "BucketedImageSet", "bucket_of", "bucket_sizes", "load_buckets"]
