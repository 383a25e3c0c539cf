"""GAN inversion and latent editing (SPEC G8).

Two ways to find the latent of a real image x under a trained generator G:

* **Optimisation** (:func:`project`, Abdal et al. 2019 "Image2StyleGAN"; Karras et al. 2020 projector):
  minimise MSE(G(l), x) + lambda_p * perceptual(G(l), x) + lambda_z * ||z||^2 / D over the latent l,
  in z for a DCGAN, in w for a StyleGAN (one w for every layer; ``w_plus`` gives each layer its own).
  The prior term keeps z in the region the generator was trained on (||z||^2 / D ~ 1 there).
* **An encoder** E trained on the generator (the ``gan-encoder`` method in
  :mod:`genlab.methods.gan_encoder`, Zhu et al. 2020 "In-Domain GAN Inversion"): one forward pass
  gives the latent; it also initialises the optimisation (``init``), the hybrid of both papers.

Editing without attribute labels (Harkonen et al. 2020, "GANSpace"): the principal directions of the
latents of real images (:func:`principal_directions`) are the axes along which the data varies most;
moving an inverted latent along one of them edits the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from genlab.errors import ConfigError
from genlab.losses import PerceptualLoss
from genlab.methods.capabilities import GANLatent, StyleSpace, has, require


@dataclass
class Projection:
    """The result of inverting images: latents, their images, and the loss per optimisation step."""

    latents: torch.Tensor  # (N, D) z, (N, w_dim) w, or (N, num_ws, w_dim) w+
    images: torch.Tensor  # (N, C, H, W) G(latents) in [-1, 1]
    space: str  # "z", "w" or "w+"
    losses: list[float]


def latent_space(method, space: str | None) -> str:
    """The space to invert into: "w" for a StyleGAN (a declared style space w), "z" otherwise."""
    require(method, GANLatent, "be inverted (it has no generator latent space)")
    has_w = has(method, StyleSpace)
    space = space or ("w" if has_w else "z")
    if space not in ("z", "w", "w+"):
        raise ConfigError(f"latent space must be z, w or w+, got {space!r}")
    if space != "z" and not has_w:
        require(method, StyleSpace, f"be inverted in {space} (only a StyleGAN has a w space; invert a DCGAN in z)")
    return space


def render(method, latents: torch.Tensor, space: str, labels: torch.Tensor | None = None) -> torch.Tensor:
    """G(latents) for latents in ``space`` (differentiable). A StyleGAN's per-layer noise is fixed (seed 0),
    so the same latent always gives the same image while it is optimised."""
    if space == "z":
        return method.synthesize(latents, labels)
    ws = latents if space == "w+" else latents[:, None].expand(-1, method.num_ws, -1)  # (N, num_ws, w_dim)
    generator = torch.Generator(device=method.device).manual_seed(0)
    return method.synthesize_w(ws, generator=generator)


def initial_latents(method, n: int, space: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """The start of the optimisation: w_avg in w (the centre of the learned distribution), z = 0 in z."""
    if space == "z":
        return torch.zeros(n, method.latent_dim, device=method.device)
    w = method.w_avg.detach().to(method.device)[None].expand(n, -1)
    return w[:, None].expand(-1, method.num_ws, -1).clone() if space == "w+" else w.clone()


def project(
    method,
    target: torch.Tensor,
    space: str | None = None,
    steps: int = 300,
    lr: float = 0.05,
    perceptual_weight: float = 0.1,
    prior_weight: float = 1e-3,
    init: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    perceptual: PerceptualLoss | None = None,
    progress: bool = False,
    callback: Callable[[int, float], None] | None = None,
) -> Projection:
    """Invert ``target`` images (N, C, H, W) in [-1, 1] by optimising their latents with Adam.

    The generator's weights are not changed (they get no optimiser; their gradients are discarded).
    ``init``: starting latents (e.g. from a trained encoder); else :func:`initial_latents`.
    ``progress`` shows a bar over the optimisation steps; ``callback(step, loss)`` follows each step.
    """
    from tqdm.auto import tqdm

    space = latent_space(method, space)
    if steps < 0:
        raise ConfigError(f"steps must be >= 0, got {steps}")
    target = target.to(method.device)
    latents = (init.detach().clone() if init is not None else initial_latents(method, len(target), space)).to(method.device)
    latents.requires_grad_(True)
    if perceptual is None and perceptual_weight > 0:
        perceptual = PerceptualLoss("auto", channels=target.shape[1])
    optimizer = torch.optim.Adam([latents], lr=lr)
    was_training = method.training
    method.eval()
    losses: list[float] = []
    try:
        for step in tqdm(range(steps), disable=not progress, desc="invert", unit="step"):
            image = render(method, latents, space, labels)
            loss = ((image - target) ** 2).mean()
            if perceptual_weight > 0:
                loss = loss + perceptual_weight * perceptual(image, target)
            if space == "z" and prior_weight > 0:
                loss = loss + prior_weight * (latents ** 2).mean()
            optimizer.zero_grad(set_to_none=True)
            (grad,) = torch.autograd.grad(loss, [latents])  # only the latents: G's weights get no gradient
            latents.grad = grad
            optimizer.step()
            losses.append(float(loss.detach()))
            if callback is not None:
                callback(step, losses[-1])
        with torch.no_grad():
            images = render(method, latents, space, labels).clamp(-1, 1)
    finally:
        method.train(was_training)
    return Projection(latents=latents.detach(), images=images, space=space, losses=losses)


@torch.no_grad()
def principal_directions(latents: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, the top-k principal directions (k, D) and their standard deviations (k,) of latents (N, D)."""
    flat = latents.flatten(1).double()
    if len(flat) < 2:
        raise ConfigError("principal directions need at least 2 latents")
    mean = flat.mean(0)
    _, s, v = torch.linalg.svd(flat - mean, full_matrices=False)
    k = min(k, v.shape[0])
    return mean.float(), v[:k].float(), (s[:k] / (len(flat) - 1) ** 0.5).float()


@torch.no_grad()
def edit_along(method, latents: torch.Tensor, direction: torch.Tensor, std: float, space: str,
               strengths: torch.Tensor) -> torch.Tensor:
    """Images of each latent moved by s * std along ``direction`` for every s in ``strengths``: (N, S, C, H, W)."""
    direction = direction.to(latents.device).view(1, *latents.shape[1:])
    rows = [render(method, latents + float(s) * std * direction, space).clamp(-1, 1) for s in strengths]
    return torch.stack(rows, 1)
