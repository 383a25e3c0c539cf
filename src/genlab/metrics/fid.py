"""Frechet Inception Distance (Heusel et al. 2017): the Frechet distance between Gaussian fits of features."""

from __future__ import annotations

import torch

from genlab.errors import ConfigError, DataError
from genlab.metrics.statistics import GaussianStats

__all__ = ["frechet_distance", "FID"]


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Principal square root of a symmetric positive semi-definite matrix (D, D) via its eigendecomposition."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    # Rounding can push zero eigenvalues (rank-deficient covariances, N < D) slightly negative.
    return (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians, in float64.

    tr((S1 S2)^(1/2)) is computed as tr((S1^(1/2) S2 S1^(1/2))^(1/2)): the two matrices are similar, and the
    second is symmetric PSD, so symmetric eigendecompositions give it robustly even for singular
    covariances (no eps offset needed, unlike scipy.linalg.sqrtm of the non-symmetric product).
    """
    mu1, mu2 = (torch.as_tensor(m).to(torch.float64) for m in (mu1, mu2))
    sigma1, sigma2 = (torch.as_tensor(s).to(device=mu1.device, dtype=torch.float64) for s in (sigma1, sigma2))
    mu2 = mu2.to(mu1.device)
    dim = mu1.shape[0]
    if mu1.ndim != 1 or tuple(mu2.shape) != (dim,) or any(tuple(s.shape) != (dim, dim) for s in (sigma1, sigma2)):
        raise DataError(
            f"Frechet distance needs means (D,) and covariances (D, D) of one D; got {tuple(mu1.shape)}, "
            f"{tuple(sigma1.shape)}, {tuple(mu2.shape)}, {tuple(sigma2.shape)}"
        )
    if not all(torch.isfinite(t).all() for t in (mu1, mu2, sigma1, sigma2)):
        raise DataError("Frechet distance got NaN or infinite statistics; check the features")
    sqrt_sigma1 = _sqrtm_psd(sigma1)
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1  # (D, D), similar to S1 S2
    middle = (middle + middle.T) / 2
    trace_sqrt_product = torch.linalg.eigvalsh(middle).clamp_min(0).sqrt().sum()
    difference = mu1 - mu2
    distance = difference @ difference + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt_product
    # The distance is >= 0; a tiny negative value is rounding of identical statistics.
    return max(float(distance), 0.0)


class FID:
    """Streaming FID: feed real and fake features, or load cached reference statistics for the real side."""

    def __init__(self, reference: GaussianStats | None = None):
        self.real = reference if reference is not None else GaussianStats()
        self.fake = GaussianStats()
        # Cached reference statistics are the same on every process: they must not be summed across processes.
        self._real_is_reference = reference is not None

    def update(self, features, real: bool) -> None:
        """Add a batch of features (N, D) to the real or the fake side."""
        if real:
            if self._real_is_reference:
                raise ConfigError("this FID was built from reference statistics; update(real=True) is not allowed")
            self.real.update(features)
        else:
            self.fake.update(features)

    def compute(self) -> float:
        """FID between all real and all fake features seen so far (by every process when distributed)."""
        real = self.real if self._real_is_reference else self.real.copy().all_reduce()
        fake = self.fake.copy().all_reduce()
        return frechet_distance(fake.mean, fake.covariance, real.mean, real.covariance)
