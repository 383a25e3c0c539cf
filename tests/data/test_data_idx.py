"""IDX reader: round trips, header validation and errors that name the file."""

import gzip
import struct

import numpy as np
import pytest

from genlab.data.idx import parse_idx, read_idx, write_idx
from genlab.errors import DataError


def _assert_one_line_naming(excinfo, name):
    message = str(excinfo.value)
    assert "\n" not in message
    assert str(name) in message


@pytest.mark.parametrize("dtype", ["u1", "i1", "i2", "i4", "f4", "f8"])
def test_idx_round_trip_every_dtype(tmp_path, dtype):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    path = tmp_path / "x.idx"
    path.write_bytes(write_idx(array))
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == (3, 4, 5)
    np.testing.assert_array_equal(back, array)


def test_idx_header_is_big_endian_as_specified():
    # The specification's example: magic 0x00000803 (ubyte, 3 dims), then 60000, 28, 28 as big-endian uint32.
    header = write_idx(np.zeros((2, 28, 28), np.uint8))[:16]
    assert header == struct.pack(">4BIII", 0, 0, 0x08, 3, 2, 28, 28)
    data = struct.pack(">4BI", 0, 0, 0x0B, 1, 2) + struct.pack(">hh", -2, 513)
    assert parse_idx(data, "x").tolist() == [-2, 513]


def test_gzip_and_plain_files_read_the_same(tmp_path):
    array = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    (tmp_path / "a").write_bytes(write_idx(array))
    (tmp_path / "a.gz").write_bytes(gzip.compress(write_idx(array)))
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), read_idx(tmp_path / "a.gz"))


def test_truncated_idx_names_the_file(tmp_path):
    data = write_idx(np.zeros((10, 28, 28), np.uint8))
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(data[:-100])
    with pytest.raises(DataError, match="truncated") as excinfo:
        read_idx(path)
    _assert_one_line_naming(excinfo, path)


def test_too_long_idx_is_rejected(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(write_idx(np.zeros(10, np.uint8)) + b"\x00")
    with pytest.raises(DataError, match="too long") as excinfo:
        read_idx(path)
    _assert_one_line_naming(excinfo, path)


@pytest.mark.parametrize("magic", [b"\x01\x00\x08\x01", b"\x00\x00\x07\x01", b"\x00\x00\x08\x00", b"PK\x03\x04"])
def test_bad_magic_is_rejected(tmp_path, magic):
    path = tmp_path / "bad"
    path.write_bytes(magic + b"\x00\x00\x00\x01" + b"\x05")
    with pytest.raises(DataError, match="magic") as excinfo:
        read_idx(path)
    _assert_one_line_naming(excinfo, path)


def test_header_shorter_than_its_dims(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(b"\x00\x00\x08\x03" + b"\x00\x00\x00\x01")
    with pytest.raises(DataError, match="header") as excinfo:
        read_idx(path)
    _assert_one_line_naming(excinfo, path)


def test_truncated_gzip_names_the_file(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(write_idx(np.arange(5000, dtype=np.int32)))[:-30])
    with pytest.raises(DataError, match="gzip") as excinfo:
        read_idx(path)
    _assert_one_line_naming(excinfo, path)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(DataError) as excinfo:
        read_idx(tmp_path / "nope")
    _assert_one_line_naming(excinfo, tmp_path / "nope")
