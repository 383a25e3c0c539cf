"""Typed configuration: dataclasses, YAML presets and ``key=value`` overrides (SPEC P3).

A run's configuration is a :class:`RunConfig` with four sections: ``data`` (where images come
from), ``train`` (the trainer's loop), ``model`` (the method's own dataclass: networks and the
family's math) and the method's name. Values are layered, later wins:

    dataclass defaults  <-  preset YAML  <-  command-line ``key=value`` overrides

Every layer is validated against the dataclass types, so an unknown key or a value of the wrong
type is rejected with the key's full name and the valid alternatives, before any work starts.
Keys are dotted paths (``train.lr=1e-4``, ``model.unet.base_channels=32``); a bare leaf name
(``lr=1e-4``) is accepted when it names exactly one field.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from genlab.data import DataConfig
from genlab.errors import ConfigError


@dataclass
class TrainConfig:
    """The trainer's loop: optimisation, EMA, checkpoints, logs and previews."""

    steps: int = 2000  # optimiser steps
    batch_size: int = 64  # global batch (summed over processes and accumulation micro-batches)
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 2e-4
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"  # after warm-up
    warmup_steps: int = 100  # linear warm-up from 0 to lr
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    adam_betas: tuple[float, ...] = (0.9, 0.999)
    grad_clip: float | None = 1.0  # max global grad norm; None disables clipping
    ema_decay: float | None = 0.999  # None disables the EMA copy
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 0  # preview grid every K steps (0: only at the end)
    sample_n: int = 64
    eval_every: int = 0  # FID/KID of eval_n samples against eval_ref every K steps, logged (0: never)
    eval_n: int = 1000
    eval_ref: str | None = None  # e.g. "mnist:test"
    report_every: int = 0  # rewrite RUN/report.html every K steps and at the end (0: never; `genlab report` any time)
    tensorboard: bool = False  # also write TensorBoard events to RUN/tensorboard/ (needs the `tensorboard` extra)
    time_limit: float | None = None  # minutes of wall time; stop (and checkpoint) when reached
    threads: int | None = None  # torch CPU threads; None: torch's default (all cores)
    device: str | None = None  # None: accelerate's choice (CUDA when present)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # fp32 is the fast path on CPUs


@dataclass
class RunConfig:
    """Everything that defines a run; saved as ``config.yaml`` in the run folder."""

    method: str
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: Any = None  # the method's Config dataclass


# ---------------------------------------------------------------------------------------------
# Generic dataclass <-> plain-data conversion with type checking.


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to the annotated type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"config key '{key}' must be one of {list(args)}, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config section '{key}' must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)  # 1e4 written in YAML
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-4" (no dot) as a string
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise TypeError(f"unsupported config annotation {tp!r} for '{key}'")
    raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], [v.rsplit(".", 1)[-1] for v in valid], n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}; valid keys: {', '.join(valid)}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and ill-typed values."""
    fields = _fields(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise _unknown_key(key, [f"{prefix}.{f}" if prefix else f for f in fields])
        kwargs[name] = _coerce(value, fields[name], key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"invalid config section '{prefix or cls.__name__}': {e}") from None


def to_dict(obj: Any) -> Any:
    """Plain YAML-ready data (dicts, lists, scalars) from a dataclass tree."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a dataclass tree, e.g. ``['unet.base_channels', ...]``."""
    keys = []
    for name, tp in _fields(cls).items():
        key = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(tp):
            keys.extend(leaf_keys(tp, key))
        else:
            keys.append(key)
    return keys


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        node = tree.get(part)
        if not isinstance(node, dict):
            node = tree[part] = {}
        tree = node
    tree[path[-1]] = value


def parse_override(text: str, model_cls: type) -> tuple[list[str], Any]:
    """Parse ``key=value`` into a path and a YAML-typed value, resolving bare leaf names."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    sections = {"data": DataConfig, "train": TrainConfig, "model": model_cls}
    all_keys = [f"{s}.{k}" for s, c in sections.items() for k in leaf_keys(c)]
    if key in all_keys:
        return key.split("."), value
    head = key.split(".")[0]
    if head in sections and "." in key:
        raise _unknown_key(key, [k for k in all_keys if k.startswith(head + ".")])
    matches = [k for k in all_keys if k == key or k.endswith("." + key)]
    if len(matches) == 1:
        return matches[0].split("."), value
    if len(matches) > 1:
        raise ConfigError(f"config key '{key}' is ambiguous: write one of {', '.join(matches)}")
    raise _unknown_key(key, all_keys)


# ---------------------------------------------------------------------------------------------
# Presets


def preset_dir() -> Path:
    """Folder of the YAML presets shipped inside the package."""
    return Path(str(resources.files("genlab") / "configs"))


def list_presets(method: str) -> list[str]:
    """Preset names available for ``method`` (file ``<method>_<preset>.yaml``)."""
    from genlab.methods import METHODS

    prefix = method.replace("-", "_") + "_"
    # gan_encoder_small.yaml belongs to "gan-encoder", not to "gan": skip longer method names' files.
    longer = [m.replace("-", "_") + "_" for m in METHODS if m != method and m.replace("-", "_").startswith(prefix)]
    return sorted(p.stem[len(prefix):] for p in preset_dir().glob(f"{prefix}*.yaml")
                  if not any(p.stem.startswith(other) for other in longer))


def preset_path(method: str, preset: str) -> Path:
    """The file of preset ``preset``: a path to a YAML file, or ``configs/<method>_<preset>.yaml``."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    return preset_dir() / f"{method.replace('-', '_')}_{preset}.yaml"


def load_preset(method: str, preset: str) -> dict:
    """Read preset ``configs/<method>_<preset>.yaml`` (or a path to a YAML file)."""
    path = preset_path(method, preset)
    if not path.is_file():
        valid = list_presets(method)
        raise ConfigError(
            f"unknown preset '{preset}' for method '{method}'; valid presets: {', '.join(valid) or 'none'} "
            "(or a path to a .yaml file)"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"preset {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path} must be a mapping with sections data/train/model")
    return data


def build_config(
    method: str,
    model_cls: type,
    preset: str | None = None,
    overrides: typing.Sequence[str] = (),
    base: dict | None = None,
) -> RunConfig:
    """Layer defaults, a preset (or ``base``, e.g. a saved config.yaml) and overrides into a RunConfig."""
    tree: dict = {"data": {}, "train": {}, "model": {}}
    if base is not None:
        tree = _deep_merge(tree, base)
    if preset is not None:
        tree = _deep_merge(tree, load_preset(method, preset))
    for text in overrides:
        path, value = parse_override(text, model_cls)
        _set_path(tree, path, value)
    extra = set(tree) - {"data", "train", "model", "method"}
    if extra:
        raise _unknown_key(sorted(extra)[0], ["data", "train", "model"])
    saved_method = tree.get("method", method)
    if saved_method != method:
        raise ConfigError(f"config is for method '{saved_method}', not '{method}'")
    return RunConfig(
        method=method,
        data=from_dict(DataConfig, tree.get("data") or {}, "data"),
        train=from_dict(TrainConfig, tree.get("train") or {}, "train"),
        model=from_dict(model_cls, tree.get("model") or {}, "model"),
    )


def save_config(cfg: RunConfig, path: Path) -> None:
    """Write the config as YAML (readable, and the source of truth for --resume and load_run)."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def read_config_file(path: Path) -> dict:
    """Read a saved ``config.yaml`` as plain data."""
    if not path.is_file():
        raise ConfigError(f"no config.yaml in {path.parent}: is this a genlab run folder?")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"{path} is not a genlab run config (no 'method' key)")
    return data
