"""Low-rank adaptation (LoRA, Hu et al. 2021; SPEC A1) of Linear and Conv2d layers.

A :class:`LoRALayer` wraps a frozen base layer (peft's ``LoraLayer`` idea) and adds named adapters:

    y = base(x) + sum_a w_a (alpha_a / r_a) B_a A_a dropout_a(x)

with A (r x in) random and B (out x r) zero at initialisation (the paper's sec. 4.1), so the
wrapped layer's output is the base's until B has been trained. For a convolution, A is a
convolution with the base's kernel, stride and padding into r channels and B a 1x1 convolution back
(LoCon / peft), so the delta kernel is ``Delta W[o, i, :, :] = sum_k B[o, k] A[k, i, :, :]``.
``w_a`` is a user weight (1 by default) that mixes several adapters at sampling time.

The base layer is never edited until an explicit :meth:`LoRALayer.merge`, which adds the deltas to
its weight and keeps the exact original weight beside it; :meth:`LoRALayer.unmerge` puts that
original back, so merge then unmerge restores the base bit for bit (subtracting the delta again, as
peft does, leaves float rounding behind).

Module paths and state-dict keys follow peft's layout: a wrapped layer at ``path`` holds
``path.base_layer.*``, ``path.lora_A.<adapter>.weight`` and ``path.lora_B.<adapter>.weight``;
a saved adapter (:func:`adapter_state_dict`) drops the adapter name, as ``peft`` does on disk.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from genlab.errors import ConfigError

# Target words of `targets=...`: each selects a kind of layer; anything else is a module name (below).
# conv1x1 is the pointwise convolutions only (residual skips, projections): kohya sd-scripts' default LoRA
# ("LierLa") adapts Linear and 1x1 Conv2d layers and reaches 3x3 kernels only when asked (its conv_dim).
TARGET_KINDS = ("attn", "conv", "conv1x1", "linear")


class LoRALayer(nn.Module):
    """A frozen nn.Linear or nn.Conv2d plus named low-rank adapters (peft's LoraLayer layout)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        check_adaptable(base_layer)
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.adapter_weight: dict[str, float] = {}  # w_a: the user's mixing weight of each adapter
        self.merged: dict[str, float] = {}  # adapter -> the weight w_a it was merged with
        # The base weight before merge, exact (a buffer: it follows .to(device); not saved).
        self.register_buffer("_original_weight", None, persistent=False)

    @property
    def is_conv(self) -> bool:
        return isinstance(self.base_layer, nn.Conv2d)

    @property
    def in_features(self) -> int:
        b = self.base_layer
        return b.in_channels if self.is_conv else b.in_features

    @property
    def out_features(self) -> int:
        b = self.base_layer
        return b.out_channels if self.is_conv else b.out_features

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0) -> None:
        """A new adapter of rank ``r``: A Kaiming-uniform (as nn.Linear's default, peft's and the
        paper's code), B zero, so it adds nothing until trained."""
        if name in self.lora_A:
            raise ConfigError(f"an adapter named {name!r} is already attached here; choose another name")
        if not isinstance(r, int) or r < 1:
            raise ConfigError(f"LoRA rank must be a positive integer, got {r!r}")
        if self.merged:
            raise ConfigError("unmerge the adapters before adding another one")
        b = self.base_layer
        device, dtype = b.weight.device, b.weight.dtype
        if self.is_conv:
            a = nn.Conv2d(self.in_features, r, b.kernel_size, b.stride, b.padding, bias=False)
            bb = nn.Conv2d(r, self.out_features, 1, bias=False)
        else:
            a = nn.Linear(self.in_features, r, bias=False)
            bb = nn.Linear(r, self.out_features, bias=False)
        nn.init.kaiming_uniform_(a.weight, a=5 ** 0.5)
        nn.init.zeros_(bb.weight)
        self.lora_A[name] = a.to(device=device, dtype=dtype)
        self.lora_B[name] = bb.to(device=device, dtype=dtype)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[name], self.lora_alpha[name], self.adapter_weight[name] = r, float(alpha), 1.0

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name`` (unmerged first)."""
        if self.merged:
            raise ConfigError("unmerge the adapters before removing one")
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            del table[name]
        for table in (self.r, self.lora_alpha, self.adapter_weight):
            del table[name]

    def scaling(self, name: str) -> float:
        """alpha / r: the paper's scale, stored as (alpha, r) so a saved adapter means one thing."""
        return self.lora_alpha[name] / self.r[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """(alpha / r) B A in the shape of the base weight ((out, in) or (out, in, kh, kw)), float64."""
        a = self.lora_A[name].weight.detach().double()  # (r, in) or (r, in, kh, kw)
        b = self.lora_B[name].weight.detach().double()  # (out, r) or (out, r, 1, 1)
        if self.is_conv:
            delta = torch.einsum("ok,kihw->oihw", b[:, :, 0, 0], a)  # (out, in, kh, kw)
        else:
            delta = b @ a  # (out, in)
        return self.scaling(name) * delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + sum over unmerged adapters of w (alpha / r) B(A(dropout(x)))."""
        y = self.base_layer(x)  # (N, out, ...) or (..., out)
        for name in self.lora_A:
            w = self.adapter_weight[name]
            if name in self.merged or w == 0:
                continue
            h = self.lora_A[name](self.lora_dropout[name](x))  # (N, r, H', W') or (..., r)
            y = y + (w * self.scaling(name)) * self.lora_B[name](h)
        return y

    @torch.no_grad()
    def merge(self, names: Iterable[str] | None = None) -> None:
        """Add w (alpha / r) B A of each adapter into the base weight; the exact original is kept for unmerge.

        The sum is formed in float64 and rounded once to the weight's dtype, so merging several adapters
        rounds once, not once per adapter.
        """
        names = [n for n in (self.lora_A if names is None else names) if n not in self.merged]
        if not names:
            return
        weight = self.base_layer.weight
        if self._original_weight is None:
            self._original_weight = weight.detach().clone()
        factors = {n: self.adapter_weight[n] for n in names}
        total = self._original_weight.double()
        for n, f in {**self.merged, **factors}.items():
            total = total + f * self.delta_weight(n)
        weight.copy_(total.to(weight.dtype))
        self.merged.update(factors)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the base weight back exactly as it was before :meth:`merge`."""
        if self._original_weight is not None:
            self.base_layer.weight.copy_(self._original_weight)
        self._original_weight = None
        self.merged = {}

    @torch.no_grad()
    def subtract(self, names: Iterable[str] | None = None) -> None:
        """Take w (alpha / r) B A of each adapter out of a base weight that already contains it (a merged
        run read from disk, whose original weight is gone): float64, rounded once, so the base returns up
        to float rounding (within one layer, :meth:`unmerge` is exact instead)."""
        if self.merged:
            raise ConfigError("unmerge the adapters merged in this session before subtracting others")
        weight = self.base_layer.weight
        total = weight.double()
        for n in (self.lora_A if names is None else names):
            total = total - self.adapter_weight[n] * self.delta_weight(n)
        weight.copy_(total.to(weight.dtype))


def check_adaptable(layer: nn.Module) -> None:
    """Raise ConfigError unless LoRA can wrap ``layer``: an nn.Linear, or an ungrouped, undilated nn.Conv2d."""
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or layer.dilation != (1, 1) or layer.padding_mode != "zeros":
            raise ConfigError(f"LoRA wraps plain convolutions; this one has groups={layer.groups}, "
                              f"dilation={layer.dilation}, padding_mode={layer.padding_mode!r}")
    elif not isinstance(layer, nn.Linear):
        raise ConfigError(f"LoRA wraps nn.Linear and nn.Conv2d layers, not {type(layer).__name__}")


def _adaptable(layer: nn.Module) -> bool:
    try:
        check_adaptable(layer)
        return True
    except ConfigError:
        return False


def _is_attention(module: nn.Module) -> bool:
    from genlab.nn.attention import Attention

    return isinstance(module, Attention)  # (torch's MultiheadAttention reads out_proj.weight directly: not wrapped)


def parse_targets(targets: str | Sequence[str]) -> list[str]:
    """``"attn,conv"`` or ``["attn", "conv"]`` -> ``["attn", "conv"]`` (empty entries refused)."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    items = [t.strip() for t in items]
    if not items or any(not t for t in items):
        raise ConfigError(f"targets={targets!r}: give a comma-separated list of {', '.join(TARGET_KINDS)} "
                          "or module names, e.g. targets=attn,conv")
    return items


def matches_name(path: str, target: str) -> bool:
    """peft's rule for a list of target_modules: the path equals the name or ends with '.' + name."""
    return path == target or path.endswith("." + target)


def select_targets(model: nn.Module, targets: str | Sequence[str], within: Mapping[str, nn.Module] | None = None
                   ) -> list[str]:
    """Module paths of ``model`` that LoRA wraps for ``targets``, in module order.

    Each target is a kind (``attn``: the q/k/v and output projections of attention layers; ``conv``:
    every Conv2d; ``conv1x1``: the Conv2d with a 1x1 kernel; ``linear``: every Linear) or a module name
    matched as peft matches target_modules (the full path or its last components, e.g. ``to_qkv`` or
    ``unet.conv_in``). ``within`` limits the
    search to these sub-modules of ``model`` (a method's own networks, not its frozen parents). A target
    that selects nothing is an error naming it.
    """
    wanted = parse_targets(targets)
    scopes = list((within or {"": model}).values())
    allowed = {id(m) for scope in scopes for m in scope.modules()}
    attention_children = {id(child) for m in model.modules() if _is_attention(m) for child in m.children()}
    chosen: list[str] = []
    hits = dict.fromkeys(wanted, 0)
    for path, module in _candidate_layers(model):
        if id(module) not in allowed:
            continue
        layer = module.base_layer if isinstance(module, LoRALayer) else module
        picked = False
        for t in wanted:
            if t == "attn":
                ok = isinstance(layer, nn.Linear) and id(module) in attention_children
            elif t == "conv":
                ok = isinstance(layer, nn.Conv2d)
            elif t == "conv1x1":
                ok = isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1)
            elif t == "linear":
                ok = isinstance(layer, nn.Linear)
            else:
                ok = matches_name(path, t)
            if ok:
                hits[t] += 1
                picked = True
        if picked:
            chosen.append(path)
    missing = [t for t, n in hits.items() if n == 0]
    if missing:
        raise ConfigError(f"LoRA targets {', '.join(missing)} select no Linear or Conv2d layer of this model: use "
                          f"{', '.join(TARGET_KINDS)} or a module name such as {_example_path(model, allowed)}")
    return chosen


