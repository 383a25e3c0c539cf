"""Frechet distance against scipy.linalg.sqrtm, closed forms, and torchmetrics' FID."""

import numpy as np
import pytest
import scipy.linalg
import torch

from genlab.errors import ConfigError, DataError
from genlab.metrics.fid import FID, frechet_distance
from genlab.metrics.statistics import GaussianStats


def _gaussian(n, d, seed, shift=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g, dtype=torch.float64) * scale / d**0.5
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mixing + shift


def _reference_fid(x, y):
    """FID in float64 the classic way: scipy's sqrtm of the non-symmetric product S1 S2."""
    x, y = x.numpy(), y.numpy()
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _stats(x):
    return GaussianStats().update(x)


def test_frechet_distance_matches_scipy_sqrtm():
    x = _gaussian(600, 32, seed=0)
    y = _gaussian(500, 32, seed=1, shift=0.3, scale=1.5)
    a, b = _stats(x), _stats(y)
    ours = frechet_distance(a.mean, a.covariance, b.mean, b.covariance)
    reference = _reference_fid(x, y)
    assert reference > 1.0  # a non-trivial distance
    assert abs(ours - reference) / reference < 1e-4
    # Symmetric in its two arguments.
    assert frechet_distance(b.mean, b.covariance, a.mean, a.covariance) == pytest.approx(ours, rel=1e-10)


def test_equal_covariances_give_squared_mean_distance():
    sigma = np.cov(_gaussian(400, 24, seed=2).numpy(), rowvar=False)
    g = torch.Generator().manual_seed(4)
    mu1, mu2 = torch.randn(24, generator=g, dtype=torch.float64), torch.randn(24, generator=g, dtype=torch.float64)
    expected = float(((mu1 - mu2) ** 2).sum())
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(expected, rel=1e-8)


def test_identical_sets_give_zero_even_with_singular_covariance():
    x = _gaussian(500, 16, seed=5)
    s = _stats(x)
    assert frechet_distance(s.mean, s.covariance, s.mean, s.covariance) == pytest.approx(0.0, abs=1e-8)
    # N < D: rank-deficient covariance (scipy's sqrtm would need an eps offset here).
    few = _gaussian(20, 64, seed=6)
    s = _stats(few)
    scale = float(s.covariance.trace())
    assert frechet_distance(s.mean, s.covariance, s.mean, s.covariance) < 1e-6 * scale


def test_one_dimensional_closed_form():
    # FID of N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2.
    value = frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-2.0]), torch.tensor([[0.25]]))
    assert value == pytest.approx(3.0**2 + (2.0 - 0.5) ** 2, rel=1e-12)


def test_fid_class_is_batch_and_order_invariant_and_accepts_reference_stats():
    x = _gaussian(400, 12, seed=7)
    y = _gaussian(300, 12, seed=8, shift=0.5)
    one = FID()
    one.update(x, real=True)
    one.update(y, real=False)
    streamed = FID()
    permutation = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    for batch in y[permutation].split(17):
        streamed.update(batch, real=False)
    for batch in x.split(64):
        streamed.update(batch, real=True)
    assert streamed.compute() == pytest.approx(one.compute(), rel=1e-10, abs=1e-10)
    assert one.compute() == pytest.approx(_reference_fid(y, x), rel=1e-4)
    cached = FID(reference=_stats(x))
    cached.update(y, real=False)
    assert cached.compute() == pytest.approx(one.compute(), rel=1e-12)
    with pytest.raises(ConfigError, match="reference"):
        cached.update(x, real=True)


def test_mismatched_shapes_raise_data_error():
    with pytest.raises(DataError, match="D"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))


def test_agrees_with_torchmetrics_fid():
    fid_module = pytest.importorskip("torchmetrics.image.fid")

    class Identity(torch.nn.Module):
        """Features are the inputs: lets torchmetrics' FID run on precomputed features."""

        num_features = 10

        def forward(self, x):
            return x

    x = _gaussian(300, 10, seed=9)
    y = _gaussian(250, 10, seed=10, shift=0.2, scale=0.7)
    metric = fid_module.FrechetInceptionDistance(feature=Identity())
    metric.update(x, real=True)
    metric.update(y, real=False)
    ours = FID()
    ours.update(x, real=True)
    ours.update(y, real=False)
    assert ours.compute() == pytest.approx(float(metric.compute()), rel=1e-6)
