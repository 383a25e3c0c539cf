"""Capture and restore every global random number generator, for exact resume (SPEC P5).

Covers Python's ``random``, NumPy's legacy global RNG (``np.random.*``), torch's CPU generator and,
when CUDA is initialised, every visible CUDA generator. Explicit ``torch.Generator`` objects (a data
loader's shuffling generator, a method's own) are not global: save ``gen.get_state()`` with them.

The state splits like a checkpoint: torch states are uint8 tensors (for safetensors), Python and
NumPy states are lists of ints and floats (for ``state.json``).
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch

from genlab.errors import GenlabError


def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return ``(tensors, json_state)`` describing every global RNG right now."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    json_state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "kind": kind,
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "cuda_devices": 0,
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    # Only when CUDA is already in use: querying it otherwise would create a context on every GPU.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_states = torch.cuda.get_rng_state_all()
        json_state["cuda_devices"] = len(cuda_states)
        tensors.update({f"torch_cuda_{i}": s for i, s in enumerate(cuda_states)})
    return tensors, json_state


def restore_rng_state(tensors: dict[str, torch.Tensor], json_state: dict[str, Any]) -> None:
    """Put every global RNG back in the state :func:`capture_rng_state` returned."""
    try:
        py = json_state["python"]
        np_state = json_state["numpy"]
        cpu_state = tensors["torch_cpu"]
        n_cuda = int(json_state.get("cuda_devices", 0))
        cuda_states = [tensors[f"torch_cuda_{i}"] for i in range(n_cuda)]
        random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
        np.random.set_state(
            (
                np_state["kind"],
                np.asarray(np_state["keys"], dtype=np.uint32),
                np_state["pos"],
                np_state["has_gauss"],
                np_state["cached_gaussian"],
            )
        )
    except (KeyError, TypeError, ValueError) as err:
        raise GenlabError(f"saved RNG state is malformed ({err!r}); the checkpoint was not written by genlab") from None

    torch.set_rng_state(cpu_state.to(device="cpu", dtype=torch.uint8))
    if cuda_states:
        if not torch.cuda.is_available():
            warnings.warn(
                "checkpoint holds CUDA RNG states but CUDA is unavailable; they are not restored", stacklevel=2
            )
            return
        n_here = torch.cuda.device_count()
        if n_here != len(cuda_states):
            warnings.warn(
                f"checkpoint holds {len(cuda_states)} CUDA RNG states but {n_here} devices are visible; "
                "restoring the first min(both) only",
                stacklevel=2,
            )
        for i, state in enumerate(cuda_states[:n_here]):
            torch.cuda.set_rng_state(state.to(device="cpu", dtype=torch.uint8), device=i)