def _candidate_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every layer LoRA can wrap, or has wrapped (the wrapper, not the layers inside it)."""
    out, wrappers = [], []
    for path, module in model.named_modules():
        if not path or any(path.startswith(w + ".") for w in wrappers):
            continue
        if isinstance(module, LoRALayer):
            wrappers.append(path)
        if isinstance(module, LoRALayer) or _adaptable(module):
            out.append((path, module))
    return out


def _example_path(model: nn.Module, allowed: set[int]) -> str:
    return next((path for path, m in _candidate_layers(model) if id(m) in allowed), "(none)")


def inject_adapter(model: nn.Module, paths: Sequence[str], name: str, r: int | Mapping[str, int],
                   alpha: float | Mapping[str, float], dropout: float = 0.0) -> dict[str, LoRALayer]:
    """Wrap the layers at ``paths`` (once) and add adapter ``name`` to each (rank and alpha per path when
    given as path -> value); returns path -> wrapper."""
    layers = {}
    for path in paths:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = getattr(parent, attr)
        if not isinstance(layer, LoRALayer):
            layer = LoRALayer(layer)
            setattr(parent, attr, layer)
        rank = r[path] if isinstance(r, Mapping) else r
        layer.add_adapter(name, rank, alpha[path] if isinstance(alpha, Mapping) else alpha, dropout)
        layers[path] = layer
    return layers


def is_spatial_conv(layer: nn.Module) -> bool:
    """A Conv2d whose kernel is larger than 1x1 (an adapter on it costs r (kh kw C_in + C_out), not r (C_in + C_out))."""
    layer = layer.base_layer if isinstance(layer, LoRALayer) else layer
    return isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)


def adapter_ranks(model: nn.Module, paths: Sequence[str], rank: int, conv_rank: int | None = None) -> dict[str, int]:
    """path -> rank: ``conv_rank`` on the convolutions with a kernel larger than 1x1 (LoCon's and kohya's conv_dim),
    ``rank`` on every other layer; ``conv_rank=None`` means ``rank`` everywhere."""
    return {p: conv_rank if conv_rank is not None and is_spatial_conv(model.get_submodule(p)) else rank for p in paths}


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every LoRA wrapper in ``model`` by module path."""
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALayer)}


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every adapter in ``model`` (A and B matrices): what LoRA training optimises."""
    return [p for layer in lora_layers(model).values() for table in (layer.lora_A, layer.lora_B)
            for p in table.parameters()]


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under peft's file keys without the prefix: ``<path>.lora_A.weight``."""
    out = {}
    for path, layer in lora_layers(model).items():
        if name in layer.lora_A:
            out[f"{path}.lora_A.weight"] = layer.lora_A[name].weight.detach()
            out[f"{path}.lora_B.weight"] = layer.lora_B[name].weight.detach()
    return out


