"""Training-health monitor for adversarial training (SPEC G4): D collapse, exploding gradients, mode collapse.

Three failure signs of GAN training are watched, each with a warning that fires once per *episode*
(the first step the condition holds; a new warning only after it has cleared):

* **Discriminator collapse**: the running mean of the D loss (over ``window`` steps) falls below
  ``d_loss_floor``. For losses whose floor is 0 (BCE, hinge, least squares) this means D separates
  real from fake perfectly and G's gradients vanish. Not meaningful for Wasserstein critics (their
  loss is unbounded below); a method does not feed ``d_loss`` then.
* **Exploding gradients**: any logged ``grad_norm*`` value above ``grad_norm_max``, or above
  ``grad_norm_factor`` times the running median of that key's recent (healthy) values.
* **Mode collapse**: every ``every`` steps the method hands a batch generated from a fixed z. The
  diversity score is the entropy (nats) of the mean predicted class distribution of the project's
  evaluator classifier (``genlab.metrics.extractors``), ``H(mean_i softmax(f(x_i)))``: ln 10 = 2.30
  for samples spread evenly over 10 classes, 0 when every sample is the same digit. Below
  ``min_entropy`` (1.0 nats: fewer than ~e = 2.7 classes' worth) the samples have collapsed. Data
  without an evaluator (no ``evaluator``): the score is the mean pairwise RMS pixel distance of the
  batch (in [-1, 1] units, 0 for identical samples), checked against ``min_pixel_distance``.

Values are returned as ``health_*`` log entries every step (the last measured diversity is repeated
between checks, so the trainer's window averages stay right). The monitor draws no random numbers
and leaves every network as it found it, so exact resume is unaffected; its running statistics
are not checkpointed (a resumed run starts watching afresh).
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from genlab.errors import ConfigError
from genlab.metrics.inception_score import marginal_class_entropy

__all__ = ["HealthConfig", "HealthWarning", "TrainingHealth", "class_entropy", "pixel_diversity"]


@dataclass
class HealthConfig:
    """Thresholds and cadence of the training-health monitor."""

    enabled: bool = True
    every: int = 200  # steps between diversity checks on a fixed z batch (0: never)
    num_samples: int = 200  # size of the fixed z batch
    # "auto": the data source's shipped evaluator for 1-channel 28x28 data (mnist, fashion-mnist), else pixel distances; a name
    # ("mnist", "fashion-mnist") or path of an evaluator; "none": pixel distances.
    evaluator: str = "auto"
    min_entropy: float = 1.0  # nats, of at most ln(num_classes) (2.30 for 10 classes)
    min_pixel_distance: float = 0.1  # mean pairwise RMS distance in [-1, 1] pixel units (no evaluator)
    window: int = 50  # steps of the D-loss running mean and the grad-norm running median
    d_loss_floor: float = 0.01
    grad_norm_max: float = 1e4
    grad_norm_factor: float = 100.0  # x the running median of the same key (GAN norms spike ~50x harmlessly)


class HealthWarning(UserWarning):
    """A sign of unhealthy adversarial training (D collapse, exploding gradients, mode collapse)."""


def class_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the mean predicted class distribution of logits (N, K): a batch diversity score."""
    return torch.tensor(marginal_class_entropy(torch.softmax(logits.double(), dim=1)), dtype=torch.float32)


def pixel_diversity(images: torch.Tensor) -> torch.Tensor:
    """Mean over pairs i != j of the RMS pixel distance ||x_i - x_j|| / sqrt(D) of images (N, ...)."""
    x = images.flatten(1).double()  # (N, D)
    n = x.shape[0]
    if n < 2:
        raise ConfigError(f"pixel diversity needs at least 2 images, got {n}")
    d = torch.cdist(x, x) / math.sqrt(x.shape[1])  # (N, N), zero diagonal
    return (d.sum() / (n * (n - 1))).float()


