"""The one training loop for every method (SPEC P4-P7).

Design choices that make runs exact and resumable:

* **Randomness is a function of (seed, step).** Every micro-batch gets its own generator seeded from
  (seed, micro-batch index); the method draws its noise and timesteps through :class:`_StepContext`,
  which draws for the *global* batch and hands each process its slice. A run therefore gives the same
  weights whether it ran straight through, was resumed, or was split over processes.
* **Data order is a function of (seed, epoch).** Epoch ``e`` visits ``randperm(N, seed + e)``;
  the position in the epoch follows from the step, so resuming needs no sampler state.
* **Gradients are averaged explicitly** (one all-reduce per optimiser step) instead of wrapping the
  method in DDP: methods call their networks directly (GANs step two optimisers), which DDP's
  forward hooks would not see. accelerate supplies the device, the process group and autocast.
* **Checkpoints are atomic** (``genlab.train.checkpoint``); a non-finite loss stops training before
  the optimiser touches the weights, so the last checkpoint stays good.

The run lifecycle (issues 12, 13):

* **One writer per run folder**: the caller holds :class:`genlab.train.lock.RunLock` while fitting.
* **Each launch is a segment.** Every launch (fresh or resumed) logs one ``start`` record holding its
  full config and, on resume, the settings it changed (``changes``: key -> [old, new]) at its step;
  ``config.yaml`` holds the newest segment's settings. So segment k ran from start record k's step to
  the next one's, with that record's config. A launch that completes (or stops cleanly) logs one ``end``.
* **Resume with changed settings** applies them or refuses them (:data:`RESUMABLE_KEYS`): the
  learning rate is set on every optimiser group driven by ``train.lr``; the network, the data, the seed
  and the batch arithmetic cannot change. Changes are compared with the config stored in the checkpoint.
* **Extending (or shortening) ``train.steps``** re-plans the LR decay from the current step to the new
  total, starting at the current LR: no jump. A finished decay (LR 0) cannot continue that way, so it
  restarts with a warm-up to ``train.lr`` and decays again (a warm restart, Loshchilov & Hutter 2017,
  SGDR) with a warning. During the first warm-up nothing changes: the warm-up ignores the total.
* **``train.time_limit`` is per launch**: minutes since this launch began training; reaching it
  saves a checkpoint and says so. ``train.time_clock=cpu`` counts the process's CPU minutes instead
  of wall minutes, so a budget means the same compute on a shared, loaded machine (both are saved in
  checkpoints and logged: ``elapsed_s``, ``cpu_s``).
* **SIGINT and SIGTERM** save a checkpoint at the next step boundary and stop with a message naming
  it; a second signal stops at once, naming the newest checkpoint that really exists.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from genlab.config import RunConfig, read_config_file, save_config, to_dict
from genlab.data import ImageSet, to_model_range
from genlab.data.micro import micro_augment
from genlab.autotune import auto_mixed_precision
from genlab.compiling import compile_network, eager, fall_back, is_compiled
from genlab.errors import ConfigError, GenlabError, TrainingDiverged
from genlab.methods.base import Method, OptimizerSpec
from genlab.methods.capabilities import Generates, has
from genlab.train.checkpoint import (
    check_weights_fit,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    checkpoint_step,
    flatten_state,
    unflatten_state,
)
from genlab.train.ema import EMA
from genlab.train.rng import capture_rng_state, restore_rng_state
from genlab.train.runlog import RunLog

_SEED_STRIDE = 1_000_003  # a prime; keeps (seed, index) streams apart
_GRID_BATCH = 16  # preview images per sampling call: the grid's progress bar moves per batch

# Config keys a resumed run may change; every other key is refused on resume (see the module docstring).
RESUMABLE_KEYS = frozenset({
    "train.steps", "train.lr", "train.grad_clip", "train.time_limit", "train.checkpoint_every",
    "train.keep_checkpoints", "train.time_clock", "train.log_every", "train.sample_every", "train.sample_n", "train.eval_every",
    "train.eval_n", "train.eval_ref", "train.threads", "train.device", "train.report_every", "train.tensorboard",
    "train.compile", "train.channels_last", "data.root",
})


@dataclass
class LRPlan:
    """Where the current LR plan begins: at ``start``, from ``factor`` x lr, after a warm-up or not."""

    start: int = 0  # 0 for a fresh run; the resume step when train.steps changed
    factor: float = 1.0  # LR multiplier the decay starts from
    warmup: bool = True  # a linear warm-up over train.warmup_steps first


def lr_lambda(cfg, plan: LRPlan = LRPlan()) -> Callable[[int], float]:
    """LR multiplier per optimiser step: linear warm-up, then constant, cosine or linear decay to 0 at cfg.steps."""
    warmup = cfg.warmup_steps if plan.warmup else 0
    total, kind = cfg.steps, cfg.lr_schedule

    def f(step: int) -> float:
        k = step - plan.start
        if warmup > 0 and k < warmup:
            return plan.factor * (k + 1) / warmup
        if kind == "constant":
            return plan.factor
        progress = min(1.0, (k - warmup) / max(1, total - plan.start - warmup))
        if kind == "cosine":
            return plan.factor * (0.5 * (1.0 + math.cos(math.pi * progress)))
        return plan.factor * (1.0 - progress)

    return f


_FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # torch's fused AdamW supports these


def make_optimizer(spec: OptimizerSpec | list, tc) -> torch.optim.Optimizer:
    """The optimiser a method asked for; unset fields of the spec come from the run's train config."""
    if not isinstance(spec, OptimizerSpec):
        spec = OptimizerSpec(params=list(spec))
    params = [p for p in spec.params if p.requires_grad]
    if not params:
        raise ConfigError("a method declared an optimiser group without trainable parameters")
    lr = tc.lr if spec.lr is None else spec.lr
    weight_decay = tc.weight_decay if spec.weight_decay is None else spec.weight_decay
    if spec.kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=spec.momentum, nesterov=spec.nesterov, weight_decay=weight_decay)
    if spec.kind != "adamw":
        raise ConfigError(f"unknown optimiser kind {spec.kind!r}; valid: adamw, sgd")
    betas = tuple(tc.adam_betas) if spec.betas is None else tuple(spec.betas)
    # The fused kernel updates every tensor in one pass (the per-tensor loop launches ~10 ops per tensor:
    # 8.5 -> 1.3 ms per step for the small U-Net's 128 tensors on one CPU thread); same maths, float32 rounding.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in _FUSED_DTYPES for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)


