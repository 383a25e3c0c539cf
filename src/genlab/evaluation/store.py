"""The metrics store: a run's ``metrics.json``, one entry per protocol, merged under a file lock."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from genlab.errors import DataError
from genlab.fileio import atomic_write_text

METRICS_FILE = "metrics.json"
# Protocol fields that describe when, how fast and by which path, not what was measured: not part of an
# entry's identity (a run scored as runs/x and as /abs/runs/x/ merges into one entry).
_VOLATILE = ("date", "seconds", "target")


def _protocol_identity(protocol: dict) -> dict:
    """The protocol without when/how-fast fields: entries with equal identities measured the same thing."""
    return {k: v for k, v in protocol.items() if k not in _VOLATILE}


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Entries of a ``metrics.json`` (a run folder or the file itself); [] when there is none yet."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e}); delete it and evaluate again") from None
    if isinstance(data, dict) and "entries" in data:
        return list(data["entries"])
    if isinstance(data, dict) and "metrics" in data and "protocol" in data:  # a single result (--json FILE)
        return [data]
    raise DataError(f"{path} is not a genlab metrics file (no 'entries')")


@contextlib.contextmanager
def _exclusive(path: Path):
    """Hold an exclusive lock on ``path`` + ".lock" (POSIX; elsewhere no lock): evaluations of one run
    started in parallel must not read the same metrics.json and each write back without the other's entry."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; parallel evaluations of one run may lose an entry
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def merge_metrics(path: str | os.PathLike, result: dict) -> Path:
    """Add ``result`` to ``metrics.json``: merged into the entry with the same protocol, else appended."""
    path = Path(path)
    with _exclusive(path):
        entries = read_metrics(path)
        identity = _protocol_identity(result["protocol"])
        for entry in entries:
            if _protocol_identity(entry["protocol"]) == identity:
                entry["metrics"].update(result["metrics"])
                entry["std"] = {**entry.get("std", {}), **result["std"]}
                entry["protocol"] = result["protocol"]  # newest date and timings
                break
        else:
            entries.append(result)
        atomic_write_text(path, json.dumps({"entries": entries}, indent=2) + "\n")
    return path


def write_result(result: dict, run_dir: Path | None, json_path: str | os.PathLike | None, write: bool = True) -> dict:
    """Store a result: merged into the run's metrics.json (when ``write`` and there is a run) and/or as ``json_path``."""
    if write and run_dir is not None:
        merge_metrics(Path(run_dir) / METRICS_FILE, result)
    if json_path is not None:
        atomic_write_text(Path(json_path), json.dumps(result, indent=2) + "\n")
    return result
