"""Reconstruction scoring of autoencoder-family runs on held-out images (SPEC E4): MSE, PSNR, SSIM,
plus the test ELBO of a run that has one and the codebook usage of a run with discrete codes."""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable

import torch

from genlab.data import from_model_range, to_model_range
from genlab.evaluation.common import as_run, now, versions
from genlab.evaluation.store import write_result
from genlab.methods.capabilities import DiscreteCodes, HasELBO, Reconstructs, has, require
from genlab.metrics import psnr_from_mse, ssim, ssim_window

RECONSTRUCTION_METRICS = ("mse", "psnr", "psnr_dataset", "ssim")
PSNR_PROTOCOL = "mean over images of 10 log10(4 / max(MSE_i, q)), q = (2/255)^2 / 12 (8-bit rounding noise)"


def ssim_protocol(size) -> str:
    """How SSIM was computed for images of ``size`` (the window and sigma of the small-image rule)."""
    window, sigma = ssim_window(tuple(size))
    return f"gaussian {window}x{window}, sigma {sigma:.3g}, K1 0.01, K2 0.03"


def evaluate_reconstruction(
    target: str | os.PathLike,
    data: str | None = None,
    n: int | None = None,
    weights: str = "ema",
    data_root: str | os.PathLike | None = None,
    batch_size: int = 500,
    json_path: str | os.PathLike | None = None,
    write: bool = True,
    progress: bool = False,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Reconstruction MSE / PSNR / SSIM of an autoencoder-family run on held-out images (SPEC E4), plus
    the test ELBO of a run with ``HasELBO`` and the codebook usage of one with ``DiscreteCodes``.

    Reconstructions are rounded to 8-bit pixels first (what a saved image holds); images are in
    [-1, 1] so the data range is 2. ``psnr`` is the mean over images of each image's PSNR (the usual
    convention of autoencoder papers); ``psnr_dataset`` is the PSNR of the mean MSE, which is never
    higher (Jensen); both are :mod:`genlab.metrics.image_quality`'s one PSNR. SSIM follows its
    small-image rule (11x11 Gaussian window, sigma 1.5, for images of 11 px and more).
    """
    from tqdm.auto import tqdm

    from genlab.runs import heldout_images

    run = as_run(target, weights)
    require(run.method, Reconstructs, "be scored on reconstructions", where=str(run.path))
    held = heldout_images(run, data, n, None if data_root is None else str(data_root))
    images = held.to_model_range()
    if log is not None:
        log(f"reconstructing {len(images)} held-out images of {held.source}:{held.split}")
    method = run.method
    sq_err, ssims, nll, codes = [], [], [], []
    generator = torch.Generator().manual_seed(seed)  # the ELBO's one-sample estimate: reproducible
    start = time.perf_counter()
    with torch.no_grad(), tqdm(total=len(images), disable=not progress, desc="reconstruct", unit="img") as bar:
        for i in range(0, len(images), batch_size):
            x = images[i: i + batch_size].to(method.device)
            x_hat = to_model_range(from_model_range(method.reconstruct(x)))  # 8-bit, as saved
            x_hat, xc = x_hat.cpu().double(), x.cpu().double()
            sq_err.append(((x_hat - xc) ** 2).flatten(1).mean(1))
            ssims.append(ssim(x_hat, xc, data_range=2.0, reduction="none"))
            if has(method, HasELBO):
                nll.append(method.negative_elbo(x, generator=generator).double().cpu())
            if has(method, DiscreteCodes):
                codes.append(method.encode_codes(x).flatten().cpu())
            bar.update(len(x))
    seconds = time.perf_counter() - start
    mse_per_image = torch.cat(sq_err)
    values: dict[str, float] = {
        "mse": float(mse_per_image.mean()),
        "psnr": float(psnr_from_mse(mse_per_image).mean()),
        "psnr_dataset": float(psnr_from_mse(mse_per_image.mean())),
        "ssim": float(torch.cat(ssims).mean()),
    }
    if nll:
        nats = torch.cat(nll)
        values["nll_nats"] = float(nats.mean())  # negative ELBO: an upper bound on -log p(x)
        values["bits_per_dim"] = float(nats.mean() / (images[0].numel() * math.log(2)))
    if codes:
        counts = torch.bincount(torch.cat(codes), minlength=int(method.codebook_size)).double()
        p = counts / counts.sum()
        values["code_usage"] = float((counts > 0).double().mean())
        values["code_perplexity"] = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    protocol = {
        "kind": "reconstruction",
        "n": len(images),
        "image_shape": list(images.shape[1:]),
        "data": f"{held.source}:{held.split}",
        "method": run.config.method,
        "checkpoint_step": run.step,
        "weights": run.weights,
        "rounding": "reconstructions rounded to 8-bit before scoring",
        "seed": seed,
        "data_range": 2.0,
        "ssim_window": ssim_protocol(images.shape[-2:]),
        "psnr": PSNR_PROTOCOL + "; psnr_dataset: of the mean MSE",
        **({"nll": "negative ELBO in nats per image (1 latent sample); bits/dim = nats / (C H W ln 2)"} if nll else {}),
        **({"code_usage": f"fraction of the {int(method.codebook_size)} codes used on the data; perplexity = exp(H)"}
           if codes else {}),
        **versions(),
        "date": now(),
        "seconds": {"reconstruct": round(seconds, 3)},
        "target": str(run.path),
    }
    return write_result({"metrics": values, "std": {}, "protocol": protocol}, run.path, json_path, write)
