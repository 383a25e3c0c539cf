"""Training throughput of genlab's U-Net against diffusers' UNet2DModel at the same layout.

One training step = forward + MSE loss + backward + AdamW step, on random data (the data loader is
not measured). FLOPs per step are counted once per model with torch.utils.flop_counter
(matmuls and convolutions, forward and backward; normalisations and element-wise ops are free),
so "GFLOP/s" is the effective rate: counted work over wall time. The models are timed in
alternation, in A B B A order, so that noise from a shared machine hits both alike; images/s and
GFLOP/s are medians over repeats, and the ratio is the median of the per-repeat ratios (each
repeat's two timings are taken back to back, which cancels slow drifts of the machine's load).
Prints a Markdown table and the machine it ran on.

genlab's step is its trainer's (``genlab.train.trainer.make_optimizer``: AdamW with the fused kernel);
diffusers' is its training scripts' (``torch.optim.AdamW``, the per-tensor loop). Each library runs as its
users run it by default (NCHW memory) and in channels_last (NHWC, oneDNN's native layout: genlab's
``train.channels_last=true``; for diffusers ``model.to(memory_format=torch.channels_last)``, which its
training scripts do not do). ``--compile`` adds genlab compiled for training as ``train.compile=true`` does
(``genlab.compiling.compile_network``: inductor, ``dynamic=False``, forward and backward), in channels_last;
its one-off compile time (the first step, minus a timed step) is reported separately with the number of steps
after which it pays.

Each repeat is timed twice: wall time and this process's CPU time. On a shared machine the CPU time is
the steadier measure (time slices lost to other processes are not counted), so the paired ratios are
given for both. GFLOP/s are also given as a fraction of this core's measured fp32 peak: the faster of a
1024^3 matmul (MKL) and a large 3x3 convolution (oneDNN) at the same threads; on AMD CPUs MKL takes
its AVX2 path, so the convolution is the one that reaches the FMA units' rate.

    python benchmarks/train_throughput.py                   # the small CPU preset (ddpm_small.yaml)
    python benchmarks/train_throughput.py --patch-size 1 --channel-mult 1,2,2   # U-Net at 28x28x1
    python benchmarks/train_throughput.py --compile         # also genlab compiled (make bench)

The defaults are the U-Net of the ``ddpm_small`` preset: 28x28x1 images, batch 64, pixel_unshuffle
by 2 so the U-Net sees 14x14x4 (``model.patch_size: 2``), base 32, mult (1, 2), one residual block
per level, attention at 7x7 and in the middle, 4 heads, GroupNorm 8, no dropout.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from genlab.errors import ConfigError
from genlab.models.unet import UNet, UNetConfig


def _int_tuple(text: str) -> tuple[int, ...]:
    """Parse "1,2,2" (or "none" / "" for the empty tuple) into a tuple of ints."""
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(int(part) for part in text.split(","))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; defaults are the U-Net of the ddpm_small preset (28x28x1, batch 64)."""
    parser = argparse.ArgumentParser(
        description="Images/s and effective GFLOP/s of one U-Net training step (forward + MSE + "
        "backward + AdamW), genlab's U-Net side by side with diffusers' UNet2DModel at matched "
        "width, depth, resolution and attention placement.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    shape = parser.add_argument_group("data")
    shape.add_argument("--batch-size", type=int, default=64, help="images per training step")
    shape.add_argument("--image-size", type=int, default=28, help="height = width of the images")
    shape.add_argument("--channels", type=int, default=1, help="image channels (1: grey, 3: RGB)")
    shape.add_argument("--patch-size", type=int, default=2,
                       help="pixel_unshuffle factor p before the U-Net (genlab's model.patch_size): "
                       "the U-Net sees (image-size / p)^2 x channels p^2")
    arch = parser.add_argument_group("architecture (applied to both models)")
    arch.add_argument("--base-channels", type=int, default=32, help="width of the first level")
    arch.add_argument("--channel-mult", type=_int_tuple, default=(1, 2),
                      help="width multiplier per level, comma-separated")
    arch.add_argument("--num-res-blocks", type=int, default=1,
                      help="residual blocks per encoder level (diffusers: layers_per_block)")
    arch.add_argument("--attention-resolutions", type=_int_tuple, default=(7,),
                      help="feature-map sizes (of the U-Net input, after patching) with "
                      "self-attention, comma-separated, or 'none'")
    arch.add_argument("--no-mid-attention", action="store_true",
                      help="drop the middle block's attention (diffusers: add_attention=False)")
    arch.add_argument("--num-heads", type=int, default=4, help="attention heads")
    arch.add_argument("--dropout", type=float, default=0.0, help="residual-block dropout")
    arch.add_argument("--no-scale-shift", action="store_true",
                      help="add the time embedding (DDPM) instead of ADM's scale-shift norm")
    arch.add_argument("--norm-groups", type=int, default=8, help="GroupNorm groups")
    timing = parser.add_argument_group("timing")
    timing.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    timing.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    timing.add_argument("--repeats", type=int, default=12,
                        help="timed repeats per model (alternating models); the median is reported")
    timing.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, usually all cores)")
    timing.add_argument("--models", default="genlab,diffusers",
                        help="comma-separated subset of: genlab, diffusers")
    timing.add_argument("--compile", action="store_true",
                        help="also time genlab's U-Net compiled for training (train.compile=true), channels_last")
    timing.add_argument("--bf16", action="store_true",
                        help="also time both models under bf16 autocast (train.mixed_precision=bf16), "
                        "genlab also in channels_last")
    timing.add_argument("--profile", action="store_true",
                        help="also print where one step's time goes (torch.profiler, eager contenders)")
    timing.add_argument("--compile-diffusers", action="store_true",
                        help="also time diffusers' UNet2DModel compiled the same way (NCHW, as its users run it)")
    timing.add_argument("--seed", type=int, default=0, help="seed of weights and data")
    return parser.parse_args(argv)


