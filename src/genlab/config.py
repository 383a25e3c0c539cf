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
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from genlab.data import DataConfig
from genlab.errors import ConfigError
from genlab.fileio import atomic_write_text
from genlab.ranges import FINITE, NON_NEGATIVE, NonNegativeFloat, PositiveFloat, PositiveInt, Range, UnitFloat


@dataclass
class TrainConfig:
    """The trainer's loop: optimisation, EMA, checkpoints, logs and previews."""

    steps: PositiveInt = 2000  # optimiser steps
    batch_size: PositiveInt = 64  # global batch (summed over processes and accumulation micro-batches)
    grad_accum: PositiveInt = 1  # micro-batches per optimiser step
    lr: PositiveFloat = 2e-4  # peak learning rate
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"  # after warm-up
    warmup_steps: int = 100  # linear warm-up from 0 to lr
    weight_decay: NonNegativeFloat = 0.0  # AdamW's decoupled weight decay (an SGD optimiser: its L2 penalty)
    adam_betas: tuple[Annotated[float, Range(0, 1, hi_open=True)], ...] = (0.9, 0.999)  # Adam's (beta1, beta2)
    grad_clip: PositiveFloat | None = 1.0  # max global grad norm; None disables clipping
    ema_decay: UnitFloat | None = 0.999  # None disables the EMA copy
    seed: Annotated[int, Range(0, 2**32 - 1)] = 0  # weights, data order and noise all follow from it
    log_every: PositiveInt = 50  # steps between log.jsonl records
    checkpoint_every: PositiveInt = 500  # steps between checkpoints (and one at the end)
    keep_checkpoints: PositiveInt = 2  # newest checkpoints kept on disk
    sample_every: int = 0  # preview grid every K steps (0: only at the end)
    sample_n: PositiveInt = 64  # images in a preview grid
    eval_every: int = 0  # FID/KID of eval_n samples against eval_ref every K steps, logged (0: never)
    eval_n: PositiveInt = 1000  # samples per periodic evaluation
    eval_ref: str | None = None  # e.g. "mnist:test"
    report_every: int = 0  # rewrite RUN/report.html every K steps and at the end (0: never; `genlab report` any time)
    tensorboard: bool = False  # also write TensorBoard events to RUN/tensorboard/ (needs the `tensorboard` extra)
    time_limit: PositiveFloat | None = None  # minutes of this launch (not summed over resumes); then checkpoint and stop
    time_clock: Literal["wall", "cpu"] = "wall"  # what time_limit counts: wall time, or this process's CPU time (all its threads; a budget other jobs on the cores cannot shrink)
    threads: PositiveInt | None = None  # torch CPU threads; None: torch's default (all cores)
    device: str | None = None  # cpu, cuda, cuda:N or mps; None: accelerate's choice (CUDA when present)
    # bf16 autocast on an avx512_bf16 CPU: 1.4x per training step of the small U-Net (NCHW; in channels_last
    # its GroupNorms are 6x slower), 1.7x for the CIFAR-10 classifier's channels_last convs (docs/results.md,
    # "Issue 17 point 1"); measure per model and machine (not measured on CPUs without bf16 instructions).
    # auto: bf16 where the device computes it natively (genlab.autotune.auto_mixed_precision), else no.
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "no"
    compile: bool = False  # diffusion: torch.compile the denoiser for training (faster steps after a compile of minutes)
    # diffusion: keep the denoiser's weights, and so its activations, in NHWC memory (oneDNN's native layout: NCHW
    # convolutions reorder to a blocked layout and back at every call). 1.07x per float32 training step of the
    # small U-Net on this CPU, but slower with bf16 (docs/results.md, "Issue 17 point 1"); same values up to
    # float rounding. The classifier has its own model.channels_last (it also converts its inputs).
    channels_last: bool = False

    def __post_init__(self) -> None:
        if len(self.adam_betas) != 2:
            raise ConfigError(f"config key 'train.adam_betas' must be two numbers [beta1, beta2], got {list(self.adam_betas)}")
        if self.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", self.device):
            raise ConfigError(f"config key 'train.device' must be cpu, cuda, cuda:N, mps or null, got {self.device!r}")


