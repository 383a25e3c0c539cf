"""A disk cache of decoded arrays, so that 60,000 JPEGs are decoded once, not on every run.

Entries are safetensors files under ``$GENLAB_CACHE/data/`` (default ``~/.cache/genlab/data``),
named by a hash of a key that says what was decoded and from which bytes (the source's path, size
and mtime, or a listing of a folder's files). The key is also stored inside the file and compared
on read. Writes are atomic (a temporary file, then a rename), so a crash never leaves a half
entry; an entry that cannot be read or does not match its key is rebuilt.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor

from genlab.data.config import resolve_cache_dir
from genlab.errors import WriteError
from genlab.fileio import atomic_write, sha256_bytes

CACHE_VERSION = 1  # bump when a reader's output changes, to invalidate old entries


def cache_path(name: str, key: dict) -> Path:
    """Where the entry for ``key`` lives: <cache>/data/<name>-<sha256(key)[:16]>.safetensors."""
    digest = sha256_bytes(_key_text(key).encode())[:16]
    return resolve_cache_dir() / "data" / f"{name}-{digest}.safetensors"


def _key_text(key: dict) -> str:
    return json.dumps({"cache_version": CACHE_VERSION, **key}, sort_keys=True)


def read_cached(name: str, key: dict) -> dict[str, Tensor] | None:
    """The tensors stored for ``key``, or None when absent, unreadable or stored for another key."""
    path = cache_path(name, key)
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None
    if metadata.get("key") != _key_text(key):
        return None
    return tensors


def write_cached(name: str, key: dict, tensors: dict[str, Tensor]) -> Path | None:
    """Store tensors for ``key`` atomically; returns the path, or None (with a warning) when not writable."""
    path = cache_path(name, key)
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    try:
        return atomic_write(path, lambda tmp: save_file(contiguous, tmp, metadata={"key": _key_text(key)}))
    except WriteError as e:
        warnings.warn(f"data cache not written ({e}); set GENLAB_CACHE to a writable folder", stacklevel=2)
        return None


def cached(name: str, key: dict, build: Callable[[], dict[str, Tensor]], check: Callable[[dict[str, Tensor]], bool] | None = None) -> dict[str, Tensor]:
    """``build()``'s tensors, read from the cache when a valid entry exists, else built and stored."""
    tensors = read_cached(name, key)
    if tensors is not None and (check is None or check(tensors)):
        return tensors
    tensors = build()
    write_cached(name, key, tensors)
    return tensors
