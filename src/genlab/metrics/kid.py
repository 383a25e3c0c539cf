"""Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2 with a cubic polynomial kernel.

All random subsets are drawn first, then scored a few at a time with batched matrix products: each batch
holds at most ``_BATCH_ELEMENTS`` kernel values (float64), so memory stays bounded whatever the subset size.
The within-real kernel sums depend only on the reals and the subsets drawn (the seed, the subset size and
the two set sizes), so a cached reference can compute them once (``kid_real_kernel_sums``) and pass them in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genlab.errors import ConfigError, DataError
from genlab.metrics.statistics import FeatureBank, as_features, canonical_order

__all__ = ["KIDConfig", "polynomial_kernel", "mmd2_unbiased", "kernel_inception_distance", "kid_real_kernel_sums", "KID"]

_BATCH_ELEMENTS = 2**22  # kernel values per batch of subsets: 32 MB of float64 (4 subsets of 1000)


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
    """k(x, y) = (x . y / D + 1)^3 for all pairs of rows of x (..., M, D) and y (..., N, D): (..., M, N)."""
    # In place after the product: no temporary (..., M, N) matrices (autograd handles these ops in place).
    return torch.matmul(x, y.mT).mul_(1 / x.shape[-1]).add_(1).pow_(3)


def _kernel_sum_off_diagonal(x: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """sum_{i != j} k(x_i, x_j) over each sample x (..., m, D): shape (...).

    k is symmetric, so only the diagonal blocks and those above it are computed, the latter counted
    twice: 10 of 16 block products for 4 blocks.
    """
    parts = x.tensor_split(min(blocks, x.shape[-2]), dim=-2)
    total = sum(polynomial_kernel(p, p).sum((-2, -1)) for p in parts)
    for a, p in enumerate(parts):
        for q in parts[a + 1:]:
            total = total + 2 * polynomial_kernel(p, q).sum((-2, -1))
    diagonal = ((x * x).sum(-1) / x.shape[-1] + 1) ** 3  # k(x_i, x_i), (..., m)
    return total - diagonal.sum(-1)


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, x_within: torch.Tensor | None = None) -> torch.Tensor:
    """Unbiased MMD^2 between equal-size samples x, y (..., m, D) (Gretton et al. 2012, Lemma 6): shape (...).

    ``x_within`` (...): sum_{i != j} k(x_i, x_j) when already known (the reals of a cached reference); else computed.
    """
    m = x.shape[-2]
    if x_within is None:
        x_within = _kernel_sum_off_diagonal(x)
    # Within-sample terms exclude the diagonal k(x_i, x_i): that is what makes the estimator unbiased.
    within = (x_within + _kernel_sum_off_diagonal(y)) / (m * (m - 1))
    return within - 2 * polynomial_kernel(x, y).sum((-2, -1)) / (m * m)


def _subset_size(n_real: int, n_fake: int, subsets: int, subset_size: int) -> int:
    """m = min(subset_size, N_real, N_fake), after checking the options."""
    KIDConfig(subsets=subsets, subset_size=subset_size)
    m = min(subset_size, n_real, n_fake)
    if m < 2:
        raise DataError(f"KID needs at least 2 real and 2 fake samples, got {n_real} and {n_fake}")
    return m


def _draw_subsets(n_real: int, n_fake: int, subsets: int, m: int, generator: torch.Generator | None, device):
    """Indices (S, m) of the reals and of the fakes of each subset, without replacement within a subset.

    Drawn on the CPU generator (default: seeded with 0), real then fake per subset, so that the subsets are
    the same on every device and as in the one-subset-at-a-time protocol.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    draws = [(torch.randperm(n_real, generator=generator)[:m], torch.randperm(n_fake, generator=generator)[:m])
             for _ in range(subsets)]
    return torch.stack([r for r, _ in draws]).to(device), torch.stack([f for _, f in draws]).to(device)


def kernel_inception_distance(
    real_features,
    fake_features,
    subsets: int = 100,
    subset_size: int = 1000,
    generator: torch.Generator | None = None,
    real_kernel_sums: torch.Tensor | None = None,
) -> tuple[float, float]:
    """KID: mean and (population) std of unbiased MMD^2 over random subsets of m = min(subset_size, N_real, N_fake).

    Each subset draws m real and m fake samples without replacement. Samples are first put in a canonical
    order, so the result depends only on the two sets and the generator (default: a CPU generator seeded
    with 0), not on their order. ``generator`` must be a CPU generator. ``real_kernel_sums`` (subsets,):
    what :func:`kid_real_kernel_sums` returns for the same reals, fake count, subsets and generator seed.
    """
    real = as_features(real_features, "real features")
    fake = as_features(fake_features, "fake features").to(real.device)
    if real.shape[1] != fake.shape[1]:
        raise DataError(f"real and fake features differ in dimension: {real.shape[1]} vs {fake.shape[1]}")
    m = _subset_size(real.shape[0], fake.shape[0], subsets, subset_size)
    real = real[canonical_order(real)]
    fake = fake[canonical_order(fake)]
    real_index, fake_index = _draw_subsets(real.shape[0], fake.shape[0], subsets, m, generator, real.device)
    batch = max(1, _BATCH_ELEMENTS // (m * m))
    if real_kernel_sums is None:
        within = [None] * len(real_index.split(batch))
    else:
        if real_kernel_sums.shape != (subsets,):
            raise DataError(f"real_kernel_sums must hold one sum per subset ({subsets},), got {tuple(real_kernel_sums.shape)}")
        within = real_kernel_sums.to(real).split(batch)
    values = torch.cat([mmd2_unbiased(real[r], fake[f], w)  # (b, m, D) each -> (b,)
                        for r, f, w in zip(real_index.split(batch), fake_index.split(batch), within)])
    # Population std (ddof = 0), as in Binkowski et al.'s code and torchmetrics.
    return float(values.mean()), float(values.std(correction=0))


def kid_real_kernel_sums(
    real_features, n_fake: int, subsets: int = 100, subset_size: int = 1000, generator: torch.Generator | None = None
) -> torch.Tensor:
    """sum_{i != j} k(x_i, x_j) over the reals of each KID subset (subsets,), for ``n_fake`` fakes.

    The subsets are those :func:`kernel_inception_distance` draws with the same arguments: they depend on the
    reals, the number of fakes (not their values), the subset size and the generator's state.
    """
    real = as_features(real_features, "real features")
    m = _subset_size(real.shape[0], n_fake, subsets, subset_size)
    real = real[canonical_order(real)]
    real_index, _ = _draw_subsets(real.shape[0], n_fake, subsets, m, generator, real.device)
    batch = max(1, _BATCH_ELEMENTS // (m * m))
    return torch.cat([_kernel_sum_off_diagonal(real[r]) for r in real_index.split(batch)])  # (S,)


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
