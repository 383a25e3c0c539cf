"""SDXL micro-conditions (Podell et al. 2023, sec. 2.2): the augmentations that record them and the
vector a denoiser is conditioned on.

SDXL trains on images that were up-scaled from a smaller original, or randomly cropped, and tells
the network how: the original size (h, w), the crop's top-left corner (top, left) and the target
size (h, w) are six scalars per image (``MICRO_CONDITIONS``), Fourier-embedded and added to the
time embedding (:class:`genlab.nn.embeddings.MicroConditionEmbedder`). The model then learns what
blur and what cut-off objects belong to which condition, and at sampling one asks for a sharp,
whole, centred object with original size = target size and crop = (0, 0), or reproduces a crop by
asking for it.

Our images are small and already centred, so the two augmentations make the situations SDXL meets
in web data:

- ``data.random_shift = S``: the image is padded by S pixels of background (-1, black) and a
  window of its own size is cut at offset (top, left), each uniform in [-S, S]; (0, 0) is the image
  itself, a positive top cuts the object's top off (the window starts below the image's top edge).
- ``data.min_original_size = m``: the image is shrunk to a random original size s in [m, H]
  (antialiased) and up-scaled back (bilinear), the blurry up-scaled small images of sec. 2.2.

Multi-aspect data (``data.fit=buckets``, :mod:`genlab.data.buckets`) records each image's native
size as the original size and its bucket as the target size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from genlab.errors import ConfigError

# The six micro-conditions, in the order of the vector (SDXL's c_size, c_crop and target size).
MICRO_CONDITIONS = ("original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width")
BACKGROUND = -1.0  # model-range value of the padding: black, the background of digits and of data.fit=pad


def micro_vector(n: int, target: tuple[int, int], original: tuple[int, int] | None = None,
                 crop: tuple[int, int] = (0, 0)) -> Tensor:
    """The micro-conditions (n, 6) of n images: original size (default: the target), crop, target size."""
    th, tw = target
    oh, ow = original if original is not None else target
    top, left = crop
    return torch.tensor([oh, ow, top, left, th, tw], dtype=torch.float32).expand(n, -1).clone()


def parse_crop(text: str) -> tuple[int, int]:
    """--crop TOP,LEFT -> (top, left) integers."""
    try:
        top, left = (int(v) for v in str(text).split(","))
    except ValueError:
        raise ConfigError(f"--crop {text!r}: give the crop's top-left corner as TOP,LEFT in pixels, e.g. 0,0") from None
    return top, left


def parse_size(text: str | int) -> tuple[int, int]:
    """--original-size / --target-size: N (square) or HxW -> (h, w) positive integers."""
    try:
        parts = [int(v) for v in str(text).lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise ConfigError(f"size {text!r}: give N (square) or HxW in pixels, e.g. 28 or 20x40")
    return parts[0], parts[1]


def shift_crop(images: Tensor, top: Tensor, left: Tensor, max_shift: int) -> Tensor:
    """Cut an H x W window at (top, left) (n,) long, each in [-max_shift, max_shift], out of every image
    padded by max_shift pixels of background: (n, C, H, W) -> (n, C, H, W)."""
    _, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=BACKGROUND)  # (n, C, H + 2S, W + 2S)
    rows = [padded[i, :, max_shift + int(y): max_shift + int(y) + h, max_shift + int(x): max_shift + int(x) + w]
            for i, (y, x) in enumerate(zip(top.tolist(), left.tolist()))]
    return torch.stack(rows)


def upscale_from(images: Tensor, original: Tensor) -> Tensor:
    """Each image shrunk to its original size (n, 2) (antialiased bilinear) and up-scaled back (bilinear)."""
    out = images.clone()
    _, _, h, w = images.shape
    for size in {tuple(s) for s in original.tolist()}:
        if size == (h, w):
            continue
        rows = (original == torch.tensor(size)).all(1)
        small = F.interpolate(images[rows], size=size, mode="bilinear", antialias=True, align_corners=False)
        out[rows] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return out


def micro_augment(images: Tensor, uniforms: Tensor, max_shift: int = 0, min_original_size: int | None = None,
                  original: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Augment images (n, C, H, W) in [-1, 1] and record how: (images, micro-conditions (n, 6)).

    ``uniforms`` (n, 3) in [0, 1) are the random draws (the trainer's, so runs are reproducible): the
    original size's, then the crop's top and left. ``original`` (n, 2): the images' native sizes
    (default H x W); a random shrink scales them by s / H.
    """
    n, _, h, w = images.shape
    if original is None:
        original = torch.tensor([h, w]).expand(n, -1)
    original = original.to(torch.long).clone()
    if min_original_size is not None:
        if not 1 <= min_original_size <= min(h, w):
            raise ConfigError(f"data.min_original_size={min_original_size} must be between 1 and the image size {min(h, w)}")
        s = min_original_size + (uniforms[:, 0] * (min(h, w) - min_original_size + 1)).long().clamp(max=min(h, w) - min_original_size)
        size = torch.stack([(s * h + min(h, w) // 2) // min(h, w), (s * w + min(h, w) // 2) // min(h, w)], 1)  # (n, 2)
        images = upscale_from(images, size)
        original = (original * size + torch.tensor([h, w]) // 2) // torch.tensor([h, w])  # the native size shrunk alike
    top = torch.zeros(n, dtype=torch.long)
    left = torch.zeros(n, dtype=torch.long)
    if max_shift:
        top = (uniforms[:, 1] * (2 * max_shift + 1)).long().clamp(max=2 * max_shift) - max_shift
        left = (uniforms[:, 2] * (2 * max_shift + 1)).long().clamp(max=2 * max_shift) - max_shift
        images = shift_crop(images, top, left, max_shift)
    micro = torch.stack([original[:, 0], original[:, 1], top, left,
                         torch.full((n,), h), torch.full((n,), w)], 1).float()  # (n, 6)
    return images, micro
