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
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from genlab.config import RunConfig, save_config, to_dict
from genlab.data import ImageSet, to_model_range
from genlab.errors import ConfigError, TrainingDiverged
from genlab.methods.base import Method, OptimizerSpec
from genlab.methods.capabilities import Generates, has
from genlab.train.checkpoint import (
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


def lr_lambda(cfg) -> Any:
    """LR multiplier per optimiser step: linear warm-up to 1, then constant, cosine or linear decay to 0."""
    warmup, total, kind = cfg.warmup_steps, cfg.steps, cfg.lr_schedule

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return f


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
        return torch.optim.SGD(params, lr=lr, momentum=spec.momentum, weight_decay=weight_decay)
    if spec.kind != "adamw":
        raise ConfigError(f"unknown optimiser kind {spec.kind!r}; valid: adamw, sgd")
    betas = tuple(tc.adam_betas) if spec.betas is None else tuple(spec.betas)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


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


class Trainer:
    """Trains ``method`` on ``data`` as ``cfg.train`` says, writing everything into ``run_dir``."""

    def __init__(self, run_dir: Path, cfg: RunConfig, method: Method, data: ImageSet, progress: bool = True):
        from accelerate import Accelerator

        self.run_dir = Path(run_dir)
        self.cfg = cfg
        tc = cfg.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        # accelerate only forms a multi-process CPU group (gloo) when told it runs on the CPU.
        on_cpu = tc.device == "cpu" or (tc.device is None and not torch.cuda.is_available())
        self.accelerator = Accelerator(cpu=on_cpu, mixed_precision=tc.mixed_precision)
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
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR] = {}
        self.group_params: dict[str, list[torch.nn.Parameter]] = {}
        for group, spec in method.optimizer_groups().items():
            opt = make_optimizer(spec, tc)
            self.optimizers[group] = opt
            self.group_params[group] = [p for g in opt.param_groups for p in g["params"]]
            self.schedulers[group] = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc))
        self.emas = {}
        if tc.ema_decay is not None:
            self.emas = {name: EMA(module, decay=tc.ema_decay) for name, module in method.ema_targets().items()}
        self.step = 0
        self.elapsed = 0.0  # seconds of training over all sessions of this run
        self._perm_epoch = -1
        self._perm = None

    # ------------------------------------------------------------------ data and randomness

    def _generator(self, index: int, stream: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.train.seed * _SEED_STRIDE + index * 7 + stream)

    def _batch(self, micro_index: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        epoch, position = divmod(micro_index, self.batches_per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.cfg.train.seed * _SEED_STRIDE + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.data), generator=g), epoch
        lo = position * self.micro_batch + self.rank * self.local_batch
        idx = self._perm[lo: lo + self.local_batch]
        images = to_model_range(self.data.images[idx])  # (n, C, H, W) float in [-1, 1]
        conditions = getattr(self.data, "conditions", None)  # paired data: the input image of each pair
        condition = None if conditions is None else to_model_range(conditions[idx])
        if self.cfg.data.hflip:
            flip = torch.rand(self.micro_batch, generator=gen)[self.rank * self.local_batch:][: self.local_batch] < 0.5
            images[flip] = images[flip].flip(-1)
            if condition is not None:
                condition[flip] = condition[flip].flip(-1)
        batch = {"image": images.to(self.device, non_blocking=True)}
        if condition is not None:
            batch["condition"] = condition.to(self.device, non_blocking=True)
        if self.data.labels is not None:
            batch["label"] = self.data.labels[idx].to(self.device)
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
        state = {"step": self.step, "elapsed_seconds": self.elapsed, "skeletons": skeletons, "rng": rng_json,
                 "method": self.cfg.method, "data_info": dataclasses.asdict(self.method.data_info),
                 "parents": self.method.parent_records}  # frozen parents' configs: a child loads without their folders
        return save_checkpoint(self.run_dir, self.step, tensors, state, keep_last=self.cfg.train.keep_checkpoints)

    def resume(self, path: Path | None = None) -> int:
        """Load the latest (or given) checkpoint; returns the step to continue from."""
        path = path or latest_checkpoint(self.run_dir)
        if path is None:
            raise ConfigError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}; start the run without --resume")
        tensors, state = load_checkpoint(path, device="cpu")
        self.method.load_state_dict(tensors["model"])
        sk = state["skeletons"]
        for name, ema in self.emas.items():
            ema.load_state_dict(unflatten_state(tensors[f"ema_{name}"], sk[f"ema_{name}"]))
        for group in self.optimizers:
            self.optimizers[group].load_state_dict(unflatten_state(tensors[f"optim_{group}"], sk[f"optim_{group}"]))
            self.schedulers[group].load_state_dict(unflatten_state(tensors[f"sched_{group}"], sk[f"sched_{group}"]))
        restore_rng_state(tensors.get("rng", {}), state["rng"])
        self.step = int(state["step"])
        self.elapsed = float(state.get("elapsed_seconds", 0.0))
        if self.is_main:  # later checkpoints belong to an abandoned future of this run
            for later in list_checkpoints(self.run_dir):
                if checkpoint_step(later) > self.step:
                    import shutil

                    shutil.rmtree(later, ignore_errors=True)
        return self.step

    # ------------------------------------------------------------------ previews

    def _with_ema_weights(self) -> ExitStack:
        """Context in which the method holds its EMA weights (in eval mode); raw weights after."""
        stack = ExitStack()
        targets = self.method.ema_targets()
        for name, ema in self.emas.items():
            stack.enter_context(ema.averaged(targets[name]))
        self.method.eval()
        stack.callback(self.method.train)
        return stack

    def sample_grid(self, path: Path) -> None:
        """Save a preview grid drawn with EMA weights from a fixed seed (comparable across steps)."""
        from genlab.imageio import save_grid

        if not has(self.method, Generates):  # classifiers, autoencoders, translators: no grids
            return
        with self._with_ema_weights():
            images = self.method.sample(self.cfg.train.sample_n, generator=torch.Generator().manual_seed(0))
        save_grid(images, path)

    def periodic_eval(self) -> dict[str, float]:
        """FID/KID of train.eval_n EMA samples against train.eval_ref (fixed seed: comparable over steps)."""
        from genlab.evaluation import periodic_eval

        tc = self.cfg.train
        if tc.eval_ref is None:
            raise ConfigError("train.eval_every needs train.eval_ref, e.g. train.eval_ref=mnist:test")
        with self._with_ema_weights():
            return periodic_eval(self.method, ref=tc.eval_ref, n=tc.eval_n, data_root=self.cfg.data.root)

    def _outputs(self):
        """The log-record observer writing report.html (train.report_every) and TensorBoard events."""
        from genlab.report.live import training_outputs

        return training_outputs(self.run_dir, self.cfg.train.report_every, self.cfg.train.tensorboard)

    def _new_health_warnings(self) -> list[str]:
        """Warnings the method's health monitor issued since the last call (logged as ``health`` records)."""
        issued = getattr(getattr(self.method, "health", None), "warnings", [])
        seen, self._health_seen = getattr(self, "_health_seen", 0), len(issued)
        return issued[seen:]

    # ------------------------------------------------------------------ the loop

    def fit(self, resume: bool = False) -> TrainResult:
        tc = self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume()
        if self.is_main:
            save_config(self.cfg, self.run_dir / "config.yaml")
            (self.run_dir / "samples").mkdir(exist_ok=True)
        log = RunLog(self.run_dir, on_record=self._outputs()) if self.is_main else None
        if log is not None:
            log.truncate_after(self.step)
            if self.step == 0:
                log.log(0, {"config": to_dict(self.cfg), "argv": list(sys.argv), "world_size": self.world,
                            "num_images": len(self.data)}, kind="start")
        self.method.train()
        bar = tqdm(total=tc.steps, initial=self.step, disable=not self.progress, desc=f"train {self.cfg.method}",
                   unit="step", dynamic_ncols=True)
        sums: dict[str, float] = {}
        count, window_start, images_seen = 0, time.perf_counter(), 0
        session_start, elapsed_at_start = time.perf_counter(), self.elapsed
        stopped_early = False
        try:
            while self.step < tc.steps:
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
                    for name, value in {**out, **ctx.logs}.items():
                        logs[name] = value
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
                images_seen += tc.batch_size
                self.elapsed = elapsed_at_start + (time.perf_counter() - session_start)
                for name, value in logs.items():
                    sums[name] = sums.get(name, 0.0) + float(value)
                count += 1
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    now = time.perf_counter()
                    values = {k: v / count for k, v in sums.items()}
                    values["lr"] = next(iter(self.schedulers.values())).get_last_lr()[0]
                    values["images_per_s"] = images_seen / max(now - window_start, 1e-9)
                    values["elapsed_s"] = self.elapsed
                    if log is not None:
                        log.log(self.step, values)
                        for message in self._new_health_warnings():
                            log.log(self.step, {"warning": message}, kind="health")
                    bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k in ("loss", "d_loss", "g_loss")})
                    sums, count, window_start, images_seen = {}, 0, now, 0
                time_up = tc.time_limit is not None and self.elapsed >= tc.time_limit * 60
                if time_up:
                    stopped_early = self.step < tc.steps
                if self.step % tc.checkpoint_every == 0 or self.step == tc.steps or time_up:
                    self.save()
                if self.is_main and tc.sample_every and self.step % tc.sample_every == 0 and self.step < tc.steps:
                    self.sample_grid(self.run_dir / "samples" / f"step_{self.step:06d}.png")
                if self.is_main and tc.eval_every and self.step % tc.eval_every == 0 and log is not None:
                    log.log(self.step, self.periodic_eval(), kind="eval")
                if time_up:
                    break
        except TrainingDiverged as e:
            if log is not None:
                log.log(self.step, {"error": str(e)}, kind="diverged")
            raise
        finally:
            bar.close()
        if self.is_main:
            self.sample_grid(self.run_dir / "samples" / f"step_{self.step:06d}.png")
            if log is not None:
                log.log(self.step, {"elapsed_s": self.elapsed, "stopped_early": stopped_early}, kind="end")
                log.close()
        self.accelerator.wait_for_everyone()
        return TrainResult(self.run_dir, self.step, stopped_early)
