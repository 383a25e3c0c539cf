"""One place for durable file writes and content hashes.

Every file genlab writes (config.yaml, checkpoint files, sample grids, data caches) goes through
:func:`atomic_write`: the bytes land in a temporary sibling, are flushed and fsynced, and the
temporary file is renamed over the target (atomic on POSIX and NTFS), so a crash or a full disk
leaves either the old file or the new one, never half of one. A failed write (disk full, file too
large, read-only folder) is one :class:`~genlab.errors.WriteError` line naming the folder and its
free space, and the previous file stays intact.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from genlab.errors import WriteError

_CHUNK = 1 << 20  # hash files in 1 MiB chunks: no second copy of a large checkpoint in RAM


def resolve_cache_dir() -> Path:
    """genlab's cache folder: the environment variable GENLAB_CACHE, else ~/.cache/genlab."""
    return Path(os.environ.get("GENLAB_CACHE") or Path.home() / ".cache" / "genlab").expanduser()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _free_space(folder: Path) -> str:
    """Free space of the file system holding ``folder`` (or its nearest existing parent), for messages."""
    for candidate in (folder, *folder.parents):
        try:
            free = shutil.disk_usage(candidate).free
        except OSError:
            continue
        for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
            if free < 1024 or unit == "TiB":
                return f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
            free /= 1024
    return "unknown"


def write_error(err: OSError, path: str | os.PathLike) -> WriteError:
    """The one-line error for a failed write of ``path``: what failed, where, the free space and the fix."""
    folder = Path(path).parent
    cause = err.strerror or str(err) or type(err).__name__
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make the folder writable or choose another one"
    elif err.errno == errno.EFBIG:
        fix = "raise the file-size limit (ulimit -f) or choose another folder"
    else:
        fix = "free some space or choose another folder"
    error = WriteError(f"cannot write {Path(path).name} in {folder} ({cause}; {_free_space(folder)} free there): "
                       f"{fix}; earlier files are intact")
    error.os_error = err  # the cause, for callers that re-word the message
    return error


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or creation inside folder ``path`` durable (POSIX; a no-op where folders can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Create or replace ``path`` atomically with what ``write(tmp_path)`` writes; fsynced before the rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")  # suffix kept: writers that sniff it
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise write_error(err, path) from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Create or replace ``path`` with ``data`` atomically and durably."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Create or replace ``path`` with UTF-8 ``text`` atomically and durably."""
    return atomic_write_bytes(path, text.encode("utf-8"))
