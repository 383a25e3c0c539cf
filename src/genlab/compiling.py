"""torch.compile of a denoiser network, in place, with an eager fallback (sampling and training share it).

``nn.Module.compile`` keeps the module and its parameters (state-dict keys unchanged, so checkpoints stay
interchangeable between compiled and eager runs) and routes ``module(...)`` through a TorchDynamo-compiled
``_call_impl``; clearing that attribute makes the module eager again. Shapes are static (``dynamic=False``):
each new input shape, dtype, grad mode or train/eval flag compiles once more, so callers keep those fixed.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def compile_network(module: torch.nn.Module) -> None:
    """Compile ``module`` in place (inductor, static shapes); a second call does nothing."""
    if not is_compiled(module):
        module.compile(dynamic=False)


def is_compiled(module: torch.nn.Module) -> bool:
    """True while calls of ``module`` go through its compiled graph (not after a fallback)."""
    return module._compiled_call_impl is not None


def fall_back(module: torch.nn.Module, error: Exception, doing: str) -> None:
    """Make ``module`` eager for good and say so in one warning line naming the compiler's error."""
    module._compiled_call_impl = None
    first_line = str(error).splitlines()[0] if str(error) else ""
    warnings.warn(f"torch.compile failed ({type(error).__name__}: {first_line}); {doing} with the eager network",
                  RuntimeWarning, stacklevel=3)


@contextmanager
def eager(module: torch.nn.Module) -> Iterator[None]:
    """Calls of ``module`` run eagerly inside the block (a preview grid in eval mode under no_grad would
    otherwise compile a second graph: minutes for a few images); the compiled graph is back after it."""
    compiled, module._compiled_call_impl = module._compiled_call_impl, None
    try:
        yield
    finally:
        module._compiled_call_impl = compiled
