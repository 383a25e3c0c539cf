"""Guidance as wrappers around the denoiser, so that every sampler gets every guidance (SPEC D7-D9).

A sampler calls ``denoise(x_t, t) -> eps_hat`` (or ``(eps_hat, v)`` with a learned variance, see
:mod:`genlab.diffusion.samplers`). Each guidance here takes such a callable and returns another one
whose eps_hat is steered, using the score view eps = -sqrt(1 - abar_t) grad_{x_t} log p(x_t)
(Song et al. 2021): adding a term grad log r(x_t) to the score means subtracting
sqrt(1 - abar_t) grad log r(x_t) from eps.

- :func:`classifier_free_guidance` (Ho & Salimans 2022): one batched pass over [x; x] with
  [y; null], eps = eps_uncond + w (eps_cond - eps_uncond).
- :func:`classifier_guidance` (Dhariwal & Nichol 2021, Alg. 2): eps - sqrt(1 - abar) s grad log p(y | x_t);
  :func:`classifier_mean_shift` is Alg. 1's shift of DDPM's posterior mean by s Sigma grad log p(y | x_t).
- :func:`rule_guidance` (model-free): at every call the predicted x0_hat takes one gradient step
  x0_hat - sum_i w_i grad rule_i(x0_hat), and eps is replaced by the eps that predicts that x0 at
  the same x_t. Rules are differentiable losses of the predicted x_0 (:data:`RULES`).

Rule specs (``--rule`` on the command line, :func:`parse_rule`)::

    NAME[:WEIGHT][:KEY=VALUE]...        e.g.  symmetry:50   brightness:500:target=0.3
                                              region:300:box=0,0,0.5,0.5   ink:1000:target=0.1
                                              mypackage.rules:smooth:0.5:scale=2

The built-in rules are means over pixels, so their gradients are ~1/(H W) per pixel and useful
weights are in the tens to thousands on 28x28 images (docs/results.md has a measured table). A
weight is a step size: too large overshoots (symmetry's step is 4 w / (H W) times the asymmetry;
above 2 it diverges).

NAME is a built-in or :func:`register_rule` name, or ``module:function`` (imported; the function
takes x0 (N, C, H, W) in [-1, 1] and keyword parameters and returns an (N,) loss to minimise).
WEIGHT defaults to 1. A VALUE is a float, a comma-separated list of floats, or else a string.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from genlab.diffusion.samplers import Denoiser, MeanShift, split_output
from genlab.diffusion.schedule import NoiseSchedule
from genlab.errors import ConfigError

# grad_{x_t} log p(y | x_t, t): (x_t (N, C, H, W), t (N,)) -> (N, C, H, W)
GradLogProb = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
RuleFn = Callable[..., torch.Tensor]


def _with_variance(eps: torch.Tensor, v: torch.Tensor | None):
    """Repack a guided eps with the inner denoiser's learned variance, if it had one."""
    return eps if v is None else (eps, v)


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance (Ho & Salimans 2022)


def _batch_of_conditions(a: Any, b: Any) -> Any:
    """Two conditions as one batch [a; b]: labels by torch.cat, others (a text encoding) by their ``cat``."""
    return torch.cat([a, b]) if isinstance(a, torch.Tensor) else type(a).cat([a, b])


