"""Seconds per part of scoring N generated images against a cached reference: fit, FID, KID, IS, PR/DC.

    python benchmarks/scoring_speed.py [--n 10000] [--dims 128 2048] [--threads 2] [--repeats 3]

The reference (features, mean, covariance) is computed before the clock starts, as `genlab eval` reads
it from its cache; the generated side is N random features of each dimension (128: the project's
evaluators; 2048: Inception) and random 10-class probabilities. Each part runs with the protocol's
settings (KID 100 subsets of 1000, IS 10 splits, PR k = 3, DC k = 5); the table reports the median of
``--repeats`` runs, wall clock and process CPU time (CPU / wall near the thread count on a quiet machine).
"kid, sums cached" and "prdc, radii cached" are KID given the within-real kernel sums of its subsets and
PR/DC given the reference's k-NN radii, as `genlab eval`'s reference cache stores them after the first
score; "all five metrics, cached" is the total of what a score against such a reference runs.
The feature pass of the evaluator network is not included (it depends on the images, not on N features).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import time

import torch

from genlab.evaluation.generation import IS_SPLITS, K_DENSITY_COVERAGE, K_PRECISION_RECALL, KID_SUBSET_SIZE, KID_SUBSETS
from genlab.metrics import GaussianStats, frechet_distance, inception_score, kernel_inception_distance
from genlab.metrics import kid_real_kernel_sums, knn_radii, precision_recall_density_coverage


def _timed(fn, repeats: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of ``repeats`` calls of fn()."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def _parts(n: int, dim: int, seed: int) -> dict:
    """What each timed part calls, on a reference of n features and n generated ones of dimension dim."""
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(n, dim, generator=g, dtype=torch.float64).relu()  # post-ReLU, like both evaluators
    fake = (1.1 * torch.randn(n, dim, generator=g, dtype=torch.float64) + 0.05).relu()
    probabilities = torch.softmax(3 * torch.randn(n, 10, generator=g, dtype=torch.float64), dim=1)
    ref = GaussianStats().update(real)  # the cached reference's statistics
    fit = lambda: GaussianStats().update(fake)  # noqa: E731
    fake_stats = fit()
    parts = {
        "fit (mean, cov)": fit,
        "fid": lambda: frechet_distance(fake_stats.mean, fake_stats.covariance, ref.mean, ref.covariance),
        "kid": lambda: kernel_inception_distance(real, fake, KID_SUBSETS, KID_SUBSET_SIZE,
                                                 torch.Generator().manual_seed(0)),
        "is": lambda: inception_score(probabilities, IS_SPLITS, torch.Generator().manual_seed(0)),
        "prdc": lambda: precision_recall_density_coverage(real, fake, K_PRECISION_RECALL, K_DENSITY_COVERAGE),
    }
    if "real_kernel_sums" in inspect.signature(kernel_inception_distance).parameters:
        sums = kid_real_kernel_sums(real, n, KID_SUBSETS, KID_SUBSET_SIZE, torch.Generator().manual_seed(0))
        parts["kid, sums cached"] = lambda: kernel_inception_distance(
            real, fake, KID_SUBSETS, KID_SUBSET_SIZE, torch.Generator().manual_seed(0), real_kernel_sums=sums)
    if "real_radii" in inspect.signature(precision_recall_density_coverage).parameters:
        radii = knn_radii(real, (K_PRECISION_RECALL, K_DENSITY_COVERAGE))
        parts["prdc, radii cached"] = lambda: precision_recall_density_coverage(
            real, fake, K_PRECISION_RECALL, K_DENSITY_COVERAGE, real_radii=radii)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="generated (and reference) features (default 10000)")
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 2048], help="feature dimensions (128 2048)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per part; the median is reported (default 3)")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    load_before = os.getloadavg()[0]
    rows = []
    for dim in a.dims:
        for name, fn in _parts(a.n, dim, seed=0).items():
            wall, cpu = _timed(fn, a.repeats)
            rows.append({"dim": dim, "part": name, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3)})
            print(f"| {dim:5d} | {name:24s} | {wall:7.3f} | {cpu:7.3f} |", flush=True)
        timed = {r["part"]: r for r in rows if r["dim"] == dim}
        direct = ["fit (mean, cov)", "fid", "kid", "is", "prdc"]
        cached = [{"kid": "kid, sums cached", "prdc": "prdc, radii cached"}.get(p, p) for p in direct]
        for name, parts in (("all five metrics", direct), ("all five metrics, cached", cached)):
            if all(p in timed for p in parts):
                wall, cpu = (sum(timed[p][key] for p in parts) for key in ("wall_s", "cpu_s"))
                rows.append({"dim": dim, "part": name, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3)})
                print(f"| {dim:5d} | {name:24s} | {wall:7.3f} | {cpu:7.3f} |", flush=True)
    print(f"n = {a.n}, threads = {a.threads}, repeats = {a.repeats}, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.2f} (at the start: {load_before:.2f})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"n": a.n, "threads": a.threads, "repeats": a.repeats, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
