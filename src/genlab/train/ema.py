"""Exponential moving average of a module's weights, the copy most families sample from (SPEC G2, P5).

After each optimiser step, every parameter's shadow moves toward the raw weight::

    shadow <- d * shadow + (1 - d) * param,      d = min(decay, (1 + n) / (10 + n))

where ``n`` is the number of updates made before this one (so the first update uses d = 0.1).
The warm-up term keeps early averages from being dominated by the random initialisation. It is
TensorFlow's ``ExponentialMovingAverage(num_updates=...)`` rule, used by the original DDPM code and
by diffusers' ``EMAModel`` (``use_ema_warmup=False``), which gives the same d for every update after
its first one (its first update is a plain copy, d = 0); ADM (guided-diffusion) itself uses a fixed
rate with no warm-up, which ``warmup=False`` reproduces.

Buffers (BatchNorm running statistics, counters) are not averaged: they are copied as they are at
each update, the StyleGAN2 / DCGAN convention for the EMA generator. Shadows of fp16 / bf16
parameters are kept in float32 so that tiny (1 - d) increments are not rounded away.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from genlab.errors import ConfigError, GenlabError

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _shadow_copy(t: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``t``, promoted to float32 when ``t`` is a low-precision float."""
    t = t.detach()
    return t.to(torch.float32, copy=True) if t.dtype in _LOW_PRECISION else t.clone()


class EMA:
    """A shadow copy of a module's parameters, averaged with warm-up, swappable in for sampling."""

    def __init__(self, module: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not 0.0 <= decay <= 1.0:
            raise ConfigError(f"EMA decay must be in [0, 1] (typically 0.999-0.9999), got {decay!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        with torch.no_grad():
            self.params: dict[str, torch.Tensor] = {n: _shadow_copy(p) for n, p in module.named_parameters()}
            self.buffers: dict[str, torch.Tensor] = {n: b.detach().clone() for n, b in module.named_buffers()}
        # Parameters that are not floating point (rare) cannot be averaged: they are copied like buffers.
        self._averaged = [n for n, p in self.params.items() if p.is_floating_point()]
        self._copied = [n for n, p in self.params.items() if not p.is_floating_point()]

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use: min(decay, (1 + n) / (10 + n)) with warm-up."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    def _module_tensors(self, module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The module's parameters and buffers by name, checked against the shadow's names."""
        params = dict(module.named_parameters())
        buffers = dict(module.named_buffers())
        if params.keys() != self.params.keys() or buffers.keys() != self.buffers.keys():
            missing = sorted((self.params.keys() | self.buffers.keys()) - (params.keys() | buffers.keys()))
            extra = sorted((params.keys() | buffers.keys()) - (self.params.keys() | self.buffers.keys()))
            raise ConfigError(
                f"EMA was built for another module (missing {missing[:3]}, unexpected {extra[:3]}); "
                "pass the same (unwrapped) module the EMA was created from"
            )
        return params, buffers

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Move the shadow toward the module's current weights (call after each optimiser step)."""
        params, buffers = self._module_tensors(module)
        decay = self.current_decay()
        shadow, raw = [], []
        for name in self._averaged:
            s, p = self.params[name], params[name].detach()
            if s.device != p.device:  # the module moved after the EMA was built: follow it once
                s = self.params[name] = s.to(p.device)
            shadow.append(s)
            raw.append(p if p.dtype == s.dtype else p.to(s.dtype))
        if shadow:
            # lerp: s + (1 - d)(p - s) = d s + (1 - d) p, one fused kernel per device/dtype group.
            torch._foreach_lerp_(shadow, raw, 1.0 - decay)
        for name in self._copied:
            self.params[name].copy_(params[name])
        for name, b in buffers.items():
            self.buffers[name].copy_(b)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Overwrite the module's parameters and buffers with the averaged ones (cast to their dtype)."""
        params, buffers = self._module_tensors(module)
        for name, p in params.items():
            p.copy_(self.params[name])
        for name, b in buffers.items():
            b.copy_(self.buffers[name])

    @contextlib.contextmanager
    def averaged(self, module: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averaged weights into ``module`` (e.g. to sample); restore them after."""
        params, buffers = self._module_tensors(module)
        with torch.no_grad():
            backup = {n: t.detach().clone() for n, t in {**params, **buffers}.items()}
        self.copy_to(module)
        try:
            yield module
        finally:
            with torch.no_grad():
                for name, t in {**params, **buffers}.items():
                    t.copy_(backup[name])  # bit-exact: same dtype, plain copy

    def to(self, device: str | torch.device) -> EMA:
        """Move the shadow tensors to ``device`` (e.g. keep the EMA on the CPU to save GPU memory)."""
        self.params = {n: t.to(device) for n, t in self.params.items()}
        self.buffers = {n: t.to(device) for n, t in self.buffers.items()}
        return self

    def state_dict(self) -> dict[str, Any]:
        """``{"params": {name: T}, "buffers": {name: T}, "num_updates": n, "decay": d, "warmup": w}``.

        Nested: store it with ``checkpoint.flatten_state`` (tensors -> safetensors, rest -> JSON).
        """
        return {
            "params": dict(self.params),
            "buffers": dict(self.buffers),
            "num_updates": self.num_updates,
            "decay": self.decay,
            "warmup": self.warmup,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore shadows and the update count; ``decay`` and ``warmup`` stay as constructed (the config's)."""
        try:
            params, buffers, num_updates = state["params"], state["buffers"], int(state["num_updates"])
        except (KeyError, TypeError, ValueError) as err:
            raise GenlabError(f"EMA state is malformed ({err!r}); expected the dict EMA.state_dict() returns") from None
        if params.keys() != self.params.keys() or buffers.keys() != self.buffers.keys():
            missing = sorted(self.params.keys() - params.keys()) + sorted(self.buffers.keys() - buffers.keys())
            raise GenlabError(
                f"EMA state does not match the module (e.g. missing {missing[:3]}); was it saved for another model?"
            )
        for name, t in params.items():
            if t.shape != self.params[name].shape:
                shape, expected = tuple(t.shape), tuple(self.params[name].shape)
                raise GenlabError(f"EMA state '{name}' has shape {shape}, the module {expected}")
            self.params[name].copy_(t)
        for name, t in buffers.items():
            self.buffers[name].copy_(t)
        self.num_updates = num_updates
