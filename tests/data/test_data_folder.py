"""folder:PATH source: layout, labels, order, archives, and one-line errors naming the file (DATA3)."""

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from genlab.data import DataConfig, load_data
from genlab.data.folder import decode_image
from genlab.errors import DataError


def _save(path, array, mode=None, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path, format=fmt)


def _random(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _assert_one_line(excinfo, *names):
    message = str(excinfo.value)
    assert "\n" not in message
    for name in names:
        assert str(name) in message, message


@pytest.fixture
def class_folder(tmp_path):
    """cats/ with 3 images, dogs/ with 2 (lossless PNG and BMP), and pixel arrays by relative path."""
    arrays = {}
    for i, rel in enumerate(["dogs/d10.png", "dogs/d2.png", "cats/c1.png", "cats/sub/c3.bmp", "cats/c2.png"]):
        arrays[rel] = _random((6, 5, 3), seed=i)
        _save(tmp_path / "photos" / rel, arrays[rel])
    (tmp_path / "photos" / "README.txt").write_text("not an image")
    (tmp_path / "photos" / "cats" / ".hidden.png").write_bytes(b"junk")  # hidden files are skipped
    return tmp_path / "photos", arrays


def test_folder_classes_labels_and_round_robin_order(class_folder):
    folder, arrays = class_folder
    data = load_data(DataConfig(source=f"folder:{folder}"))
    assert data.class_names == ["cats", "dogs"]
    # Natural order within a class (c1, c2, sub/c3; d2 before d10), classes interleaved.
    order = ["cats/c1.png", "dogs/d2.png", "cats/c2.png", "dogs/d10.png", "cats/sub/c3.bmp"]
    assert data.labels.tolist() == [0, 1, 0, 1, 0]
    assert data.images.shape == (5, 3, 6, 5) and data.images.dtype == torch.uint8
    for i, rel in enumerate(order):
        np.testing.assert_array_equal(data.images[i].permute(1, 2, 0).numpy(), arrays[rel])
    assert data.info["num_classes"] == 2 and data.info["image_size"] == (6, 5)


def test_folder_limit_takes_the_first_examples(class_folder):
    folder, arrays = class_folder
    data = load_data(source=f"folder:{folder}", limit=2)
    assert data.labels.tolist() == [0, 1]
    np.testing.assert_array_equal(data.images[1].permute(1, 2, 0).numpy(), arrays["dogs/d2.png"])


def test_tar_archive_reads_like_the_folder(class_folder, tmp_path):
    folder, _ = class_folder
    archive = tmp_path / "photos.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="photos")  # one wrapping folder, as archives usually have
    from_folder = load_data(source=f"folder:{folder}")
    from_tar = load_data(source=f"folder:{archive}")
    assert from_tar.class_names == from_folder.class_names
    assert torch.equal(from_tar.images, from_folder.images)
    assert torch.equal(from_tar.labels, from_folder.labels)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_formats_and_long_names(tmp_path, fmt):
    # 150-character paths: USTAR splits them into prefix + name, GNU and PAX add extension records.
    deep = "/".join(["d" * 30] * 4)
    arrays = {f"a/{deep}/x.png": _random((3, 3), 0), f"b/{deep}/y.png": _random((3, 3), 1), "b/z.png": _random((3, 3), 2)}
    archive = tmp_path / "deep.tar"
    with tarfile.open(archive, "w", format=fmt) as tar:
        for name, array in arrays.items():
            data = _encode(array, "PNG")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = load_data(source=f"folder:{archive}")
    assert data.class_names == ["a", "b"] and data.labels.tolist() == [0, 1, 1]
    expected = [arrays[f"a/{deep}/x.png"], arrays[f"b/{deep}/y.png"], arrays["b/z.png"]]
    np.testing.assert_array_equal(data.images[:, 0].numpy(), np.stack(expected))


def test_truncated_tar_names_the_archive(tmp_path):
    archive = tmp_path / "cut.tar"
    with tarfile.open(archive, "w") as tar:
        for i in range(3):
            data = _encode(_random((30, 30), i), "PNG")
            info = tarfile.TarInfo(f"img{i}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive.write_bytes(archive.read_bytes()[:1500])
    with pytest.raises(DataError) as excinfo:
        load_data(source=f"folder:{archive}")
    _assert_one_line(excinfo, archive)


def test_unlabelled_folder_and_split_subfolders(tmp_path):
    a, b, c = _random((4, 4), 0), _random((4, 4), 1), _random((4, 4), 2)
    _save(tmp_path / "flat" / "img2.png", a)
    _save(tmp_path / "flat" / "img10.png", b)
    flat = load_data(source=f"folder:{tmp_path / 'flat'}")
    assert flat.labels is None and flat.class_names is None and flat.num_classes == 0
    assert flat.images.shape == (2, 1, 4, 4)
    np.testing.assert_array_equal(flat.images[:, 0].numpy(), np.stack([a, b]))
    with pytest.raises(DataError, match="'test'") as excinfo:
        load_data(source=f"folder:{tmp_path / 'flat'}", split="test")
    _assert_one_line(excinfo, tmp_path / "flat")

    _save(tmp_path / "split" / "train" / "x" / "0.png", a)
    _save(tmp_path / "split" / "test" / "x" / "0.png", c)
    test = load_data(source=f"folder:{tmp_path / 'split'}", split="test")
    np.testing.assert_array_equal(test.images[0, 0].numpy(), c)
    assert test.class_names == ["x"]


def test_folder_path_relative_to_data_root(tmp_path, monkeypatch):
    _save(tmp_path / "root" / "mine" / "a.png", _random((3, 3), 0))
    monkeypatch.chdir(tmp_path)
    assert len(load_data(source="folder:mine", root=str(tmp_path / "root"))) == 1


def test_corrupt_png_names_the_file(tmp_path):
    _save(tmp_path / "f" / "good.png", _random((4, 4), 0))
    bad = tmp_path / "f" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(DataError, match="not a readable image") as excinfo:
        load_data(source=f"folder:{tmp_path / 'f'}")
    _assert_one_line(excinfo, bad)


def test_truncated_jpeg_names_the_file(tmp_path):
    path = tmp_path / "f" / "cut.jpg"
    _save(path, _random((64, 64, 3), 0), fmt="JPEG")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError) as excinfo:
        load_data(source=f"folder:{tmp_path / 'f'}")
    _assert_one_line(excinfo, path)


def test_empty_folder_names_the_folder(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images") as excinfo:
        load_data(source=f"folder:{tmp_path / 'empty'}")
    _assert_one_line(excinfo, tmp_path / "empty")


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist") as excinfo:
        load_data(source=f"folder:{tmp_path / 'nowhere'}")
    _assert_one_line(excinfo, tmp_path / "nowhere")


def test_inconsistent_sizes_name_two_files_and_suggest_image_size(tmp_path):
    _save(tmp_path / "f" / "a.png", _random((8, 8), 0))
    _save(tmp_path / "f" / "b.png", _random((8, 10), 1))
    with pytest.raises(DataError, match="data.image_size=") as excinfo:
        load_data(source=f"folder:{tmp_path / 'f'}")
    _assert_one_line(excinfo, "a.png is 8x8", "b.png is 8x10")
    # With a target size each image is fitted on its own: padding to 10 x 10 puts the 8 x 8 image
    # at rows 1..8, columns 1..8, and the 8 x 10 one at rows 1..8, all columns.
    data = load_data(source=f"folder:{tmp_path / 'f'}", image_size=10, fit="pad")
    assert data.images.shape == (2, 1, 10, 10)
    np.testing.assert_array_equal(data.images[0, 0, 1:9, 1:9].numpy(), _random((8, 8), 0))
    np.testing.assert_array_equal(data.images[1, 0, 1:9, :].numpy(), _random((8, 10), 1))
    with pytest.raises(DataError, match="center-crop") as excinfo:
        load_data(source=f"folder:{tmp_path / 'f'}", image_size=9, fit="pad")
    _assert_one_line(excinfo, "b.png")


def test_unsupported_mode_names_the_file_and_mode(tmp_path):
    path = tmp_path / "f" / "deep.png"
    path.parent.mkdir()
    Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16)).save(path)  # 16-bit grey
    with pytest.raises(DataError, match="unsupported image mode") as excinfo:
        load_data(source=f"folder:{tmp_path / 'f'}")
    _assert_one_line(excinfo, path, Image.open(path).mode)


