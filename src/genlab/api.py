"""The Python API; the CLI is a thin layer over these functions (SPEC P2).

    import genlab
    run = genlab.train("ddpm", data="mnist5k", preset="small", overrides=["train.steps=500"])
    images = run.sample(16, seed=0, sampler="ddim", steps=50)   # (16, 1, 28, 28) in [-1, 1]
    run = genlab.load_run("runs/demo")                             # later, from the folder
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from genlab.config import RunConfig, build_config, check_device, list_presets, read_config_file
from genlab.data import load_data
from genlab.errors import ConfigError
from genlab.methods import get_method
from genlab.runs import Run, build_method, check_weights_fit, data_info_for, heldout_images, load_run, slerp
from genlab.train.checkpoint import find_checkpoint, latest_checkpoint, tensor_shapes


def default_run_dir(method: str, source: str) -> Path:
    safe = source.replace(":", "_").replace("/", "_").strip("_")
    return Path("runs") / f"{method}-{safe}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(
    method: str,
    data: str | None = None,
    preset: str | None = None,
    overrides: Sequence[str] = (),
    run_dir: str | Path | None = None,
    resume: bool = False,
    data_root: str | None = None,
    progress: bool = True,
    checkpoint: int | str | None = None,
) -> Run:
    """Train ``method`` and return the finished :class:`Run`; ``checkpoint`` (a step or "latest") picks what resumes."""
    from genlab.train.trainer import Trainer

    method_cls = get_method(method)
    overrides = list(overrides)
    base = None
    if resume:
        if run_dir is None:
            raise ConfigError("--resume needs --run-dir: the run folder to continue")
        base = read_config_file(Path(run_dir) / "config.yaml")
        if data is not None and data != base.get("data", {}).get("source"):
            raise ConfigError(f"--data {data} differs from the run's data source {base['data']['source']!r}; "
                              "a resumed run keeps its data")
        preset = None  # the saved config already contains the preset
    overrides = _resolve_parent_run(overrides, data, data_root, resume)
    if data is not None:
        overrides.insert(0, f"data.source={data}")
        preset = resolve_preset(method, data, preset)
    if data_root is not None:
        overrides.insert(0, f"data.root={data_root}")
    cfg = build_config(method, method_cls.Config, preset=preset, overrides=overrides, base=base)
    check_device(cfg.train.device)
    if resume and base is not None:
        changed = _changed_keys(base, cfg)
        if changed - {"train.steps", "train.time_limit", "train.checkpoint_every", "train.sample_every",
                      "train.log_every", "train.threads", "train.keep_checkpoints"}:
            import warnings

            warnings.warn(f"resuming with changed {sorted(changed)}: the continuation is no longer an exact resume")
    if run_dir is None:
        run_dir = default_run_dir(method, cfg.data.source)
    run_dir = Path(run_dir)
    if checkpoint is not None and not resume:
        raise ConfigError(f"--checkpoint {checkpoint} chooses where a resumed run continues: add --resume")
    if not resume and latest_checkpoint(run_dir) is not None:
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir")
    start = find_checkpoint(run_dir, checkpoint) if resume else None  # the newest intact one unless chosen
    images = load_data(cfg.data)
    torch.manual_seed(cfg.train.seed)  # weight initialisation is part of the run's seed
    instance = build_method(method_cls, cfg, data_info_for(cfg, images), run_dir / "config.yaml" if resume else None)
    if start is not None:
        check_weights_fit(instance, tensor_shapes(start, "model"), start, run_dir / "config.yaml")
    trainer = Trainer(run_dir, cfg, instance, images, progress=progress)
    trainer.fit(resume=resume, checkpoint=start)
    return load_run(run_dir)


def resolve_preset(method: str, data: str | None, preset: str | None) -> str | None:
    """A dataset-specific preset (ddpm_mnist_small.yaml) wins over the generic one (ddpm_small.yaml)."""
    if data is not None and preset is not None and f"{data.replace('-', '_')}_{preset}" in list_presets(method):
        return f"{data.replace('-', '_')}_{preset}"
    return preset


# Config fields that name a frozen parent run: a prior's VQ model, an LDM's autoencoder, an inverter's GAN.
PARENT_RUN_KEYS = ("codes", "autoencoder", "gan")


def _resolve_parent_run(overrides: list[str], data: str | None, data_root: str | None, resume: bool) -> list[str]:
    """Make a parent run path absolute and, unless --data is given, train on the parent's data."""
    out = list(overrides)
    for i, text in enumerate(overrides):
        key, _, value = text.partition("=")
        if key.removeprefix("model.") not in PARENT_RUN_KEYS or not value or value in ("null", "None"):
            continue
        parent = Path(value).expanduser()
        if not (parent / "config.yaml").is_file():
            raise ConfigError(f"{key}={value}: not a run folder (no config.yaml); pass the folder of a trained run")
        out[i] = f"{key}={parent.resolve()}"
        if data is None and not resume:
            # The parent's data section first, so the prior or LDM sees the images its parent was trained on.
            parent_data = read_config_file(parent / "config.yaml").get("data", {})
            for name in ("source", "image_size", "fit", "channels"):
                if parent_data.get(name) is not None:
                    out.insert(0, f"data.{name}={parent_data[name]}")
            if data_root is None and parent_data.get("root"):
                out.insert(0, f"data.root={parent_data['root']}")
    return out


def _changed_keys(base: dict, cfg: RunConfig) -> set[str]:
    from genlab.config import to_dict

    new = to_dict(cfg)
    out = set()

    def walk(a, b, prefix):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in set(a) | set(b):
                walk(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        elif a != b:
            out.add(prefix)

    walk(base, new, "")
    return out


__all__ = ["Run", "data_info_for", "default_run_dir", "heldout_images", "load_run", "resolve_preset", "slerp", "train"]
