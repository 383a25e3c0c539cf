"""Atomic checkpoints: safetensors for tensors, JSON for everything else (SPEC P4, P5).

A checkpoint is a folder ``RUN/checkpoints/step_XXXXXX/`` (step zero-padded to 6+ digits)::

    model.safetensors       one file per tensor group ("model", "ema", "optimizer", ...)
    ema.safetensors
    state.json              all non-tensor state; written last, so its presence marks completeness

Crash safety. Everything is written into ``step_XXXXXX.tmp-<pid>/``, each file flushed and
fsynced, ``state.json`` last; then the folder is renamed into place (a rename is atomic on POSIX
and NTFS). A crash at any point therefore leaves either the old set of checkpoints or the new one,
never a half-written ``step_XXXXXX`` folder. Leftover ``*.tmp-*`` / ``*.del-*`` folders are ignored
by the readers and removed by the next save. Replacing an existing step renames the old folder to
``*.old-<pid>`` first; if a crash falls between the two renames, the readers fall back on that
complete ``.old`` folder and the next save puts it back.

Nothing here uses pickle or ``torch.load``: nested Python state (optimizer and LR-scheduler
``state_dict()``) goes through :func:`flatten_state`, which splits it into a flat
``{name: Tensor}`` dict for safetensors and a JSON skeleton that :func:`unflatten_state` reverses
exactly. Only the main process should save (the trainer's job under accelerate / DDP).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

import genlab
from genlab.errors import ConfigError, GenlabError
from genlab.fileio import atomic_write_bytes, fsync_dir, sha256_bytes, sha256_file, write_error

CHECKPOINT_FORMAT = 1  # bump when the folder layout or state.json meta changes
STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
_OLD_DIR = re.compile(r"^step_(\d{6,})\.old-\d+$")  # a replaced step, kept until its successor is in place
_STALE_DIR = re.compile(r"^step_\d{6,}\.(tmp|del)-\d+$")  # unfinished writes / unfinished deletions
_GROUP_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_RESERVED_STATE_KEYS = ("checkpoint",)

# ---------------------------------------------------------------------------------------------
# Nested state <-> (flat tensors, JSON skeleton)

# The skeleton is plain JSON. Plain values stay plain (str-keyed dicts, lists, str, finite
# numbers, bool, null), so state.json stays readable; what JSON cannot say is written as a
# one-key object whose key is one of these tags.
_TENSOR = "__tensor__"  # {"__tensor__": name}: a tensor stored under `name`
_TUPLE = "__tuple__"  # {"__tuple__": [...]}
_ITEMS = "__items__"  # {"__items__": [[key, value], ...]}: dict with non-str keys (or tag-like keys)
_FLOAT = "__float__"  # {"__float__": "nan" | "inf" | "-inf"}: strict JSON has no non-finite numbers
_TAGS = (_TENSOR, _TUPLE, _ITEMS, _FLOAT)


def flatten_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split nested state into ``({name: Tensor}, JSON-able skeleton)``; reversed by unflatten_state.

    Handles any nesting of dict / list / tuple / int / float / bool / None / str / Tensor: tuples
    stay tuples, non-str dict keys keep their type, inf/nan survive, 0-dim tensors stay 0-dim and
    dtypes are kept. Tensor names are the dotted path to the tensor (``state.0.exp_avg``).
    Tensors are returned as they are (detached); :func:`save_checkpoint` makes them contiguous,
    moves them to the CPU and un-shares storage for safetensors.
    """
    tensors: dict[str, torch.Tensor] = {}

    def unique_name(path: list[str]) -> str:
        name = ".".join(path) or "tensor"
        candidate, k = name, 1
        while candidate in tensors:  # e.g. int key 0 and str key "0" in the same dict
            candidate, k = f"{name}~{k}", k + 1
        return candidate

    def encode(x: Any, path: list[str], as_key: bool = False) -> Any:
        if isinstance(x, torch.Tensor):
            if as_key:
                raise TypeError(f"flatten_state: a tensor cannot be a dict key (at '{'.'.join(path)}')")
            name = unique_name(path)
            tensors[name] = x.detach()
            return {_TENSOR: name}
        if x is None or isinstance(x, (bool, int, str)):
            return x
        if isinstance(x, float):
            if math.isfinite(x):
                return float(x)
            return {_FLOAT: "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}
        if isinstance(x, tuple):
            return {_TUPLE: [encode(v, path + [str(i)], as_key) for i, v in enumerate(x)]}
        if isinstance(x, list) and not as_key:
            return [encode(v, path + [str(i)]) for i, v in enumerate(x)]
        if isinstance(x, dict) and not as_key:
            plain = all(isinstance(k, str) for k in x) and not (len(x) == 1 and next(iter(x)) in _TAGS)
            if plain:
                return {k: encode(v, path + [k]) for k, v in x.items()}
            return {_ITEMS: [[encode(k, path, as_key=True), encode(v, path + [str(k)])] for k, v in x.items()]}
        where = ".".join(path) or "<root>"
        raise TypeError(
            f"flatten_state: cannot store a {type(x).__name__} at '{where}'; "
            "use dict/list/tuple/int/float/bool/None/str/Tensor"
        )

    return tensors, encode(obj, [])


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """Rebuild the nested state from :func:`flatten_state`'s ``(tensors, skeleton)``."""

    def decode(x: Any) -> Any:
        if isinstance(x, list):
            return [decode(v) for v in x]
        if not isinstance(x, dict):
            return x
        if len(x) == 1:
            (tag, payload), = x.items()
            if tag == _TENSOR:
                if payload not in tensors:
                    raise GenlabError(
                        f"checkpoint state refers to tensor '{payload}', which is missing from its tensor file"
                    )
                return tensors[payload]
            if tag == _TUPLE:
                return tuple(decode(v) for v in payload)
            if tag == _ITEMS:
                return {decode(k): decode(v) for k, v in payload}
            if tag == _FLOAT:
                return float(payload)
        return {k: decode(v) for k, v in x.items()}

    return decode(skeleton)


# ---------------------------------------------------------------------------------------------
# Folder layout


def _checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    """``step_000123``: the folder name of a step's checkpoint (6+ digits, so names sort by step)."""
    return f"step_{step:06d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest step first (folders with a ``state.json``)."""
    root = _checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    primary: dict[int, Path] = {}
    fallback: dict[int, Path] = {}
    for entry in root.iterdir():
        if entry.is_symlink() or not (entry / STATE_FILE).is_file():  # a symlinked step could point anywhere
            continue
        if m := _STEP_DIR.match(entry.name):
            primary[int(m.group(1))] = entry
        elif m := _OLD_DIR.match(entry.name):
            fallback[int(m.group(1))] = entry  # crash between the two renames of a same-step save
    for step, path in fallback.items():
        primary.setdefault(step, path)
    return [primary[s] for s in sorted(primary)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None when there is none."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step encoded in a checkpoint folder's name."""
    name = Path(path).name
    m = _STEP_DIR.match(name) or _OLD_DIR.match(name)
    if m is None:
        raise GenlabError(f"{path} is not a checkpoint folder (expected a name like step_000100)")
    return int(m.group(1))


# ---------------------------------------------------------------------------------------------
# Writing


def _remove_dir(path: Path) -> None:
    """Delete a folder so that a crash mid-way never leaves something that looks like a checkpoint."""
    m = re.match(r"^(step_\d{6,})", path.name)
    if m and not _STALE_DIR.match(path.name):
        doomed = path.with_name(f"{m.group(1)}.del-{os.getpid()}")
        if doomed.exists():
            shutil.rmtree(doomed)
        os.replace(path, doomed)  # atomic: from here on the readers ignore it
        path = doomed
    shutil.rmtree(path, ignore_errors=True)


def _clean_stale(root: Path) -> None:
    """Remove unfinished writes and deletions; put back a replaced step whose successor never landed."""
    for entry in list(root.iterdir()):
        if not entry.is_dir():
            continue
        if _STALE_DIR.match(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
        elif m := _OLD_DIR.match(entry.name):
            primary = root / step_dir_name(int(m.group(1)))
            if primary.exists() or not (entry / STATE_FILE).is_file():
                _remove_dir(entry)
            else:
                os.replace(entry, primary)


def _check_group(group: str, tensors: Any) -> None:
    """Raise ConfigError unless ``tensors`` is a ``{str: Tensor}`` dict."""
    if not isinstance(tensors, dict):
        raise ConfigError(f"checkpoint group '{group}' must be a dict of name -> Tensor, got {type(tensors).__name__}")
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise ConfigError(
                f"checkpoint group '{group}': entry {name!r} is a {type(t).__name__}; tensor groups hold "
                "str -> Tensor only (run nested state through flatten_state)"
            )


def _tensors_for_safetensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors that share no storage (safetensors refuses anything else)."""
    out: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for name, t in tensors.items():
        t = t.detach().to("cpu")  # GPU tensors: a fresh copy (strides preserved, so still check below)
        if not t.is_contiguous() or (t.numel() > 0 and t.untyped_storage().data_ptr() in seen_storage):
            t = t.clone(memory_format=torch.contiguous_format)  # transposed views / tied weights
        if t.numel() > 0:
            seen_storage.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _check_json(x: Any, where: str) -> None:
    """Raise ConfigError naming the first value of ``state`` that strict JSON cannot hold exactly."""
    if x is None or isinstance(x, (bool, int, str)):
        return
    if isinstance(x, float):
        if not math.isfinite(x):
            raise ConfigError(f"checkpoint state {where} = {x} is not finite; store it through flatten_state")
        return
    if isinstance(x, (list, tuple)):  # tuples come back as lists: documented in save_checkpoint
        for i, v in enumerate(x):
            _check_json(v, f"{where}[{i}]")
        return
    if isinstance(x, dict):
        for k, v in x.items():
            if not isinstance(k, str):
                raise ConfigError(
                    f"checkpoint state {where} has the {type(k).__name__} key {k!r}; JSON keys are strings "
                    "(store it through flatten_state to keep the key type)"
                )
            _check_json(v, f"{where}[{k!r}]")
        return
    raise ConfigError(
        f"checkpoint state {where} is a {type(x).__name__}; state.json holds plain JSON values "
        "(tensors go in the tensor groups, nested state through flatten_state)"
    )


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    keep_last: int | None = 2,
) -> Path:
    """Atomically write ``RUN/checkpoints/step_XXXXXX/`` and prune to the newest ``keep_last``.

    ``tensors`` maps a group name (the file stem: "model", "ema", "optimizer") to ``{name: Tensor}``.
    ``state`` is plain JSON (str keys; tuples are written as lists; non-finite floats and non-str
    keys are refused: pass such values through :func:`flatten_state`). ``state.json`` also gets the
    ``step`` and a ``checkpoint`` block (format, genlab version, UTC time, size and sha256 of each
    tensor file). Pruning keeps the ``keep_last`` highest steps plus the one just written (None
    keeps everything). Returns the checkpoint folder.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ConfigError(f"checkpoint step must be an int >= 0, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ConfigError(f"keep_last must be an int >= 1 or None (keep all), got {keep_last!r}")
    if not isinstance(state, dict):
        raise ConfigError(f"checkpoint state must be a dict, got {type(state).__name__}")
    for key in _RESERVED_STATE_KEYS:
        if key in state:
            raise ConfigError(f"checkpoint state key '{key}' is reserved for the checkpoint's own metadata; rename it")
    if "step" in state and state["step"] != step:
        raise ConfigError(f"checkpoint state['step'] = {state['step']!r} disagrees with step={step}")
    _check_json(state, "state")
    for group, group_tensors in tensors.items():
        if not isinstance(group, str) or not _GROUP_NAME.match(group):
            raise ConfigError(f"checkpoint group name {group!r} must be a plain file stem (letters, digits, _ . -)")
        _check_group(group, group_tensors)

    root = _checkpoints_dir(run_dir)
    final = root / step_dir_name(step)
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _clean_stale(root)
        tmp.mkdir()
        files: dict[str, dict[str, Any]] = {}
        for group, group_tensors in tensors.items():
            data = safetensors.torch.save(_tensors_for_safetensors(group_tensors))
            file_name = f"{group}.safetensors"
            atomic_write_bytes(tmp / file_name, data)
            files[group] = {"file": file_name, "bytes": len(data), "sha256": sha256_bytes(data)}
        meta = {
            "format": CHECKPOINT_FORMAT,
            "genlab_version": genlab.__version__,
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "files": files,
        }
        full_state = {"step": step, **state, "checkpoint": meta}
        # state.json last: its presence marks a complete checkpoint.
        atomic_write_bytes(tmp / STATE_FILE, json.dumps(full_state, indent=1, allow_nan=False).encode())
    except OSError as err:  # (WriteError too) disk full, file too large, read-only: the older checkpoints stay
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(getattr(err, "os_error", err), final) from None

    if final.exists():
        # Two renames: a crash between them leaves a complete `.old` folder that readers fall back on.
        old = root / f"{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(root)
        _remove_dir(old)
    else:
        os.replace(tmp, final)
    fsync_dir(root)

    if keep_last is not None:
        complete = list_checkpoints(run_dir)
        for path in complete[:-keep_last]:
            if path.name != final.name:
                _remove_dir(path)
    return final


# ---------------------------------------------------------------------------------------------
# Reading


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


class CheckpointState(dict):
    """``state.json`` as read: a missing key is a one-line GenlabError naming the file, not a KeyError."""

    def __init__(self, data: dict, source: Path):
        super().__init__(data)
        self.source = source

    def __missing__(self, key: str) -> Any:
        raise GenlabError(f"checkpoint {self.source} has no '{key}' entry (damaged, or written by another genlab "
                          "version); use an earlier checkpoint with --checkpoint STEP")


def _read_state(path: Path) -> CheckpointState:
    """Read and sanity-check a checkpoint folder's state.json (step and file table)."""
    state_path = path / STATE_FILE
    if path.is_symlink() or not path.is_dir():
        what = "is a symbolic link" if path.is_symlink() else "does not exist"
        raise GenlabError(f"checkpoint folder {path} {what}; checkpoints are real folders inside the run's checkpoints/")
    if not state_path.is_file() or state_path.is_symlink():
        raise GenlabError(f"checkpoint {state_path} is missing: the checkpoint is incomplete, use an earlier one")
    try:
        state = json.loads(state_path.read_text(), object_hook=lambda d: CheckpointState(d, state_path))
        files = state["checkpoint"]["files"]
        if not isinstance(state, dict) or not isinstance(files, dict) or not all(
                isinstance(info, dict) and {"file", "bytes", "sha256"} <= info.keys() for info in files.values()):
            raise ValueError("malformed 'checkpoint.files' block")
        if isinstance(state["step"], bool) or not isinstance(state["step"], int):
            raise ValueError(f"'step' is {state['step']!r}, not an integer")
    except GenlabError:  # a missing key: CheckpointState's message says it all
        raise
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise GenlabError(f"checkpoint {state_path} is corrupt ({_one_line(err)}); use an earlier checkpoint") from None
    return state


def _tensor_file(path: Path, info: dict) -> Path:
    """The tensor file a ``state.json`` entry names: a plain file name inside its own step folder, nothing else."""
    name = info["file"]
    # `../..`, absolute paths and sub-folders would let a state.json load files from anywhere.
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise GenlabError(f"checkpoint {path / STATE_FILE} names the file {name!r}, which is not a plain file name "
                          "inside its step folder; the checkpoint is damaged or forged, use an earlier one")
    file = path / name
    if file.is_symlink():
        raise GenlabError(f"checkpoint file {file} is a symbolic link; checkpoint files must be regular files "
                          "inside their step folder: use an earlier checkpoint")
    return file


def verify_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Path], CheckpointState]:
    """Check a checkpoint folder against its ``state.json`` (names, sizes, sha256); returns its files and state."""
    path = Path(path)
    state = _read_state(path)
    files: dict[str, Path] = {}
    for group, info in state["checkpoint"]["files"].items():
        file = _tensor_file(path, info)
        try:
            size, digest = file.stat().st_size, sha256_file(file)
        except OSError as err:
            raise GenlabError(
                f"checkpoint file {file} cannot be read ({_one_line(err)}); use an earlier checkpoint"
            ) from None
        if size != info["bytes"] or digest != info["sha256"]:
            raise GenlabError(
                f"checkpoint file {file} is corrupt ({size} bytes, sha256 mismatch with state.json); "
                "use an earlier checkpoint"
            )
        files[group] = file
    return files, state


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read a checkpoint folder: ``({group: {name: Tensor}}, state)``; tensors land on ``device``.

    Every tensor file is checked against the size and sha256 recorded in ``state.json``; a missing
    or corrupt file raises GenlabError naming it, and so does a missing ``state`` key when read.
    """
    files, state = verify_checkpoint(path)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for group, file in files.items():
        try:
            loaded = safetensors.torch.load_file(file)  # memory-mapped read: no second copy in RAM
        except Exception as err:  # safetensors raises its own error types for malformed headers
            raise GenlabError(f"checkpoint file {file} is not a valid safetensors file ({_one_line(err)})") from None
        tensors[group] = {k: v.to(device) for k, v in loaded.items()}
    return tensors, state


def check_weights_fit(method: torch.nn.Module, weights: dict[str, Any], ckpt: Path, config_path: Path) -> None:
    """Refuse (one line) a checkpoint whose tensor names or shapes differ from the model the config builds.

    ``weights`` maps names to tensors or shapes. Differences mean config.yaml no longer describes the
    run (edited, truncated or damaged); torch would say so in a multi-line RuntimeError.
    """
    own = {k: tuple(v.shape) for k, v in method.state_dict().items()}
    saved = {k: tuple(v.shape if hasattr(v, "shape") else v) for k, v in weights.items()}
    if own == saved:
        return
    missing, unexpected = sorted(own.keys() - saved.keys()), sorted(saved.keys() - own.keys())
    shaped = sorted(k for k in own.keys() & saved.keys() if own[k] != saved[k])
    detail = (f"'{shaped[0]}' is {list(saved[shaped[0]])} in the checkpoint, {list(own[shaped[0]])} in the model"
              if shaped else f"'{(missing or unexpected)[0]}' is {'missing from the checkpoint' if missing else 'unexpected'}")
    raise GenlabError(f"{ckpt} does not fit the model that {config_path} describes ({detail}): was config.yaml edited "
                      "or damaged? restore it (the first 'start' record of log.jsonl holds the config)")


def find_checkpoint(run_dir: str | os.PathLike, which: int | str | os.PathLike | None = "latest") -> Path | None:
    """The checkpoint to load: step ``which``, a checkpoint folder, or for "latest" (None) the newest *intact* one.

    A damaged newer checkpoint (sha256 mismatch, missing file, corrupt state.json) is skipped with a
    one-line warning naming it, so a crash or a bad disk sector costs the steps since the previous
    checkpoint, not the run. Returns None when the run has no checkpoint at all.
    """
    if isinstance(which, os.PathLike) or (isinstance(which, str) and Path(which).is_dir()):
        return Path(which)  # a folder: load_checkpoint checks it
    found = list_checkpoints(run_dir)
    if which is None or which == "latest":
        skipped: list[tuple[str, GenlabError]] = []
        for path in reversed(found):
            try:
                verify_checkpoint(path)
            except GenlabError as err:
                skipped.append((path.name, err))
                warnings.warn(f"skipping damaged checkpoint {path.name}: {err}")
                continue
            return path
        if skipped:
            raise GenlabError(f"every checkpoint of {run_dir} is damaged ({', '.join(name for name, _ in skipped)}; "
                              f"the newest: {skipped[0][1]}): restore checkpoints/ from a backup or retrain")
        return None
    step = parse_checkpoint_choice(which)
    for path in found:
        if checkpoint_step(path) == step:
            return path
    steps = ", ".join(str(checkpoint_step(p)) for p in found) or "none"
    raise GenlabError(f"checkpoint {which}: {run_dir} has no checkpoint at step {step}; available steps: {steps} "
                      "(or latest)")


def parse_checkpoint_choice(which: int | str) -> int | str:
    """``--checkpoint STEP|latest``: the step as an int, or "latest"; anything else is a one-line error."""
    if which == "latest":
        return which
    text = str(which).strip()
    if isinstance(which, bool) or not text.isdigit():
        raise GenlabError(f"checkpoint {which!r}: give a step number (e.g. 500) or latest")
    return int(text)
