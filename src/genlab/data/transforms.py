"""Deterministic pixel transforms on uint8 batches: size fitting, grey <-> RGB conversion, grey dilation.

All functions take and return uint8 tensors (N, C, H, W) and keep their device. Augmentation
(random flips) belongs to the trainer, not here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from genlab.errors import ConfigError

# ITU-R BT.601 luma weights in 16-bit fixed point, L = (19595 R + 38470 G + 7471 B + 2^15) >> 16,
# the same integer arithmetic as Pillow's convert("L"), so grey images match PIL exactly.
_LUMA_WEIGHTS = (19595, 38470, 7471)


def resize(images: Tensor, size: int) -> Tensor:
    """Resize to size x size with antialiased bilinear interpolation (PIL's BILINEAR filter)."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    # torch's uint8 antialiased kernel: a triangle filter widened by the downscale factor, as in
    # Pillow, so downsampling averages every input pixel instead of aliasing.
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def pad(images: Tensor, size: int) -> Tensor:
    """Centre images on a size x size canvas of zeros (the extra pixel of an odd margin goes bottom/right)."""
    h, w = images.shape[-2:]
    if h > size or w > size:
        raise ConfigError(f"data.fit=pad cannot shrink {h}x{w} images to image_size={size}; use data.fit=resize or center-crop")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(images, (left, size - w - left, top, size - h - top), value=0)


def center_crop(images: Tensor, size: int) -> Tensor:
    """Keep the central size x size window (the extra pixel of an odd margin is cut bottom/right)."""
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise ConfigError(f"data.fit=center-crop cannot enlarge {h}x{w} images to image_size={size}; use data.fit=resize or pad")
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top : top + size, left : left + size]


def fit_size(images: Tensor, size: int, fit: str = "resize") -> Tensor:
    """(N, C, H, W) uint8 -> (N, C, size, size) by resize, pad (zeros) or center-crop."""
    if fit == "resize":
        return resize(images, size)
    if fit == "pad":
        return pad(images, size)
    if fit == "center-crop":
        return center_crop(images, size)
    raise ConfigError(f"data.fit must be resize, pad or center-crop, got {fit!r}")


def rgb_to_grey(images: Tensor) -> Tensor:
    """(N, 3, H, W) -> (N, 1, H, W): ITU-R BT.601 luma, bit-exact with Pillow's convert("L")."""
    r, g, b = images.to(torch.int32).unbind(dim=1)  # (N, H, W) each
    wr, wg, wb = _LUMA_WEIGHTS
    grey = (wr * r + wg * g + wb * b + (1 << 15)) >> 16  # (N, H, W), in [0, 255]
    return grey.unsqueeze(1).to(torch.uint8)


def grey_to_rgb(images: Tensor) -> Tensor:
    """(N, 1, H, W) -> (N, 3, H, W) by repeating the grey channel."""
    return images.expand(-1, 3, -1, -1).contiguous()


def convert_channels(images: Tensor, channels: int) -> Tensor:
    """Convert (N, C, H, W) uint8 between grey (C = 1) and RGB (C = 3); a no-op when C == channels."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return grey_to_rgb(images)
    if have == 3 and channels == 1:
        return rgb_to_grey(images)
    raise ConfigError(f"data.channels={channels} is not reachable from {have}-channel images; use 1 (grey) or 3 (RGB)")


def grey_dilate(images: Tensor, radius: int = 1) -> Tensor:
    """Each pixel replaced by the brightest pixel of its (2r+1)^2 square neighbourhood (grey-level dilation;
    outside the image counts as dark). On bright-ink images (MNIST) every stroke grows by ``radius`` pixels on
    each side: the ``mnist-bold`` style. Any dtype (uint8 included); a bool map gives the binary dilation."""
    if radius <= 0:
        return images
    grown = F.max_pool2d(images.float(), 2 * radius + 1, stride=1, padding=radius)  # exact for uint8 values
    return grown.to(images.dtype) if images.dtype != torch.bool else grown > 0