class TrainingHealth:
    """Watches a GAN's logs and samples; warns once per episode of each failure and reports ``health_*`` values."""

    def __init__(self, config: HealthConfig | None = None, channels: int = 1, image_size: int = 28,
                 source: str | None = None):
        self.config = config = config or HealthConfig()
        if config.every < 0 or config.window < 1 or config.num_samples < 2:
            raise ConfigError(
                f"health: every ({config.every}) must be >= 0, window ({config.window}) >= 1, "
                f"num_samples ({config.num_samples}) >= 2"
            )
        name = config.evaluator
        if name == "auto":  # the data's own evaluator when the project ships one (mnist for unknown 1x28x28)
            from genlab.metrics.extractors import DEFAULT_EXTRACTORS  # train/ never imports evaluation

            if source is not None:
                name = DEFAULT_EXTRACTORS.get(source, "none") if (channels, image_size) == (1, 28) else "none"
            else:
                name = "mnist" if (channels, image_size) == (1, 28) else "none"
        self.evaluator_name = None if name == "none" else name
        self._extractor = None
        self._d_losses: deque[float] = deque(maxlen=config.window)
        self._grad_norms: dict[str, deque[float]] = {}
        self._active: dict[str, bool] = {}  # condition -> currently in an episode
        self.diversity: float | None = None
        self.warnings: list[str] = []  # every warning issued, in order (for tests and reports)

    # ------------------------------------------------------------------ episodes

    def _episode(self, condition: str, holds: bool, message: str) -> None:
        """Warn when ``condition`` starts holding; stay quiet while it keeps holding; re-arm when it clears."""
        if holds and not self._active.get(condition, False):
            self.warnings.append(message)
            warnings.warn(message, HealthWarning, stacklevel=3)
        self._active[condition] = holds

    # ------------------------------------------------------------------ per-step signals

    def observe(self, step: int, logs: dict[str, torch.Tensor | float]) -> dict[str, torch.Tensor]:
        """Feed one step's logs (``d_loss``, ``grad_norm*``); returns the ``health_*`` values to log."""
        cfg = self.config
        out: dict[str, torch.Tensor] = {}
        if "d_loss" in logs:
            self._d_losses.append(float(logs["d_loss"]))
            mean = sum(self._d_losses) / len(self._d_losses)
            full = len(self._d_losses) == cfg.window
            collapsed = full and mean < cfg.d_loss_floor
            self._episode("d_collapse", collapsed,
                          f"step {step}: discriminator loss collapsed (running mean {mean:.3g} < {cfg.d_loss_floor} over "
                          f"{cfg.window} steps): D wins outright and G gets no signal; try label smoothing, instance "
                          "noise, a lower D learning rate, spectral norm or the hinge/WGAN-GP loss")
            out["health_d_loss_mean"] = torch.tensor(mean)
            out["health_d_collapse"] = torch.tensor(float(collapsed))
        exploding_any = False
        for key, value in logs.items():
            if not key.startswith("grad_norm"):
                continue
            norm = float(value)
            history = self._grad_norms.setdefault(key, deque(maxlen=cfg.window))
            median = sorted(history)[len(history) // 2] if history else None
            exploding = not math.isfinite(norm) or norm > cfg.grad_norm_max or (
                median is not None and len(history) >= min(10, cfg.window) and norm > cfg.grad_norm_factor * median)
            self._episode(f"explode_{key}", exploding,
                          f"step {step}: exploding gradients: {key} = {norm:.3g} (running median "
                          f"{median if median is not None else float('nan'):.3g}, limit {cfg.grad_norm_max:.3g} or "
                          f"{cfg.grad_norm_factor:g}x median); lower the learning rate or enable train.grad_clip")
            if not exploding:  # the median tracks healthy values only, so a lasting explosion stays flagged
                history.append(norm)
            exploding_any = exploding_any or exploding
        out["health_grad_explosion"] = torch.tensor(float(exploding_any))
        if self.diversity is not None:
            out["health_diversity"] = torch.tensor(self.diversity)
            out["health_mode_collapse"] = torch.tensor(float(self._active.get("mode_collapse", False)))
        return out

    # ------------------------------------------------------------------ sample diversity

    def due(self, step: int) -> bool:
        """Whether the diversity check runs at ``step``: every ``every`` steps, not at step 0.

        An untrained DCGAN generator (weights ~ N(0, 0.02)) maps every z to nearly the same image, so a
        check at step 0 would always cry collapse.
        """
        every = self.config.every
        return self.config.enabled and every > 0 and step > 0 and step % every == 0

    def _extractor_for(self, device: torch.device):
        if self._extractor is None:
            from genlab.metrics.extractors import get_extractor

            self._extractor = get_extractor(self.evaluator_name)
        return self._extractor.to(device)

    @torch.no_grad()
    def diversity_score(self, images: torch.Tensor) -> float:
        """Evaluator class entropy (nats) of images (N, C, H, W) in [-1, 1], or their pixel diversity without one."""
        if self.evaluator_name is None:
            return float(pixel_diversity(images))
        _, logits = self._extractor_for(images.device).features_and_logits(images)
        return float(class_entropy(logits))

    def check_samples(self, step: int, images: torch.Tensor | Callable[[], torch.Tensor]) -> float:
        """Score a fixed-z batch (or a callable making it) and warn on mode collapse; returns the score."""
        if callable(images):
            images = images()
        score = self.diversity_score(images.detach().float())
        self.diversity = score
        if self.evaluator_name is None:
            threshold, what = self.config.min_pixel_distance, "mean pairwise RMS pixel distance"
        else:
            threshold, what = self.config.min_entropy, f"'{self.evaluator_name}' evaluator class entropy (nats)"
        self._episode("mode_collapse", score < threshold,
                      f"step {step}: mode collapse: {what} of a fixed-z batch is {score:.3g} < {threshold:g}; the generator "
                      "covers few modes: try minibatch variety (lower D lr, TTUR), spectral norm, WGAN-GP or restart")
        return score