def expected_adapter_shapes(model: nn.Module, paths: Sequence[str], r: int | Mapping[str, int]
                            ) -> dict[str, tuple[int, ...]]:
    """The file keys and shapes an adapter of rank ``r`` on ``paths`` of ``model`` must have."""
    shapes = {}
    for path in paths:
        layer = model.get_submodule(path)
        base = layer.base_layer if isinstance(layer, LoRALayer) else layer
        check_adaptable(base)
        k = r[path] if isinstance(r, Mapping) else r
        if isinstance(base, nn.Conv2d):
            shapes[f"{path}.lora_A.weight"] = (k, base.in_channels, *base.kernel_size)
            shapes[f"{path}.lora_B.weight"] = (base.out_channels, k, 1, 1)
        else:
            shapes[f"{path}.lora_A.weight"] = (k, base.in_features)
            shapes[f"{path}.lora_B.weight"] = (base.out_features, k)
    return shapes


def check_adapter_tensors(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]],
                          where: str) -> None:
    """Refuse, in one line naming them, keys missing from ``tensors``, unexpected keys, and wrong shapes."""
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [f"{k} {tuple(tensors[k].shape)} (this model needs {tuple(s)})" for k, s in expected.items()
             if k in tensors and tuple(tensors[k].shape) != tuple(s)]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if items:
            shown = ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")
            problems.append(f"{len(items)} {label}: {shown}")
    if problems:
        raise ConfigError(f"{where}: the adapter does not fit this model ({'; '.join(problems)}); "
                          "load it into the base run it was trained on")