def check_device(device: str | None) -> None:
    """Refuse a ``train.device`` this machine does not have, before a run folder is written."""
    import torch

    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={device} but torch finds no CUDA GPU here; use train.device=cpu (or null)")
    if device is not None and device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"train.device={device} but there are {torch.cuda.device_count()} CUDA GPUs (cuda:0 ...)")
    if device == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError("train.device=mps but torch finds no Apple GPU here; use train.device=cpu (or null)")


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
    """A type for people: 'int', 'float | None', 'list of int', "one of ['a', 'b']"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (tuple, list):
        return f"list of {_type_name(args[0]) if args else 'values'}"
    if tp is type(None):
        return "None"
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _check_range(value: Any, range_: Range, key: str) -> Any:
    if not range_.contains(value):
        raise ConfigError(f"config key '{key}' must be {range_.describe()}, got {value!r}")
    return value


def _coerce(value: Any, tp: Any, key: str, range_: Range | None = None) -> Any:
    """Return ``value`` converted to the annotated type ``tp`` or raise ConfigError naming ``key``.

    Numbers are checked against ``range_`` (from ``Annotated[int, Range(...)]``), else against the
    implicit ranges of :mod:`genlab.ranges` (ints >= 0, floats finite).
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        declared = next((a for a in args[1:] if isinstance(a, Range)), None)
        return _coerce(value, args[0], key, declared)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        for arg in options:
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                if len(options) == 1:  # `float | None`: the float's own message says more (its range)
                    message = str(e)
                    # "or null" belongs to this key only: an error inside an optional section names a key
                    # of its own, which may not be null.
                    if type(None) in args and message.startswith(f"config key '{key}' "):
                        message = message.replace(", got ", " or null, got ", 1)
                    raise ConfigError(message) from None
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and ("no" if value is False else "yes") in args:
            value = "no" if value is False else "yes"  # YAML 1.1 reads a bare `no` (as in mixed_precision=no) as false
        if any(value == a and type(value) is type(a) for a in args):
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
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e4" (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            value = int(value)  # 1e4 written in YAML
        if isinstance(value, int) and not isinstance(value, bool):
            return _check_range(value, range_ or NON_NEGATIVE, key)
    elif tp is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-4" (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int beyond 1.8e308
                raise ConfigError(f"config key '{key}' must be {(range_ or FINITE).describe()}, got a {len(str(abs(value)))}-digit number") from None
            return _check_range(number, range_ or FINITE, key)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise TypeError(f"unsupported config annotation {tp!r} for '{key}'")
    raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls, include_extras=True)
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


def _section_type(tp: Any) -> type | None:
    """The dataclass of a section annotated ``Section`` or ``Section | None`` (an optional section), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        sections = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return sections[0] if len(sections) == 1 else None
    return None


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a dataclass tree, e.g. ``['unet.base_channels', ...]``."""
    keys = []
    for name, tp in _fields(cls).items():
        key = f"{prefix}.{name}" if prefix else name
        section = _section_type(tp)
        if section is not None:
            keys.extend(leaf_keys(section, key))
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


def _drop_unchosen_networks(tree: dict, model_cls: type, overrides: list[tuple[list[str], Any]]) -> None:
    """Keep only the chosen network's section (``model_cls.network_sections``, e.g. ddpm's unet / dit)
    of a preset or saved config, so ``model.network=dit`` works with a U-Net preset; a key the user
    gives for another network still reaches the model config, which refuses it."""
    sections = getattr(model_cls, "network_sections", ())
    model = tree.get("model")
    if not sections or not isinstance(model, dict):
        return
    default = next(f.default for f in dataclasses.fields(model_cls) if f.name == "network")
    network = next((v for path, v in overrides if path == ["model", "network"]), model.get("network", default))
    for name in sections:
        if name != network:
            model.pop(name, None)


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
    parsed = [parse_override(text, model_cls) for text in overrides]
    _drop_unchosen_networks(tree, model_cls, parsed)
    for path, value in parsed:
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
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def read_config_file(path: Path, complete: bool = False) -> dict:
    """Read a saved ``config.yaml`` as plain data; a damaged file is a one-line ConfigError naming it.

    ``complete``: the file is a run's own (written by :func:`save_config`, which always writes the
    data, train and model sections), so a missing section means a truncated file, not "use defaults".
    """
    if not path.is_file():
        raise ConfigError(f"no config.yaml in {path.parent}: is this a genlab run folder?")
    fix = "restore it, or copy the 'config' of the first 'start' record in log.jsonl back into it as YAML"
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
            reason = f"{e.problem} at line {e.problem_mark.line + 1}"
        else:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path} is damaged ({reason}): {fix}") from None
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"{path} is not a genlab run config (no 'method' key; damaged?): {fix}")
    if not isinstance(data["method"], str):
        raise ConfigError(f"{path}: 'method' is {data['method']!r}, not a method name: {fix}")
    missing = [s for s in ("data", "train", "model") if s not in data] if complete else []
    if missing:
        raise ConfigError(f"{path} is damaged (no '{missing[0]}' section: truncated?): {fix}")
    return data


