"""Sampling speed of genlab against diffusers on the same weights: ms per image (issue 17 item 2, SPEC E6).

The small preset's DDPM (``ddpm_small``: 28x28x1, 2x2 pixel patches, so the U-Net sees 14x14x4;
base 32, mult (1, 2), attention at 7 px and in the middle) is exported with ``genlab export
--format diffusers`` and sampled both ways in one process, with the same batch size and threads:

- genlab: ``method.sample(sampler="ddim", steps=50)`` and ``sampler="dpmpp-2m", steps=10``;
- diffusers: the exported UNet2DModel with its own schedulers, ``DDIMScheduler`` (eta 0) and
  ``DPMSolverMultistepScheduler`` (DPM-Solver++ order 2 on the exported timestep spacing), in the
  loop of the export's model card (DDPMPipeline's loop plus pixel_unshuffle / pixel_shuffle: a
  patched U-Net cannot be a plain pipeline). Not with ``use_karras_sigmas=True``: on the cosine
  schedule (sigma_max ~2e4) its 10 Karras levels round to the timesteps 998, 998, 998, 998, 997, ...
  and diffusers' step lookup then runs off the end of its sigmas (IndexError, diffusers 0.42); genlab
  caps sigma_max at 80 (samplers.py). The two DPM-Solver++ runs therefore visit different noise
  levels; the number of network evaluations (10) is the same, which is what the time measures.

Both make the same number of network evaluations (50 and 10). The two are timed in alternation,
A B then B A, so a shared machine's noise hits both alike; ms per image and the ratio
(diffusers time / genlab time, > 1 means genlab is faster) are medians over repeats, the ratio the
median of per-repeat ratios. DDIM's images are also compared (same x_T, same weights): max |diff|.

    python benchmarks/sampling_speed.py                      # random weights of the preset (speed only)
    python benchmarks/sampling_speed.py --run runs/demo      # a trained ddpm run's EMA weights
    python benchmarks/sampling_speed.py --compile            # also genlab with torch.compile'd backbone

``--compile`` adds a third contender, genlab with its backbone compiled by torch.compile (inductor,
``dynamic=False``, ``--compile-mode``) and its outputs checked against eager; the one-off compile time
(first call, cold cache unless TORCHINDUCTOR_CACHE_DIR holds earlier kernels) is printed separately
with the number of images after which it pays, at the measured per-image saving.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run", help="a trained pixel ddpm run (default: the ddpm small preset, random weights)")
    parser.add_argument("--batch-size", type=lambda v: v if v == "auto" else int(v), default=64,
                        help="images per sampling call (both libraries), or auto: genlab's choice for its network "
                             "(genlab.autotune.auto_batch_size, as `genlab sample` makes it)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per library and sampler (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="also time genlab with a torch.compile'd backbone")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode (default, max-autotune-no-cudagraphs)")
    return parser.parse_args(argv)


def preset_run(folder: Path, seed: int) -> Path:
    """A run folder holding the ddpm small preset's DDPM for 28x28x1 data, randomly initialised."""
    from genlab.config import build_config
    from genlab.interop.diffusers import save_run
    from genlab.methods import DataInfo
    from genlab.methods.ddpm import DDPM, DDPMConfig

    cfg = build_config("ddpm", DDPMConfig, preset="small")
    torch.manual_seed(seed)
    method = DDPM(cfg.model, DataInfo(channels=1, image_size=28, source="mnist5k"))
    with torch.no_grad():  # leave the zero-initialised output layers: their inputs still cost the same
        for p in method.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    cfg.model = method.config
    return save_run(folder / "run", cfg, method)


class DiffusersSampler:
    """The export's UNet2DModel driven by a diffusers scheduler, in the model card's loop."""

    def __init__(self, folder: Path, scheduler, patch_size: int):
        from diffusers import UNet2DModel

        self.unet = UNet2DModel.from_pretrained(str(folder), subfolder="unet").eval()
        self.scheduler, self.p = scheduler, patch_size

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, steps: int) -> torch.Tensor:
        """x_T (N, C, H, W) -> x_0 after ``steps`` scheduler steps."""
        self.scheduler.set_timesteps(steps)
        for t in self.scheduler.timesteps:
            out = F.pixel_shuffle(self.unet(F.pixel_unshuffle(x, self.p), t).sample, self.p)
            x = self.scheduler.step(out, t, x).prev_sample
        return x


def median_ms(seconds: list[float], batch: int) -> float:
    return 1000 * statistics.median(seconds) / batch


