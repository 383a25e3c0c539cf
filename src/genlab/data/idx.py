"""Reader for the IDX format of MNIST and Fashion-MNIST (http://yann.lecun.com/exdb/mnist/).

An IDX file is a 4-byte magic number ``0x00 0x00 <dtype code> <ndim>``, then ndim big-endian
uint32 dimensions, then the values in row-major order, big-endian. Files may be gzip-compressed.
Every check (magic, dtype, dimensions, length) names the file when it fails.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from genlab.errors import DataError

# dtype code -> big-endian numpy dtype (the IDX specification's table).
IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"


def read_bytes(path: str | os.PathLike) -> bytes:
    """A file's bytes, gunzipped when it starts with the gzip magic; DataError naming the file otherwise."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as e:
            raise DataError(f"{path} is a truncated or corrupt gzip file ({e}); replace it with a fresh copy") from e
    return data


def parse_idx(data: bytes, name: str) -> np.ndarray:
    """Decode IDX bytes into a native-endian array, validating the header against the length."""
    if len(data) < 4:
        raise DataError(f"{name} is not an IDX file: only {len(data)} bytes")
    zero1, zero2, code, ndim = data[:4]
    if zero1 != 0 or zero2 != 0 or code not in IDX_DTYPES or ndim == 0:
        raise DataError(f"{name} is not an IDX file: bad magic number 0x{data[:4].hex()} (expected 0x0000 then a dtype code and ndim)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name} is truncated: {len(data)} bytes, shorter than its {header}-byte header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "too long"
        raise DataError(f"{name} is {problem}: {len(data)} bytes, but its header {shape} of {dtype.name} needs {expected}")
    values = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip or plain) into a numpy array of its dtype and shape."""
    return parse_idx(read_bytes(path), str(path))


def write_idx(array: np.ndarray) -> bytes:
    """Encode an array as IDX bytes (the inverse of :func:`parse_idx`)."""
    codes = {dtype.newbyteorder("="): code for code, dtype in IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"IDX has no code for dtype {array.dtype}")
    big_endian = array.astype(IDX_DTYPES[codes[native]], copy=False)
    header = bytes([0, 0, codes[native], array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(big_endian).tobytes()