def unet_shape(args: argparse.Namespace) -> tuple[int, int]:
    """(channels, size) of the U-Net's input after pixel_unshuffle by the patch size."""
    return args.channels * args.patch_size**2, args.image_size // args.patch_size


def build_genlab(args: argparse.Namespace) -> nn.Module:
    """genlab's U-Net with the options of the command line."""
    config = UNetConfig(
        base_channels=args.base_channels,
        channel_mult=args.channel_mult,
        num_res_blocks=args.num_res_blocks,
        attention_resolutions=args.attention_resolutions,
        num_heads=args.num_heads,
        dropout=args.dropout,
        use_scale_shift_norm=not args.no_scale_shift,
        norm_groups=args.norm_groups,
        mid_attention=not args.no_mid_attention,
    )
    channels, size = unet_shape(args)
    return UNet(config, channels, channels, size)


class DiffusersUNet(nn.Module):
    """diffusers' UNet2DModel with the same layout, called as model(x, t) -> tensor."""

    def __init__(self, args: argparse.Namespace):
        super().__init__()
        from diffusers import UNet2DModel

        channels, size = unet_shape(args)
        widths = tuple(args.base_channels * m for m in args.channel_mult)
        resolutions = [size // 2**i for i in range(len(widths))]
        has_attention = [r in args.attention_resolutions for r in resolutions]
        # diffusers fixes the head *width*; pick it so the head count equals ours at the first
        # attended width (FLOPs do not depend on the head count, only the kernel shapes do).
        attended = [w for w, a in zip(widths, has_attention) if a] + [widths[-1]]
        head_dim = attended[0] // args.num_heads
        self.model = UNet2DModel(
            sample_size=size,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=widths,
            layers_per_block=args.num_res_blocks,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in has_attention),
            up_block_types=tuple(
                "AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)
            ),
            attention_head_dim=head_dim,
            norm_num_groups=args.norm_groups,
            attn_norm_num_groups=args.norm_groups,  # else diffusers drops the middle attention GroupNorm
            dropout=args.dropout,
            resnet_time_scale_shift="default" if args.no_scale_shift else "scale_shift",
            add_attention=not args.no_mid_attention,
            flip_sin_to_cos=True,  # cos first, as genlab's timestep_embedding
            freq_shift=0,
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W), t (N,) -> predicted noise (N, C, H, W)."""
        return self.model(x, t, return_dict=False)[0]


class Patched(nn.Module):
    """pixel_unshuffle -> U-Net -> pixel_shuffle, as genlab's DDPM does with model.patch_size."""

    def __init__(self, unet: nn.Module, patch_size: int):
        super().__init__()
        self.unet = unet
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W), t (N,) -> (N, C, H, W)."""
        p = self.patch_size
        if p == 1:
            return self.unet(x, t)
        h = F.pixel_unshuffle(x, p)  # (N, C p^2, H / p, W / p)
        return F.pixel_shuffle(self.unet(h, t), p)  # (N, C, H, W)


def make_step(model: nn.Module, args: argparse.Namespace,
              optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
              channels_last: bool = False, bf16: bool = False) -> Callable[[], torch.Tensor]:
    """A closure doing one full training step of ``model`` on a fixed random batch; returns the loss.

    ``channels_last`` puts the network's weights in NHWC memory, as ``train.channels_last`` does (the data
    stay NCHW, as the trainer's batches: the first convolution's output is NHWC and the layout carries on).
    ``bf16`` runs the forward pass and the loss under bf16 autocast, as ``train.mixed_precision=bf16`` does."""
    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.batch_size, args.channels, args.image_size, args.image_size)
    x = torch.randn(shape, generator=generator)
    target = torch.randn(shape, generator=generator)
    t = torch.randint(0, 1000, (args.batch_size,), generator=generator)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    opt = optimizer(list(model.parameters()))

    def step() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.mse_loss(model(x, t), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def genlab_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimiser genlab's trainer builds for a network (train.lr 1e-4, its other defaults)."""
    from genlab.config import TrainConfig
    from genlab.methods.base import OptimizerSpec
    from genlab.train.trainer import make_optimizer

    return make_optimizer(OptimizerSpec(params=params), TrainConfig(lr=1e-4))


