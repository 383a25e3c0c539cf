"""A stand-in for the trainer's step context, for calling ``Method.training_step`` directly in tests."""

from __future__ import annotations

import torch


class RecordingContext:
    """Seeded randomness of the trainer's shape ((n, ...) per draw); ``optimize`` only records the loss."""

    def __init__(self, n: int, seed: int = 0, step: int = 0):
        self.n, self.step, self.gen, self.losses = n, step, torch.Generator().manual_seed(seed), []
        self.micro, self.is_last_micro, self.logs = 0, True, {}

    def randn(self, *shape):
        return torch.randn(self.n, *shape, generator=self.gen)

    def rand(self, *shape):
        return torch.rand(self.n, *shape, generator=self.gen)

    def randint(self, low, high):
        return torch.randint(low, high, (self.n,), generator=self.gen)

    def optimize(self, loss, group="main"):
        self.losses.append(loss)