def classifier_free_guidance(
    denoise_with_labels: Callable[[torch.Tensor, torch.Tensor, Any], Any],
    labels: Any,
    guidance_scale: float,
    null_label: int | None = None,
    negative_labels: Any = None,
    unconditional: Any = None,
) -> Denoiser:
    """Classifier-free guidance: eps = eps_uncond + w (eps_cond - eps_uncond), one network call per step.

    ``denoise_with_labels(x_t, t, y)`` is the conditional model (y (M,) long, ``null_label`` the
    class it was trained on with probability p_uncond). Each call of the returned denoiser runs it
    ONCE on the batch [x_t; x_t] with labels [y; null] (or [y; negative_labels]: negative
    conditioning replaces the unconditional branch, so samples are pushed away from that class).

    The condition need not be labels: a text model passes its prompts' encodings as ``labels`` and
    the empty prompt's as ``unconditional`` (the "null" it was trained on with caption dropout);
    a condition other than a tensor is batched by its class's ``cat`` (e.g.
    :meth:`genlab.text.encoders.TextEncoding.cat`).

    Convention: w = ``guidance_scale``; w = 1 is the plain conditional model (returned unwrapped,
    exactly, with a single N-sample pass), w = 0 the unconditional one (or the negative class's; also
    a single pass), w > 1 extrapolates beyond
    the conditional. Ho & Salimans write eps = (1 + w') eps_cond - w' eps_uncond: the same with
    w = 1 + w' (their w' = 0 is our w = 1). For Gaussians the guided score is the conditional score
    plus (w - 1) (conditional - unconditional score), i.e. that of p(x | y)^w p(x)^(1 - w).
    A learned variance, if any, is taken from the conditional branch (as GLIDE does).
    """
    if not math.isfinite(guidance_scale):
        raise ConfigError(f"guidance_scale={guidance_scale!r}: use a finite number (1: no guidance; 3 is typical)")
    if negative_labels is not None and len(negative_labels) != len(labels):
        raise ConfigError(f"{len(negative_labels)} negative conditions for {len(labels)} conditions: give one per sample")
    if null_label is None and unconditional is None and negative_labels is None:
        raise ConfigError("classifier-free guidance needs the unconditional condition: null_label (a class "
                          "index) or unconditional (e.g. the empty prompt's encoding)")
    if guidance_scale == 1 and negative_labels is None:

        def conditional(x_t: torch.Tensor, t: torch.Tensor):
            return denoise_with_labels(x_t, t, labels)

        return conditional
    if negative_labels is not None:
        other = negative_labels
    else:
        other = unconditional if unconditional is not None else torch.full_like(labels, null_label)
    if guidance_scale == 0:  # only the other branch counts: one N-sample pass, not a wasted 2N one

        def other_branch(x_t: torch.Tensor, t: torch.Tensor):
            return denoise_with_labels(x_t, t, other.to(x_t.device) if isinstance(other, torch.Tensor) else other)

        return other_branch

    both_conditions = _batch_of_conditions(labels, other)

    def guided(x_t: torch.Tensor, t: torch.Tensor):
        n = len(x_t)
        conditions = both_conditions.to(x_t.device) if isinstance(both_conditions, torch.Tensor) else both_conditions
        both = denoise_with_labels(torch.cat([x_t, x_t]), torch.cat([t, t]), conditions)  # (2N, C, H, W): one pass for both branches
        eps_both, v_both = split_output(both)
        eps_cond, eps_uncond = eps_both[:n], eps_both[n:]
        eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        return _with_variance(eps, None if v_both is None else v_both[:n])

    return guided


# ---------------------------------------------------------------------------------------------
# Classifier guidance (Dhariwal & Nichol 2021)


