"""Paired data for image-to-image translation (SPEC DATA1 ``paired:PATH``, DATA2 control images, G6).

Two ways to get (input A, target B) pairs:

- ``paired:PATH``: the user's own pairs. PATH/A holds the inputs and PATH/B the targets (or
  PATH/train/{A,B} and PATH/test/{A,B} for splits; PATH may also be a .tar/.tar.gz of that layout).
  A file in A and a file in B form a pair when their names without extension match ("0001.png" in
  A with "0001.jpg" in B; sub-folders are part of the name). The loaded :class:`ImageSet` holds B
  as ``images`` and A as ``conditions``, in natural name order. Every problem (missing folder,
  unmatched names, different sizes, unreadable file) is a one-line DataError naming the file.
- Derived tasks: the input is computed from the target image by one of the pure transforms below
  (Sobel edges, a masked copy, a low-resolution copy, luminance), so any data source becomes an
  image-to-image task. They take float batches (N, C, H, W) in the model range [-1, 1] and keep
  the device and dtype.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import torch
import torch.nn.functional as F
from torch import Tensor

from genlab.data.cache import cached
from genlab.data.config import DataConfig
from genlab.data.folder import ImageTree, _natural_key, decode_images, open_image_tree, subtree, tree_fingerprint
from genlab.data.imageset import ImageSet
from genlab.data.transforms import _LUMA_WEIGHTS
from genlab.errors import DataError

PAIRED_PREFIX = "paired:"
PAIRED_SPLITS = ("train", "test", "val")
PAIRED_CACHE_MIN_FILES = 1000  # as for folder:PATH, smaller folders decode in about a second
_SHOW_NAMES = 3  # unmatched names listed in an error

# ---------------------------------------------------------------------------------------------
# paired:PATH


def _pair_key(relpath: str) -> str:
    """The name that pairs files across A and B: the relative path without its extension."""
    return str(PurePosixPath(relpath).with_suffix(""))


def _files_by_key(tree: ImageTree) -> dict[str, str]:
    """key -> relative path of every image of one side; two files with one key are an error."""
    if not tree.paths:
        raise DataError(f"{tree.origin} holds no images; put the paired images there (png, jpg, bmp, webp, gif)")
    out: dict[str, str] = {}
    for path in tree.paths:
        key = _pair_key(path)
        if key in out:
            raise DataError(f"{tree.origin} has two files named {key} ({out[key]} and {path}); keep one per pair name")
        out[key] = path
    return out


def _few(names: list[str]) -> str:
    shown = ", ".join(sorted(names, key=_natural_key)[:_SHOW_NAMES])
    return shown + (", ..." if len(names) > _SHOW_NAMES else "")


def _side_trees(tree: ImageTree, split: str) -> tuple[ImageTree, ImageTree]:
    """The A and B sub-trees for ``split``: PATH/<split>/{A,B}, or PATH/{A,B} as the "train" split."""
    splits = [s for s in PAIRED_SPLITS if any(p.startswith(f"{s}/") for p in tree.paths)]
    layout = "put inputs in PATH/A and targets in PATH/B (or PATH/train/A, PATH/train/B), matched by file name"
    if split in splits:
        base = f"{split}/"
    elif not splits and split == "train":
        base = ""
    else:
        available = ", ".join(splits) or "train (PATH/A, PATH/B)"
        raise DataError(f"{tree.origin} has no {split!r} split for data.split={split}; available splits: {available}")
    sides = []
    for side in ("A", "B"):
        if not any(p.startswith(f"{base}{side}/") for p in tree.paths):
            raise DataError(f"{tree.origin}/{base}{side} is missing or holds no images; {layout}")
        sides.append(subtree(tree, f"{base}{side}"))
    return sides[0], sides[1]


def matched_pairs(tree_a: ImageTree, tree_b: ImageTree) -> list[tuple[str, str]]:
    """(A path, B path) of every pair, in natural name order; DataError listing unmatched names."""
    a, b = _files_by_key(tree_a), _files_by_key(tree_b)
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        parts = []
        if only_a:
            parts.append(f"{len(only_a)} file(s) in {tree_a.origin} have no partner in B ({_few(only_a)})")
        if only_b:
            parts.append(f"{len(only_b)} file(s) in {tree_b.origin} have no partner in A ({_few(only_b)})")
        raise DataError("; ".join(parts) + "; pairs are matched by file name without extension")
    keys = sorted(a, key=_natural_key)
    return [(a[k], b[k]) for k in keys]


def load_paired(cfg: DataConfig, root: Path | None) -> ImageSet:
    """The (A, B) pairs of paired:PATH for cfg.split: B as ``images``, A as ``conditions``."""
    from genlab.data.sources import _resolve_folder, _unwrap  # sources imports this module

    spec = cfg.source[len(PAIRED_PREFIX) :]
    if not spec:
        raise DataError("data.source=paired: needs a path, e.g. paired:~/facades (with A/ and B/ inside)")
    path = _resolve_folder(spec, root)
    tree = _unwrap(open_image_tree(path))
    tree_a, tree_b = _side_trees(tree, cfg.split)
    pairs = matched_pairs(tree_a, tree_b)
    if cfg.limit is not None:
        pairs = pairs[: cfg.limit]

    def build() -> dict[str, Tensor]:
        inputs = decode_images(tree_a, [p for p, _ in pairs], cfg.image_size, cfg.fit)  # (N, C', H, W)
        targets = decode_images(tree_b, [p for _, p in pairs], cfg.image_size, cfg.fit)  # (N, C, H, W)
        if inputs.shape[-2:] != targets.shape[-2:]:
            a_path, b_path = pairs[0]
            (ha, wa), (hb, wb) = inputs.shape[-2:], targets.shape[-2:]
            raise DataError(
                f"{tree_a.origin}/{a_path} is {ha}x{wa} but its pair {tree_b.origin}/{b_path} is {hb}x{wb}; "
                "paired images must have the same size (or set data.image_size=N to bring both to N x N)"
            )
        return {"images": targets, "conditions": inputs}

    if cfg.limit is None and len(pairs) >= PAIRED_CACHE_MIN_FILES:
        key = {"reader": "paired", "split": cfg.split, "image_size": cfg.image_size, "fit": cfg.fit, **tree_fingerprint(path)}
        tensors = cached("paired", key, build, check=lambda t: t.keys() == {"images", "conditions"} and len(t["images"]) == len(pairs))
    else:
        tensors = build()
    return ImageSet(tensors["images"], None, None, cfg.source, cfg.split, tree.origin, conditions=tensors["conditions"])


# ---------------------------------------------------------------------------------------------
# Derived inputs (DATA2 control images), on float batches in [-1, 1].

# Sobel derivative along x (columns); its transpose is the derivative along y.
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
# Sobel response to a unit step edge (0 -> 1): 1 + 2 + 1. Dividing by it maps such an edge to 1.
SOBEL_STEP_RESPONSE = 4.0


def luminance(x: Tensor) -> Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) ITU-R BT.601 luma (weights 0.299, 0.587, 0.114); grey input unchanged.

    The weights sum to 1, so [-1, 1] maps to [-1, 1]; they are the fixed-point weights of
    :func:`genlab.data.transforms.rgb_to_grey` (Pillow's convert("L")).
    """
    if x.shape[1] == 1:
        return x
    if x.shape[1] != 3:
        raise DataError(f"luminance needs 1 or 3 channels, got {x.shape[1]}")
    weights = torch.tensor(_LUMA_WEIGHTS, dtype=x.dtype, device=x.device) / 65536.0
    return (x * weights.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)


