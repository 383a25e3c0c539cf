"""Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2 with a cubic polynomial kernel."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genlab.errors import ConfigError, DataError
from genlab.metrics.statistics import FeatureBank, as_features, canonical_order

__all__ = ["KIDConfig", "polynomial_kernel", "mmd2_unbiased", "kernel_inception_distance", "KID"]


@dataclass
class KIDConfig:
    """Options of KID: how many random subsets, of which size, drawn with which seed."""

    subsets: int = 100
    subset_size: int = 1000
    seed: int = 0

    def __post_init__(self):
        if self.subsets < 1:
            raise ConfigError(f"kid subsets must be >= 1, got {self.subsets}")
        if self.subset_size < 2:
            raise ConfigError(f"kid subset_size must be >= 2 (the unbiased estimator needs pairs), got {self.subset_size}")


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x . y / D + 1)^3 for all pairs of rows of x (M, D) and y (N, D): (M, N)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 between two equal-size samples x, y (m, D) (Gretton et al. 2012, Lemma 6)."""
    m = x.shape[0]
    k_xx = polynomial_kernel(x, x)  # (m, m)
    k_yy = polynomial_kernel(y, y)  # (m, m)
    k_xy = polynomial_kernel(x, y)  # (m, m)
    # Within-sample terms exclude the diagonal k(x_i, x_i): that is what makes the estimator unbiased.
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * k_xy.sum() / (m * m)


def kernel_inception_distance(
    real_features,
    fake_features,
    subsets: int = 100,
    subset_size: int = 1000,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """KID: mean and (population) std of unbiased MMD^2 over random subsets of m = min(subset_size, N_real, N_fake).

    Each subset draws m real and m fake samples without replacement. Samples are first put in a canonical
    order, so the result depends only on the two sets and the generator (default: a CPU generator seeded
    with 0), not on their order. ``generator`` must be a CPU generator.
    """
    KIDConfig(subsets=subsets, subset_size=subset_size)
    real = as_features(real_features, "real features")
    fake = as_features(fake_features, "fake features").to(real.device)
    if real.shape[1] != fake.shape[1]:
        raise DataError(f"real and fake features differ in dimension: {real.shape[1]} vs {fake.shape[1]}")
    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2:
        raise DataError(f"KID needs at least 2 real and 2 fake samples, got {real.shape[0]} and {fake.shape[0]}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    real = real[canonical_order(real)]
    fake = fake[canonical_order(fake)]
    values = []
    for _ in range(subsets):
        # Indices are drawn on the CPU generator so that the subsets are the same on every device.
        real_index = torch.randperm(real.shape[0], generator=generator)[:m].to(real.device)
        fake_index = torch.randperm(fake.shape[0], generator=generator)[:m].to(real.device)
        values.append(mmd2_unbiased(real[real_index], fake[fake_index]))
    values = torch.stack(values)
    # Population std (ddof = 0), as in Binkowski et al.'s code and torchmetrics.
    return float(values.mean()), float(values.std(correction=0))


class KID:
    """Streaming KID: accumulate real and fake features, compute over all processes' features."""

    def __init__(self, config: KIDConfig | None = None):
        self.config = config if config is not None else KIDConfig()
        self.real = FeatureBank()
        self.fake = FeatureBank()

    def update(self, features, real: bool) -> None:
        """Add a batch of features (N, D) to the real or the fake side."""
        (self.real if real else self.fake).update(features)

    def compute(self) -> tuple[float, float]:
        """(mean, std) of KID over the configured subsets."""
        return kernel_inception_distance(
            self.real.gather(),
            self.fake.gather(),
            subsets=self.config.subsets,
            subset_size=self.config.subset_size,
            generator=torch.Generator().manual_seed(self.config.seed),
        )
