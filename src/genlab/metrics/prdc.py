"""Precision/recall (Kynkaanniemi et al. 2019) and density/coverage (Naeem et al. 2020) from k-NN manifolds.

Each sample's k-NN ball has the radius of its k-th nearest neighbour within its own set (the sample itself
excluded). Precision: share of fakes inside some real ball; recall: share of reals inside some fake ball
(both k = 3). Density: mean number of real balls containing a fake, divided by k; coverage: share of reals
whose ball contains some fake (both k = 5, real balls only).

Cost: three passes over distance matrices, each cut into ``chunk_size`` x ``chunk_size`` tiles (memory: a
few float64 tiles, 8 MB each at 1024, plus the k + 1 smallest distances per sample), every comparison
made on a tile right after its matrix product. One pass over real-real distances gives both real radii
(k = 3 and 5) from one top-k, one over fake-fake gives the fake radii, and one over real-fake distances
feeds all four metrics. Within a set only the tiles on and above the diagonal are computed
(d(x_i, x_j) = d(x_j, x_i)), halving the two k-NN passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genlab.errors import ConfigError, DataError
from genlab.metrics.statistics import FeatureBank, as_features

__all__ = ["PRDCConfig", "knn_radii", "precision_recall_density_coverage", "PRDC"]


@dataclass
class PRDCConfig:
    """Options of precision/recall/density/coverage: neighbourhood sizes and the distance tile size."""

    k_precision_recall: int = 3  # Kynkaanniemi et al. 2019
    k_density_coverage: int = 5  # Naeem et al. 2020
    chunk_size: int = 1024  # side of the distance tiles held at once

    def __post_init__(self):
        for name in ("k_precision_recall", "k_density_coverage", "chunk_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"prdc {name} must be >= 1, got {getattr(self, name)}")


def _squared_distances(x: torch.Tensor, y: torch.Tensor, x_sq: torch.Tensor, y_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between rows of x (M, D) and y (N, D), given their squared norms: (M, N)."""
    # ||x||^2 + ||y||^2 - 2 x.y: one matmul (fused with the sum); clamp the rounding below zero.
    return torch.addmm(x_sq[:, None] + y_sq, x, y.T, alpha=-2).clamp_min_(0)


def _tiles(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def knn_radii(x: torch.Tensor, ks: tuple[int, ...], chunk_size: int = 1024) -> dict[int, torch.Tensor]:
    """Squared distance from each row of x (N, D) to its k-th nearest other row, for each k in ``ks``."""
    k_max = max(ks)
    if x.shape[0] <= k_max:
        raise DataError(f"k-NN radii with k = {k_max} need more than {k_max} samples, got {x.shape[0]}")
    x_sq = (x * x).sum(1)  # (N,)
    tiles = _tiles(x.shape[0], chunk_size)
    # The k_max + 1 smallest squared distances of each row so far (memory O(N k)), merged tile by tile.
    nearest = torch.full((x.shape[0], k_max + 1), float("inf"), dtype=x.dtype, device=x.device)

    def merge(rows: slice, d: torch.Tensor) -> None:
        smallest = d.topk(min(k_max + 1, d.shape[1]), dim=1, largest=False).values  # (r, <= k_max + 1)
        nearest[rows] = torch.cat([nearest[rows], smallest], dim=1).topk(k_max + 1, dim=1, largest=False).values

    for a, rows in enumerate(tiles):
        for cols in tiles[a:]:
            d = _squared_distances(x[rows], x[cols], x_sq[rows], x_sq[cols])  # (r, c)
            merge(rows, d)
            if cols != rows:  # read by columns, the same tile serves the rows of cols (copied: topk is fastest on rows)
                merge(cols, d.T.contiguous())
    # They include the sample itself at distance 0: the k-th neighbour is at index k (topk sorts ascending).
    return {k: nearest[:, k].contiguous() for k in ks}  # (N,) each


def precision_recall_density_coverage(
    real_features,
    fake_features,
    k_precision_recall: int = 3,
    k_density_coverage: int = 5,
    chunk_size: int = 1024,
    real_radii: dict[int, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Precision, recall (k-NN manifolds, k = 3) and density, coverage (k = 5) of fakes against reals.

    ``real_radii``: the reals' ``knn_radii`` for both k when already known (a cached reference); else computed.
    """
    config = PRDCConfig(k_precision_recall, k_density_coverage, chunk_size)
    k_pr, k_dc = config.k_precision_recall, config.k_density_coverage
    real = as_features(real_features, "real features")  # (N, D)
    fake = as_features(fake_features, "fake features").to(real.device)  # (M, D)
    if real.shape[1] != fake.shape[1]:
        raise DataError(f"real and fake features differ in dimension: {real.shape[1]} vs {fake.shape[1]}")
    if real_radii is None:
        real_radii = knn_radii(real, (k_pr, k_dc), chunk_size)  # squared radii (N,) each
    if any(real_radii[k].shape != (real.shape[0],) for k in (k_pr, k_dc)):
        raise DataError(f"real_radii must hold ({real.shape[0]},) radii for k = {k_pr} and {k_dc}")
    real_pr, real_dc = real_radii[k_pr].to(real), real_radii[k_dc].to(real)
    fake_pr = knn_radii(fake, (k_pr,), chunk_size)[k_pr]  # squared radii (M,)

    real_sq, fake_sq = (real * real).sum(1), (fake * fake).sum(1)
    fake_in_real_manifold = torch.zeros(fake.shape[0], dtype=torch.bool, device=real.device)  # precision
    real_balls_per_fake = torch.zeros(fake.shape[0], dtype=torch.int32, device=real.device)  # density
    real_in_fake_manifold = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)  # recall
    real_ball_has_fake = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)  # coverage
    for rows in _tiles(real.shape[0], chunk_size):
        for cols in _tiles(fake.shape[0], chunk_size):
            d = _squared_distances(real[rows], fake[cols], real_sq[rows], fake_sq[cols])  # (r, c)
            inside_real_dc = d <= real_dc[rows, None]  # fake j in real ball i (k = 5)
            real_balls_per_fake[cols] += inside_real_dc.view(torch.uint8).sum(dim=0, dtype=torch.int32)  # 3x a bool sum
            real_ball_has_fake[rows] |= inside_real_dc.any(dim=1)
            fake_in_real_manifold[cols] |= (d <= real_pr[rows, None]).any(dim=0)  # (k = 3)
            real_in_fake_manifold[rows] |= (d <= fake_pr[None, cols]).any(dim=1)
    return {
        "precision": float(fake_in_real_manifold.double().mean()),
        "recall": float(real_in_fake_manifold.double().mean()),
        "density": float(real_balls_per_fake.sum().double() / (k_dc * fake.shape[0])),
        "coverage": float(real_ball_has_fake.double().mean()),
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