def sobel_gradients(x: Tensor) -> Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, 2, H, W): Sobel d/dx and d/dy of the luminance in [0, 1], divided by
    :data:`SOBEL_STEP_RESPONSE` (a black-to-white step gives 1). Borders are replicate-padded."""
    grey = (luminance(x) + 1.0) / 2.0  # (N, 1, H, W) in [0, 1]
    kernel_x = torch.tensor(_SOBEL_X, dtype=x.dtype, device=x.device)
    kernels = torch.stack([kernel_x, kernel_x.T]).unsqueeze(1)  # (2, 1, 3, 3): d/dx, d/dy
    return F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels) / SOBEL_STEP_RESPONSE  # (N, 2, H, W)


def sobel_edges(x: Tensor, threshold: float | None = 0.25) -> Tensor:
    """(N, C, H, W) -> (N, 1, H, W) edge map in [-1, 1]: Sobel gradient magnitude of the luminance.

    The luminance is first mapped to [0, 1], so a full black-to-white step has gradient magnitude
    4 (:data:`SOBEL_STEP_RESPONSE`); the magnitude is divided by 4 and clamped to [0, 1]
    ("normalised", ``threshold=None``) or compared with ``threshold`` (binary edges, 1 where
    magnitude / 4 > threshold). The result is mapped back to [-1, 1]: edges +1, flat regions -1.
    Borders are replicate-padded, so the frame of the image is not an edge.
    """
    magnitude = sobel_gradients(x).square().sum(dim=1, keepdim=True).sqrt()  # (N, 1, H, W)
    edges = magnitude.clamp(max=1.0) if threshold is None else (magnitude > threshold).to(x.dtype)
    return edges * 2.0 - 1.0


def square_hole_mask(corners: Tensor, height: int, width: int, side: int) -> Tensor:
    """(N, 2) uniforms in [0, 1) -> (N, 1, H, W) bool mask, True inside one side x side square per image.

    The square's top-left corner is uniform over all positions that keep it inside the image.
    """
    n = corners.shape[0]
    top = (corners[:, 0] * (height - side + 1)).floor().long().clamp(0, height - side)  # (N,)
    left = (corners[:, 1] * (width - side + 1)).floor().long().clamp(0, width - side)  # (N,)
    rows = torch.arange(height, device=corners.device).view(1, height, 1)
    cols = torch.arange(width, device=corners.device).view(1, 1, width)
    inside_rows = (rows >= top.view(n, 1, 1)) & (rows < (top + side).view(n, 1, 1))  # (N, H, 1)
    inside_cols = (cols >= left.view(n, 1, 1)) & (cols < (left + side).view(n, 1, 1))  # (N, 1, W)
    return (inside_rows & inside_cols).unsqueeze(1)  # (N, 1, H, W)


def patch_grid(height: int, width: int, patch: int) -> tuple[int, int]:
    """Rows and columns of the patch x patch grid covering an H x W image (the last ones cropped)."""
    return -(-height // patch), -(-width // patch)


def random_patch_mask(uniforms: Tensor, height: int, width: int, patch: int, fraction: float) -> Tensor:
    """(N, rows * cols) uniforms -> (N, 1, H, W) bool mask hiding each grid patch with probability ``fraction``.

    As the random patch masking of masked autoencoders (He et al. 2022), on a grid of
    :func:`patch_grid` cells; the expected hidden area is ``fraction``.
    """
    rows, cols = patch_grid(height, width, patch)
    hidden = (uniforms < fraction).view(-1, 1, rows, cols)  # (N, 1, rows, cols)
    cells = hidden.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)  # (N, 1, rows p, cols p)
    return cells[..., :height, :width]


def apply_mask(x: Tensor, mask: Tensor, fill: float = -1.0) -> Tensor:
    """Pixels of x where ``mask`` (N, 1, H, W) is True set to ``fill`` (-1: black), on every channel."""
    return x.masked_fill(mask, fill)


def lowres(x: Tensor, factor: int = 2, upsample: str = "bilinear") -> Tensor:
    """Low-resolution copy at full size: factor x factor average pooling, then upsampling back to H x W.

    Sizes not divisible by ``factor`` keep a partial last window (averaged over its pixels only),
    so a constant image stays exactly that constant. ``upsample`` is "nearest" or "bilinear".
    """
    height, width = x.shape[-2:]
    low = F.avg_pool2d(x, factor, ceil_mode=True)  # (N, C, ceil(H / f), ceil(W / f))
    if upsample == "nearest":
        return F.interpolate(low, size=(height, width), mode="nearest")
    return F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
