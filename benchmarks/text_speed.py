"""ms per sample of text runs, all in one process: CFG w = 2, DPM-Solver++(2M) 10 steps, batches of 100 "the digit K"
prompts, one thread, the minimum of 3 rounds (the runs alternate, so a change of load hits each alike).

    PYTHONPATH=src python benchmarks/text_speed.py RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--n", type=int, default=100, help="samples per timed batch")
    parser.add_argument("--rounds", type=int, default=3)
    a = parser.parse_args()

    from genlab.runs import load_run

    torch.set_num_threads(1)
    runs = {path: load_run(path) for path in a.runs}
    prompts = [f"the digit {k % 10}" for k in range(a.n)]
    options = {"prompts": prompts, "guidance_scale": 2.0, "sampler": "dpmpp-2m", "steps": 10}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(a.rounds):
        for path, run in runs.items():
            run.sample(a.n, seed=0, **options)  # untimed: fills the text encoder's cache and warms the kernels
            start = time.perf_counter()
            run.sample(a.n, seed=1, **options)
            best[path] = min(best[path], time.perf_counter() - start)
    for path, seconds in best.items():
        print(f"{path}: {1000 * seconds / a.n:.1f} ms per sample, {a.n / seconds:.1f} images/s")


if __name__ == "__main__":
    main()
