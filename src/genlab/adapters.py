"""LoRA adapters on disk in peft's layout, and what the CLI does with them (SPEC A1).

A saved adapter is a folder, as ``peft``'s ``save_pretrained`` writes it::

    adapter_config.json        {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": [...], ...}
    adapter_model.safetensors  base_model.model.<module path>.lora_A.weight  (r, in[, kh, kw])
                               base_model.model.<module path>.lora_B.weight  (out, r[, 1, 1])

Module paths are those of the base run's method (``unet.mid.1.attention.to_qkv``), so peft loads the
folder into the same torch module (``PeftModel.from_pretrained(method, folder)``) and genlab loads
folders peft wrote. r and lora_alpha travel together: the scale alpha / r is recomputed, never stored
rounded. Loading checks every key and shape and refuses, in one line naming them, an adapter that does
not fit; peft options genlab does not implement (DoRA, rsLoRA, biases) are refused by name rather than
ignored. Layers whose rank differs from ``r`` (``conv_rank``) are listed in peft's ``rank_pattern`` and
``alpha_pattern`` (escaped module paths), which genlab reads by peft's rule.

    genlab lora export LORA_RUN OUT                     # the PEFT folder of a lora run
    genlab lora merge LORA_RUN --out RUN [--weight w]   # a plain run of the base's kind, W + w (alpha / r) B A
    genlab lora unmerge RUN --out BASE                  # the base back from a merged run
    genlab sample BASE_RUN --lora A:0.7,B:0.3 --out grid.png   # several adapters, mixed with weights
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from genlab.errors import ConfigError, GenlabError
from genlab.nn.lora import (LoRALayer, adapter_state_dict, load_adapter, lora_layers, pattern_value, resolve_peft_targets,
                            unwrap)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the user's model
MERGED_DIR = "lora"  # a merged run keeps each merged adapter in RUN/lora/<name>/ (so unmerge can take it out)

# peft LoraConfig options with the value genlab implements; any other value is refused by name.
_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "bias": "none", "fan_in_fan_out": False, "lora_bias": False,
                "modules_to_save": None, "layers_to_transform": None}


@dataclass
class Adapter:
    """One LoRA adapter: rank, alpha, the modules it targets and its tensors (keys ``<path>.lora_A.weight``)."""

    r: int
    lora_alpha: float
    target_modules: list[str] | str  # module paths / names, or a regex (peft's two forms)
    tensors: dict[str, torch.Tensor] = field(repr=False)
    # peft's per-layer exceptions to r and lora_alpha: regex (matched at the end of a module path) -> value
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    lora_dropout: float = 0.0
    base_model_name_or_path: str | None = None  # the base run it was trained on (provenance)

    def peft_config(self) -> dict[str, Any]:
        """adapter_config.json as peft writes it (a LoraConfig's fields that matter, with peft's defaults)."""
        alpha = int(self.lora_alpha) if float(self.lora_alpha).is_integer() else self.lora_alpha
        targets = self.target_modules if isinstance(self.target_modules, str) else sorted(self.target_modules)
        return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": self.base_model_name_or_path,
                "revision": None, "inference_mode": True, "r": self.r, "lora_alpha": alpha,
                "lora_dropout": self.lora_dropout, "target_modules": targets, "init_lora_weights": True,
                "layers_pattern": None, **_UNSUPPORTED, "rank_pattern": dict(self.rank_pattern),
                "alpha_pattern": {k: int(v) if float(v).is_integer() else v for k, v in self.alpha_pattern.items()}}

    def ranks_and_alphas(self, paths: list[str]) -> tuple[dict[str, int], dict[str, float]]:
        """path -> rank and path -> alpha by peft's rule (rank_pattern / alpha_pattern, else r / lora_alpha)."""
        return ({p: pattern_value(self.rank_pattern, p, self.r) for p in paths},
                {p: float(pattern_value(self.alpha_pattern, p, self.lora_alpha)) for p in paths})


def save_adapter(adapter: Adapter, folder: str | Path) -> Path:
    """Write the PEFT folder (config and safetensors, each atomically)."""
    import safetensors.torch

    from genlab.fileio import atomic_write, atomic_write_text

    folder = Path(folder)
    tensors = {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in adapter.tensors.items()}
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: safetensors.torch.save_file(tensors, str(tmp)))
    atomic_write_text(folder / CONFIG_FILE, json.dumps(adapter.peft_config(), indent=2) + "\n")
    return folder


