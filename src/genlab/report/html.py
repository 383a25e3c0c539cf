"""The HTML run report (SPEC P4): one self-contained file per run or per set of runs.

    genlab report RUN [RUN ...] --out report.html

Everything is read from the run folder's files, never from a model: ``config.yaml``, ``log.jsonl``
(the ``start`` record's command line and config, ``train`` curves, ``eval``, ``health`` and
``diverged`` records), ``metrics.json`` (every evaluation with its full protocol, and the sampler
and guidance sweeps found among its entries) and ``samples/step_*.png``. Images and plots are
inlined as ``data:`` URIs, so the page opens from disk with no network. All text is escaped and
nothing depends on the clock, so the same run folder gives the same bytes.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shlex
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Sequence

import yaml

from genlab.errors import GenlabError
from genlab.fileio import atomic_write_text
from genlab.report import plots

SAMPLE_FILE = re.compile(r"step_(\d+)\.png$")
# Training curves in this order (losses, learning rate, gradient norms, health); other numeric values follow.
CURVE_ORDER = (lambda k: "loss" in k, lambda k: k == "lr", lambda k: k.startswith("grad_norm"),
               lambda k: k.startswith("health_"))
_NOT_CURVES = {"elapsed_s"}
# Protocol keys a sweep varies; the rest must be equal for entries to share a sweep plot.
_SAMPLER_KEYS = ("sampler", "steps")


@dataclass
class RunFiles:
    """What a report shows of one run folder, read from its files."""

    path: Path
    name: str
    config: dict
    command: str
    records: list[dict] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    samples: list[tuple[int, Path]] = field(default_factory=list)  # (step, png), by step
    nfe_sweep: list[dict] = field(default_factory=list)  # points of benchmarks/sampler_sweep.py's JSON in RUN/


def reconstructed_command(config: dict) -> str:
    """``genlab train METHOD --data SOURCE key=value ...``: the config's values that differ from the defaults."""
    from genlab.config import RunConfig, to_dict
    from genlab.methods import get_method

    method = config.get("method", "?")
    try:
        defaults = to_dict(RunConfig(method=method, model=get_method(method).Config()))
    except GenlabError:  # an unknown method (a newer genlab's run): show every value
        defaults = {}
    overrides: list[str] = []

    def walk(value: Any, default: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, default.get(k) if isinstance(default, dict) else None, f"{key}.{k}" if key else k)
        elif value != default and key != "data.source":
            overrides.append(f"{key}={json.dumps(value).replace(' ', '')}")

    for section in ("data", "train", "model"):
        walk(config.get(section) or {}, defaults.get(section, {}), section)
    data = (config.get("data") or {}).get("source")
    return shlex.join(["genlab", "train", method] + (["--data", data] if data else []) + overrides)


def read_run(path: str | os.PathLike) -> RunFiles:
    """Read a run folder's config, log, metrics and sample grids (whatever exists yet)."""
    from genlab.evaluation import read_metrics
    from genlab.train.runlog import LOG_FILE, read_log

    path = Path(path)
    if not (path / "config.yaml").is_file() and not (path / LOG_FILE).is_file():
        raise GenlabError(f"{path}: not a genlab run folder (no config.yaml or log.jsonl); "
                          "give the folder `genlab train` printed")
    records = read_log(path) if (path / LOG_FILE).is_file() else []
    start = next((r["values"] for r in records if r.get("kind") == "start"), {})
    if (path / "config.yaml").is_file():
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    else:
        config = start.get("config", {})
    argv = start.get("argv") or []
    from_cli = len(argv) > 1 and Path(str(argv[0])).name in ("genlab", "cli.py") and argv[1] == "train"
    command = shlex.join(["genlab"] + [str(a) for a in argv[1:]]) if from_cli else reconstructed_command(config)
    samples = sorted((int(m.group(1)), p) for p in (path / "samples").glob("step_*.png")
                     if (m := SAMPLE_FILE.search(p.name)))
    return RunFiles(path=path, name=path.resolve().name, config=config, command=command, records=records,
                    metrics=read_metrics(path), samples=samples, nfe_sweep=_nfe_sweep_points(path))


def _nfe_sweep_points(path: Path) -> list[dict]:
    """Points of sampler-sweep JSON files in the run folder (``sampler_sweep.py --json RUN/sweep.json``)."""
    points = []
    for file in sorted(path.glob("*.json")):
        try:
            data = json.loads(file.read_text())
        except ValueError:
            continue
        is_sweep = isinstance(data, list) and data and all(
            isinstance(d, dict) and {"sampler", "nfe", "fid"} <= set(d) for d in data)
        if is_sweep:
            points += data
    return points


