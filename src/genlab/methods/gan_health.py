"""What every GAN method does with the training-health monitor (SPEC G4), in one place.

Each training step feeds ``genlab.methods.health.TrainingHealth`` the D loss and the trainer's gradient
norms; every ``health.every`` steps it scores the diversity of one fixed batch, G(z) for the same z,
labels and noise each time. That batch comes from a private seed and G runs in eval mode (restored
after), so the monitor draws nothing from the run's random streams and leaves BatchNorm statistics
alone: a run with the monitor trains exactly as one without.
"""

from __future__ import annotations

import torch

from genlab.methods.base import DataInfo
from genlab.methods.health import HealthConfig, TrainingHealth

HEALTH_SEED = 1234  # z (and noise inputs) of the fixed batch: the same at every check


class WatchesTrainingHealth:
    """Mixin of the GAN methods: builds ``self.health`` and feeds it once per training step.

    The method provides ``generator`` (an nn.Module), ``num_classes`` (None if unconditional) and
    ``sample(n, generator=, labels=, truncation=)``.
    """

    health: TrainingHealth | None

    def init_health(self, config: HealthConfig, data_info: DataInfo) -> None:
        """The monitor for this data (its evaluator or pixel distances), or None when disabled."""
        self.health = (TrainingHealth(config, data_info.channels, data_info.image_size, data_info.source)
                       if config.enabled else None)

    def watch_health(self, ctx, d_loss: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The ``health_*`` logs of this step: ``d_loss`` (None for a critic, whose loss has no floor), the
        trainer's ``grad_norm*`` logs, and the diversity check of the fixed batch when due; {} without a monitor."""
        if self.health is None:
            return {}
        signals = {k: v for k, v in getattr(ctx, "logs", {}).items() if k.startswith("grad_norm")}
        if d_loss is not None:
            signals["d_loss"] = d_loss
        if self.health.due(ctx.step):
            self.health.check_samples(ctx.step, self.health_samples)
        return self.health.observe(ctx.step, signals)

    @torch.no_grad()
    def health_samples(self) -> torch.Tensor:
        """G's images (num_samples, C, H, W) of the fixed batch: private seed, balanced labels, psi = 1, eval mode."""
        n = self.health.config.num_samples
        labels = torch.arange(n) % self.num_classes if self.num_classes else None  # every class equally often
        was_training = self.generator.training
        self.generator.eval()
        try:
            return self.sample(n, generator=torch.Generator().manual_seed(HEALTH_SEED), labels=labels, truncation=1.0)
        finally:
            self.generator.train(was_training)
