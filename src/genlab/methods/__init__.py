"""Registry of methods (model families) by the name used on the command line."""

from __future__ import annotations

import importlib

from genlab.errors import ConfigError
from genlab.methods.base import DataInfo, Method

# name -> "module:Class"; imported lazily so `genlab --help` stays fast.
METHODS = {
    "ddpm": "genlab.methods.ddpm:DDPM",
    "classifier": "genlab.methods.classifier:ClassifierMethod",
}


def get_method(name: str) -> type[Method]:
    """The Method class registered as ``name``."""
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; valid methods: {', '.join(sorted(METHODS))}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["METHODS", "DataInfo", "Method", "get_method"]
