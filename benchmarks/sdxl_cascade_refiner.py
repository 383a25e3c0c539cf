"""FID of a cascade (base + super-resolution, with vs without conditioning augmentation) and of a
refiner handoff (base alone vs base + refiner at equal NFE), with the shipped MNIST evaluator.

    # cascade: a 14 px base, two 28 px SR stages (the base's samples are fed to both)
    genlab train ddpm --preset small --run-dir runs/base14 data.image_size=14
    genlab train sr --base runs/base14 --preset small --run-dir runs/sr_aug                      # max_augmentation 0.4
    genlab train sr --base runs/base14 --preset small --run-dir runs/sr_plain model.max_augmentation=0
    PYTHONPATH=src python benchmarks/sdxl_cascade_refiner.py cascade --base runs/base14 --sr runs/sr_aug runs/sr_plain --levels 0.0 0.4 --n 2000

    # refiner: trained on t < 200 on top of a ddpm base
    genlab train ddpm --preset small --run-dir runs/base28
    genlab train refiner --base runs/base28 --preset small --run-dir runs/refiner
    PYTHONPATH=src python benchmarks/sdxl_cascade_refiner.py refiner --refiner runs/refiner --n 2000 --steps 20 --switch 200 150 100

Prints one JSON object per line. FID against mnist:test (10,000 images) in the evaluator's feature
space (``--extractor`` default: the run data's evaluator, mnist). Same seed for every row: the rows of
one table differ only in the model that made them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch


def fid(images: torch.Tensor, data_root: str | None, ref: str = "mnist:test") -> float:
    """FID of images (N, C, H, W) in [-1, 1] against ``ref``, via the project's evaluation of an .npz."""
    from genlab.data import from_model_range
    from genlab.evaluation import evaluate_generation

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "samples.npz"
        np.savez(path, images=from_model_range(images).permute(0, 2, 3, 1).numpy())
        result = evaluate_generation(str(path), ref=ref, metrics="fid", data_root=data_root, write=False)
    return round(float(result["metrics"]["fid"]), 2)


def cascade(a) -> None:
    from genlab import api

    base = api.load_run(a.base)
    low = base.sample(a.n, seed=a.seed)  # (N, C, 14, 14), the base's own sampler: one set of base samples for every row
    for path in a.sr:
        run = api.load_run(path)
        levels = [None] if run.method.num_micro == 0 else [None, *a.levels]
        for level in levels:
            options = {"low_res": low, "steps": a.steps, "sampler": a.sampler or run.method.config.sampler}
            if level is not None:
                options["augmentation"] = level
            images = torch.cat([run.method.sample(len(chunk), generator=torch.Generator().manual_seed(a.seed + i),
                                                  **{**options, "low_res": chunk})
                                for i, chunk in enumerate(low.split(250))])
            used = run.method.config.sample_augmentation if level is None else level
            print(json.dumps({"table": "cascade", "sr_run": path, "sr_step": run.step, "base_step": base.step,
                              "max_augmentation": run.method.config.max_augmentation,
                              "sample_augmentation": 0.0 if run.method.num_micro == 0 else (used if used is not None else run.method.config.max_augmentation / 2),
                              "n": a.n, "sampler": options["sampler"], "steps": a.steps,
                              "fid": fid(images, a.data_root)}), flush=True)
    up = torch.nn.functional.interpolate(low, size=28, mode="bilinear", align_corners=False)
    print(json.dumps({"table": "cascade", "sr_run": "none (base samples up-sampled bilinearly)", "n": a.n,
                      "fid": fid(up.clamp(-1, 1), a.data_root)}), flush=True)


def refiner(a) -> None:
    from genlab import api

    run = api.load_run(a.refiner)
    base = run.method.base  # the base stored in the refiner's checkpoint
    # One sampler for both rows (default: the base's own), else the rows would differ in more than the refiner.
    sampler = a.sampler or base.config.sampler
    switches = a.switch or [run.method.switch]
    for steps in a.steps:
        alone = torch.cat([base.sample(m, generator=torch.Generator().manual_seed(a.seed + i), steps=steps,
                                       sampler=sampler) for i, m in enumerate(_chunks(a.n))])
        row = {"table": "refiner", "refiner_run": a.refiner, "refiner_step": run.step,
               "t_switch": run.method.config.t_switch, "n": a.n, "sampler": sampler, "nfe": steps,
               "fid_base_alone": fid(alone, a.data_root)}
        for switch in switches:  # the same x_T and step noise as the base-alone row: only the handoff differs
            handoff = torch.cat([run.method.sample(m, generator=torch.Generator().manual_seed(a.seed + i), steps=steps,
                                                   sampler=sampler, switch=switch) for i, m in enumerate(_chunks(a.n))])
            print(json.dumps({**row, "switch": switch, "fid_base_then_refiner": fid(handoff, a.data_root)}), flush=True)


def _chunks(n: int, size: int = 250) -> list[int]:
    return [min(size, n - s) for s in range(0, n, size)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="table", required=True)
    c = sub.add_parser("cascade")
    c.add_argument("--base", required=True)
    c.add_argument("--sr", nargs="+", required=True)
    c.add_argument("--levels", type=float, nargs="*", default=[0.0], help="extra sampling levels of augmented SR runs")
    c.add_argument("--steps", type=int, default=50, help="steps of the SR stage (the base samples with its own defaults)")
    c.add_argument("--sampler", default=None, help="sampler of the SR stage (default: each SR run's model.sampler)")
    r = sub.add_parser("refiner")
    r.add_argument("--refiner", required=True)
    r.add_argument("--steps", type=int, nargs="+", default=[20])
    r.add_argument("--sampler", default=None, help="sampler of both rows (default: the base's model.sampler)")
    r.add_argument("--switch", type=int, nargs="*", help="handoff steps to compare (each <= the run's t_switch; "
                                                        "default: the run's sample_switch, else t_switch)")
    for q in (c, r):
        q.add_argument("--n", type=int, default=500)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--data-root", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    cascade(a) if a.table == "cascade" else refiner(a)


if __name__ == "__main__":
    main()