def diffusers_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimiser of diffusers' training scripts (train_unconditional.py: torch.optim.AdamW)."""
    return torch.optim.AdamW(params, lr=1e-4)


def fp32_peak() -> tuple[float, float]:
    """GFLOP/s of a float32 1024^3 matrix product (MKL) and of a 3x3 convolution, 256 -> 256 channels on
    16 x 16 x 16 NHWC (oneDNN), on this CPU at the current threads (best of 5 wall-time measurements)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    x = torch.randn(16, 256, 16, 16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3).contiguous(memory_format=torch.channels_last)
    rates = []
    for op, flops in ((lambda: a @ b, 2 * 1024**3), (lambda: F.conv2d(x, w, padding=1), 2 * 16 * 256**2 * 9 * 16**2)):
        op()
        rates.append(flops / min(time_steps(op, 3)[0] for _ in range(5)) / 1e9)
    return rates[0], rates[1]


def count_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call of ``step`` (matmuls and convolutions, forward and backward)."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def time_steps(step: Callable[[], None], n: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per step over n consecutive steps."""
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n, (time.process_time() - start_cpu) / n


PROFILE_GROUPS = {  # profiler op names -> what they are
    "convolution forward": ("aten::mkldnn_convolution",),
    "convolution backward": ("aten::convolution_backward",),
    "attention (SDPA forward + backward)": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                                            "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
    "matmul (linear layers)": ("aten::mm", "aten::addmm", "aten::bmm"),
    "group norm forward + backward": ("aten::native_group_norm", "aten::native_group_norm_backward"),
    "SiLU forward + backward": ("aten::silu", "aten::silu_backward"),
    "copies and concatenation": ("aten::copy_", "aten::cat"),
    "optimizer (fused AdamW kernel, or the per-tensor loop's ops)": (
        "aten::_fused_adamw_", "aten::lerp_", "aten::addcdiv_", "aten::sqrt", "aten::_foreach_add_"),
}