# ------------------------------------------------------------------------------------------ pieces


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _img(data: bytes, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" alt="{escape(alt)}" src="{_data_uri(data)}">'


def format_number(value: Any) -> str:
    """A metric as shown in the table: 6 significant digits (the exact value is in the cell's data-value)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return escape(str(value))
    return f"{value:.6g}"


def _train_series(run: RunFiles) -> dict[str, list[tuple[float, float]]]:
    """Every numeric value of the ``train`` records: key -> [(step, value)]."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in run.records:
        if r.get("kind") != "train":
            continue
        for k, v in r["values"].items():
            if k not in _NOT_CURVES and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(k, []).append((r["step"], float(v)))
    return out


def _curve_keys(series_keys: Sequence[str]) -> list[str]:
    """Keys in display order: losses, learning rate, gradient norms, health, then the rest."""
    ordered: list[str] = []
    for match in CURVE_ORDER:
        ordered += sorted(k for k in series_keys if match(k) and k not in ordered)
    return ordered + sorted(k for k in series_keys if k not in ordered)


def _curves_section(runs: Sequence[RunFiles]) -> str:
    """Training curves, a panel per logged value; several runs share axes (a line per run, aligned on the step)."""
    per_run = {run.name: _train_series(run) for run in runs}
    keys = _curve_keys({k for s in per_run.values() for k in s})
    if not keys:
        return "<p class='empty'>no training records in log.jsonl yet</p>"
    colors = {name: f"C{i % 10}" for i, name in enumerate(per_run)}  # matplotlib's default cycle, fixed per run
    panels = [plots.Panel(k, {name: s[k] for name, s in per_run.items() if k in s}, colors=colors) for k in keys]
    return _img(plots.panels_png(panels), "training curves: " + ", ".join(keys))


def _metrics_table(rows: Sequence[tuple[str, dict]]) -> str:
    """One row per (label, metrics.json entry): every metric (± std) and the full protocol, folded."""
    if not rows:
        return "<p class='empty'>no evaluations yet (metrics.json): run <code>genlab eval RUN</code></p>"
    names = list(dict.fromkeys(k for _, e in rows for k in e.get("metrics", {})))
    head = "".join(f"<th>{escape(n)}</th>" for n in names)
    body = []
    for label, entry in rows:
        p = entry.get("protocol", {})
        what = ", ".join(f"{k} {p[k]}" for k in ("kind", "reference", "n", "sampler", "steps", "weights",
                                                   "checkpoint_step") if p.get(k) is not None)
        what += "".join(f", {k} {v}" for k, v in (p.get("sample_options") or {}).items())
        cells = []
        for n in names:
            v = entry.get("metrics", {}).get(n)
            if v is None:
                cells.append("<td></td>")
                continue
            std = entry.get("std", {}).get(n)
            pm = f' <span class="std">± {format_number(std)}</span>' if std is not None else ""
            cells.append(f'<td class="metric" data-metric="{escape(n)}" data-value="{escape(repr(v))}">'
                         f'<span class="value">{format_number(v)}</span>{pm}</td>')
        protocol = escape(json.dumps(p, indent=1, sort_keys=True))
        body.append(f"<tr><td>{escape(label)}</td><td class='what'>{escape(what)}"
                    f"<details><summary>protocol</summary><pre>{protocol}</pre></details></td>{''.join(cells)}</tr>")
    return (f"<table class='metrics'><thead><tr><th>run</th><th>protocol</th>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def _identity(protocol: dict, varied: Sequence[str]) -> str:
    """What a sweep holds fixed: the protocol without its volatile fields and the ``varied`` keys."""
    from genlab.evaluation.store import _protocol_identity

    return json.dumps(_protocol_identity({k: v for k, v in protocol.items() if k not in varied}), sort_keys=True)


def _sampler_plot(lines: dict[str, list[tuple[float, float]]], protocol: dict, x: str, short: str) -> tuple[str, bytes]:
    """FID against ``x`` (NFE or steps; ``short`` names it in the alt text), a line per sampler, log x axis."""
    title = f"sampler sweep: FID ({protocol.get('extractor')} features, N={protocol.get('n')})"
    panel = plots.Panel(title, {k: sorted(v) for k, v in sorted(lines.items())}, x, "FID", logx=True)
    return f"sampler sweep: FID vs {short}", plots.panels_png([panel], cols=1)


def _sampler_sweeps(entries: Sequence[dict], nfe_sweep: Sequence[dict]) -> list[tuple[str, bytes]]:
    """FID vs NFE from a sweep file; else FID vs steps from metrics.json entries that differ only in sampler/steps."""
    if nfe_sweep:
        lines: dict[str, list[tuple[float, float]]] = {}
        for d in nfe_sweep:
            lines.setdefault(str(d["sampler"]), []).append((d["nfe"], d["fid"]))
        return [_sampler_plot(lines, nfe_sweep[0], "model evaluations (NFE)", "NFE")]
    groups: dict[str, list[dict]] = {}
    for e in entries:
        groups.setdefault(_identity(e["protocol"], _SAMPLER_KEYS), []).append(e)
    out = []
    for group in groups.values():
        lines = {}
        for e in group:
            if isinstance(e["protocol"].get("steps"), int):
                point = (e["protocol"]["steps"], e["metrics"]["fid"])
                lines.setdefault(str(e["protocol"].get("sampler")), []).append(point)
        if any(len(v) > 1 for v in lines.values()):
            out.append(_sampler_plot(lines, group[0]["protocol"], "sampler steps", "steps"))
    return out


def _guidance_sweeps(entries: Sequence[dict]) -> list[tuple[str, bytes]]:
    """FID (and class accuracy) vs guidance scale, over entries that differ only in the scale."""
    groups: dict[str, list[tuple[float, dict]]] = {}
    for e in entries:
        options = dict(e["protocol"].get("sample_options") or {})
        scale = options.pop("guidance_scale", None)
        if isinstance(scale, (int, float)):
            groups.setdefault(_identity({**e["protocol"], "sample_options": options}, ()), []).append((float(scale), e))
    out = []
    for group in groups.values():
        if len({s for s, _ in group}) > 1:
            metrics = [m for m in ("fid", "class_accuracy") if all(m in e["metrics"] for _, e in group)]
            panels = [plots.Panel(f"guidance sweep: {m}", {m: sorted((s, e["metrics"][m]) for s, e in group)},
                                  "guidance scale w", m) for m in metrics]
            out.append((f"guidance sweep: {', '.join(metrics)} vs guidance scale", plots.panels_png(panels, cols=2)))
    return out


def _sweeps(entries: Sequence[dict], nfe_sweep: Sequence[dict] = ()) -> list[tuple[str, bytes]]:
    """(alt text, PNG) of every sweep plot of a run."""
    scored = [e for e in entries if isinstance(e.get("metrics", {}).get("fid"), (int, float))]
    return _sampler_sweeps(scored, nfe_sweep) + _guidance_sweeps(scored)


def _notices(run: RunFiles) -> str:
    """Health warnings, divergence and any other non-routine log record, in step order."""
    routine = {"start", "train", "end", "eval", "sample"}
    rows = [r for r in run.records if r.get("kind") not in routine]
    if not rows:
        return "<p class='empty'>no warnings in log.jsonl</p>"
    items = "".join(f"<li><b>step {r['step']}</b> [{escape(str(r.get('kind')))}] "
                    f"{escape(json.dumps(r.get('values'), sort_keys=True))}</li>" for r in rows)
    return f"<ul class='warnings'>{items}</ul>"


def _periodic_evals(run: RunFiles) -> str:
    """Metrics logged during training (``eval`` records) as curves."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in run.records:
        if r.get("kind") == "eval":
            for k, v in r["values"].items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    series.setdefault(k, []).append((r["step"], float(v)))
    if not series:
        return ""
    panels = [plots.Panel(k, {run.name: v}) for k, v in sorted(series.items())]
    return "<h3>metrics during training</h3>" + _img(plots.panels_png(panels), "metrics during training")


def _grid_strip(samples: Sequence[tuple[int, Path]]) -> str:
    figs = "".join(f"<figure>{_img(p.read_bytes(), f'samples at step {s}', 'grid')}"
                   f"<figcaption>step {s}</figcaption></figure>" for s, p in samples)
    return f"<div class='grids'>{figs}</div>"


def _status(run: RunFiles) -> str:
    train = [r for r in run.records if r.get("kind") == "train"]
    steps = (run.config.get("train") or {}).get("steps")
    end = next((r for r in reversed(run.records) if r.get("kind") in ("end", "diverged")), None)
    at = train[-1]["step"] if train else 0
    state = "finished" if end and end["kind"] == "end" else ("diverged" if end else "running or interrupted")
    return f"step {at} of {steps}, {state}"


def _run_section(run: RunFiles, anchor: str) -> str:
    config = escape(yaml.safe_dump(run.config, sort_keys=False, default_flow_style=None))
    data = (run.config.get("data") or {}).get("source")
    sweeps = "".join(_img(png, alt) for alt, png in _sweeps(run.metrics, run.nfe_sweep))
    sweeps = sweeps or "<p class='empty'>no sweeps in metrics.json</p>"
    return f"""<section id="{anchor}">
<h2>{escape(run.name)}</h2>
<p class="meta">{escape(str(run.config.get('method', '?')))} on {escape(str(data))}
 &middot; {escape(_status(run))} &middot; <code>{escape(str(run.path))}</code></p>
<h3>command</h3><pre class="command">{escape(run.command)}</pre>
<h3>training curves</h3>{_curves_section([run])}
{_periodic_evals(run)}
<h3>samples over training</h3>{_grid_strip(run.samples) if run.samples else "<p class='empty'>no sample grids yet</p>"}
<h3>evaluations</h3>{_metrics_table([(run.name, e) for e in run.metrics])}
<h3>sweeps</h3>{sweeps}
<h3>warnings</h3>{_notices(run)}
<details><summary>config.yaml</summary><pre>{config}</pre></details>
</section>"""


def _comparison_section(runs: Sequence[RunFiles]) -> str:
    """Several runs: aligned curves, one metrics table, grids side by side at the steps all runs have."""
    common = sorted(set.intersection(*(set(s for s, _ in r.samples) for r in runs)))
    if common:
        rows = "".join(f"<tr><th>step {s}</th>" + "".join(
            f"<td>{_img(dict(r.samples)[s].read_bytes(), f'{r.name} at step {s}', 'grid')}</td>" for r in runs)
            + "</tr>" for s in common)
        heads = "".join(f"<th>{escape(r.name)}</th>" for r in runs)
        grids = f"<table class='side'><thead><tr><th></th>{heads}</tr></thead><tbody>{rows}</tbody></table>"
    else:
        grids = "<p class='empty'>the runs have no sample grids at a common step</p>"
    table = _metrics_table([(r.name, e) for r in runs for e in r.metrics])
    return f"""<section id="compare">
<h2>comparison of {len(runs)} runs</h2>
<h3>training curves</h3>{_curves_section(runs)}
<h3>evaluations</h3>{table}
<h3>samples at equal steps</h3>{grids}
</section>"""


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1240px;padding:16px 28px;color:#1d2330;background:#fff}
h1{font-size:22px;margin:4px 0 2px}h2{font-size:18px;border-bottom:2px solid #dde3ec;padding-bottom:4px;margin-top:28px}
h3{font-size:14px;margin:18px 0 6px;color:#3a4a63;text-transform:uppercase;letter-spacing:.04em}
.meta{color:#5b6780;margin:2px 0}pre{background:#f5f7fa;border:1px solid #e3e8ef;padding:8px 10px;overflow-x:auto;font-size:12px;white-space:pre-wrap;overflow-wrap:anywhere}
img.plot{max-width:100%;display:block;margin:4px 0 8px}
.grids{display:flex;flex-wrap:wrap;gap:14px}figure{margin:0;text-align:center}figcaption{font-size:12px;color:#5b6780}
img.grid{width:168px;image-rendering:pixelated;border:1px solid #d0d7e2}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #dde3ec;padding:4px 8px;vertical-align:top;text-align:left}
thead th{background:#eef2f7}td.metric{text-align:right;font-variant-numeric:tabular-nums}.std{color:#7a869c;font-size:11px}
td.what{max-width:460px}details summary{cursor:pointer;color:#2b5fb3}.empty{color:#7a869c;font-style:italic}
ul.warnings li{color:#8a4b00}nav a{margin-right:12px}
"""


def render_report(runs: Sequence[RunFiles]) -> str:
    """The report's HTML for one run (its page) or several (a comparison first, then each run)."""
    if not runs:
        raise GenlabError("genlab report needs at least one run folder")
    if len({r.name for r in runs}) < len(runs):  # runs/a/run and runs/b/run: tell them apart by path
        for r in runs:
            r.name = str(r.path)
    anchors = [f"run-{i}" for i in range(len(runs))]
    nav = "".join(f'<a href="#{a}">{escape(r.name)}</a>' for a, r in zip(anchors, runs))
    body = (_comparison_section(runs) if len(runs) > 1 else "") + "".join(
        _run_section(r, a) for r, a in zip(runs, anchors))
    title = "genlab report: " + ", ".join(r.name for r in runs)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title><style>{STYLE}</style></head>
<body><h1>{escape(title)}</h1>
{f"<nav>{nav}</nav>" if len(runs) > 1 else ""}
{body}
</body></html>
"""


def write_report(runs: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike | None = None) -> Path:
    """Write the HTML report of one or more run folders (default ``RUN/report.html``); returns its path."""
    paths = [runs] if isinstance(runs, (str, os.PathLike)) else list(runs)
    if not paths:
        raise GenlabError("genlab report needs at least one run folder")
    out = Path(out) if out is not None else Path(paths[0]) / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise GenlabError(f"--out {out}: a report is an HTML file; give a name ending in .html")
    text = render_report([read_run(p) for p in paths])
    return atomic_write_text(out, text)  # a browser refreshing during training never sees half a page
