"""Compare runs: one Markdown table per family of metrics and one bar chart, from each run's ``metrics.json``.

Each family gets its own columns (issue 13): generation (FID / KID / IS / PR / DC and class
accuracy, with the sampler, steps, guidance and reference they were measured with),
reconstruction (MSE / PSNR / SSIM, the ELBO, codebook usage) and translation (PSNR / SSIM and the
do-nothing baseline). A run appears in every family it has an entry for (its newest one). Under
each table, one warning line per protocol field in which the compared entries differ: such numbers
are not directly comparable.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

from genlab.errors import ConfigError, DataError

# Metric columns of each family, in print order; a column is shown when some entry has it.
FAMILIES = {
    "generation": ("fid", "kid", "is", "precision", "recall", "density", "coverage", "class_accuracy"),
    "reconstruction": ("mse", "psnr", "psnr_dataset", "ssim", "nll_nats", "bits_per_dim", "code_usage",
                       "code_perplexity"),
    "translation": ("psnr", "ssim", "psnr_input", "ssim_input"),
}
# Protocol columns of each family (what a reader needs beside the numbers).
_PROTOCOL_COLUMNS = {
    "generation": (("step", "checkpoint_step"), ("N", "n"), ("reference", "reference"), ("extractor", "extractor"),
                   ("sampler", "sampler"), ("steps", "steps"), ("guidance", "guidance")),
    "reconstruction": (("step", "checkpoint_step"), ("N", "n"), ("data", "data")),
    "translation": (("step", "checkpoint_step"), ("N", "n"), ("data", "data"), ("task", "task")),
}
# Protocol fields whose differences make numbers incomparable, warned about one line each.
_MUST_MATCH = {
    "generation": ("n", "sampler", "steps", "guidance", "reference", "reference_n", "extractor_sha256", "seed",
                   "weights", "kid_subset_size"),
    "reconstruction": ("n", "data", "weights", "psnr", "ssim_window"),
    "translation": ("n", "data", "task", "seed", "weights", "psnr", "ssim_window"),
}
_GUIDANCE_OPTIONS = ("guidance_scale", "negative_labels", "classifier", "classifier_scale", "rules")
_LOWER_IS_BETTER = {"fid", "kid", "mse", "nll_nats", "bits_per_dim"}


def kind_of(entry: dict) -> str:
    """The family of a metrics entry (entries written before protocols named their kind are generation)."""
    return entry["protocol"].get("kind", "generation")


def guidance_of(protocol: dict) -> str:
    """The guidance a generation entry was sampled with, as one word list (``none`` when unguided)."""
    options = protocol.get("sample_options") or {}
    used = [f"{k}={json.dumps(options[k], sort_keys=True)}" for k in _GUIDANCE_OPTIONS if options.get(k) is not None]
    return " ".join(used) or "none"


def _newest(entries: list[dict], kind: str, ref: str | None) -> dict | None:
    """The newest entry of a family (generation entries against ``ref`` when given)."""
    chosen = [e for e in entries if kind_of(e) == kind
              and (ref is None or kind != "generation" or e["protocol"].get("reference") == ref)]
    return max(chosen, key=lambda e: e["protocol"].get("date", "")) if chosen else None


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(kind: str, rows: list[dict]) -> list[str]:
    """The Markdown lines of one family's table, then its protocol warnings."""
    columns = [c for c in FAMILIES[kind] if any(c in r["metrics"] for r in rows)]
    header = ["run", *(name for name, _ in _PROTOCOL_COLUMNS[kind]), *columns]
    lines = [f"{kind}:", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        p = {**r["protocol"], "guidance": guidance_of(r["protocol"])}
        cells = [Path(r["run"]).name or r["run"], *(_cell(p.get(field)) for _, field in _PROTOCOL_COLUMNS[kind])]
        for c in columns:
            value, std = r["metrics"].get(c), r.get("std", {}).get(c)
            cells.append("-" if value is None else f"{value:.4g}" + (f" +- {std:.2g}" if std is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    for field in _MUST_MATCH[kind]:
        seen = []
        for r in rows:
            value = guidance_of(r["protocol"]) if field == "guidance" else r["protocol"].get(field)
            if value not in seen:
                seen.append(value)
        if len(seen) > 1:
            lines.append(f"warning: the {kind} protocols differ in {field} ({' vs '.join(_cell(v) for v in seen)}); "
                         "these numbers are not directly comparable")
    return lines


def compare(
    runs: Sequence[str | os.PathLike],
    ref: str | None = None,
    out: str | os.PathLike | None = "compare.png",
) -> tuple[str, list[dict]]:
    """Markdown tables (one per family) and a PNG bar chart at ``out`` of the newest metrics of each run.

    ``runs`` are run folders (their ``metrics.json``) or metrics JSON files; ``ref`` picks the
    generation entries scored against that split. Returns (text, rows), one row per run and family:
    ``{"run", "kind", "metrics", "std", "protocol"}``.
    """
    from genlab.evaluation.store import read_metrics

    if not runs:
        raise ConfigError("compare needs at least one run folder or metrics JSON file")
    if out is not None and Path(out).suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: the chart is a PNG; give a file name ending in .png")
    rows = []
    for run in runs:
        path = Path(run)
        if not path.exists():
            raise DataError(f"{path}: no such run folder or metrics file")
        entries = read_metrics(path)
        found = [e for e in (_newest(entries, kind, ref) for kind in FAMILIES) if e is not None]
        if not found:
            what = f" against {ref}" if ref else ""
            raise DataError(f"{path} has no metrics{what} yet; run `genlab eval {path}"
                            f"{' --ref ' + ref if ref else ''}` first")
        rows.extend({"run": str(path), "kind": kind_of(e), **e} for e in found)
    lines: list[str] = []
    for kind in FAMILIES:
        family = [r for r in rows if r["kind"] == kind]
        if family:
            lines.extend(([""] if lines else []) + _table(kind, family))
    if out is not None:
        _bar_chart(rows, Path(out))
    return "\n".join(lines), rows


def _bar_chart(rows: list[dict], out: Path) -> Path:
    """One panel per metric shown in the tables, one bar per run (with the std as an error bar where there is one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from genlab.fileio import atomic_write

    panels = [(kind, c) for kind in FAMILIES for c in FAMILIES[kind]
              if any(r["kind"] == kind and c in r["metrics"] for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(2.6 * max(1, len(panels)) + 1, 3.2), squeeze=False)
    for ax, (kind, column) in zip(axes[0], panels):
        family = [r for r in rows if r["kind"] == kind]
        values = [r["metrics"].get(column, math.nan) for r in family]
        errors = [r.get("std", {}).get(column, 0.0) for r in family]
        ax.bar(range(len(family)), values, yerr=errors, color=[f"C{i % 10}" for i in range(len(family))])
        ax.set_title(column + (" (lower is better)" if column in _LOWER_IS_BETTER else ""), fontsize=9)
        ax.set_xticks(range(len(family)), [Path(r["run"]).name or r["run"] for r in family], rotation=30, ha="right",
                      fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)
    return out
