"""Micro-conditioning (SDXL sec. 2.2): share of samples with a cut-off object, with vs without the conditioning.

Both runs train on shifted crops (the preset's data.random_shift=8); only one sees the crop as a condition:

    genlab train ddpm --preset micro_small --run-dir runs/micro_on
    genlab train ddpm --preset micro_small --run-dir runs/micro_off model.micro_conditioning=false
    PYTHONPATH=src python benchmarks/sdxl_micro.py --on runs/micro_on --off runs/micro_off --n 1000 --grid grid.png

A sample is "cut off" when its ink (pixels above mid-grey) touches the 1-pixel border of the image.
Prints one JSON object: the share for each run sampled at crop (0, 0) (the plain model has no crop
input: it is sampled as it is), for the micro-conditioned run at an offset crop (it should reproduce
cut-off digits), and for real images without and with the training shifts (the floor and what the
plain model learns to imitate); and the mean offset of the ink's centre of mass from the image
centre, (row, column) in pixels, which shows whether the crop condition moves the object at all; and, per
noise level t, the conditioned denoiser's x0 error on shifted images given their true crop vs told (0, 0)
(equal errors: the network ignores the crop).
"""

from __future__ import annotations

import argparse
import json

import torch


def cut_off_share(images: torch.Tensor, threshold: float = 0.0) -> float:
    """Share of images (N, C, H, W) in [-1, 1] whose ink (> threshold) touches the outermost pixel frame."""
    ink = images.amax(dim=1) > threshold  # (N, H, W)
    border = torch.zeros_like(ink[0])
    border[0, :], border[-1, :], border[:, 0], border[:, -1] = True, True, True, True
    return float((ink & border).flatten(1).any(1).float().mean())


def ink_centroid(images: torch.Tensor) -> tuple[float, float]:
    """Mean (row, column) of the ink's centre of mass relative to the image centre, in pixels (ink = x + 1)."""
    ink = (images.mean(dim=1) + 1).clamp(min=0)  # (N, H, W)
    h, w = ink.shape[-2:]
    rows, cols = torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32)
    mass = ink.sum((1, 2)).clamp(min=1e-6)
    row = (ink.sum(2) * rows).sum(1) / mass - (h - 1) / 2
    col = (ink.sum(1) * cols).sum(1) / mass - (w - 1) / 2
    return round(float(row.mean()), 2), round(float(col.mean()), 2)


def crop_use(method, n: int = 512, shift: int = 8, seed: int = 1,
             levels: tuple[int, ...] = (50, 200, 400, 600, 800, 950)) -> dict[int, tuple[float, float]]:
    """Does the denoiser use the crop? {t: (x0 MSE given the true crop, x0 MSE told crop (0, 0))} on shifted mnist5k.

    x0_hat from the predicted eps, clipped to [-1, 1]; the same x_t for both. Equal MSEs: the crop is ignored.
    """
    from genlab.data import DataConfig, load_data
    from genlab.data.micro import micro_augment

    g = torch.Generator().manual_seed(seed)
    x0, micro = micro_augment(load_data(DataConfig(source="mnist5k", limit=n)).to_model_range(),
                              torch.rand(n, 3, generator=g), shift)
    told_centre = micro.clone()
    told_centre[:, 2:4] = 0
    out = {}
    with torch.no_grad():
        for level in levels:
            t = torch.full((n,), level)
            x_t = method.schedule.q_sample(x0, t, torch.randn(x0.shape, generator=g))
            abar = method.schedule.alphas_cumprod[level]
            mse = []
            for m in (micro, told_centre):
                eps = method._denoise(x_t, t, None, micro=m)
                eps = eps[0] if isinstance(eps, tuple) else eps
                x0_hat = ((x_t - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
                mse.append(round(float(((x0_hat - x0) ** 2).mean()), 4))
            out[level] = tuple(mse)
    return out


def main() -> None:
    from genlab import api
    from genlab.data import DataConfig, load_data
    from genlab.data.micro import micro_augment

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--on", required=True, help="run trained with crops and model.micro_conditioning=true")
    p.add_argument("--off", required=True, help="run trained with the same crops, without the conditioning")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: each run's model.sample_steps)")
    p.add_argument("--offset", default="6,6", help="the offset crop asked of the conditioned run")
    p.add_argument("--shift", type=int, default=8, help="data.random_shift of the runs (for the real-data reference)")
    p.add_argument("--checkpoint", default=None, help="step of both runs to load (default: the newest)")
    p.add_argument("--grid", default=None, help="PNG to write: 16 samples per row: with the conditioning at crop (0, 0), "
                                                "without it, with it at the offset crop")
    a = p.parse_args()
    torch.set_num_threads(1)
    top, left = (int(v) for v in a.offset.split(","))
    ckpt = int(a.checkpoint) if a.checkpoint else None
    on, off = api.load_run(a.on, checkpoint=ckpt), api.load_run(a.off, checkpoint=ckpt)
    real = load_data(DataConfig(source="mnist5k", limit=a.n)).to_model_range()
    shifted, _ = micro_augment(real, torch.rand(len(real), 3, generator=torch.Generator().manual_seed(0)), a.shift)
    sets = {
        "with_conditioning_crop_0_0": on.sample(a.n, seed=0, steps=a.steps, crop=(0, 0)),
        "without_conditioning": off.sample(a.n, seed=0, steps=a.steps),
        f"with_conditioning_crop_{top}_{left}": on.sample(a.n, seed=0, steps=a.steps, crop=(top, left)),
        "real_mnist5k": real,
        f"real_shifted_{a.shift}": shifted,
    }
    out = {"n": a.n, "sampler": [on.method.config.sampler, off.method.config.sampler], "steps": a.steps,
           "step_on": on.step, "step_off": off.step}
    # The cut-off share, and where the ink sits (a crop (top, left) moves the object up and left by that much).
    out.update({f"cut_off_{name}": cut_off_share(images) for name, images in sets.items()})
    out.update({f"ink_centroid_{name}": ink_centroid(images) for name, images in sets.items()})
    out["x0_mse_true_crop_vs_told_0_0_by_t"] = crop_use(on.method, shift=a.shift)
    print(json.dumps(out))
    if a.grid:
        from genlab.imageio import save_grid

        rows = ["with_conditioning_crop_0_0", "without_conditioning", f"with_conditioning_crop_{top}_{left}"]
        save_grid(torch.cat([sets[name][:16] for name in rows]), a.grid, nrow=16, scale=2)


if __name__ == "__main__":
    main()
