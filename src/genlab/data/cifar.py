"""Reader for the official binary version of CIFAR-10 (cifar-10-binary.tar.gz), raw bytes only.

The Python version of CIFAR-10 is pickled, and genlab never unpickles downloaded files (a pickle
can run code). The binary version stores 3073-byte records: one label byte (0-9), then the
32x32 red plane, the green plane and the blue plane, each row-major
(https://www.cs.toronto.edu/~kriz/cifar.html).
"""

from __future__ import annotations

import numpy as np

from genlab.errors import DataError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
RECORD_BYTES = 1 + 3 * 32 * 32
TRAIN_BATCHES = [f"data_batch_{i}.bin" for i in range(1, 6)]
TEST_BATCHES = ["test_batch.bin"]


def parse_cifar_binary(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode binary CIFAR-10 records into images uint8 (N, 3, 32, 32) and labels uint8 (N,)."""
    if len(data) == 0 or len(data) % RECORD_BYTES:
        raise DataError(f"{name} is truncated or not a CIFAR-10 binary batch: {len(data)} bytes is not a multiple of {RECORD_BYTES}")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD_BYTES)  # (N, 3073)
    labels = records[:, 0]
    if labels.max() >= len(CIFAR10_CLASSES):
        raise DataError(f"{name} is corrupt: label {labels.max()} outside 0-9")
    images = records[:, 1:].reshape(-1, 3, 32, 32)  # planes R, G, B; rows; columns
    return images, labels
