"""Parity of genlab and diffusers on the same weights: max |difference| of images in [0, 1] (issue 18 item 4).

Both directions, at the size of the ddpm small preset (28x28x1) with random weights:

- export: the preset's DDPM (2x2 pixel patch, so the model card's loop, not DDPMPipeline) and the
  same U-Net without the patch (a DDPMPipeline), sampled by genlab and by diffusers from the same
  noise: DDPM ancestral (DDPMScheduler, the same per-image generators) and DDIM eta 0 (DDIMScheduler
  with ``use_clipped_model_output=True``);
- import: a UNet2DModel made by diffusers (random weights, the library's own layout and defaults
  apart from the options genlab needs) imported with ``genlab import diffusers`` and sampled both ways.

    python benchmarks/diffusers_parity.py [--steps 50]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F


def _diffusers_loop(unet, scheduler, x: torch.Tensor, steps: int, p: int, generators=None, **step_options):
    """The model card's loop: scheduler steps over a (patched) UNet2DModel from x_T."""
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = F.pixel_shuffle(unet(F.pixel_unshuffle(x, p), t).sample, p)
            x = scheduler.step(out, t, x, generator=generators, **step_options).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


def compare(run_dir: Path, folder: Path, steps: int, n: int = 8) -> dict[str, float]:
    """Max |image difference| between genlab's run and the diffusers folder, DDPM and DDIM from the same noise."""
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

    from genlab.noise import ImageNoise
    from genlab.runs import load_run

    method = load_run(run_dir, device="cpu").method
    unet = UNet2DModel.from_pretrained(str(folder), subfolder="unet").eval()
    p, info = method.config.patch_size, method.data_info
    seeds = range(100, 100 + n)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = torch.cat([torch.randn(1, info.channels, info.image_size, info.image_size, generator=g) for g in gens])
    theirs = _diffusers_loop(unet, DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler"), x, steps, p, gens)
    ours = method.sample(n, generator=ImageNoise([torch.Generator().manual_seed(s) for s in seeds]), sampler="ddpm",
                         steps=steps)
    ddpm = float((theirs - (ours / 2 + 0.5)).abs().max())
    ddim_scheduler = DDIMScheduler.from_pretrained(str(folder), subfolder="scheduler")
    theirs = _diffusers_loop(unet, ddim_scheduler, x, steps, p, use_clipped_model_output=True, eta=0.0)
    ours = method.sample(n, noise=x, sampler="ddim", steps=steps)
    return {"ddpm": ddpm, "ddim": float((theirs - (ours / 2 + 0.5)).abs().max()), "n": n, "patch": p}


def main(argv: list[str] | None = None) -> None:
    import sys

    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    sys.path.insert(0, str(Path(__file__).parent))
    from sampling_speed import preset_run

    from genlab.config import build_config
    from genlab.interop import export_diffusers, import_diffusers
    from genlab.interop.diffusers import save_run
    from genlab.methods import DataInfo
    from genlab.methods.ddpm import DDPM, DDPMConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="sampling steps of both samplers")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = preset_run(tmp / "preset", seed=0)
        rows.append(("export: ddpm small preset (patch 2, card loop)", compare(run, export_diffusers(run, tmp / "e1"),
                                                                              args.steps)))
        cfg = build_config("ddpm", DDPMConfig, preset="small", overrides=["model.patch_size=1",
                                                                          "model.unet.attention_resolutions=[14]"])
        torch.manual_seed(1)
        method = DDPM(cfg.model, DataInfo(channels=1, image_size=28, source="mnist5k"))
        with torch.no_grad():
            for p in method.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        cfg.model = method.config
        run = save_run(tmp / "nopatch" / "run", cfg, method)
        rows.append(("export: same U-Net at 28x28 (patch 1, DDPMPipeline)",
                     compare(run, export_diffusers(run, tmp / "e2"), args.steps)))
        torch.manual_seed(2)
        unet = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                           layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=16)
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        DDPMPipeline(unet=unet, scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")
                     ).save_pretrained(str(tmp / "made"))
        run = import_diffusers(tmp / "made", tmp / "imported")
        rows.append(("import: UNet2DModel made by diffusers (28x28)", compare(run, tmp / "made", args.steps)))
    print(f"max |image difference| in [0, 1], {args.steps} steps, same noise (per-image generators)\n")
    print("| direction | images | DDPM (DDPMScheduler) | DDIM eta 0 (DDIMScheduler) |")
    print("|---|---:|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r['n']} | {r['ddpm']:.2e} | {r['ddim']:.2e} |")


if __name__ == "__main__":
    main()
