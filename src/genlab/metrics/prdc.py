"""Precision/recall (Kynkaanniemi et al. 2019) and density/coverage (Naeem et al. 2020) from k-NN manifolds.

Each sample's k-NN ball has the radius of its k-th nearest neighbour within its own set (the sample itself
excluded). Precision: share of fakes inside some real ball; recall: share of reals inside some fake ball
(both k = 3). Density: mean number of real balls containing a fake, divided by k; coverage: share of reals
whose ball contains some fake (both k = 5, real balls only). Distances are computed in row chunks, so no
N x N matrix is ever held: memory is chunk_size x N float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genlab.errors import ConfigError, DataError
from genlab.metrics.statistics import FeatureBank, as_features

__all__ = ["PRDCConfig", "knn_radii", "precision_recall_density_coverage", "PRDC"]


@dataclass
class PRDCConfig:
    """Options of precision/recall/density/coverage: neighbourhood sizes and the distance chunk size."""

    k_precision_recall: int = 3  # Kynkaanniemi et al. 2019
    k_density_coverage: int = 5  # Naeem et al. 2020
    chunk_size: int = 1024  # rows of the distance matrix held at once

    def __post_init__(self):
        for name in ("k_precision_recall", "k_density_coverage", "chunk_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"prdc {name} must be >= 1, got {getattr(self, name)}")


def _squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between rows of x (M, D) and y (N, D): (M, N)."""
    # ||x||^2 + ||y||^2 - 2 x.y: one matmul; clamp the rounding below zero.
    return ((x * x).sum(1, keepdim=True) + (y * y).sum(1) - 2 * x @ y.T).clamp_min(0)


def knn_radii(x: torch.Tensor, ks: tuple[int, ...], chunk_size: int = 1024) -> dict[int, torch.Tensor]:
    """Squared distance from each row of x (N, D) to its k-th nearest other row, for each k in ``ks``."""
    k_max = max(ks)
    if x.shape[0] <= k_max:
        raise DataError(f"k-NN radii with k = {k_max} need more than {k_max} samples, got {x.shape[0]}")
    radii = {k: [] for k in ks}
    for chunk in torch.split(x, chunk_size):
        # The k_max + 1 smallest include the sample itself at distance 0: the k-th neighbour is at index k.
        nearest = _squared_distances(chunk, x).topk(k_max + 1, dim=1, largest=False).values  # (c, k_max + 1)
        for k in ks:
            radii[k].append(nearest[:, k])
    return {k: torch.cat(r) for k, r in radii.items()}


def precision_recall_density_coverage(
    real_features,
    fake_features,
    k_precision_recall: int = 3,
    k_density_coverage: int = 5,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Precision, recall (k-NN manifolds, k = 3) and density, coverage (k = 5) of fakes against reals."""
    config = PRDCConfig(k_precision_recall, k_density_coverage, chunk_size)
    k_pr, k_dc = config.k_precision_recall, config.k_density_coverage
    real = as_features(real_features, "real features")  # (N, D)
    fake = as_features(fake_features, "fake features").to(real.device)  # (M, D)
    if real.shape[1] != fake.shape[1]:
        raise DataError(f"real and fake features differ in dimension: {real.shape[1]} vs {fake.shape[1]}")
    real_radii = knn_radii(real, (k_pr, k_dc), chunk_size)  # squared radii (N,)
    fake_radius = knn_radii(fake, (k_pr,), chunk_size)[k_pr]  # squared radii (M,)

    fake_in_real_manifold = torch.zeros(fake.shape[0], dtype=torch.bool, device=real.device)  # precision
    real_balls_per_fake = torch.zeros(fake.shape[0], dtype=torch.float64, device=real.device)  # density
    real_in_fake_manifold, real_ball_has_fake = [], []  # recall, coverage
    for start in range(0, real.shape[0], chunk_size):
        stop = start + chunk_size
        distances = _squared_distances(real[start:stop], fake)  # (c, M)
        inside_real_pr = distances <= real_radii[k_pr][start:stop, None]  # fake j in real ball i (k = 3)
        inside_real_dc = distances <= real_radii[k_dc][start:stop, None]  # fake j in real ball i (k = 5)
        fake_in_real_manifold |= inside_real_pr.any(dim=0)
        real_balls_per_fake += inside_real_dc.sum(dim=0)
        real_in_fake_manifold.append((distances <= fake_radius[None, :]).any(dim=1))
        real_ball_has_fake.append(inside_real_dc.any(dim=1))
    return {
        "precision": float(fake_in_real_manifold.double().mean()),
        "recall": float(torch.cat(real_in_fake_manifold).double().mean()),
        "density": float(real_balls_per_fake.sum() / (k_dc * fake.shape[0])),
        "coverage": float(torch.cat(real_ball_has_fake).double().mean()),
    }


class PRDC:
    """Streaming precision/recall/density/coverage: accumulate features, compute over all processes."""

    def __init__(self, config: PRDCConfig | None = None):
        self.config = config if config is not None else PRDCConfig()
        self.real = FeatureBank()
        self.fake = FeatureBank()

    def update(self, features, real: bool) -> None:
        """Add a batch of features (N, D) to the real or the fake side."""
        (self.real if real else self.fake).update(features)

    def compute(self) -> dict[str, float]:
        """Precision, recall, density and coverage of all fakes against all reals."""
        c = self.config
        return precision_recall_density_coverage(
            self.real.gather(), self.fake.gather(), c.k_precision_recall, c.k_density_coverage, c.chunk_size
        )
