"""Model cards: the README.md of every folder genlab exports (issue 18 item 5; SPEC E5).

One writer for every export (diffusers folders today; evaluators and adapters may call it too): the
exporter says what the folder is and how to use it, and the card adds what the run folder knows,
read through :func:`genlab.report.html.read_run` as the HTML report reads it: the command that
trained it, its data, its steps, every evaluation in ``metrics.json`` with its protocol (a number
without its protocol is not reported), the resolved config, and the versions. Markdown, so it renders
on the Hub and on GitHub.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any, Sequence

import yaml

from genlab.fileio import atomic_write_text

CARD_FILE = "README.md"
# Protocol fields shown in a card's metrics table (the rest stays in the full protocol line).
_PROTOCOL_SUMMARY = ("reference", "n", "extractor", "sampler", "steps", "seed", "weights", "checkpoint_step")


def _cell(value: Any) -> str:
    """A value for a Markdown table cell: numbers to 4 significant digits, pipes escaped."""
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (dict, list)):
        text = json.dumps(value, sort_keys=True)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def metrics_section(entries: Sequence[dict], step: int | None) -> str:
    """Every metrics.json entry as a table row: the values (± std) and the protocol they were measured under."""
    if not entries:
        return ("No evaluation is recorded in the run's metrics.json: score it with `genlab eval RUN --ref SOURCE:SPLIT` "
                "before exporting to have its numbers here.")
    names = list(dict.fromkeys(k for e in entries for k in e.get("metrics", {})))
    lines = ["| " + " | ".join(["protocol", *names]) + " |", "|" + "---|" * (len(names) + 1)]
    for entry in entries:
        p = entry.get("protocol", {})
        what = ", ".join(f"{k} {_cell(p[k])}" for k in _PROTOCOL_SUMMARY if p.get(k) is not None)
        what += "".join(f", {k} {_cell(v)}" for k, v in (p.get("sample_options") or {}).items())
        cells = []
        for name in names:
            value, std = entry.get("metrics", {}).get(name), entry.get("std", {}).get(name)
            cells.append("" if value is None else _cell(value) + ("" if std is None else f" ± {_cell(std)}"))
        lines.append("| " + " | ".join([what, *cells]) + " |")
    text = "\n".join(lines)
    measured = sorted({e.get("protocol", {}).get("checkpoint_step") for e in entries} - {None})
    if step is not None and measured and measured != [step]:
        text += (f"\n\nThe evaluations were measured on checkpoint step(s) {', '.join(map(str, measured))}; "
                 f"this export is step {step}.")
    full = [json.dumps({k: v for k, v in e.get("protocol", {}).items() if k != "seconds"}, sort_keys=True)
            for e in entries]
    return text + "\n\nFull protocols (metrics.json):\n\n```json\n" + "\n".join(full) + "\n```"


def model_card(run_dir: str | os.PathLike, *, title: str, summary: str, usage: str, step: int | None = None,
               weights: str | None = None, provenance: dict[str, Any] | None = None) -> str:
    """The Markdown card of a folder exported from the run ``run_dir``.

    ``summary`` and ``usage`` are the exporter's (what the folder is; how to load it); ``step`` and
    ``weights`` say which checkpoint and weights (ema / raw) were exported; ``provenance`` adds
    lines (e.g. where an imported run came from).
    """
    import torch

    import genlab
    from genlab.report.html import read_run

    run = read_run(run_dir)
    config = run.config
    data, train = config.get("data") or {}, config.get("train") or {}
    shape = ", ".join(f"{k} {data[k]}" for k in ("split", "image_size", "channels", "limit", "fit")
                      if data.get(k) is not None)
    lines = [f"# {title}", "", summary, "", "## Training", "",
             f"- Command: `{run.command}`",
             f"- Data: `{data.get('source', '?')}`" + (f" ({shape})" if shape else ""),
             f"- Steps: {step if step is not None else '?'} of {train.get('steps', '?')} planned, batch "
             f"{train.get('batch_size', '?')}, learning rate {train.get('lr', '?')}, seed {train.get('seed', '?')}",
             f"- Weights: {weights or '?'}" + (f" (EMA decay {train.get('ema_decay')})" if weights == "ema" else ""),
             "", "## Metrics", "", metrics_section(run.metrics, step), "", "## Usage", "",
             "`PATH` is this folder (or its Hub name).", "", usage, "", "## Configuration", "",
             "The run's resolved `config.yaml`:", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```",
             "", "## Provenance", "",
             f"- genlab {genlab.__version__}, torch {torch.__version__}",
             f"- Exported {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')} from the run "
             f"folder `{Path(run_dir).resolve()}`"]
    for key, value in (provenance or {}).items():
        lines.append(f"- {key}: {_cell(value)}")
    return "\n".join(lines) + "\n"


def write_model_card(folder: str | os.PathLike, run_dir: str | os.PathLike, **card: Any) -> Path:
    """Write :func:`model_card` (``card``: its keyword arguments) as ``folder/README.md``; returns the path."""
    path = Path(folder) / CARD_FILE
    atomic_write_text(path, model_card(run_dir, **card))
    return path
