"""One Markdown table of several runs side by side: training cost, sampling cost and metrics.

    python benchmarks/family_table.py RUN [RUN ...] [--ref mnist:test]

To train and score every generative family at one CPU budget first (the all-families table), use
`genlab bench families --data mnist --minutes M` (genlab.report.families); this script tabulates any
runs that already exist.

For each run: method, steps trained, training wall time (from log.jsonl), threads, the newest
generation metrics against --ref (FID, KID, precision, recall, density, coverage with N and the
sampling time per image from the protocol) and, where the run was scored on reconstructions, MSE /
PSNR / SSIM / ELBO / codebook usage. Evaluate the runs first with `genlab eval`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from genlab.config import read_config_file
from genlab.evaluation import read_metrics
from genlab.report.families import training_summary

GENERATION = ("fid", "kid", "precision", "recall", "density", "coverage")
RECONSTRUCTION = ("mse", "psnr", "ssim", "nll_nats", "bits_per_dim", "code_usage", "code_perplexity")


def _fmt(value) -> str:
    return "-" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--ref", default="mnist:test", help="reference of the generation metrics (default mnist:test)")
    a = parser.parse_args()
    rows, has_recon = [], False
    for run in a.runs:
        entries = read_metrics(run)
        gen = [e for e in entries if e["protocol"].get("reference") == a.ref]
        rec = [e for e in entries if e["protocol"].get("kind") == "reconstruction"]
        has_recon |= bool(rec)
        steps, minutes, threads = training_summary(run)
        row = {"run": run.name, "method": read_config_file(run / "config.yaml")["method"], "steps": steps,
               "train min": round(minutes, 1), "threads": threads}
        if gen:
            p = gen[-1]["protocol"]
            row.update({k: gen[-1]["metrics"].get(k) for k in GENERATION})
            row["N"] = p["n"]
            row["sample ms/img"] = round(1000 * p["seconds"]["sample"] / p["n"], 2)
            row["sampler"] = f"{p.get('sampler') or '-'} {p.get('steps') or ''}".strip()
        if rec:
            row.update({k: rec[-1]["metrics"].get(k) for k in RECONSTRUCTION})
        rows.append(row)
    columns = ["run", "method", "steps", "train min", "threads", "N", "sampler", "sample ms/img", *GENERATION]
    if has_recon:
        columns += list(RECONSTRUCTION)
    columns = [c for c in columns if any(r.get(c) is not None for r in rows)]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")


if __name__ == "__main__":
    main()
