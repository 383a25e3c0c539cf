"""What the trainer writes beside log.jsonl while it runs: the HTML report and TensorBoard events.

:func:`training_outputs` gives the trainer one callable that sees every log record as it is
written (``RunLog(on_record=...)``); the trainer knows nothing of HTML or TensorBoard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from genlab.errors import ConfigError
from genlab.report.html import write_report

REPORT_FILE = "report.html"


class ReportEvery:
    """Rewrites ``RUN/report.html`` when training passes a multiple of ``every`` steps, and at the end."""

    def __init__(self, run_dir: str | Path, every: int):
        self.run_dir, self.every = Path(run_dir), every
        self.written_at = 0  # a resumed run writes at its first multiple

    def __call__(self, record: dict) -> None:
        kind, step = record.get("kind"), record["step"]
        due = kind == "train" and step // self.every > self.written_at // self.every
        if due or kind in ("end", "diverged"):
            write_report([self.run_dir], self.run_dir / REPORT_FILE)
            self.written_at = step


def training_outputs(run_dir: str | Path, report_every: int, tensorboard: bool) -> Callable[[dict], None] | None:
    """The record observer for ``train.report_every`` and ``train.tensorboard`` (None when both are off)."""
    if report_every < 0:
        raise ConfigError(f"train.report_every must be >= 0 (0: never), got {report_every}")
    observers: list[Callable[[dict], None]] = []
    if tensorboard:
        from genlab.report.tensorboard import TensorBoardWriter

        observers.append(TensorBoardWriter(run_dir))
    if report_every:
        observers.append(ReportEvery(run_dir, report_every))
    if not observers:
        return None

    def observe(record: dict) -> None:
        for observer in observers:
            observer(record)

    return observe