def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give each per-parameter state tensor (AdamW's moments, SGD's momentum) its parameter's memory layout.

    Checkpoints store contiguous tensors, and a resumed run may switch train.channels_last; the fused AdamW
    kernel walks parameter, gradient and moments as flat memory, so moments in another layout than their
    NHWC parameter would be applied to the wrong elements, silently."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


class _StepContext:
    """Randomness and optimiser steps offered to ``Method.training_step`` for one micro-batch."""

    def __init__(self, trainer: "Trainer", step: int, micro: int, generator: torch.Generator, is_last_micro: bool):
        self.trainer = trainer
        self.step = step
        self.micro = micro
        self.generator = generator
        self.is_last_micro = is_last_micro
        self.logs: dict[str, torch.Tensor] = {}

    def _local(self, full: torch.Tensor) -> torch.Tensor:
        t = self.trainer
        lo = t.rank * t.local_batch
        return full[lo: lo + t.local_batch].to(t.device)

    def randn(self, *shape_per_sample: int) -> torch.Tensor:
        full = torch.randn(self.trainer.micro_batch, *shape_per_sample, generator=self.generator)
        return self._local(full)

    def rand(self, *shape_per_sample: int) -> torch.Tensor:
        return self._local(torch.rand(self.trainer.micro_batch, *shape_per_sample, generator=self.generator))

    def randint(self, low: int, high: int) -> torch.Tensor:
        return self._local(torch.randint(low, high, (self.trainer.micro_batch,), generator=self.generator))

    def optimize(self, loss: torch.Tensor, group: str = "main") -> None:
        self.trainer._optimize(loss, group, self)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stopped_early: bool  # by train.time_limit