# ---------------------------------------------------------------------------------------------
# Documentation of the keys: `genlab config METHOD` prints each key's value, source and meaning.


def field_comments(cls: type) -> dict[str, str]:
    """Each field's meaning: its trailing ``# comment`` in the class source (else the comment block above it).

    The comments next to the fields are the configs' documentation; reading them from the source
    keeps one copy. Inherited fields take the comment of the class that declares them.
    """
    import inspect
    import io
    import tokenize

    out: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        names = {f.name for f in dataclasses.fields(klass)}
        trailing: dict[int, str] = {}
        above: list[str] = []
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                trailing[tok.start[0]] = tok.string.lstrip("#").strip()
        lines = source.splitlines()
        for number, line in enumerate(lines, 1):
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(stripped.lstrip("#").strip())
                continue
            m = re.match(r"(\w+)\s*:", stripped)
            if m and m.group(1) in names:
                comment = trailing.get(number) if not stripped.startswith("#") else None
                out[m.group(1)] = comment or " ".join(above)
            above = []
    return out


@dataclass
class KeyInfo:
    """One key of a resolved config, as `genlab config` prints it."""

    key: str
    value: Any
    default: Any
    source: Literal["default", "preset", "override"]
    type: str
    meaning: str


def _leaf_items(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_leaf_items(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def _field_type(tp: Any) -> str:
    """'int >= 1', 'float > 0 | None', "one of ['linear', 'cosine']": the type with its range."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        declared = next((a for a in args[1:] if isinstance(a, Range)), None)
        return f"{_type_name(args[0])} {declared.describe()}" if declared else _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_field_type(a) for a in args)
    if tp is int:
        return f"int {NON_NEGATIVE.describe()}"
    return _type_name(tp)


def describe_config(method: str, model_cls: type, preset: str | None = None,
                    overrides: typing.Sequence[str] = ()) -> list[KeyInfo]:
    """Every leaf key of the resolved config with its value, default, source layer, type and meaning."""
    cfg = build_config(method, model_cls, preset=preset, overrides=overrides)
    defaults = _leaf_items(to_dict(RunConfig(method=method, model=model_cls())))
    from_preset = _leaf_items(load_preset(method, preset)) if preset is not None else {}
    overridden = {".".join(parse_override(text, model_cls)[0]) for text in overrides}
    rows = []
    for section, cls in (("data", DataConfig), ("train", TrainConfig), ("model", model_cls)):
        rows.extend(_describe_section(getattr(cfg, section), cls, section, defaults, from_preset, overridden))
    return rows


def _describe_section(obj: Any, cls: type, prefix: str, defaults: dict, from_preset: dict,
                      overridden: set[str]) -> list[KeyInfo]:
    rows = []
    comments = field_comments(cls)
    for name, tp in _fields(cls).items():
        key = f"{prefix}.{name}"
        value = getattr(obj, name)
        section = _section_type(tp)
        if section is not None:
            if value is not None:  # an optional section left out (a diffusion run's other network) has no keys
                rows.extend(_describe_section(value, section, key, defaults, from_preset, overridden))
            continue
        source = "override" if key in overridden else "preset" if key in from_preset else "default"
        rows.append(KeyInfo(key, to_dict(value), defaults.get(key), source, _field_type(tp), comments.get(name, "")))
    return rows
