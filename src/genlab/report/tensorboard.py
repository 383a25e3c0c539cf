"""TensorBoard event files of a run (``train.tensorboard=true``), written from its log records.

The writer sees the same records as ``log.jsonl`` (see :mod:`genlab.report.live`): ``train`` values
become scalars ``train/<key>``, ``eval`` values ``eval/<key>``, new ``samples/step_*.png`` grids become
images ``samples``, and the ``end`` record writes the hyper-parameters (the flattened config) with the
final values as their metrics (``final/<key>``). Events go to ``RUN/tensorboard/``:
``tensorboard --logdir runs``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from genlab.errors import GenlabError

EVENTS_DIR = "tensorboard"


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises this when the tensorboard package is absent
        raise GenlabError("train.tensorboard=true needs the tensorboard package: pip install 'genlab[tensorboard]' "
                          "(or set train.tensorboard=false)") from None
    return SummaryWriter


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    """The finite numeric entries of a record's values (strings, lists and non-finite floats are skipped)."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flat_hparams(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config as TensorBoard hparams: ``train.lr`` -> 2e-4; lists and None as text."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_hparams(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


class TensorBoardWriter:
    """Turns a run's log records into TensorBoard scalars, sample images and hparams."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.writer = _summary_writer()(log_dir=str(self.run_dir / EVENTS_DIR))
        self.final: dict[str, float] = {}
        self.images_written: set[str] = set()

    def _new_samples(self) -> None:
        from PIL import Image

        for path in sorted((self.run_dir / "samples").glob("step_*.png")):
            if path.name in self.images_written:
                continue
            self.images_written.add(path.name)
            image = np.asarray(Image.open(path).convert("RGB"))  # (H, W, 3) uint8
            self.writer.add_image("samples", image, global_step=int(path.stem.split("_")[1]), dataformats="HWC")

    def __call__(self, record: dict) -> None:
        kind, step, values = record.get("kind"), record["step"], record.get("values", {})
        if kind in ("train", "eval"):
            numbers = _numbers(values)
            for k, v in numbers.items():
                self.writer.add_scalar(f"{kind}/{k}", v, global_step=step)
            self.final.update({f"final/{kind}/{k}": v for k, v in numbers.items()})
        self._new_samples()
        if kind in ("end", "diverged"):
            self.close()
        else:
            self.writer.flush()

    def close(self) -> None:
        """Write the hparams (config and final values) and close the event file."""
        if self.writer is None:
            return
        import yaml
        from torch.utils.tensorboard.summary import hparams

        config_file = self.run_dir / "config.yaml"
        if config_file.is_file():
            config = yaml.safe_load(config_file.read_text()) or {}
            for summary in hparams(flat_hparams(config), self.final):
                self.writer.file_writer.add_summary(summary)
            for k, v in self.final.items():  # the hparams view shows metrics that are also scalars
                self.writer.add_scalar(k, v)
        self.writer.close()
        self.writer = None