class Interrupted(KeyboardInterrupt):
    """Training stopped by a signal; the message says which checkpoint holds the work (one line)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class _Signals:
    """SIGINT / SIGTERM during training: the first asks for a stop at the next step boundary, a second stops at once."""

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_Signals":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        t = self.trainer
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            t._say(f"{name} received: saving a checkpoint after step {t.step + 1} and stopping "
                   f"(send it again to stop at once)")
            return
        raise Interrupted(signum, f"stopped at once by a second signal ({name}) during step {t.step + 1}; "
                                  f"{t._checkpoint_phrase()}")


class _LogWindow:
    """Means of the per-step logs since the last log record, and the throughput over that window."""

    def __init__(self):
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        self.sums: dict[str, float] = {}
        self.count, self.images, self.start = 0, 0, now

    def add(self, logs: dict[str, torch.Tensor], images: int) -> None:
        for name, value in logs.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.count += 1
        self.images += images

    def flush(self) -> dict[str, float]:
        now = time.perf_counter()
        values = {k: v / self.count for k, v in self.sums.items()}
        values["images_per_s"] = self.images / max(now - self.start, 1e-9)
        self.reset(now)
        return values


class Trainer:
    """Trains ``method`` on ``data`` as ``cfg.train`` says, writing everything into ``run_dir``.

    ``evaluate(method) -> {name: value}`` scores the method every ``train.eval_every`` steps (the caller
    builds it, e.g. from :func:`genlab.evaluation.periodic_eval`: the trainer imports no evaluation code).
    ``observe(record)`` sees every log record as it is written (the caller's report.html and TensorBoard
    writers, :func:`genlab.report.live.training_outputs`; the trainer imports no report code either).
    """

    def __init__(self, run_dir: Path, cfg: RunConfig, method: Method, data: ImageSet, progress: bool = True,
                 evaluate: Callable[[Method], dict[str, float]] | None = None,
                 observe: Callable[[dict], None] | None = None):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        self.run_dir = Path(run_dir)
        self.evaluate = evaluate
        self.observe = observe
        # The method's model config: shapes it derived from the data are saved, so a reload rebuilds them.
        self.cfg = dataclasses.replace(cfg, model=getattr(method, "config", cfg.model))
        tc = cfg.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        # accelerate only forms a multi-process CPU group (gloo) when told it runs on the CPU.
        on_cpu = tc.device == "cpu" or (tc.device is None and not torch.cuda.is_available())
        # accelerate keeps one process-wide AcceleratorState and refuses a second Accelerator with another
        # mixed_precision; a later training in the same process (bench families, tests, notebooks) may ask
        # for another one, so forget the state's precision (the process group, PartialState, is kept).
        precision = tc.mixed_precision
        if precision == "auto":
            precision = auto_mixed_precision(torch.device("cpu") if on_cpu else torch.device(tc.device or "cuda"))
        if AcceleratorState._shared_state.get("_mixed_precision", precision) != precision:
            AcceleratorState._reset_state()
        self.accelerator = Accelerator(cpu=on_cpu, mixed_precision=precision)
        self.device = self.accelerator.device if tc.device in (None, "cpu") else torch.device(tc.device)
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        self.progress = progress and self.is_main

        if tc.batch_size % tc.grad_accum:
            raise ConfigError(f"train.batch_size={tc.batch_size} is not divisible by train.grad_accum={tc.grad_accum}")
        self.micro_batch = tc.batch_size // tc.grad_accum  # global micro-batch
        if self.micro_batch % self.world:
            raise ConfigError(f"micro-batch {self.micro_batch} (batch_size / grad_accum) is not divisible by the "
                              f"{self.world} processes: choose train.batch_size as a multiple of {self.world * tc.grad_accum}")
        self.local_batch = self.micro_batch // self.world
        if len(data) < self.micro_batch:
            raise ConfigError(f"the data has {len(data)} images, fewer than one micro-batch of {self.micro_batch}: "
                              "lower train.batch_size or use more data")
        self.data = data
        self.batches_per_epoch = len(data) // self.micro_batch  # drop the last partial batch

        self.method = method.to(self.device)
        if tc.channels_last:
            self._denoiser_network("train.channels_last").to(memory_format=torch.channels_last)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR] = {}
        self.group_params: dict[str, list[torch.nn.Parameter]] = {}
        self.follows_train_lr: dict[str, bool] = {}  # groups whose LR is train.lr (not the method's own)
        self.lr_plan = LRPlan()
        for group, spec in method.optimizer_groups().items():
            opt = make_optimizer(spec, tc)
            self.optimizers[group] = opt
            self.group_params[group] = [p for g in opt.param_groups for p in g["params"]]
            self.follows_train_lr[group] = not isinstance(spec, OptimizerSpec) or spec.lr is None
            self.schedulers[group] = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc, self.lr_plan))
        self.emas = {}
        if tc.ema_decay is not None:
            self.emas = {name: EMA(module, decay=tc.ema_decay) for name, module in method.ema_targets().items()}
        self.compiled = self._denoiser_network("train.compile") if tc.compile else None
        if self.compiled is not None:
            compile_network(self.compiled)
        self.step = 0
        self.elapsed = 0.0  # seconds of training over all launches of this run (logged; time_limit is per launch)
        self.cpu_elapsed = 0.0  # CPU seconds of the same (all threads of the process; train.time_clock=cpu)
        self.changes: dict[str, list[Any]] = {}  # settings this launch changed on resume: key -> [old, new]
        self._perm_epoch = -1
        self._perm = None

    def _denoiser_network(self, key: str) -> torch.nn.Module:
        """The method's denoiser network, which ``key`` (train.compile, train.channels_last) acts on."""
        network = getattr(self.method, "backbone", None)
        if not isinstance(network, torch.nn.Module):
            raise ConfigError(f"{key} applies to diffusion methods (a denoiser network); {self.cfg.method} "
                              f"has none: set {key}=false")
        return network

    # ------------------------------------------------------------------ data and randomness

    def _generator(self, index: int, stream: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.train.seed * _SEED_STRIDE + index * 7 + stream)

    def _batch(self, micro_index: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        epoch, position = divmod(micro_index, self.batches_per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.cfg.train.seed * _SEED_STRIDE + epoch)
            order = getattr(self.data, "epoch_order", None)  # multi-aspect data: batches of one bucket each
            self._perm = order(g, self.micro_batch) if order else torch.randperm(len(self.data), generator=g)
            self._perm_epoch = epoch
        lo = position * self.micro_batch + self.rank * self.local_batch
        idx = self._perm[lo: lo + self.local_batch]
        images = to_model_range(self.data.images[idx])  # (n, C, H, W) float in [-1, 1]
        bucket_shape = getattr(self.data, "bucket_shape", None)  # multi-aspect data: cut the batch to its bucket
        if bucket_shape is not None:
            height, width = bucket_shape(idx)
            images = images[..., :height, :width]
        conditions = getattr(self.data, "conditions", None)  # paired data: the input image of each pair
        condition = None if conditions is None else to_model_range(conditions[idx])
        if self.cfg.data.hflip:
            flip = torch.rand(self.micro_batch, generator=gen)[self.rank * self.local_batch:][: self.local_batch] < 0.5
            images[flip] = images[flip].flip(-1)
            if condition is not None:
                condition[flip] = condition[flip].flip(-1)
        micro = None
        d = self.cfg.data
        if d.random_shift or d.min_original_size or bucket_shape is not None:  # SDXL micro-conditioning
            draws = torch.rand(self.micro_batch, 3, generator=gen)[self.rank * self.local_batch:][: self.local_batch]
            original = self.data.original_sizes[idx] if bucket_shape is not None else None
            images, micro = micro_augment(images, draws, d.random_shift, d.min_original_size, original)
        batch = {"image": images.to(self.device, non_blocking=True)}
        if micro is not None:
            batch["micro"] = micro.to(self.device)
        if condition is not None:
            batch["condition"] = condition.to(self.device, non_blocking=True)
        if self.data.labels is not None:
            batch["label"] = self.data.labels[idx].to(self.device)
        captions = getattr(self.data, "captions", None)
        if captions is not None:  # captioned data: every caption of each image; the method picks one
            batch["captions"] = [captions[i] for i in idx.tolist()]
        return batch

    # ------------------------------------------------------------------ optimisation

    def _optimize(self, loss: torch.Tensor, group: str, ctx: _StepContext) -> None:
        if group not in self.optimizers:
            raise ConfigError(f"training step asked to optimise '{group}', but the method has {list(self.optimizers)}")
        finite = torch.isfinite(loss.detach()).float()
        if self.world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            raise TrainingDiverged(
                f"loss of '{group}' is {loss.item()} at step {ctx.step}; training stopped and the last checkpoint "
                f"({self._last_checkpoint_name()}) is intact: lower train.lr, enable train.grad_clip or check the data"
            )
        # Gradients flow only into this group's parameters: a generator's loss backpropagates through
        # the discriminator but must not leave gradients there for D's next step.
        (loss / self.cfg.train.grad_accum).backward(inputs=self.group_params[group])
        if not ctx.is_last_micro:
            return
        opt = self.optimizers[group]
        params = [p for p in self.group_params[group] if p.grad is not None]
        if self.world > 1 and params:
            # One flat all-reduce per step: average gradients over processes (DDP's maths, explicit).
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat /= self.world
            offset = 0
            for p in params:
                n = p.grad.numel()
                p.grad.copy_(flat[offset: offset + n].view_as(p.grad))
                offset += n
        if params:  # the norm before clipping is logged for every group: exploding gradients show up
            max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip is not None else math.inf
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            ctx.logs[f"grad_norm_{group}" if len(self.optimizers) > 1 else "grad_norm"] = norm.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def _last_checkpoint_name(self) -> str:
        last = latest_checkpoint(self.run_dir)
        return last.name if last else "none yet"

    def _checkpoint_phrase(self) -> str:
        """Which checkpoint holds the work, as it is on disk now (never one that was not written)."""
        last = latest_checkpoint(self.run_dir)
        if last is None:
            return "no checkpoint was written, so there is nothing to resume"
        return f"the newest checkpoint is {last} (step {checkpoint_step(last)}); continue with --resume"

    def _say(self, message: str) -> None:
        """A status line on stderr that does not break the progress bar (main process only)."""
        if self.is_main:
            tqdm.write(message, file=sys.stderr)

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path | None:
        """Write an atomic checkpoint of everything needed to resume exactly (main process only)."""
        if not self.is_main:
            return None
        tensors: dict[str, dict[str, torch.Tensor]] = {"model": {k: v.detach() for k, v in self.method.state_dict().items()}}
        skeletons: dict[str, Any] = {}
        for name, ema in self.emas.items():
            tensors[f"ema_{name}"], skeletons[f"ema_{name}"] = flatten_state(ema.state_dict())
        for group in self.optimizers:
            tensors[f"optim_{group}"], skeletons[f"optim_{group}"] = flatten_state(self.optimizers[group].state_dict())
            tensors[f"sched_{group}"], skeletons[f"sched_{group}"] = flatten_state(self.schedulers[group].state_dict())
        rng_tensors, rng_json = capture_rng_state()
        tensors["rng"] = rng_tensors
        state = {"step": self.step, "elapsed_seconds": self.elapsed, "cpu_seconds": self.cpu_elapsed, "skeletons": skeletons, "rng": rng_json,
                 "method": self.cfg.method, "data_info": dataclasses.asdict(self.method.data_info),
                 "parents": self.method.parent_records,  # frozen parents' configs: a child loads without their folders
                 "config": to_dict(self.cfg), "lr_plan": dataclasses.asdict(self.lr_plan)}
        return save_checkpoint(self.run_dir, self.step, tensors, state, keep_last=self.cfg.train.keep_checkpoints)

    def resume(self, path: Path | None = None) -> int:
        """Load the latest (or given) checkpoint and apply the changed settings; returns the step to continue from."""
        path = path or latest_checkpoint(self.run_dir)
        if path is None:
            raise ConfigError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}; start the run without --resume")
        tensors, state = load_checkpoint(path, device="cpu")
        # The settings that trained up to this checkpoint (older checkpoints: the run's config.yaml).
        trained = state.get("config") or read_config_file(self.run_dir / "config.yaml")
        self.changes = _changed_settings(trained, to_dict(self.cfg))
        weights_only = not any(group.startswith("optim_") for group in tensors)
        if not weights_only:  # with no training state to honour, only the weights' shapes must fit
            self._refuse_unresumable()
        check_weights_fit(self.method, tensors["model"], path, self.run_dir / "config.yaml")
        self.method.load_state_dict(tensors["model"])
        if weights_only:
            return self._start_from_weights(state, path)
        sk = state["skeletons"]
        for name, ema in self.emas.items():
            ema.load_state_dict(unflatten_state(tensors[f"ema_{name}"], sk[f"ema_{name}"]))
        for group in self.optimizers:
            self.optimizers[group].load_state_dict(unflatten_state(tensors[f"optim_{group}"], sk[f"optim_{group}"]))
            match_state_layout(self.optimizers[group])
            self.schedulers[group].load_state_dict(unflatten_state(tensors[f"sched_{group}"], sk[f"sched_{group}"]))
        restore_rng_state(tensors.get("rng", {}), state["rng"])
        self.step = int(state["step"])
        self.elapsed = float(state.get("elapsed_seconds", 0.0))
        self.cpu_elapsed = float(state.get("cpu_seconds", 0.0))
        self.lr_plan = LRPlan(**state.get("lr_plan", {}))
        if "train.steps" in self.changes and self.step < self.cfg.train.steps:
            self._replan_schedule(trained)
        self._apply_schedule()
        if self.is_main:  # later checkpoints belong to an abandoned future of this run
            for later in list_checkpoints(self.run_dir):
                if checkpoint_step(later) > self.step:
                    import shutil

                    shutil.rmtree(later, ignore_errors=True)
        return self.step

    def _start_from_weights(self, state: dict, path: Path) -> int:
        """A checkpoint of weights alone (``genlab import``: no optimiser, EMA or RNG state to continue):
        training goes on from those weights with a fresh optimiser, schedule and EMA, i.e. fine-tuning."""
        if self.emas:  # the EMA was built from the initial weights: start it from the loaded ones
            self.emas = {name: EMA(module, decay=self.cfg.train.ema_decay) for name, module in self.method.ema_targets().items()}
        self.step = int(state.get("step", 0))
        self._say(f"{path} holds weights only ({'imported' if 'imported_from' in state else 'no training state'}): "
                  f"training continues from them with a fresh optimiser, learning-rate schedule and EMA")
        self._apply_schedule()
        return self.step

    def _refuse_unresumable(self) -> None:
        """Raise ConfigError naming the first changed setting a resumed run cannot honour."""
        refused = sorted(k for k in self.changes if k not in RESUMABLE_KEYS)
        if "train.lr" in self.changes and not any(self.follows_train_lr.values()):
            refused.insert(0, "train.lr")  # a GAN's rates are its own (model.*): train.lr would change nothing
        if not refused:
            return
        key, also = refused[0], (f" (also {', '.join(refused[1:])})" if len(refused) > 1 else "")
        old, new = self.changes[key]
        why = ("this method's optimisers take their rates from model.*, not train.lr" if key == "train.lr"
               else "the checkpoint's weights were made with it")
        raise ConfigError(f"{key} cannot change on resume ({old!r} -> {new!r}){also}: {why}; resume without it, "
                          f"or start a new run in another --run-dir (resumable keys: "
                          f"{', '.join(sorted(RESUMABLE_KEYS))})")

    def _replan_schedule(self, trained: dict) -> None:
        """A new train.steps: continue the decay from the current LR to 0 at the new total (no jump)."""
        tc = self.cfg.train
        if tc.lr_schedule == "constant":
            return
        warmup_end = self.lr_plan.start + (tc.warmup_steps if self.lr_plan.warmup else 0)
        if self.step < warmup_end:
            return  # still warming up: the warm-up does not depend on the total, the decay will use the new one
        old_total = trained["train"]["steps"]
        factor = lr_lambda(dataclasses.replace(tc, steps=old_total), self.lr_plan)(self.step)
        if factor > 0:
            self.lr_plan = LRPlan(start=self.step, factor=factor, warmup=False)
            warnings.warn(f"train.steps {old_total} -> {tc.steps}: the {tc.lr_schedule} decay continues from "
                          f"step {self.step} at lr {factor * tc.lr:.3g} and reaches 0 at step {tc.steps}")
        else:
            self.lr_plan = LRPlan(start=self.step, factor=1.0, warmup=True)
            warnings.warn(f"train.steps {old_total} -> {tc.steps}: the {tc.lr_schedule} decay had reached lr 0, "
                          f"so it restarts: warm-up over {tc.warmup_steps} steps from step {self.step} back to lr "
                          f"{tc.lr:.3g}, then decay to 0 at step {tc.steps} (a warm restart)")

    def _apply_schedule(self) -> None:
        """Point every scheduler at the current plan and train.lr, and set the LR the next step uses."""
        fn = lr_lambda(self.cfg.train, self.lr_plan)
        for group, scheduler in self.schedulers.items():
            param_groups = scheduler.optimizer.param_groups
            scheduler.lr_lambdas = [fn] * len(param_groups)
            if self.follows_train_lr[group]:
                scheduler.base_lrs = [self.cfg.train.lr] * len(param_groups)
                for pg in param_groups:
                    pg["initial_lr"] = self.cfg.train.lr
            for pg, base in zip(param_groups, scheduler.base_lrs):
                pg["lr"] = base * fn(scheduler.last_epoch)  # LambdaLR's own formula
            scheduler._last_lr = [pg["lr"] for pg in param_groups]

    # ------------------------------------------------------------------ previews and periodic evaluation

    def _with_ema_weights(self) -> ExitStack:
        """Context in which the method holds its EMA weights (in eval mode); raw weights after."""
        stack = ExitStack()
        if self.compiled is not None:  # previews and scores in eval mode, without grad: the eager network
            stack.enter_context(eager(self.compiled))
        targets = self.method.ema_targets()
        for name, ema in self.emas.items():
            stack.enter_context(ema.averaged(targets[name]))
        self.method.eval()
        stack.callback(self.method.train)
        return stack

    def sample_grid(self, path: Path, progress: bool = False) -> None:
        """Save a preview grid drawn with EMA weights from a fixed seed (comparable across steps)."""
        from genlab.imageio import save_grid

        if not has(self.method, Generates):  # classifiers, autoencoders, translators: no grids
            return
        n, generator, chunks = self.cfg.train.sample_n, torch.Generator().manual_seed(0), []
        with self._with_ema_weights(), tqdm(total=n, desc="preview grid", unit="img", delay=1.0, leave=False,
                                            disable=not progress, dynamic_ncols=True) as bar:
            for start in range(0, n, _GRID_BATCH):
                m = min(_GRID_BATCH, n - start)
                chunks.append(self.method.sample(m, generator=generator).cpu())
                bar.update(m)
        save_grid(torch.cat(chunks), path)

    def periodic_eval(self) -> dict[str, float]:
        """The caller's ``evaluate(method)`` on the EMA weights in eval mode (fixed seed: comparable over steps)."""
        if self.evaluate is None:
            raise ConfigError("train.eval_every needs an evaluator: set train.eval_ref, e.g. train.eval_ref=mnist:test")
        with self._with_ema_weights():
            return self.evaluate(self.method)

    def _new_health_warnings(self) -> list[str]:
        """Warnings the method's health monitor issued since the last call (logged as ``health`` records)."""
        issued = getattr(getattr(self.method, "health", None), "warnings", [])
        seen, self._health_seen = getattr(self, "_health_seen", 0), len(issued)
        return issued[seen:]

    # ------------------------------------------------------------------ the loop

    def fit(self, resume: bool | Path = False) -> TrainResult:
        """Train to ``train.steps`` (continuing from the latest checkpoint, or the given one, when resuming)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume(None if resume is True else Path(resume))
        log = RunLog(self.run_dir, on_record=self.observe) if self.is_main else None
        try:
            if self.step >= self.cfg.train.steps:  # resuming a finished run: nothing to train, nothing to log twice
                self._say(f"{self.run_dir} is trained to step {self.step} (train.steps={self.cfg.train.steps}); "
                          "nothing to do (raise train.steps to continue)")
                self._finish(log, stopped_early=False)
                return TrainResult(self.run_dir, self.step, False)
            self._begin_launch(log)
            stop = self._loop(log)
            if isinstance(stop, int):  # a signal: the checkpoint is saved, stop here
                raise Interrupted(stop, f"stopped by {signal.Signals(stop).name} at step {self.step} of "
                                        f"{self.cfg.train.steps}; {self._checkpoint_phrase()}")
            if stop == "time_limit":
                unit = "CPU-min" if self.cfg.train.time_clock == "cpu" else "min"
                self._say(f"stopped at step {self.step} of {self.cfg.train.steps}: train.time_limit="
                          f"{self.cfg.train.time_limit:g} {unit} (per launch) reached; {self._checkpoint_phrase()}")
            self._finish(log, stopped_early=stop is not None)
        finally:
            if log is not None:
                log.close()
        self.accelerator.wait_for_everyone()
        return TrainResult(self.run_dir, self.step, stop is not None)

    def _begin_launch(self, log: RunLog | None) -> None:
        """Write config.yaml (the newest segment's settings) and this launch's one ``start`` record."""
        if not self.is_main:
            return
        save_config(self.cfg, self.run_dir / "config.yaml")
        (self.run_dir / "samples").mkdir(exist_ok=True)
        log.begin_launch(self.step)
        values = {"config": to_dict(self.cfg), "argv": list(sys.argv), "world_size": self.world,
                  "num_images": len(self.data), "mixed_precision": self.accelerator.mixed_precision}
        if self.step > 0:
            values.update(resumed_from=self.step, changes=self.changes, lr_plan=dataclasses.asdict(self.lr_plan))
        log.log(self.step, values, kind="start")

    def _loop(self, log: RunLog | None) -> str | int | None:
        """Train until train.steps or a stop; returns None, "time_limit" or the signal number that stopped it."""
        tc = self.cfg.train
        self.method.train()
        window, launch_start, launch_cpu_start = _LogWindow(), time.perf_counter(), time.process_time()
        elapsed_before, cpu_before = self.elapsed, self.cpu_elapsed
        with _Signals(self) as signals, tqdm(total=tc.steps, initial=self.step, disable=not self.progress,
                                             desc=f"train {self.cfg.method}", unit="step", dynamic_ncols=True) as bar:
            while self.step < tc.steps:
                try:
                    window.add(self._train_step(), tc.batch_size)
                except TrainingDiverged as e:
                    if log is not None:
                        log.log(self.step, {"error": str(e)}, kind="diverged")
                    raise
                launch_seconds = time.perf_counter() - launch_start
                launch_cpu_seconds = time.process_time() - launch_cpu_start
                self.elapsed = elapsed_before + launch_seconds
                self.cpu_elapsed = cpu_before + launch_cpu_seconds
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    self._log_window(log, window, bar)
                stop = self._stop_reason(signals, launch_cpu_seconds if tc.time_clock == "cpu" else launch_seconds)
                if self.step % tc.checkpoint_every == 0 or self.step == tc.steps or stop is not None:
                    self.save()
                if stop is not None:
                    if log is not None:
                        log.log(self.step, {"elapsed_s": self.elapsed, "cpu_s": self.cpu_elapsed, "stopped_early": True,
                                            "stopped_by": stop if isinstance(stop, str) else signal.Signals(stop).name},
                                kind="end")
                    return stop
                self._periodic_work(log)
        return None

    def _train_step(self) -> dict[str, torch.Tensor]:
        """One optimiser step over train.grad_accum micro-batches, EMA update included; returns the step's logs.

        With ``train.compile``, a failure of the compiler (no C++ compiler, an unsupported operator: first seen
        inside the forward or backward pass, before any optimiser step) makes the network eager for good, with
        one warning, and the step is redone: its randomness is a function of (seed, step), so the redone step
        is the eager run's step."""
        if self.compiled is None or not is_compiled(self.compiled):
            return self._train_step_once()
        try:
            return self._train_step_once()
        except GenlabError:
            raise  # the run's own failure (a non-finite loss), not the compiler's
        except Exception as error:  # inductor's failures have many types (compiler missing, lowering, C++ build)
            fall_back(self.compiled, error, "training")
            for optimizer in self.optimizers.values():  # the failed pass may have left partial gradients
                optimizer.zero_grad(set_to_none=True)
            return self._train_step_once()

    def _train_step_once(self) -> dict[str, torch.Tensor]:
        tc = self.cfg.train
        logs: dict[str, torch.Tensor] = {}
        for k in range(tc.grad_accum):
            micro_index = self.step * tc.grad_accum + k
            gen = self._generator(micro_index)
            # Dropout and other global-RNG users: reseed per micro-batch (and rank) for exact resume.
            torch.manual_seed(tc.seed * _SEED_STRIDE + micro_index * 7919 + self.rank + 1)
            batch = self._batch(micro_index, self._generator(micro_index, stream=1))
            ctx = _StepContext(self, self.step, k, gen, is_last_micro=k == tc.grad_accum - 1)
            with self.accelerator.autocast():
                out = self.method.training_step(batch, ctx)
            logs.update({**out, **ctx.logs})
        # One schedule step per training step for every group, however often the method stepped
        # it (a WGAN critic steps n_critic times; its warm-up must not run n_critic times faster).
        with warnings.catch_warnings():  # a group not stepped yet (a VQGAN's D before its start) is fine
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            for scheduler in self.schedulers.values():
                scheduler.step()
        targets = self.method.ema_targets()
        for name, ema in self.emas.items():
            ema.update(targets[name])
        self.step += 1
        return logs

    def _log_window(self, log: RunLog | None, window: _LogWindow, bar) -> None:
        """Log the window's mean losses, the LR, the throughput and the elapsed time; show the losses on the bar."""
        values = window.flush()
        values["lr"] = next(iter(self.schedulers.values())).get_last_lr()[0]
        values["elapsed_s"] = self.elapsed
        values["cpu_s"] = self.cpu_elapsed
        if log is not None:
            log.log(self.step, values)
            for message in self._new_health_warnings():
                log.log(self.step, {"warning": message}, kind="health")
        bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k in ("loss", "d_loss", "g_loss")})

    def _stop_reason(self, signals: _Signals, launch_seconds: float) -> str | int | None:
        """Why to stop after this step: a signal's number, "time_limit" (minutes of this launch), or None."""
        tc = self.cfg.train
        received = signals.received or 0
        if self.world > 1:  # every process must stop at the same step, or the next all-reduce hangs
            flag = torch.tensor(float(received), device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            received = int(flag.item())
        if received:
            return received
        if tc.time_limit is not None and launch_seconds >= tc.time_limit * 60 and self.step < tc.steps:
            return "time_limit"
        return None

    def _periodic_work(self, log: RunLog | None) -> None:
        """Preview grids and metrics every train.sample_every / train.eval_every steps (main process)."""
        tc = self.cfg.train
        if not self.is_main:
            return
        if tc.sample_every and self.step % tc.sample_every == 0 and self.step < tc.steps:
            self.sample_grid(self.run_dir / "samples" / f"step_{self.step:06d}.png")
        if tc.eval_every and self.step % tc.eval_every == 0 and log is not None:
            log.log(self.step, self.periodic_eval(), kind="eval")

    def _finish(self, log: RunLog | None, stopped_early: bool) -> None:
        """The final preview grid and the segment's one ``end`` record (neither twice for the same step)."""
        if not self.is_main:
            return
        grid = self.run_dir / "samples" / f"step_{self.step:06d}.png"
        if not grid.is_file():
            grid.parent.mkdir(exist_ok=True)
            self.sample_grid(grid, progress=self.progress)
        records = log.records()
        if not (records and records[-1]["kind"] == "end" and records[-1]["step"] == self.step):
            log.log(self.step, {"elapsed_s": self.elapsed, "cpu_s": self.cpu_elapsed, "stopped_early": stopped_early},
                    kind="end")


def _changed_settings(trained: dict, new: dict) -> dict[str, list[Any]]:
    """Leaf keys whose value differs between the config that trained and the new one: key -> [old, new].

    Keys the trained config lacks (added to genlab since) are not changes: the run used their default.
    """
    out: dict[str, list[Any]] = {}

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in a:
                if k in b:
                    walk(a[k], b[k], f"{prefix}.{k}" if prefix else k)
        elif (list(a) if isinstance(a, tuple) else a) != (list(b) if isinstance(b, tuple) else b):
            out[prefix] = [a, b]

    walk(trained, new, "")
    return out
