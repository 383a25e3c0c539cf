"""The real data beside the checkout (GENLAB_DATA, default ../shared/data): official checksums and counts."""

import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genlab.data import load_data
from genlab.data.cifar import CIFAR10_CLASSES
from genlab.data.idx import write_idx

DATA_ROOT = Path(os.environ.get("GENLAB_DATA") or Path(__file__).resolve().parents[2].parent / "shared" / "data")

# Official md5s of the decompressed IDX image files (yann.lecun.com/exdb/mnist, zalandoresearch/fashion-mnist).
OFFICIAL_IMAGE_MD5 = {
    ("mnist", "train"): "6bbc9ace898e44ae57da46a324031adb",
    ("mnist", "test"): "2646ac647ad5339dbf082846283269ea",
    ("fashion-mnist", "train"): "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    ("fashion-mnist", "test"): "8181f5470baa50b63fa0f6fddb340f0a",
}
# Published class frequencies of MNIST (e.g. the dataset card); Fashion-MNIST is balanced.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

pytestmark = pytest.mark.data


def _need(relpath: str) -> Path:
    path = DATA_ROOT / relpath
    if not path.exists():
        pytest.skip(f"real data {path} is absent (set GENLAB_DATA to the shared data folder)")
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("source, folder", [("mnist", "mnist"), ("fashion-mnist", "fashion_mnist")])
@pytest.mark.parametrize("split", ["train", "test"])
def test_idx_images_reencode_to_the_official_md5(source, folder, split):
    _need(folder)
    data = load_data(source=source, split=split, root=str(DATA_ROOT))
    n = 60000 if split == "train" else 10000
    assert data.images.shape == (n, 1, 28, 28) and data.num_classes == 10
    # Re-encoding the decoded tensor must give back the official file byte for byte: any
    # reordering, transposition or off-by-one in the reader would change the md5.
    idx_bytes = write_idx(data.images[:, 0].numpy())
    assert hashlib.md5(idx_bytes).hexdigest() == OFFICIAL_IMAGE_MD5[source, split]
    counts = data.labels.bincount(minlength=10).tolist()
    assert sum(counts) == n
    if source == "mnist":
        assert counts == (MNIST_TRAIN_COUNTS if split == "train" else MNIST_TEST_COUNTS)
    else:
        assert counts == [n // 10] * 10


def test_mnist5k_rows_are_mnist_training_images_with_their_labels():
    _need("mnist")
    mnist = load_data(source="mnist", root=str(DATA_ROOT))
    small = load_data(source="mnist5k")
    index = {image.numpy().tobytes(): i for i, image in enumerate(mnist.images)}
    positions = [index.get(image.numpy().tobytes()) for image in small.images]
    assert None not in positions  # every one of the 5,000 is a training image, byte for byte
    assert torch.equal(mnist.labels[positions], small.labels)
    assert len(set(positions)) == 5000


def _decode_member(archive: Path, name: str) -> np.ndarray:
    """One archive member decoded by PIL, independently of genlab's reader."""
    with tarfile.open(archive) as tar:
        member = next(m for m in tar if m.name == name)  # stream: the test split comes first
        return np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))


def test_cifar_archive_prefix_is_balanced_and_decodes_like_pil():
    archive = _need("cifar10_jpg.tar.gz")
    data = load_data(source="cifar10", split="test", root=str(DATA_ROOT), limit=300)
    assert data.images.shape == (300, 3, 32, 32) and data.class_names == CIFAR10_CLASSES
    assert data.labels.bincount().tolist() == [30] * 10
    # Example 13 is the second image (rank 1) of class 3 (cat).
    expected = _decode_member(archive, "cifar10_jpg/test/cat/0001.jpg")
    np.testing.assert_array_equal(data.images[13].permute(1, 2, 0).numpy(), expected)


@pytest.mark.slow
def test_cifar_archive_full_splits_and_cache():
    _need("cifar10_jpg.tar.gz")
    for split, per_class in (("train", 5000), ("test", 1000)):
        data = load_data(source="cifar10", split=split, root=str(DATA_ROOT))
        assert data.images.shape == (10 * per_class, 3, 32, 32)
        assert data.labels.bincount().tolist() == [per_class] * 10
        again = load_data(source="cifar10", split=split, root=str(DATA_ROOT), limit=1000)  # from the cache
        assert torch.equal(again.images, data.images[:1000])