def main(argv: list[str] | None = None) -> None:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from genlab.interop import export_diffusers
    from genlab.runs import load_run

    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.run) if args.run else preset_run(Path(tmp), args.seed)
        folder = export_diffusers(run_dir, Path(tmp) / "export")
        method = load_run(run_dir, device="cpu").method
        c, p = method.config, method.config.patch_size
        if args.batch_size == "auto":
            from genlab.autotune import auto_batch_size

            args.batch_size = auto_batch_size(method, 10_000)  # what sampling an FID set would use
        base = DDIMScheduler.from_pretrained(str(folder), subfolder="scheduler").config
        samplers: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {}
        ddim = DiffusersSampler(folder, DDIMScheduler.from_config(base), p)
        dpmpp = DiffusersSampler(folder, DPMSolverMultistepScheduler.from_config(
            base, algorithm_type="dpmsolver++", solver_order=2), p)
        samplers["DDIM-50"] = (lambda x: method.sample(len(x), noise=x, sampler="ddim", steps=50),
                               lambda x: ddim(x, 50))
        samplers["DPM-Solver++ 10"] = (lambda x: method.sample(len(x), noise=x, sampler="dpmpp-2m", steps=10),
                                       lambda x: dpmpp(x, 10))
        shape = (args.batch_size, method.data_info.channels, method.data_info.image_size, method.data_info.image_size)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))

        # Same computation check: DDIM with the same x_T (diffusers' eps re-derived from the clipped x0 as genlab's).
        ddim_check = DDIMScheduler.from_config(base)
        ddim_check.set_timesteps(50)
        theirs = x[:4].clone()
        with torch.no_grad():
            for t in ddim_check.timesteps:
                out = F.pixel_shuffle(ddim.unet(F.pixel_unshuffle(theirs, p), t).sample, p)
                theirs = ddim_check.step(out, t, theirs, use_clipped_model_output=True).prev_sample
        ddim_diff = float((theirs.clamp(-1, 1) - method.sample(4, noise=x[:4], sampler="ddim", steps=50)).abs().max())

        compile_seconds = compile_diff = None
        if args.compile:
            import copy

            compiled = copy.deepcopy(method)
            compiled.backbone.compile(dynamic=False, mode=None if args.compile_mode == "default" else args.compile_mode)
            start = time.perf_counter()
            with torch.no_grad():
                out = compiled.network(x, torch.full((len(x),), 500), None)  # compiles, at the timed batch shape
            compile_seconds = time.perf_counter() - start
            with torch.no_grad():
                compile_diff = float((out - method.network(x, torch.full((len(x),), 500), None)).abs().max())
            for name, (ours, theirs_fn) in list(samplers.items()):
                steps_ = 50 if name == "DDIM-50" else 10
                solver = "ddim" if steps_ == 50 else "dpmpp-2m"
                samplers[name] = (ours, theirs_fn, lambda x, s=solver, k=steps_: compiled.sample(
                    len(x), noise=x, sampler=s, steps=k))

        rows = []
        for name, fns in samplers.items():
            libs = ["genlab", "diffusers", "genlab compiled"][:len(fns)]
            fns[0](x[:2]), fns[1](x[:2])  # warm-up
            warm = 0.0
            if len(fns) == 3:  # the compiled graph is specialised to shapes and dtypes (t: long or float): compile them now
                start = time.perf_counter()
                fns[2](x)
                warm = time.perf_counter() - start
            timings: dict[str, list[float]] = {lib: [] for lib in libs}
            for repeat in range(args.repeats):
                order = list(zip(libs, fns))
                for lib, fn in order if repeat % 2 == 0 else order[::-1]:
                    start = time.perf_counter()
                    fn(x)
                    timings[lib].append(time.perf_counter() - start)
            if warm:  # recompilation in the first call counts as compile time (minus the call's own work)
                compile_seconds += max(0.0, warm - statistics.median(timings["genlab compiled"]))
            for lib in libs:
                if lib == "diffusers":
                    continue
                ratios = sorted(d / g for g, d in zip(timings[lib], timings["diffusers"]))
                rows.append((f"{name}, {lib}", median_ms(timings[lib], args.batch_size),
                             median_ms(timings["diffusers"], args.batch_size), statistics.median(ratios),
                             ratios[0], ratios[-1]))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}")
    source = args.run or "ddpm small preset (random weights)"
    print(f"{source}: {shape[1]}x{shape[2]}x{shape[3]} images, U-Net input {shape[1] * p * p}x{shape[2] // p}x"
          f"{shape[3] // p} (patch {p}), schedule {c.schedule}, prediction {c.prediction}; batch {args.batch_size}, "
          f"median of {args.repeats} calls after a warm-up; DDIM-50 images genlab vs diffusers max |diff| {ddim_diff:.2e}\n")
    print("| sampler | genlab ms/image | diffusers ms/image | speed-up (diffusers / genlab, paired median) | min | max |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, ours_ms, theirs_ms, ratio, low, high in rows:
        print(f"| {name} | {ours_ms:.2f} | {theirs_ms:.2f} | {ratio:.3f} | {low:.3f} | {high:.3f} |")
    if compile_seconds is not None:
        import os

        saved = {name.split(",")[0]: None for name, *_ in rows}
        eager_ms = {name.split(",")[0]: ms for name, ms, *_ in rows if name.endswith("genlab")}
        for name, ms, *_ in rows:
            if name.endswith("compiled"):
                saved[name.split(",")[0]] = eager_ms[name.split(",")[0]] - ms
        print(f"\ncompile ({args.compile_mode}, dynamic=False, batch {args.batch_size}): {compile_seconds:.1f} s "
              f"(first call); compiled vs eager U-Net output max |diff| {compile_diff:.2e}; load average "
              f"{os.getloadavg()[0]:.1f}")
        for name, ms in saved.items():
            pays = f"pays after {1000 * compile_seconds / ms:.0f} images" if ms and ms > 0 else "never pays"
            print(f"{name}: saves {ms:.2f} ms/image against eager genlab, {pays}")


if __name__ == "__main__":
    main()