def profile_steps(step: Callable[[], None], n: int = 3) -> dict[str, float]:
    """Milliseconds per step by PROFILE_GROUPS (self CPU time of torch.profiler over n steps), the rest, total."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    per_op = {event.key: event.self_cpu_time_total / n / 1000 for event in prof.key_averages()}
    groups = {group: sum(per_op.get(op, 0.0) for op in ops) for group, ops in PROFILE_GROUPS.items()}
    groups["everything else (element-wise ops, autograd and Python)"] = sum(per_op.values()) - sum(groups.values())
    groups["total"] = sum(per_op.values())
    return groups


def cpu_model_name() -> str:
    """The CPU's model name (as lscpu shows it), or platform's guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Contender(NamedTuple):
    """One way of running a library's training step."""

    library: str  # genlab or diffusers
    channels_last: bool = False
    compiled: bool = False
    bf16: bool = False


def contenders_of(args: argparse.Namespace) -> dict[str, Contender]:
    """name -> Contender of every contender the command line asks for."""
    libraries = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in libraries if name not in ("genlab", "diffusers")]
    if unknown:
        raise SystemExit(f"error: unknown model(s) {unknown}; choose from ['diffusers', 'genlab']")
    if args.compile and "genlab" not in libraries:
        raise SystemExit("error: --compile times genlab's compiled U-Net against eager genlab: keep genlab in --models")
    contenders = {}
    for library in libraries:
        contenders[library] = Contender(library)  # first: its FLOPs are counted, and stand for the others'
        contenders[f"{library} channels_last"] = Contender(library, channels_last=True)
        if args.bf16:
            contenders[f"{library} bf16 autocast"] = Contender(library, bf16=True)
    if args.bf16 and "genlab" in libraries:
        contenders["genlab bf16 autocast, channels_last"] = Contender("genlab", channels_last=True, bf16=True)
    if args.compile:
        contenders["genlab compiled, channels_last"] = Contender("genlab", channels_last=True, compiled=True)
    if args.compile_diffusers and "diffusers" in libraries:
        contenders["diffusers compiled"] = Contender("diffusers", compiled=True)
    return contenders


