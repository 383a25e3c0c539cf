"""fileio: atomic, durable writes with one-line failures; sha256 of files and bytes."""

from __future__ import annotations

import errno
import hashlib
import os
from types import SimpleNamespace

import pytest

from genlab import fileio
from genlab.errors import GenlabError, WriteError

from oneline import one_line


def test_sha256_matches_the_standard_test_vectors(tmp_path):
    # FIPS 180-2 examples: "abc" and the empty message.
    assert fileio.sha256_bytes(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert fileio.sha256_bytes(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    big = os.urandom(3 * (1 << 20) + 17)  # more than one read chunk
    (tmp_path / "big").write_bytes(big)
    assert fileio.sha256_file(tmp_path / "big") == hashlib.sha256(big).hexdigest()


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "config.yaml"
    fileio.atomic_write_text(path, "a: 1\n")
    fileio.atomic_write_text(path, "a: 2\n")
    assert path.read_text() == "a: 2\n" and os.listdir(path.parent) == ["config.yaml"]


@pytest.mark.parametrize("code, fix", [(errno.ENOSPC, "free some space"), (errno.EFBIG, "ulimit -f"),
                                       (errno.EACCES, "writable"), (errno.EROFS, "writable")])
def test_a_failed_write_keeps_the_old_file_and_is_one_line(tmp_path, code, fix):
    path = tmp_path / "grid.png"
    path.write_bytes(b"old")

    def half_then_fail(tmp):
        tmp.write_bytes(b"ne")
        raise OSError(code, os.strerror(code))

    with pytest.raises(WriteError) as info:
        fileio.atomic_write(path, half_then_fail)
    message = one_line(str(info.value))
    assert isinstance(info.value, GenlabError) and info.value.os_error.errno == code
    assert message.startswith(f"cannot write grid.png in {tmp_path} ({os.strerror(code)}; ")
    assert " free there" in message and fix in message
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["grid.png"]


def test_free_space_is_reported_for_the_nearest_existing_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda p: SimpleNamespace(free=3 * 1024**3 // 2))
    message = str(fileio.write_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "no" / "such" / "f"))
    assert "1.5 GiB free there" in message and str(tmp_path / "no" / "such") in message
