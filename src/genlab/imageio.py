"""Writing and reading generated images: PNG grids and ``.npz`` files (key ``images``, uint8 NHWC)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from genlab.data import from_model_range
from genlab.errors import DataError
from genlab.fileio import atomic_write


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into one uint8 (H', W', C) array, ``nrow`` per row."""
    u8 = from_model_range(images.detach().cpu())  # (N, C, H, W) uint8
    n, c, h, w = u8.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y: y + h, x: x + w] = u8[i].permute(1, 2, 0).numpy()
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """Save images in [-1, 1] as one PNG grid (``scale``: nearest-neighbour upscaling for small images)."""
    grid = make_grid(images, nrow)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    atomic_write(path, lambda p: img.save(p, format="PNG"))
    return Path(path)


def save_npz(images: torch.Tensor, path: str | Path, **extra: np.ndarray) -> Path:
    """Save images in [-1, 1] as ``images`` (uint8, N x H x W x C) in an .npz file."""
    u8 = from_model_range(images.detach().cpu()).permute(0, 2, 3, 1).numpy()
    atomic_write(path, lambda p: _savez(p, images=u8, **extra))
    return Path(path)


def _savez(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, **arrays)


def load_npz(path: str | Path) -> torch.Tensor:
    """Read ``images`` (uint8 N x H x W x C) from an .npz file as uint8 (N, C, H, W); never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "images" not in f.files:
                raise DataError(f"{path}: no 'images' array (found {', '.join(f.files) or 'nothing'}); "
                                "save uint8 images N x H x W x C under the key 'images'")
            arr = f["images"]
    except DataError:
        raise
    except Exception as e:  # zipfile.BadZipFile, ValueError (pickled object arrays) ...
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4):
        raise DataError(f"{path}: 'images' must be uint8 N x H x W x C, got {arr.dtype} with shape {arr.shape}")
    if arr.ndim == 3:
        arr = arr[..., None]
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def save_images(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save to ``.png`` (grid) or ``.npz`` by the file's suffix."""
    suffix = Path(path).suffix.lower()
    if suffix == ".png":
        return save_grid(images, path, nrow)
    if suffix == ".npz":
        return save_npz(images, path)
    raise DataError(f"--out {path}: the file must end in .png (a grid) or .npz (uint8 images N x H x W x C)")


def save_captioned_grid(data, path: str | Path, ncol: int = 4) -> Path:
    """Draw an ImageSet's images with their first caption (or class name) below each, as a PNG."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(data)
    ncol = min(ncol, n)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.4 * ncol, 2.9 * nrow), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        image = data.images[i].permute(1, 2, 0).numpy()
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        if data.captions is not None:
            text = data.captions[i][0]
        elif data.labels is not None and data.class_names:
            text = data.class_names[int(data.labels[i])]
        else:
            text = ""
        ax.set_title("\n".join(textwrap.wrap(text, 26)), fontsize=8)
    fig.tight_layout()
    atomic_write(Path(path), lambda p: fig.savefig(p, format="png", dpi=80))
    plt.close(fig)
    return Path(path)


def load_npz_captions(path: str | Path) -> list[str] | None:
    """The ``captions`` array (N strings, one per image) of an .npz file, or None when it has none."""
    with np.load(Path(path), allow_pickle=False) as f:
        if "captions" not in f.files:
            return None
        arr = f["captions"]
    if arr.dtype.kind not in "US" or arr.ndim != 1:
        raise DataError(f"{path}: 'captions' must be a 1-d array of strings (numpy dtype U), got {arr.dtype} with shape {arr.shape}")
    captions = [str(c.decode() if isinstance(c, bytes) else c) for c in arr]
    empty = [i for i, c in enumerate(captions) if not c.strip()]
    if empty:
        raise DataError(f"{path}: caption {empty[0]} is empty; every image needs a caption")
    return captions