def main(argv: list[str] | None = None) -> None:
    """Build, warm up, count and time each contender; print the Markdown table."""
    from genlab.compiling import compile_network

    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.patch_size < 1 or args.image_size % args.patch_size:
        raise SystemExit(f"error: --patch-size {args.patch_size} must divide --image-size {args.image_size}")
    builders = {"genlab": build_genlab, "diffusers": DiffusersUNet}
    optimizers = {"genlab": genlab_optimizer, "diffusers": diffusers_optimizer}
    contenders = contenders_of(args)

    steps, params, flops, first_loss = {}, {}, {}, {}
    compile_seconds = {}
    for name, (library, channels_last, compiled, bf16) in contenders.items():
        torch.manual_seed(args.seed)
        try:
            model = Patched(builders[library](args), args.patch_size)
        except ConfigError as error:
            raise SystemExit(f"error: {error}") from None
        params[name] = sum(p.numel() for p in model.parameters())
        steps[name] = make_step(model, args, optimizers[library], channels_last, bf16)
        if compiled:
            compile_network(model.unet)  # what train.compile=true does to the method's denoiser
            start = time.perf_counter()
            first_loss[name] = float(steps[name]())  # compiles the forward and the backward graphs
            compile_seconds[name] = time.perf_counter() - start
        else:
            first_loss[name] = float(steps[name]())
        if name == library:
            flops[name] = count_flops(steps[name])  # also a warm-up step
        else:  # the same network: the same work (the counter would see bf16 attention's explicit products as more)
            flops[name] = flops[library]
        for _ in range(args.warmup):
            steps[name]()

    names = list(contenders)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        # A B C, then C B A: alternate, and alternate who goes first, so all share the machine's noise.
        for name in names if repeat % 2 == 0 else names[::-1]:
            wall, cpu = time_steps(steps[name], args.steps)
            seconds[name].append(wall)
            cpu_seconds[name].append(cpu)
    mkl_rate, onednn_rate = fp32_peak()
    profiles = {name: profile_steps(steps[name]) for name in names if args.profile and not contenders[name].compiled}
    peak = max(mkl_rate, onednn_rate)

    reference = "diffusers" if "diffusers" in contenders else names[0]

    def paired(times: dict[str, list[float]], name: str) -> list[float]:
        """Per repeat, (GFLOP/s of name) / (GFLOP/s of reference), from timings taken back to back."""
        return sorted((flops[name] / s) / (flops[reference] / r) for s, r in zip(times[name], times[reference]))

    def spread(ratios: list[float]) -> str:
        return f"{statistics.median(ratios):.3f} ({ratios[0]:.3f}-{ratios[-1]:.3f})"

    rate = {name: flops[name] / statistics.median(seconds[name]) / 1e9 for name in names}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_model_name()}, "
          f"{platform.system()} {platform.machine()}, python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    unet_channels, unet_size = unet_shape(args)
    print(f"batch {args.batch_size} x {args.channels}x{args.image_size}x{args.image_size}, "
          f"U-Net input {unet_channels}x{unet_size}x{unet_size} (patch size {args.patch_size}), "
          f"base {args.base_channels}, mult {args.channel_mult}, res blocks {args.num_res_blocks}, "
          f"attention at {args.attention_resolutions or 'none'}"
          f"{'' if args.no_mid_attention else ' + middle'}, {args.num_heads} heads, "
          f"dropout {args.dropout}, {'add' if args.no_scale_shift else 'scale-shift'} time embedding; "
          f"median of {args.repeats} x {args.steps} steps after {args.warmup + 1} warm-up; "
          f"fp32 peak {peak:.1f} GFLOP/s (matmul, MKL: {mkl_rate:.1f}; 3x3 conv, oneDNN: {onednn_rate:.1f})\n")
    print(f"| model | params | GFLOP/step | images/s | GFLOP/s | fraction of fp32 peak | GFLOP/s ratio vs {reference}, "
          "wall time (paired median, min-max) | same, CPU time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        images_per_s = args.batch_size / statistics.median(seconds[name])
        print(f"| {name} | {params[name]:,} | {flops[name] / 1e9:.2f} | "
              f"{images_per_s:.1f} | {rate[name]:.2f} | {rate[name] / peak:.3f} | "
              f"{spread(paired(seconds, name))} | {spread(paired(cpu_seconds, name))} |")
    genlab_names = [name for name in names if contenders[name].library == "genlab"]
    if reference == "diffusers" and genlab_names:
        best = max(genlab_names, key=lambda name: statistics.median(paired(cpu_seconds, name)))
        print(f"\ngenlab's best setting ({best}) per FLOP vs diffusers as its users run it: "
              f"{statistics.median(paired(seconds, best)):.3f}x (wall time), "
              f"{statistics.median(paired(cpu_seconds, best)):.3f}x (CPU time); vs diffusers in channels_last: "
              f"{statistics.median(paired(cpu_seconds, best)) / statistics.median(paired(cpu_seconds, 'diffusers channels_last')):.3f}x "
              "(CPU time)")
    if profiles:
        print("\n| ms per step (torch.profiler, self CPU time, 3 steps; share of the step) | "
              + " | ".join(profiles) + " |")
        print("|---|" + "---:|" * len(profiles))
        for group in next(iter(profiles.values())):
            print(f"| {group} | " + " | ".join(f"{p[group]:.1f} ({100 * p[group] / p['total']:.0f} %)"
                                              for p in profiles.values()) + " |")
    for name, eager_name in (("genlab compiled, channels_last", "genlab channels_last"),
                             ("diffusers compiled", "diffusers")):
        if name not in compile_seconds:
            continue
        eager_s, compiled_s = statistics.median(seconds[eager_name]), statistics.median(seconds[name])
        compile_only = max(0.0, compile_seconds[name] - compiled_s)  # the first step's own work is not compile time
        saved = eager_s - compiled_s
        pays = f"saves {1000 * saved:.1f} ms/step, pays after {compile_only / saved:.0f} steps" if saved > 0 else \
            f"{1000 * -saved:.1f} ms/step slower: never pays"
        print(f"\n{name} (inductor, dynamic=False, forward + backward): compile {compile_only:.1f} s (first step "
              f"{compile_seconds[name]:.1f} s); against eager {eager_name}: {pays}; "
              f"first-step loss eager {first_loss[eager_name]:.7f}, compiled {first_loss[name]:.7f}")

if __name__ == "__main__":
    main()
