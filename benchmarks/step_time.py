"""Seconds per training step and per sampled image of a method's preset, measured on a quiet machine.

    python benchmarks/step_time.py vae --data mnist --preset small [--steps 60] [--threads 1] [key=value ...]
    python benchmarks/step_time.py pixelcnn --codes runs/vqvae --preset small

Trains ``--steps`` steps in a temporary run folder (the first ``--warmup`` are not timed: allocator
and autotuning), then samples ``--sample-n`` images when the method generates images. Prints one
Markdown row: method, preset, data, threads, s/step, projected minutes for the preset's steps, and
ms per sampled image. Run it with nothing else on the machine; wall time is what it measures.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from genlab import api
from genlab.config import build_config
from genlab.methods import get_method
from genlab.methods.capabilities import Generates, has
from genlab.train.checkpoint import latest_checkpoint, load_checkpoint


def _elapsed(run_dir: Path) -> float:
    """Seconds of training so far, as the trainer counts them."""
    return float(load_checkpoint(latest_checkpoint(run_dir))[1]["elapsed_seconds"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("method")
    p.add_argument("--data")
    p.add_argument("--preset", default="small")
    p.add_argument("--data-root")
    p.add_argument("--codes")
    p.add_argument("--autoencoder")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sample-n", type=int, default=500)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    parents = [f"model.{k}={v}" for k, v in (("codes", a.codes), ("autoencoder", a.autoencoder)) if v]
    common = parents + list(a.overrides) + [f"train.threads={a.threads}", "train.checkpoint_every=100000",
                                              "train.eval_every=0", "train.sample_every=0", "train.time_limit=null"]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        # Warm-up steps, then resume for the timed ones; the trainer's own clock (elapsed_seconds in the
        # checkpoint state) counts training steps only, not loading, checkpoints or preview grids.
        api.train(a.method, data=a.data, preset=a.preset, data_root=a.data_root, run_dir=run_dir, progress=False,
                  overrides=common + [f"train.steps={a.warmup}"])
        before = _elapsed(run_dir)
        run = api.train(a.method, run_dir=run_dir, resume=True, progress=False,
                        overrides=[f"train.steps={a.warmup + a.steps}"])
        per_step = (_elapsed(run_dir) - before) / a.steps
        ms_per_image = None
        if has(run.method, Generates):
            t0 = time.perf_counter()
            run.sample(a.sample_n, seed=0, batch_size=a.sample_n)
            ms_per_image = 1000 * (time.perf_counter() - t0) / a.sample_n
    preset = api.resolve_preset(a.method, a.data, a.preset)
    preset_steps = build_config(a.method, get_method(a.method).Config, preset=preset).train.steps
    print(f"| {a.method} | {a.preset} | {run.config.data.source} | {a.threads} | {per_step:.3f} | "
          f"{per_step * preset_steps / 60:.1f} | {'-' if ms_per_image is None else f'{ms_per_image:.2f}'} |")


if __name__ == "__main__":
    main()
