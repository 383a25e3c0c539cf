"""Small pieces every evaluation module uses: devices, atomic writes, versions, references, extractors."""

from __future__ import annotations

import datetime
import os
import platform

import torch

from genlab.data import is_path_source, split_source_ref
from genlab.errors import ConfigError
from genlab.metrics.extractors import DEFAULT_EXTRACTORS, FeatureExtractor, get_extractor


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def versions() -> dict[str, str]:
    import genlab

    return {"genlab": genlab.__version__, "torch": torch.__version__, "python": platform.python_version()}


def now() -> str:
    """UTC time of a measurement, as every protocol records it."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def parse_ref(ref: str) -> tuple[str, str]:
    """``"mnist:test"`` -> ("mnist", "test"); a one-line error for anything else."""
    from genlab.data import get_source

    source, split = split_source_ref(str(ref))
    if split is None:
        if is_path_source(str(ref)):  # its path holds no split: rpartition would cut the path
            raise ConfigError(f"reference {ref!r} needs a split: {ref}:train (the whole folder when it has no "
                              f"train/ or test/ sub-folder) or {ref}:test")
        head, sep, _ = str(ref).rpartition(":")
        if sep and head:
            get_source(head)  # an unknown source: DataError listing the valid ones
        raise ConfigError(f"reference {ref!r} must be SOURCE:SPLIT, e.g. mnist:test or fashion-mnist:train")
    get_source(source)  # DataError listing the valid sources
    return source, split


def is_run(target) -> bool:
    """Whether ``target`` is a loaded run (``Run.evaluate`` passes itself) rather than a path or a split."""
    return hasattr(target, "method") and hasattr(target, "path")


def as_run(target, weights: str = "ema"):
    """The loaded run to score: ``target`` itself when it is one, else the run folder loaded with ``weights``."""
    if is_run(target):
        return target
    from genlab.runs import load_run

    return load_run(target, weights=weights)


def resolve_extractor(extractor: str | os.PathLike | FeatureExtractor | None, source: str, device) -> FeatureExtractor:
    """The extractor object: given, named (shipped or a user evaluator), a path, or the default one for ``source``."""
    if extractor is None:
        extractor = DEFAULT_EXTRACTORS.get(source, "inception")
    if isinstance(extractor, (str, os.PathLike)):
        extractor = get_extractor(extractor)
    if hasattr(extractor, "to"):
        extractor.to(device)
    return extractor
