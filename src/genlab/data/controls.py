"""Control maps computed from images (SPEC DATA2), the conditions of ControlNet and T2I-Adapter (A2, A3).

Each map is a pure function of a float batch (N, C, H, W) in the model range [-1, 1] and returns a
one-channel map (N, 1, H, W) in [-1, 1] on the same device: -1 where there is nothing (background),
+1 (or a graded value) where the control draws. They work on the luminance, so grey and colour
images give the same map for the same picture.

- ``edges``: one-pixel edges, Canny-like (ControlNet's paper conditions on Canny edges): the Sobel
  gradient magnitude, thinned by non-maximum suppression along the gradient, thresholded.
- ``mask``: the ink (foreground) mask: luminance above a threshold (ink is bright on MNIST).
- ``scribble``: the mask thinned to a one-pixel skeleton (Zhang & Suen 1984), then dilated by one
  pixel: the shape of the strokes drawn with a pen of fixed width, their thickness removed (the
  "scribble" condition of ControlNet).
- ``thickness``: each ink pixel's local stroke width (from the distance to the background), scaled
  by ``max_width`` to (-1, 1]; background -1.

:func:`control_map` applies one by name; :data:`CONTROLS` lists the names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from genlab.data.paired import luminance, sobel_gradients
from genlab.data.transforms import grey_dilate
from genlab.errors import ConfigError

CONTROLS = ("edges", "mask", "scribble", "thickness")


def edges(x: Tensor, threshold: float = 0.25) -> Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, 1, H, W) one-pixel edges: +1 on edges, -1 elsewhere.

    Canny's non-maximum suppression (Canny 1986) on the Sobel gradient of the luminance in [0, 1]
    (:func:`genlab.data.paired.sobel_gradients`, a black-to-white step has magnitude 1), without the
    Gaussian smoothing and the hysteresis: a pixel is an edge when its magnitude exceeds ``threshold``
    and is a maximum along the gradient direction (rounded to 0, 45, 90 or 135 degrees): strictly
    above the neighbour the gradient points to, at least the one behind it (ties, as the two pixels
    either side of a step, go to the brighter side). So a step edge is one pixel wide, on the first
    bright pixel, and a one-pixel line has an edge on each side.
    """
    g = sobel_gradients(x)  # (N, 2, H, W)
    gx, gy = g[:, :1], g[:, 1:]  # (N, 1, H, W) each; y grows downwards (rows)
    magnitude = (gx.square() + gy.square()).sqrt()  # (N, 1, H, W)
    sector = torch.round(torch.atan2(gy, gx) / (math.pi / 4)).long() % 4  # 0: along x, 1: 45, 2: along y, 3: 135
    padded = F.pad(magnitude, (1, 1, 1, 1))
    height, width = x.shape[-2:]

    def shifted(dr: int, dc: int) -> Tensor:  # the magnitude of the neighbour at (row + dr, col + dc)
        return padded[..., 1 + dr: 1 + dr + height, 1 + dc: 1 + dc + width]

    maximum = torch.zeros_like(magnitude, dtype=torch.bool)
    for s, (dr, dc) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):  # the gradient's direction in each sector
        ahead, behind = shifted(dr, dc), shifted(-dr, -dc)
        # sector s also covers the opposite direction (angle + 180), where "ahead" is the other neighbour
        forward = torch.where(_points_forward(gx, gy, dr, dc), magnitude > ahead, magnitude > behind)
        backward = torch.where(_points_forward(gx, gy, dr, dc), magnitude >= behind, magnitude >= ahead)
        maximum |= (sector == s) & forward & backward
    return _signed(maximum & (magnitude > threshold), x.dtype)


def _points_forward(gx: Tensor, gy: Tensor, dr: int, dc: int) -> Tensor:
    """Whether the gradient (gx, gy) points towards the neighbour (dr, dc) rather than away from it."""
    return gx * dc + gy * dr > 0


def ink(x: Tensor, threshold: float = 0.0) -> Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, 1, H, W) bool: luminance above ``threshold`` (0: mid-grey)."""
    return luminance(x) > threshold


def mask(x: Tensor, threshold: float = 0.0) -> Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, 1, H, W): +1 on ink (luminance > ``threshold``), -1 on background."""
    return _signed(ink(x, threshold), x.dtype)