def read_adapter_folder(folder: str | Path) -> Adapter:
    """An adapter from a PEFT folder (ours or peft's); refuses options genlab does not implement."""
    import safetensors.torch

    folder = Path(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise ConfigError(f"{folder}: no {name}; a LoRA adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{folder / CONFIG_FILE}: not readable JSON ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{folder / CONFIG_FILE}: peft_type {config.get('peft_type')!r}; genlab reads LORA adapters")
    for key in ("r", "lora_alpha", "target_modules"):
        if config.get(key) in (None, "", []):
            raise ConfigError(f"{folder / CONFIG_FILE}: no {key}; a LoRA adapter config needs r, lora_alpha and target_modules")
    for key, supported in _UNSUPPORTED.items():
        value = config.get(key, supported)
        if not ((not value) if not supported else value == supported):  # null / {} / false mean "off" too
            raise ConfigError(f"{folder / CONFIG_FILE}: {key}={value!r} is not supported by genlab's LoRA "
                              f"(only {key}={supported!r}); export the adapter without it")
    r = config["r"]
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for rank in (r, *rank_pattern.values()):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"{folder / CONFIG_FILE}: ranks (r, rank_pattern) must be positive integers, got {rank!r}")
    try:
        raw = safetensors.torch.load_file(str(folder / WEIGHTS_FILE))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ConfigError(f"{folder / WEIGHTS_FILE}: not a readable safetensors file ({e})") from None
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in raw.items()}
    return Adapter(r=r, lora_alpha=float(config["lora_alpha"]), target_modules=config["target_modules"], tensors=tensors,
                   rank_pattern=dict(rank_pattern), alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
                   lora_dropout=float(config.get("lora_dropout") or 0.0),
                   base_model_name_or_path=config.get("base_model_name_or_path"))


def run_adapter(run) -> Adapter:
    """The adapter a loaded lora run trained (its EMA weights when the run was loaded with them)."""
    from genlab.methods.lora import ADAPTER, LoRA

    method = run.method
    if not isinstance(method, LoRA):
        raise ConfigError(f"{run.path} is a {run.config.method} run, not a lora run (train one with `genlab train lora "
                          "--base RUN`)")
    if method.config.full_finetune:
        raise ConfigError(f"{run.path} is a full fine-tuning run (model.full_finetune=true): it has no adapter")
    alphas = method.alphas()
    return Adapter(r=method.config.rank, lora_alpha=method.alpha, target_modules=list(method.target_paths),
                   tensors={k: v.clone() for k, v in adapter_state_dict(method.base, ADAPTER).items()},
                   rank_pattern={re.escape(p): r for p, r in method.ranks.items() if r != method.config.rank},
                   alpha_pattern={re.escape(p): alphas[p] for p, r in method.ranks.items() if r != method.config.rank},
                   lora_dropout=method.config.dropout,
                   base_model_name_or_path=method.parent_records.get("base", {}).get("path"))


def read_adapter(source: str | Path) -> Adapter:
    """An adapter from a PEFT folder or from a lora run folder."""
    from genlab.runs import load_run

    source = Path(source)
    if (source / CONFIG_FILE).is_file():
        return read_adapter_folder(source)
    if (source / "config.yaml").is_file():
        return run_adapter(load_run(source, device="cpu"))
    raise ConfigError(f"{source}: neither a LoRA adapter folder ({CONFIG_FILE}) nor a lora run folder (config.yaml)")


def attach(model: torch.nn.Module, adapter: Adapter, name: str, weight: float = 1.0, where: str = "adapter"
           ) -> dict[str, LoRALayer]:
    """Add ``adapter`` to ``model`` as ``name`` with mixing weight ``weight``, after checking every key and shape."""
    paths = resolve_peft_targets(model, adapter.target_modules)
    if not paths:
        raise ConfigError(f"{where}: target_modules {adapter.target_modules!r} name no Linear or Conv2d layer of this "
                          f"{getattr(model, 'name', type(model).__name__)} model: load it into the base it was trained on")
    ranks, alphas = adapter.ranks_and_alphas(paths)
    return load_adapter(model, adapter.tensors, name, ranks, alphas, paths, where, weight)