def load_adapter(model: nn.Module, tensors: Mapping[str, torch.Tensor], name: str, r: int | Mapping[str, int],
                 alpha: float | Mapping[str, float], paths: Sequence[str], where: str, weight: float = 1.0
                 ) -> dict[str, LoRALayer]:
    """Attach adapter ``name`` from file tensors (``<path>.lora_A.weight`` keys) after checking every key and shape."""
    check_adapter_tensors(tensors, expected_adapter_shapes(model, paths, r), where)
    layers = {}
    for path in paths:
        layer = inject_adapter(model, [path], name, r, alpha)[path]
        with torch.no_grad():
            layer.lora_A[name].weight.copy_(tensors[f"{path}.lora_A.weight"])
            layer.lora_B[name].weight.copy_(tensors[f"{path}.lora_B.weight"])
        layer.adapter_weight[name] = float(weight)
        layers[path] = layer
    return layers


def unwrap(model: nn.Module) -> nn.Module:
    """Replace every LoRA wrapper by its base layer (merged adapters stay in its weight): a plain model."""
    for path, layer in list(lora_layers(model).items()):
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, layer.base_layer)
    return model


def pattern_value(patterns: Mapping[str, Any], path: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern rule: the value of the first key that, as a regex, matches the end of
    ``path`` after a '.' (or all of it); ``default`` when none does."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def resolve_peft_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """The module paths peft would adapt for ``target_modules``: a regex (full match) or a list of names."""
    out = []
    for path, module in _candidate_layers(model):
        if isinstance(target_modules, str):
            ok = re.fullmatch(target_modules, path) is not None
        else:
            ok = any(matches_name(path, t) for t in target_modules)
        if ok:
            out.append(path)
    return out


__all__ = ["LoRALayer", "TARGET_KINDS", "adapter_parameters", "adapter_ranks", "adapter_state_dict",
           "check_adapter_tensors", "expected_adapter_shapes", "inject_adapter", "is_spatial_conv", "load_adapter",
           "lora_layers", "parse_targets", "pattern_value", "resolve_peft_targets", "select_targets", "unwrap"]
