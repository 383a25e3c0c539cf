"""`genlab demo` / `make demo`: the five-minute tour on the bundled mnist5k digits."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from genlab.imageio import save_grid


def run_demo(run_dir: Path, overrides: list[str] | None = None) -> Path:
    """Train the small DDPM preset on mnist5k, sample 64 digits with DDIM, write ``run_dir/demo.png``."""
    from genlab import api

    if run_dir.exists() and (run_dir / "config.yaml").exists():
        # A demo is a fresh run each time; the old one is moved aside, never silently mixed in.
        backup = run_dir.with_name(run_dir.name + f".old-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(run_dir), backup)
        print(f"previous demo moved to {backup}")
    start = time.perf_counter()
    run = api.train("ddpm", data="mnist5k", preset="small", overrides=overrides or [], run_dir=run_dir)
    trained = time.perf_counter() - start
    start = time.perf_counter()
    images = run.sample(64, seed=0, sampler="ddim", steps=50)
    sampled = time.perf_counter() - start
    out = save_grid(images, run_dir / "demo.png", nrow=8, scale=3)
    print(f"trained {run.step} steps in {trained / 60:.1f} min; sampled 64 images (DDIM, 50 steps, EMA) in {sampled:.1f} s")
    print(f"samples: {out}")
    print(run_dir)
    return out