def parse_lora_spec(spec: str) -> list[tuple[str, float]]:
    """``"A:0.7,B:0.3"`` -> [("A", 0.7), ("B", 0.3)]; a source without ``:w`` has weight 1."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        source, sep, w = item.rpartition(":")
        if not sep:
            source, w = item, "1"
        try:
            weight = float(w)
        except ValueError:
            source, weight = item, 1.0  # a path with a colon and no weight
        if not source:
            raise ConfigError(f"--lora {spec!r}: give adapters as PATH[:WEIGHT],..., e.g. runs/lora-a:0.7,runs/lora-b:0.3")
        out.append((source, weight))
    return out


def attach_adapters(run, spec: str) -> list[str]:
    """Attach every adapter of ``spec`` ("A:0.7,B:0.3": lora runs or PEFT folders) to a loaded run; their names."""
    from genlab.methods.lora import LoRA

    model = run.method.base if isinstance(run.method, LoRA) else run.method
    names = []
    for source, weight in parse_lora_spec(spec):
        adapter = read_adapter(source)
        name = Path(source).resolve().name.replace(".", "_") or "adapter"
        while name in names or name == "default":
            name += "_"
        trained_on = adapter.base_model_name_or_path
        if trained_on and Path(trained_on).resolve() != Path(run.path).resolve():
            warnings.warn(f"adapter {source} was trained on {trained_on}, not on {run.path}: its keys and shapes fit, "
                          "its effect may differ")
        attach(model, adapter, name, weight, where=str(source))
        names.append(name)
    model.to(run.method.device)
    return names


# ---------------------------------------------------------------------------------------------
# Merged runs


def write_plain_run(out: str | Path, method: torch.nn.Module, config: dict, data_info: dict, step: int,
                    extra_state: dict | None = None) -> Path:
    """A run folder of ``method``'s own kind (config.yaml + one checkpoint of its weights), as load_run reads it."""
    from genlab.config import build_config, save_config
    from genlab.methods import get_method
    from genlab.train.checkpoint import latest_checkpoint, save_checkpoint

    out = Path(out)
    if (out / "config.yaml").exists() or latest_checkpoint(out) is not None:
        raise ConfigError(f"{out} already holds a run; choose another --out")
    cfg = build_config(config["method"], get_method(config["method"]).Config, base=config)
    save_config(cfg, out / "config.yaml")
    state = {"method": config["method"], "data_info": data_info, "parents": getattr(method, "parent_records", {}),
             "config": config, "skeletons": {}, **(extra_state or {})}
    save_checkpoint(out, step, {"model": {k: v.detach() for k, v in method.state_dict().items()}}, state)
    return out


def merge_run(lora_run: str | Path, out: str | Path, weight: float = 1.0) -> Path:
    """Write ``out``: the base of ``lora_run`` with W + weight (alpha / r) B A in its weights, a plain run of the
    base's kind (on the lora run's data), keeping the adapter in ``out/lora/default`` for :func:`unmerge_run`."""
    from genlab.config import to_dict
    from genlab.runs import load_run

    run = load_run(lora_run, device="cpu")
    method = run.method
    adapter = None if getattr(method.config, "full_finetune", False) else run_adapter(run)  # refuses non-lora runs
    base = method.base
    for layer in lora_layers(base).values():
        for name in layer.lora_A:
            layer.adapter_weight[name] = float(weight)
        layer.merge()
    unwrap(base)
    record = method.parent_records["base"]
    config = {**record["config"], "data": to_dict(run.config)["data"]}  # it now makes the lora run's data
    merged = [] if adapter is None else [{"name": "default", "weight": float(weight), "from": str(Path(lora_run).resolve())}]
    state = {"lora_merged": {"adapters": merged, "base_data": record["config"]["data"], "base_data_info": record["data_info"],
                             "base_path": record.get("path")}}
    write_plain_run(out, base, config, dataclasses.asdict(method.data_info), int(record["step"]), state)
    if adapter is not None:
        save_adapter(adapter, Path(out) / MERGED_DIR / "default")
    return Path(out)


def unmerge_run(merged_run: str | Path, out: str | Path) -> Path:
    """Write ``out``: the base back from a run :func:`merge_run` wrote (its stored adapters subtracted in float64)."""
    from genlab.config import to_dict
    from genlab.runs import load_run
    from genlab.train.checkpoint import STATE_FILE, find_checkpoint

    merged_run = Path(merged_run)
    ckpt = find_checkpoint(merged_run)
    state = json.loads((ckpt / STATE_FILE).read_text()) if ckpt is not None else {}
    info = state.get("lora_merged")
    if info is None:
        raise GenlabError(f"{merged_run}: not a merged run (no lora_merged record); `genlab lora merge` writes those")
    run = load_run(merged_run, weights="raw", device="cpu")
    for entry in info["adapters"]:
        folder = merged_run / MERGED_DIR / entry["name"]
        attach(run.method, read_adapter_folder(folder), entry["name"], entry["weight"], where=str(folder))
    for layer in lora_layers(run.method).values():
        layer.subtract()
    unwrap(run.method)
    config = {**to_dict(run.config), "data": info["base_data"]}
    return write_plain_run(out, run.method, config, info["base_data_info"], run.step)


__all__ = ["Adapter", "attach", "attach_adapters", "merge_run", "parse_lora_spec", "read_adapter", "read_adapter_folder",
           "run_adapter", "save_adapter", "unmerge_run", "write_plain_run"]
