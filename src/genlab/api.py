"""The Python API; the CLI is a thin layer over these functions (SPEC P2).

    import genlab
    run = genlab.train("ddpm", data="mnist5k", preset="small", overrides=["train.steps=500"])
    images = run.sample(16, seed=0, sampler="ddim", steps=50)   # (16, 1, 28, 28) in [-1, 1]
    run = genlab.load_run("runs/demo")                             # later, from the folder
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from genlab.config import RunConfig, build_config, check_device, list_presets, preset_path, read_config_file
from genlab.data import load_data
from genlab.errors import ConfigError
from genlab.methods import get_method
from genlab.runs import (Run, build_method, data_info_for, heldout_images, load_run, slerp,
                         stored_parent_records)
from genlab.train.checkpoint import find_checkpoint, latest_checkpoint


def default_run_dir(method: str, source: str) -> Path:
    safe = source.replace(":", "_").replace("/", "_").strip("_")
    return Path("runs") / f"{method}-{safe}-{time.strftime('%Y%m%d-%H%M%S')}"


def train_config(
    method: str,
    data: str | None = None,
    preset: str | None = None,
    overrides: Sequence[str] = (),
    run_dir: str | Path | None = None,
    resume: bool = False,
    data_root: str | None = None,
) -> tuple[RunConfig, Path | None]:
    """The config :func:`train` uses, and the preset file it comes from (None: defaults, or a resumed run's config).

    A child method (one with frozen parents, e.g. ldm's ``model.autoencoder=RUN``) trains on its
    parent's data unless ``data`` is given, and its preset is resolved as if ``data`` were the
    parent's source (ldm_mnist_small.yaml over ldm_small.yaml for a parent trained on mnist).
    """
    method_cls = get_method(method)
    base = None
    if resume:
        if run_dir is None:
            raise ConfigError("--resume needs --run-dir: the run folder to continue")
        base = read_config_file(Path(run_dir) / "config.yaml", complete=True)
        if data is not None and data != base.get("data", {}).get("source"):
            raise ConfigError(f"--data {data} differs from the run's data source {base['data']['source']!r}; "
                              "a resumed run keeps its data")
        preset = None  # the saved config already contains the preset
    overrides, parent_source = _resolve_parent_runs(method_cls, list(overrides), data, data_root, resume)
    if data is not None:
        overrides.insert(0, f"data.source={data}")
    elif base is None and parent_source is None and method_cls.default_source is not None:
        base = {"data": {"source": method_cls.default_source}}  # under the preset, which may name other data
    preset = resolve_preset(method, data or parent_source or method_cls.default_source, preset)
    if data_root is not None:
        overrides.insert(0, f"data.root={data_root}")
    # Changed settings on resume are applied or refused by the trainer (Trainer.resume).
    cfg = build_config(method, method_cls.Config, preset=preset, overrides=overrides, base=base)
    return cfg, None if preset is None else preset_path(method, preset)


def train(
    method: str,
    data: str | None = None,
    preset: str | None = None,
    overrides: Sequence[str] = (),
    run_dir: str | Path | None = None,
    resume: bool = False,
    data_root: str | None = None,
    progress: bool = True,
    announce: Callable[[str], None] | None = None,
    checkpoint: int | str | None = None,
) -> Run:
    """Train ``method`` and return the finished :class:`Run` (EMA weights loaded when present).

    The config is :func:`train_config`'s; ``announce`` receives one line naming its preset file
    (``preset: PATH`` or ``preset: none (defaults)``) before training starts. ``checkpoint`` (a step
    or "latest") picks what a resumed run continues from (default: the newest intact checkpoint).
    """
    from genlab.report.live import training_outputs
    from genlab.train.trainer import Trainer

    cfg, preset_file = train_config(method, data, preset, overrides, run_dir, resume, data_root)
    if announce is not None:
        used = "none (the run's saved config)" if resume else "none (defaults)"
        announce(f"preset: {used if preset_file is None else _shown_path(preset_file)}")
    check_device(cfg.train.device)
    evaluate = _periodic_evaluator(cfg)
    if checkpoint is not None and not resume:
        raise ConfigError(f"--checkpoint {checkpoint} chooses where a resumed run continues: add --resume")
    if run_dir is None:
        run_dir = default_run_dir(method, cfg.data.source)
    run_dir = Path(run_dir)
    with _writer_lock(run_dir):
        if not resume and latest_checkpoint(run_dir) is not None:
            raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir")
        start = find_checkpoint(run_dir, checkpoint) if resume else None  # the newest intact one unless chosen
        images = load_data(cfg.data)
        torch.manual_seed(cfg.train.seed)  # weight initialisation is part of the run's seed
        # A resumed child rebuilds its parents from its checkpoint: their folders may have moved.
        instance = build_method(cfg, data_info_for(cfg, images), stored_parent_records(start),
                                run_dir / "config.yaml" if resume else None)
        trainer = Trainer(run_dir, cfg, instance, images, progress=progress, evaluate=evaluate,
                          observe=training_outputs(run_dir, cfg.train.report_every, cfg.train.tensorboard))
        trainer.fit(resume=start if start is not None else resume)
    return load_run(run_dir)


def sample(run: str | Path | Run, n: int = 64, seed: int = 0, weights: str = "ema", checkpoint: int | str | None = None,
           **options) -> torch.Tensor:
    """``n`` images in [-1, 1] (N, C, H, W) of a run folder (or a loaded :class:`Run`): what `genlab sample` draws.

        genlab.sample("runs/t2i", 8, prompt="a thick seven", guidance_scale=3)
        genlab.sample("runs/t2i", 16, prompts=["the digit 1", "the digit 7"], negative_prompt="a thin digit")

    ``options`` are :meth:`Run.sample`'s (sampler, steps, eta, labels, guidance_scale, prompt(s), ...).
    """
    if not isinstance(run, Run):
        run = load_run(run, weights=weights, checkpoint=checkpoint)
    return run.sample(n, seed=seed, **options)


def _writer_lock(run_dir: Path):
    """The run folder's writer lock (train, resume), taken by the main process only (RANK 0 under torchrun)."""
    import contextlib
    import os

    from genlab.train.lock import RunLock

    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return RunLock(run_dir, "trained")


def _periodic_evaluator(cfg: RunConfig):
    """``evaluate(method) -> metrics`` for train.eval_every (None when off): the trainer imports no evaluation code."""
    tc = cfg.train
    if not tc.eval_every:
        return None
    if tc.eval_ref is None:
        raise ConfigError("train.eval_every needs train.eval_ref, e.g. train.eval_ref=mnist:test")
    from genlab import evaluation
    from genlab.methods.control import ControlledDiffusion
    from genlab.runs import heldout_data, heldout_split

    options: dict = {}

    def evaluate(method):
        if isinstance(method, ControlledDiffusion) and "control" not in options:
            # A control run is scored on controlled samples: the maps of its first eval_n held-out images, made once.
            held = heldout_data(cfg.data, n=tc.eval_n)
            if len(held) < tc.eval_n:
                raise ConfigError(f"train.eval_n={tc.eval_n}, but {heldout_split(cfg.data)} holds {len(held)} images "
                                  "for the control maps; lower train.eval_n")
            options["control"] = method.control_maps(held.to_model_range().to(method.device))
        extra = {"sample_options": options} if options else {}  # other runs: the plain call
        return evaluation.periodic_eval(method, ref=tc.eval_ref, n=tc.eval_n, data_root=cfg.data.root, **extra)

    return evaluate


def resolve_preset(method: str, data: str | None, preset: str | None) -> str | None:
    """A dataset-specific preset (ddpm_mnist_small.yaml) wins over the generic one (ddpm_small.yaml)."""
    if data is not None and preset is not None and f"{data.replace('-', '_')}_{preset}" in list_presets(method):
        return f"{data.replace('-', '_')}_{preset}"
    return preset


def _shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    path = path.resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _resolve_parent_runs(method_cls, overrides: list[str], data: str | None, data_root: str | None, resume: bool
                         ) -> tuple[list[str], str | None]:
    """Make each parent run path (``model.<role>=RUN``) absolute and, unless --data is given, train on the
    parent's data. Returns the overrides and the parent's data source (None if not taken from a parent)."""
    out, source = list(overrides), None
    for i, text in enumerate(overrides):
        key, _, value = text.partition("=")
        if key.removeprefix("model.") not in method_cls.parents or not value or value in ("null", "None"):
            continue
        parent = Path(value).expanduser()
        if not (parent / "config.yaml").is_file():
            raise ConfigError(f"{key}={value}: not a run folder (no config.yaml); pass the folder of a trained run")
        out[i] = f"{key}={parent.resolve()}"
        if data is None and not resume:
            # The parent's data section first, so the prior or LDM sees the images its parent was trained on.
            parent_data = read_config_file(parent / "config.yaml").get("data", {})
            for name in method_cls.parents[key.removeprefix("model.")].data_keys:
                if parent_data.get(name) is not None:
                    out.insert(0, f"data.{name}={parent_data[name]}")
            if data_root is None and parent_data.get("root"):
                out.insert(0, f"data.root={parent_data['root']}")
            source = parent_data.get("source") or source
    return out, source


__all__ = ["Run", "data_info_for", "default_run_dir", "heldout_images", "load_run", "resolve_preset", "sample", "slerp", "train",
           "train_config"]


def control_options(run: Run, n: int, control_from: str | None = None, control_image: str | None = None,
                    control_scale: float | None = None, data_root: str | None = None, *,
                    heldout_default: bool = False) -> dict:
    """The sampling options of a control run (controlnet, t2i-adapter): ``control`` maps (n, 1, H, W) made
    from the first n images of ``control_from`` ("SOURCE:SPLIT") or read from ``control_image`` (a map
    file), and ``control_scale``. Empty for other runs, which refuse the control flags. Without either
    source: a one-line error, or with ``heldout_default`` (evaluation) the run's held-out split."""
    from genlab.methods.control import ControlledDiffusion, read_control_file
    from genlab.runs import heldout_split

    given = [flag for flag, value in (("--control-from", control_from), ("--control-image", control_image),
                                      ("--control-scale", control_scale)) if value is not None]
    if not isinstance(run.method, ControlledDiffusion):
        if given:
            raise ConfigError(f"{given[0]} is for controlnet and t2i-adapter runs; {run.path} is a {run.config.method} run")
        return {}
    if control_from is not None and control_image is not None:
        raise ConfigError("give --control-from SOURCE:SPLIT or --control-image FILE, not both")
    if control_from is None and control_image is None and heldout_default:
        control_from = heldout_split(run.config.data)
    if control_from is None and control_image is None:
        raise ConfigError(f"{run.path}: a {run.config.method} run samples from control maps: give --control-from "
                          "SOURCE:SPLIT (e.g. mnist:test) or --control-image FILE")
    if control_image is not None:
        maps = read_control_file(control_image, run.method.data_info.image_size, n)
    else:
        held = heldout_images(run, control_from, n, data_root)
        if len(held) < n:
            raise ConfigError(f"--control-from {control_from}: {len(held)} images for --n {n}; lower --n")
        maps = run.method.control_maps(held.to_model_range())
    return {"control": maps} if control_scale is None else {"control": maps, "control_scale": control_scale}
