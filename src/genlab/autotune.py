"""Settings chosen for the machine at hand: the sampling batch size, the CPU threads, the training precision.

``batch_size="auto"`` (the default of ``genlab sample`` and ``Run.sample``) times one forward pass of a
diffusion model's denoiser network at a few batch sizes and takes the one with the fewest milliseconds per
image: a sampler's cost is its number of network evaluations times that. The probe takes seconds, so its
answer is cached per network (class, parameter count, input shape), device and thread count in
``$GENLAB_CACHE/sampling_batch_size.json``. Methods without a denoiser network (GANs, VAEs: one cheap pass
per image) use :data:`DEFAULT_BATCH_SIZE`.

``train.mixed_precision: auto`` trains in bf16 autocast where the hardware computes bf16 natively (a CUDA
GPU that supports it; a CPU with AVX512-BF16 or AMX) and in float32 elsewhere: on a CPU without them bf16
is emulated and slower than float32 (:func:`auto_mixed_precision`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from genlab.errors import WriteError
from genlab.fileio import atomic_write_text, resolve_cache_dir

DEFAULT_BATCH_SIZE = 256
CANDIDATES = (16, 32, 64, 128, 256)  # the probe's batch sizes; larger ones rarely pay on a CPU's caches
_PROBE_LIMIT_S = 2.0  # a forward slower than this ends the probe: larger batches cannot be cheaper per call
_CACHE_FILE = "sampling_batch_size.json"


def usable_cores() -> int:
    """CPU cores this process may run on, one per physical core (SMT siblings share one core's arithmetic)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())  # the same text for every thread of one core
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def default_threads() -> int:
    """Torch threads when the user chose none: OMP_NUM_THREADS when set, else :func:`usable_cores`."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else usable_cores()


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS or Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def auto_mixed_precision(device: torch.device) -> str:
    """``bf16`` where ``device`` computes bf16 natively, else ``no`` (float32, never slower there)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    if device.type == "cpu":
        return "bf16" if cpu_flags() & {"avx512_bf16", "amx_bf16"} else "no"
    return "no"  # mps and others: float32


def auto_batch_size(method, n: int) -> int:
    """The batch size with the fewest ms per image for sampling ``n`` images from ``method`` (never above n)."""
    network = getattr(method, "backbone", None)
    shape = getattr(method, "_noise_shape", None)
    if not isinstance(network, torch.nn.Module) or shape is None:
        return min(n, DEFAULT_BATCH_SIZE)
    if n <= CANDIDATES[0]:
        return n
    shape = tuple(shape())
    device = method.device
    key = (f"{type(network).__name__}:{sum(p.numel() for p in network.parameters())}:{'x'.join(map(str, shape))}:"
           f"{device}:{torch.get_num_threads()}")
    path = resolve_cache_dir() / _CACHE_FILE
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached.get(key), int):
        cached[key] = _probe(method, shape, device)
        try:
            atomic_write_text(path, json.dumps(cached, indent=1, sort_keys=True))
        except (OSError, WriteError):
            pass  # a read-only cache: probe again next time
    return min(n, cached[key])


@torch.no_grad()
def probe_ms_per_image(method, shape: tuple[int, ...], device: torch.device) -> dict[int, float]:
    """ms per image of one network evaluation at each candidate batch size (best of two after a warm-up)."""
    timings: dict[int, float] = {}
    was_training = method.training
    method.eval()
    try:
        for batch in CANDIDATES:
            x = torch.randn(batch, *shape, device=device)
            t = torch.full((batch,), 0.5 * method.config.num_timesteps, device=device)  # fractional, as the ODE solvers
            method.network(x, t)  # warm-up: allocator and caches
            best = float("inf")
            for _ in range(2):
                start = time.perf_counter()
                method.network(x, t)
                best = min(best, time.perf_counter() - start)
            timings[batch] = 1000 * best / batch
            if best > _PROBE_LIMIT_S:
                break
    finally:
        method.train(was_training)
    return timings


def _probe(method, shape: tuple[int, ...], device: torch.device) -> int:
    timings = probe_ms_per_image(method, shape, device)
    return min(timings, key=timings.get)