def _signed(binary: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool map as a control map: True -> +1, False -> -1."""
    return binary.to(dtype) * 2.0 - 1.0


def _neighbours(b: Tensor) -> list[Tensor]:
    """The 8 neighbours P2..P9 of every pixel of a bool map (N, 1, H, W), clockwise from north (Zhang & Suen's
    numbering); pixels outside the image are background."""
    p = F.pad(b.to(torch.uint8), (1, 1, 1, 1))  # (N, 1, H + 2, W + 2)
    h, w = b.shape[-2:]
    # (row, col) offsets of P2 (north), P3 (north-east), ..., P9 (north-west)
    offsets = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))
    return [p[..., 1 + dr: 1 + dr + h, 1 + dc: 1 + dc + w] for dr, dc in offsets]


def thin(b: Tensor, max_iterations: int = 100) -> Tensor:
    """Zhang & Suen (1984) thinning of a bool map (N, 1, H, W): the one-pixel-wide skeleton.

    Two sub-iterations, repeated until nothing changes: a foreground pixel P1 with 2 <= B <= 6
    foreground neighbours and exactly A = 1 background-to-foreground transition in the cyclic
    sequence P2, P3, ..., P9, P2 is removed when P2 P4 P6 = 0 and P4 P6 P8 = 0 (first sub-iteration:
    south-east boundary and north-west corner) or P2 P4 P8 = 0 and P2 P6 P8 = 0 (second). All pixels
    of a sub-iteration are decided in parallel on the map as it was before it.
    """
    b = b.clone()
    for _ in range(max_iterations):
        changed = False
        for first in (True, False):
            n = _neighbours(b)
            count = sum(v.to(torch.int16) for v in n)  # B(P1)
            transitions = sum(((n[i] == 0) & (n[(i + 1) % 8] == 1)).to(torch.int16) for i in range(8))  # A(P1)
            p2, p4, p6, p8 = n[0], n[2], n[4], n[6]
            if first:
                keep_shape = (p2 * p4 * p6 == 0) & (p4 * p6 * p8 == 0)
            else:
                keep_shape = (p2 * p4 * p8 == 0) & (p2 * p6 * p8 == 0)
            remove = b & (count >= 2) & (count <= 6) & (transitions == 1) & keep_shape
            if remove.any():
                b = b & ~remove
                changed = True
        if not changed:
            return b
    return b


def dilate(b: Tensor, radius: int = 1) -> Tensor:
    """A bool map (N, 1, H, W) grown by ``radius`` pixels in the chessboard metric ((2r+1)^2 square)."""
    return grey_dilate(b, radius)


def scribble(x: Tensor, threshold: float = 0.0, width: int = 1) -> Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, 1, H, W): the ink mask thinned to its skeleton, dilated by ``width`` px, as +-1."""
    return _signed(dilate(thin(ink(x, threshold)), width), x.dtype)


def chessboard_depth(b: Tensor) -> Tensor:
    """For a bool map (N, 1, H, W): each foreground pixel's chessboard distance to the background (1 at the
    boundary; pixels outside the image are background), 0 on the background. The number of 3x3 erosions
    the pixel survives, as a float map."""
    depth = torch.zeros(b.shape, dtype=torch.float32, device=b.device)
    current = b.float()
    while bool(current.any()):
        depth = depth + current
        # erosion: a pixel survives if its whole 3x3 neighbourhood is foreground (outside: background)
        current = -F.max_pool2d(F.pad(-current, (1, 1, 1, 1), value=-0.0), 3, stride=1)
        current = (current > 0.5).float()
    return depth


def thickness(x: Tensor, threshold: float = 0.0, max_width: float = 8.0) -> Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, 1, H, W) stroke-thickness map: each ink pixel's local stroke width
    w / ``max_width`` (clamped to 1) mapped to [-1, 1]; background -1.

    A stroke's width is 2 r - 1, r the chessboard depth (:func:`chessboard_depth`) of its medial
    axis; each ink pixel takes the largest depth within a (2R + 1)^2 window, R = ceil(max_width / 2),
    which on a stroke of width <= max_width reaches the axis. So a straight stroke of odd width w gets
    exactly w on every pixel away from its ends, an even width w gets w - 1, and strokes closer than
    R pixels share the larger width.
    """
    b = ink(x, threshold)
    depth = chessboard_depth(b)  # (N, 1, H, W)
    reach = int(-(-max_width // 2))
    r = F.max_pool2d(depth, 2 * reach + 1, stride=1, padding=reach)  # (N, 1, H, W): the axis's depth
    width = (2 * r - 1).clamp(min=0) * b  # (N, 1, H, W), 0 on the background
    return (width / max_width).clamp(max=1.0).to(x.dtype) * 2.0 - 1.0


def control_map(kind: str, x: Tensor) -> Tensor:
    """The control map ``kind`` (one of :data:`CONTROLS`) of images x (N, C, H, W) in [-1, 1] -> (N, 1, H, W)."""
    if kind not in CONTROLS:
        raise ConfigError(f"unknown control {kind!r}: choose one of {', '.join(CONTROLS)}")
    return {"edges": edges, "mask": mask, "scribble": scribble, "thickness": thickness}[kind](x)
