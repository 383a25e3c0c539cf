"""Translation scoring of image-to-image runs (pix2pix): test PSNR / SSIM of translate(input) vs target."""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import torch

from genlab.evaluation.common import as_run, now, versions
from genlab.evaluation.reconstruction import PSNR_PROTOCOL, ssim_protocol
from genlab.evaluation.store import write_result
from genlab.methods.capabilities import Translates, require


def evaluate_translation(
    target: str | os.PathLike,
    data: str | None = None,
    n: int | None = None,
    weights: str = "ema",
    data_root: str | os.PathLike | None = None,
    seed: int = 0,
    write: bool = True,
    json_path: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Test PSNR / SSIM of an image-to-image run (pix2pix) on held-out pairs: translate(input) vs target.

    Derived tasks build the inputs from the targets (edges, masked with a seeded mask, low-res);
    paired data uses the split's own A images. See :func:`genlab.methods.pix2pix.evaluate_pairs`.
    """
    from genlab.methods.pix2pix import evaluate_pairs
    from genlab.runs import heldout_images

    run = as_run(target, weights)
    require(run.method, Translates, "be scored on translations", where=str(run.path))
    held = heldout_images(run, data, n, None if data_root is None else str(data_root))
    if log is not None:
        log(f"translating {len(held)} held-out images of {held.source}:{held.split}")
    start = time.perf_counter()
    values = evaluate_pairs(run.method, held.images, torch.Generator().manual_seed(seed), images_a=held.conditions)
    count = values.pop("n")
    protocol = {
        "kind": "translation",
        "task": run.config.model.task,
        "n": count,
        "data": f"{held.source}:{held.split}",
        "method": run.config.method,
        "checkpoint_step": run.step,
        "weights": run.weights,
        "seed": seed,
        "data_range": 2.0,
        "psnr": PSNR_PROTOCOL,
        "ssim_window": ssim_protocol(held.images.shape[-2:]),
        "receptive_field": run.method.receptive_field,
        **versions(),
        "date": now(),
        "seconds": {"translate": round(time.perf_counter() - start, 3)},
        "target": str(run.path),
    }
    return write_result({"metrics": values, "std": {}, "protocol": protocol}, run.path, json_path, write)
