"""A run folder written by hand (no training): config, log, sample grids, metrics.json with sweeps."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from genlab.imageio import save_grid
from genlab.train.runlog import RunLog


def protocol(**extra) -> dict:
    base = {"kind": "generation", "n": 300, "reference": "digits:test", "extractor": "mnist", "weights": "ema",
            "checkpoint_step": 20, "sampler": "ddim", "steps": 5, "seed": 0, "date": "2026-12-02T08:00:00+00:00",
            "seconds": {"sample": 1.0}, "target": "x"}
    return {**base, **extra}


def make_run(path: Path, source: str = "digits", loss_scale: float = 1.0, steps=(10, 20)) -> Path:
    """A fake ddpm run: 4 train records, grids at ``steps``, a health warning, five metrics.json entries."""
    config = {"method": "ddpm", "data": {"source": source}, "train": {"steps": 20, "lr": 2e-3}, "model": {}}
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    with RunLog(path) as log:
        log.log(0, {"config": config, "world_size": 1}, kind="start")
        for step in (5, 10, 15, 20):
            log.log(step, {"loss": loss_scale / step, "lr": 2e-3 * step / 20, "grad_norm": 3.0 - step / 10}, kind="train")
        log.log(15, {"warning": "exploding gradients: grad_norm 1e5 > 1e4"}, kind="health")
        log.log(20, {"elapsed_s": 1.0, "stopped_early": False}, kind="end")
    (path / "samples").mkdir()
    for i, step in enumerate(steps):
        save_grid(torch.linspace(-1, 1, 4 * 64).reshape(4, 1, 8, 8) * (1 - i / 4), path / "samples" / f"step_{step:06d}.png")
    entries = [{"metrics": {"fid": 80.0 / s, "kid": 0.1234567891 * s}, "std": {"kid": 0.01},
                "protocol": protocol(sampler=sampler, steps=s)}
               for sampler in ("ddim", "euler") for s in (5, 10)]
    entries.append({"metrics": {"fid": 12.5, "class_accuracy": 0.75}, "std": {},
                    "protocol": protocol(sample_options={"guidance_scale": 2.0, "labels": "all"})})
    entries.append({"metrics": {"fid": 14.0, "class_accuracy": 0.5}, "std": {},
                    "protocol": protocol(sample_options={"guidance_scale": 1.0, "labels": "all"})})
    (path / "metrics.json").write_text(json.dumps({"entries": entries}, indent=1))
    return path
