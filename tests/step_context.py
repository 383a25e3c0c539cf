"""Stand-ins for the trainer's step context, for calling ``Method.training_step`` directly in tests."""

from __future__ import annotations

import torch


class SeededDraws:
    """The trainer's random draws, (n, ...) per call, from one seeded generator; subclasses add ``optimize``."""

    n: int
    generator: torch.Generator

    def randn(self, *shape):
        return torch.randn(self.n, *shape, generator=self.generator)

    def rand(self, *shape):
        return torch.rand(self.n, *shape, generator=self.generator)

    def randint(self, low, high):
        return torch.randint(low, high, (self.n,), generator=self.generator)


class RecordingContext(SeededDraws):
    """Seeded draws; ``optimize`` only records the loss."""

    def __init__(self, n: int, seed: int = 0, step: int = 0):
        self.n, self.step, self.generator, self.losses = n, step, torch.Generator().manual_seed(seed), []
        self.micro, self.is_last_micro, self.logs = 0, True, {}

    def optimize(self, loss, group="main"):
        self.losses.append(loss)
