"""Declared capabilities: the optional abilities of a method, as types (ARCHITECTURE: "Capabilities").

A method class inherits the capabilities it has, e.g. ``class VAE(Method, Generates, Reconstructs,
LatentCodec, HasELBO)``. The CLI, the evaluation and child runs (an LDM needs a ``LatentCodec``
parent, a prior a ``DiscreteCodes`` one) ask ``isinstance(method, Capability)`` instead of probing
attribute names, and a request a method cannot serve names the capability it lacks
(:func:`require`). Each capability lists the members it promises; the contract test over the
registry checks every method that declares one really has them.

Conditioning on classes is a run-time fact (``model.class_conditional``), not a class-level one:
see :func:`conditions_on_classes`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from genlab.errors import ConfigError


class Capability:
    """Base of the capability markers: ``ability`` says what it means in the user's words."""

    ability: ClassVar[str] = ""
    members: ClassVar[tuple[str, ...]] = ()  # attributes a method declaring this capability provides


class Generates(Capability):
    """Draws new images: ``sample(n, generator=..., **options) -> (n, C, H, W)`` in [-1, 1]."""

    ability = "generate images"
    members = ("sample",)


class Reconstructs(Capability):
    """Maps an image to its reconstruction: ``reconstruct(x) -> x_hat`` (both (N, C, H, W) in [-1, 1])."""

    ability = "reconstruct images"
    members = ("reconstruct",)


class Encodes(Capability):
    """Encodes images to a continuous latent and decodes back: ``encode(x) -> z``, ``decode(z) -> x``."""

    ability = "encode images to a latent and decode them"
    members = ("encode", "decode")


class LatentCodec(Encodes):
    """An autoencoder whose latents diffuse: ``encode``/``decode`` plus ``latent_scale``.

    ``latent_scale`` (a 0-d tensor, 1 / std of the latents, measured on the data) is what latent
    diffusion multiplies the latents by so they have unit variance (Rombach et al. 2022, sec. 4.3.2).
    """

    ability = "provide scaled latents for latent diffusion"
    members = ("encode", "decode", "latent_scale")


class DiscreteCodes(Capability):
    """Encodes images to maps of codebook indices and decodes them: the parent of autoregressive priors."""

    ability = "encode images to discrete codes"
    members = ("encode_codes", "decode_codes", "codebook_size", "code_shape")


class Translates(Capability):
    """Image-to-image: ``translate(a) -> b``, a of ``input_channels``; ``make_input(b)`` derives a task input."""

    ability = "translate images"
    members = ("translate", "make_input", "input_channels")


class HasELBO(Capability):
    """Scores held-out images by an evidence lower bound: ``negative_elbo(x) -> (N,)``, nats per image."""

    ability = "report an ELBO"
    members = ("negative_elbo",)


class GANLatent(Capability):
    """A generator's latent space: ``latent_dim``, ``synthesize(z) -> images`` (unclamped, for inversion gradients)."""

    ability = "map latent vectors to images"
    members = ("latent_dim", "synthesize")


class StyleSpace(GANLatent):
    """A StyleGAN's intermediate latent space w: ``mapping(z) -> w``, ``synthesize_w(ws)``, ``w_avg``, ``num_ws``.

    Inversion and editing work in w (Abdal et al. 2019) where a generator has it, in z otherwise.
    """

    ability = "map latent vectors to images through a style space w"
    members = ("latent_dim", "synthesize", "mapping", "synthesize_w", "w_avg", "num_ws")


class Denoiser(Capability):
    """A diffusion model: a noise schedule and ``denoiser(conditioning)`` for samplers and guidance."""

    ability = "denoise (diffusion)"
    members = ("schedule", "denoiser")


class NoiseAwareClassifier(Capability):
    """p(y | x_t, t) on noisy images: ``log_prob_gradient(x_t, t, labels)`` for classifier guidance."""

    ability = "classify noisy images (classifier guidance)"
    members = ("schedule", "log_prob_gradient")


def has(method: Any, capability: type[Capability] | tuple[type[Capability], ...]) -> bool:
    """Whether ``method`` (an instance or a class) declares ``capability`` (or one of a tuple of them)."""
    cls = method if isinstance(method, type) else type(method)
    return issubclass(cls, capability)


def require(method: Any, capability: type[Capability] | tuple[type[Capability], ...], what: str | None = None,
            where: str = "") -> None:
    """Raise a one-line ConfigError unless ``method`` declares ``capability`` (or one of a tuple of them).

    ``what`` is the user's request ("interpolate"), ``where`` names the run (a folder) in the message.
    """
    if has(method, capability):
        return
    wanted = capability if isinstance(capability, tuple) else (capability,)
    name = getattr(method, "name", type(method).__name__)
    run = f"{'an' if name[:1] in 'aeiou' else 'a'} {name} run"
    run = f"{where}: {run}" if where else run
    needs = " or ".join(f"'{c.__name__}' ({c.ability})" for c in wanted)
    offering = sorted({m for c in wanted for m in capable_methods(c)})
    raise ConfigError(f"{run} cannot {what or wanted[0].ability}: that needs the capability {needs}, "
                      f"which {', '.join(offering) or 'no method'} {'has' if len(offering) == 1 else 'have'}")


def capable_methods(capability: type[Capability]) -> list[str]:
    """Registered method names whose class declares ``capability`` (imports every method module)."""
    from genlab.methods import METHODS, get_method

    out = []
    for name in sorted(METHODS):
        try:
            if has(get_method(name), capability):
                out.append(name)
        except ConfigError:  # a method registered ahead of its implementation
            continue
    return out


def capabilities_of(method: Any) -> list[type[Capability]]:
    """The capabilities ``method`` (instance or class) declares, in class-hierarchy order."""
    cls = method if isinstance(method, type) else type(method)
    return [c for c in cls.__mro__ if isinstance(c, type) and issubclass(c, Capability) and c is not Capability
            and c.__module__ == __name__]


def conditions_on_classes(method: Any) -> bool:
    """Whether this (built) method takes class labels: a run-time choice of its config."""
    return getattr(method, "num_classes", None) is not None


def conditions_on_text(method: Any) -> bool:
    """Whether this (built) method takes prompts: it has a text encoder (a run-time choice, ``model.text``)."""
    return getattr(method, "text_encoder", None) is not None


__all__ = [
    "Capability", "Generates", "Reconstructs", "Encodes", "LatentCodec", "DiscreteCodes", "Translates", "HasELBO",
    "GANLatent", "StyleSpace", "Denoiser", "NoiseAwareClassifier", "has", "require", "capable_methods",
    "capabilities_of", "conditions_on_classes", "conditions_on_text",
]