def test_top_level_images_beside_class_folders(tmp_path):
    _save(tmp_path / "f" / "stray.png", _random((4, 4), 0))
    _save(tmp_path / "f" / "cls" / "a.png", _random((4, 4), 1))
    with pytest.raises(DataError, match="stray.png") as excinfo:
        load_data(source=f"folder:{tmp_path / 'f'}")
    _assert_one_line(excinfo, tmp_path / "f")


def test_modes_alpha_palette_gif_and_mixed_channels(tmp_path):
    rgba = _random((5, 5, 4), 0)
    expected = (rgba[..., :3].astype(np.uint16) * rgba[..., 3:] + 127) // 255  # straight alpha over black
    np.testing.assert_array_equal(decode_image(_encode(rgba, "PNG"), "x.png"), expected.astype(np.uint8))

    la = np.stack([_random((5, 5), 1), np.full((5, 5), 255, np.uint8)], axis=-1)  # opaque grey + alpha
    np.testing.assert_array_equal(decode_image(_encode(la, "PNG", mode="LA"), "x.png")[..., 0], la[..., 0])

    # GIF: a palette image, first frame only; its palette colours come back exactly.
    frames = [Image.fromarray(np.full((4, 4, 3), (255, 0, 0), np.uint8)), Image.fromarray(np.full((4, 4, 3), (0, 0, 255), np.uint8))]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    first = decode_image(gif.read_bytes(), str(gif))
    assert first.shape == (4, 4, 3) and (first == [255, 0, 0]).all()

    # A folder mixing grey and RGB images gives RGB, the grey one repeated on all channels.
    grey = _random((4, 4), 3)
    _save(tmp_path / "mixed" / "a.png", grey)
    _save(tmp_path / "mixed" / "b.png", _random((4, 4, 3), 4))
    data = load_data(source=f"folder:{tmp_path / 'mixed'}")
    assert data.channels == 3
    assert all(np.array_equal(data.images[0, c].numpy(), grey) for c in range(3))


def _encode(array, fmt, mode=None):
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format=fmt)
    return buffer.getvalue()
