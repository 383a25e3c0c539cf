"""The run's training log: one JSON object per line in ``RUN/log.jsonl`` (SPEC P4).

Each record is ``{"step": int, "time": unix seconds, "kind": str, "values": {...}}``; ``kind`` says
what produced it ("train", "eval", "sample", "health", ...). Lines are written whole and flushed
one by one, so a crash loses at most the line being written; :func:`read_log` drops such a partial
last line with a warning, and :class:`RunLog` cuts it off before appending again. A corrupt line
in the middle (a disk error, a hand edit) is skipped with one warning, never fatal.

The run's history is told by two kinds of record: every launch (fresh or ``--resume``) writes one
``start`` (its step, its config or the settings it changed), and a launch that finishes its steps
or stops cleanly (time limit, signal) writes one ``end``.

Strict JSON has no NaN or infinity, yet a diverging loss is worth logging: non-finite floats are
written as the strings ``"nan"``, ``"inf"``, ``"-inf"`` and :func:`read_log` turns those strings
under ``values`` back into floats.

On each launch, :meth:`RunLog.begin_launch` drops the records written after the checkpoint being
resumed (and the ``start`` of a launch that died before saving), so the log never describes weights
that no longer exist. Only the main process logs.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from genlab.errors import ConfigError, GenlabError
from genlab.fileio import atomic_write_text

LOG_FILE = "log.jsonl"
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _log_path(path: str | os.PathLike) -> Path:
    """``RUN/log.jsonl`` for a run folder; the path itself when it already names a .jsonl file."""
    path = Path(path)
    return path if path.suffix == ".jsonl" else path / LOG_FILE


def _to_json(value: Any, key: str) -> Any:
    """A JSON-able copy of a logged value: one-element tensors / arrays to numbers, larger ones to lists."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        value = value.item() if value.numel() == 1 else value.cpu().tolist()
    elif isinstance(value, (np.ndarray, np.generic)):
        value = value.item() if value.size == 1 else value.tolist()
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _to_json(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v, f"{key}[{i}]") for i, v in enumerate(value)]
    raise ConfigError(f"cannot log '{key}': a {type(value).__name__} is not a number, string, tensor, list or dict")


def _from_json(value: Any) -> Any:
    """Undo the non-finite-float encoding of :func:`_to_json`."""
    if isinstance(value, str):
        return _NON_FINITE.get(value, value)
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _complete_lines(path: Path) -> tuple[list[tuple[str, dict]], bool, list[int]]:
    """Parsed ``(line, record)`` pairs of a log file, whether a partial last line was dropped, and the
    numbers of corrupt lines in the middle (skipped: one bad line must not cost the whole run's log)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    # After the final "\n" split() yields "" for a complete file; anything else is an unterminated tail.
    tail = lines.pop()
    records: list[tuple[str, dict]] = []
    corrupt: list[int] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _parse(line)
        if record is None:
            corrupt.append(number)
        else:
            records.append((line, record))
    dropped = False
    if tail.strip():
        record = _parse(tail)
        if record is not None:  # whole record, only its newline is missing
            records.append((tail, record))
        else:
            dropped = True
    return records, dropped, corrupt


def _parse(line: str) -> dict | None:
    """A log record (a JSON object with an integer 'step') from one line, or None."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def _warn_damage(path: Path, dropped: bool, corrupt: list[int], stacklevel: int) -> None:
    """One warning naming what was skipped: corrupt middle lines and / or a partial last line."""
    parts = []
    if corrupt:
        shown = ", ".join(map(str, corrupt[:5])) + (", ..." if len(corrupt) > 5 else "")
        parts.append(f"skipped {len(corrupt)} corrupt line{'s' * (len(corrupt) > 1)} ({shown})")
    if dropped:
        parts.append("dropped a partial last line (the run was interrupted while writing it)")
    if parts:
        warnings.warn(f"{path}: {'; '.join(parts)}", stacklevel=stacklevel + 1)


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a run's log (a run folder or a .jsonl path); damaged lines are skipped with one warning."""
    path = _log_path(path)
    if not path.is_file():
        raise GenlabError(f"no training log at {path}; is this a genlab run folder?")
    records, dropped, corrupt = _complete_lines(path)
    _warn_damage(path, dropped, corrupt, stacklevel=2)
    out = []
    for _, record in records:
        if isinstance(record.get("values"), dict):
            record["values"] = _from_json(record["values"])
        out.append(record)
    return out