def classifier_log_prob_gradient(
    logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], labels: torch.Tensor
) -> GradLogProb:
    """grad_{x_t} log p(y | x_t, t) of a noise-aware classifier ``logits_fn(x_t, t) -> (N, K)``.

    Autograd is enabled locally (samplers run under no_grad); the result is detached. Each sample's
    log-probability depends only on its own x_t, so the gradient of the sum is the per-sample one.
    """

    def gradient(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            logits = logits_fn(x, t)  # (N, K)
            log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            selected = log_probs[torch.arange(len(x), device=x.device), labels.to(x.device)]  # (N,)
            (grad,) = torch.autograd.grad(selected.sum(), x)
        return grad.to(x_t.dtype)  # (N, C, H, W)

    return gradient


def classifier_guidance(
    denoise: Denoiser, schedule: NoiseSchedule, grad_log_prob: GradLogProb, scale: float
) -> Denoiser:
    """eps_hat = eps - sqrt(1 - abar_t) s grad log p(y | x_t) (Dhariwal & Nichol 2021, Alg. 2, eq. 14).

    For DDIM and the Karras solvers (fractional t works: abar comes from
    :meth:`NoiseSchedule.signal_noise_scales`). Scale 0 returns ``denoise`` itself.
    """
    if scale == 0:
        return denoise

    def guided(x_t: torch.Tensor, t: torch.Tensor):
        eps, v = split_output(denoise(x_t, t))
        _, b = schedule.signal_noise_scales(t, x_t)  # sqrt(1 - abar_t), (N, 1, 1, 1)
        return _with_variance(eps - b * scale * grad_log_prob(x_t, t), v)

    return guided


def classifier_mean_shift(grad_log_prob: GradLogProb, scale: float) -> MeanShift:
    """DDPM's mean shift s Sigma grad log p(y | x_t) (Dhariwal & Nichol 2021, Alg. 1), for
    :func:`genlab.diffusion.samplers.sample_ddpm`'s ``mean_shift`` (Sigma is the step's variance)."""

    def shift(x_t: torch.Tensor, t: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
        return scale * variance * grad_log_prob(x_t, t)

    return shift


# ---------------------------------------------------------------------------------------------
# Rules: differentiable losses of the predicted x_0 (model-free guidance)


def _intensity(x0: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images as intensities in [0, 1] (0 black, 1 white)."""
    return (x0 + 1) / 2


def brightness_rule(x0: torch.Tensor, target: float = 0.5) -> torch.Tensor:
    """(mean intensity - target)^2 per image (N,); intensity (x0 + 1) / 2 in [0, 1]."""
    return (_intensity(x0).flatten(1).mean(dim=1) - target) ** 2


def symmetry_rule(x0: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between each image and its left-right mirror (N,); 0 iff symmetric."""
    return ((x0 - x0.flip(-1)) ** 2).flatten(1).mean(dim=1)


def ink_rule(x0: torch.Tensor, target: float = 0.2, sharpness: float = 10.0) -> torch.Tensor:
    """(soft fraction of bright pixels - target)^2 per image (N,).

    A pixel counts as ink by sigmoid(sharpness * x0): ~1 above mid-grey (x0 > 0), ~0 below; the
    sigmoid keeps the count differentiable.
    """
    ink = torch.sigmoid(sharpness * x0).flatten(1).mean(dim=1)  # (N,)
    return (ink - target) ** 2


def region_rule(x0: torch.Tensor, box: tuple[float, ...] = (0.0, 0.0, 0.5, 0.5)) -> torch.Tensor:
    """Mean squared intensity inside ``box`` per image (N,): 0 iff the box is black (empty).

    box = (x_0, y_0, x_1, y_1) as fractions of the width (x, left to right) and height (y, top to
    bottom); the pixels whose centres fall inside are used.
    """
    if isinstance(box, str):
        box = tuple(float(v) for v in box.split(","))
    if len(box) != 4 or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
        raise ConfigError(f"region box={box!r}: give x0,y0,x1,y1 fractions with 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1")
    h, w = x0.shape[-2:]
    rows = (torch.arange(h, device=x0.device) + 0.5) / h  # pixel centres, (H,)
    cols = (torch.arange(w, device=x0.device) + 0.5) / w  # (W,)
    inside = ((rows >= box[1]) & (rows <= box[3]))[:, None] & ((cols >= box[0]) & (cols <= box[2]))[None, :]
    if not bool(inside.any()):
        raise ConfigError(f"region box={box!r} contains no pixel centre of a {h}x{w} image: make it larger")
    values = _intensity(x0)[..., inside]  # (N, C, P)
    return (values**2).flatten(1).mean(dim=1)


RULES: dict[str, RuleFn] = {
    "brightness": brightness_rule,
    "symmetry": symmetry_rule,
    "ink": ink_rule,
    "region": region_rule,
}


def register_rule(name: str, fn: RuleFn) -> None:
    """Make ``fn(x0, **params) -> (N,) loss`` available to :func:`parse_rule` as ``name``."""
    if not re.fullmatch(r"[A-Za-z_][\w\-]*", name or ""):
        raise ConfigError(f"rule name {name!r}: use letters, digits, '_' or '-' (no ':')")
    if not callable(fn):
        raise ConfigError(f"rule {name!r}: {fn!r} is not callable")
    RULES[name] = fn


@dataclass
class Rule:
    """A loss on the predicted x_0 with its guidance weight and keyword parameters."""

    fn: RuleFn
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    def loss(self, x0: torch.Tensor) -> torch.Tensor:
        """The unweighted loss (N,) of x0 (N, C, H, W)."""
        value = self.fn(x0, **self.params)
        if value.shape != (len(x0),):
            raise ConfigError(
                f"rule {self.name or self.fn!r} returned shape {tuple(value.shape)}: it must return one loss per image (N,)"
            )
        return value


def _parse_value(text: str) -> Any:
    """A rule parameter: float, tuple of floats (comma-separated) or the string itself."""
    try:
        return float(text)
    except ValueError:
        pass
    if "," in text:
        try:
            return tuple(float(v) for v in text.split(","))
        except ValueError:
            pass
    return text


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _import_rule(path: str) -> RuleFn:
    """The function named by ``module:function``."""
    module_name, _, attribute = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"rule {path!r} cannot be imported ({error}): check module:function") from None
    if not callable(fn):
        raise ConfigError(f"rule {path!r} is not a function")
    return fn


def parse_rule(spec: str | Rule | tuple) -> Rule:
    """A :class:`Rule` from ``NAME[:WEIGHT][:KEY=VALUE]...`` (see the module docstring), a Rule, or (fn, weight)."""
    if isinstance(spec, Rule):
        return spec
    if isinstance(spec, tuple):
        if len(spec) != 2 or not callable(spec[0]):
            raise ConfigError(f"rule {spec!r}: give (function, weight)")
        return Rule(spec[0], float(spec[1]), name=getattr(spec[0], "__name__", ""))
    if callable(spec):
        return Rule(spec, name=getattr(spec, "__name__", ""))
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"rule {spec!r}: use NAME[:WEIGHT][:KEY=VALUE]..., e.g. symmetry:2")
    parts = spec.strip().split(":")
    name, rest = parts[0], parts[1:]
    if name not in RULES and rest and "=" not in rest[0] and not _is_float(rest[0]):
        name, rest = f"{name}:{rest[0]}", rest[1:]  # module:function
    if name in RULES:
        fn = RULES[name]
    elif ":" in name:
        fn = _import_rule(name)
    else:
        raise ConfigError(f"unknown rule {name!r}: choose one of {', '.join(sorted(RULES))} or give module:function")
    weight = 1.0
    if rest and "=" not in rest[0]:
        if not _is_float(rest[0]):
            raise ConfigError(f"rule {spec!r}: weight {rest[0]!r} is not a number")
        weight, rest = float(rest[0]), rest[1:]
    params = {}
    for item in rest:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier() or not value:
            raise ConfigError(f"rule {spec!r}: {item!r} is not KEY=VALUE")
        params[key] = _parse_value(value)
    return Rule(fn, weight, params, name)


def rule_guidance(denoise: Denoiser, schedule: NoiseSchedule, rules: list) -> Denoiser:
    """eps + (sqrt(abar) / sqrt(1 - abar)) g, g = grad_{x0} sum_i w_i rule_i(x0) at x0 = x0_hat(x_t).

    That eps predicts x0_hat - g at the same x_t (x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)):
    each denoiser call takes one gradient step of the rules on the predicted x_0, and the sampler
    carries it forward. Why not the gradient with respect to x_t through the denoiser (universal
    guidance's forward guidance)? x0_hat = (x_t - b eps) / a amplifies it by 1 / a, which is ~80 at
    the first Karras step (sigma_max 80): measured on MNIST it saturated the images at useful
    weights. The x_0 step is bounded by the rule's own gradient, and no backward pass through the
    network is needed (a rule costs about nothing next to the denoiser). ``rules`` are
    :class:`Rule` objects or anything :func:`parse_rule` takes. With no rule or only zero weights
    ``denoise`` is returned itself.
    """
    active = [rule for rule in map(parse_rule, rules) if rule.weight != 0]
    if not active:
        return denoise

    def guided(x_t: torch.Tensor, t: torch.Tensor):
        eps, v = split_output(denoise(x_t, t))
        a, b = schedule.signal_noise_scales(t, x_t)  # (N, 1, 1, 1) each
        with torch.enable_grad():
            x0 = ((x_t - b * eps) / a).detach().requires_grad_(True)  # Ho et al. eq. 15
            loss = sum(rule.weight * rule.loss(x0).sum() for rule in active)
            (grad,) = torch.autograd.grad(loss, x0)
        return _with_variance(eps + (a / b) * grad, v)

    return guided
