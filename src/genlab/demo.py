"""`genlab demo` / `make demo`: the five-minute tour on the bundled mnist5k digits."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from genlab.imageio import save_grid

# The demo's recipe on top of the ddpm_small preset: a class-conditional U-Net (labels dropped with
# probability 0.1, so the unconditional branch and guidance work too). At equal steps and cost it draws
# far more recognisable digits than the unconditional one (docs/results.md, "Demo that draws digits").
DEMO_OVERRIDES = ["model.class_conditional=true", "model.p_uncond=0.1"]


def run_demo(run_dir: Path, overrides: list[str] | None = None) -> Path:
    """Train the small DDPM preset (+ ``DEMO_OVERRIDES``, then ``overrides``) on mnist5k, sample digits with
    the preset's sampler, write ``run_dir/demo.png``.

    A class-conditional preset draws a 10 x 10 grid whose column j holds digit j; an unconditional one 8 x 8.
    The sampler and its steps are the preset's (``model.sampler``, ``model.sample_steps``), so that
    ``genlab eval runs/demo`` scores exactly what the picture shows.
    """
    from genlab import api

    if run_dir.exists() and (run_dir / "config.yaml").exists():
        # A demo is a fresh run each time; the old one is moved aside, never silently mixed in.
        backup = run_dir.with_name(run_dir.name + f".old-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(run_dir), backup)
        print(f"previous demo moved to {backup}")
    start = time.perf_counter()
    run = api.train("ddpm", data="mnist5k", preset="small", overrides=[*DEMO_OVERRIDES, *(overrides or [])],
                    run_dir=run_dir)
    trained = time.perf_counter() - start
    model = run.config.model
    conditional = bool(getattr(model, "class_conditional", False))
    n, nrow = (100, 10) if conditional else (64, 8)
    options = {"labels": run.labels("all", n)} if conditional else {}
    start = time.perf_counter()
    images = run.sample(n, seed=0, **options)
    sampled = time.perf_counter() - start
    out = save_grid(images, run_dir / "demo.png", nrow=nrow, scale=3)
    print(f"trained {run.step} steps in {trained / 60:.1f} min; sampled {n} images ({model.sampler}, "
          f"{model.sample_steps} steps, EMA{', column j = digit j' if conditional else ''}) in {sampled:.1f} s")
    print(f"samples: {out}")
    print(run_dir)
    return out