def _rewrite(path: Path, lines: list[str]) -> None:
    """Atomically replace the file's content with ``lines`` (temp file, fsync, rename)."""
    atomic_write_text(path, "".join(line + "\n" for line in lines))


class RunLog:
    """Append-only JSON-lines log of a run, flushed line by line."""

    def __init__(self, run_dir: str | os.PathLike, on_record: Callable[[dict], None] | None = None):
        self.path = _log_path(run_dir)
        self.on_record = on_record  # sees each record once it is on disk (live report, TensorBoard)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file() and self.path.stat().st_size > 0:
            self._repair_tail()
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # line-buffered

    def _repair_tail(self) -> None:
        """Cut a partial last line left by a crash, so the next record does not glue onto it."""
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
        records, dropped, corrupt = _complete_lines(self.path)
        _warn_damage(self.path, dropped, corrupt, stacklevel=3)
        _rewrite(self.path, [line for line, _ in records])

    def log(self, step: int, values: dict[str, Any], kind: str = "train") -> dict[str, Any]:
        """Append one record ``{step, time, kind, values}`` and flush it; returns the record written."""
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise ConfigError(f"log step must be an int, got {step!r}")
        if not isinstance(values, dict):
            raise ConfigError(f"log values must be a dict of name -> number, got {type(values).__name__}")
        record = {
            "step": int(step),
            "time": round(time.time(), 3),
            "kind": str(kind),
            "values": {str(k): _to_json(v, str(k)) for k, v in values.items()},
        }
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self.on_record is not None:
            self.on_record(record)
        return record

    def sync(self) -> None:
        """Flush and fsync, so the log on disk is durable (call before writing a checkpoint)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def truncate_after(self, step: int) -> int:
        """Drop every record with ``record["step"] > step`` (on resume from that step); returns how many."""
        return self._keep(lambda record: record["step"] <= step)

    def begin_launch(self, step: int) -> int:
        """Cut the log back to what the checkpoint at ``step`` describes, before a launch logs its ``start``.

        Records after ``step`` describe weights that no longer exist. A fresh launch (step 0: there is no
        checkpoint) starts a new log. A ``start`` at ``step`` itself belongs to a launch that died before
        saving anything (the launch that wrote checkpoint ``step`` started before it), so it goes too:
        each surviving launch keeps exactly one ``start``. Corrupt lines are dropped with one warning.
        Returns the number of lines dropped.
        """
        if step == 0:
            return self._keep(lambda record: False)
        return self._keep(lambda record: record["step"] < step or (record["step"] == step and record.get("kind") != "start"))

    def _keep(self, keep) -> int:
        """Rewrite the log with the records for which ``keep(record)`` is true; returns how many lines went."""
        self._file.close()
        records, dropped, corrupt = _complete_lines(self.path)
        _warn_damage(self.path, dropped, corrupt, stacklevel=4)
        kept = [line for line, record in records if keep(record)]
        _rewrite(self.path, kept)
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)
        return len(records) - len(kept) + int(dropped) + len(corrupt)

    def records(self) -> list[dict[str, Any]]:
        """The records written so far (as :func:`read_log` returns them)."""
        self._file.flush()
        return read_log(self.path)

    def close(self) -> None:
        """Flush, fsync and close the file."""
        if not self._file.closed:
            self.sync()
            self._file.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
