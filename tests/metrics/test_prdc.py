"""Precision/recall and density/coverage on synthetic Gaussians, exact cases, and a brute-force reference."""

import math

import numpy as np
import pytest
import torch

from genlab.errors import ConfigError, DataError
from genlab.metrics.prdc import PRDC, PRDCConfig, precision_recall_density_coverage


def _gaussian(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _brute_force(real, fake, k_pr=3, k_dc=5):
    """Full-matrix NumPy reference (Naeem et al.'s formulas, k-th neighbour excluding the sample itself)."""
    real, fake = real.numpy(), fake.numpy()
    dist = lambda a, b: np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))  # noqa: E731
    rr, ff, rf = dist(real, real), dist(fake, fake), dist(real, fake)
    r_pr, r_dc = np.sort(rr, axis=1)[:, k_pr], np.sort(rr, axis=1)[:, k_dc]
    f_pr = np.sort(ff, axis=1)[:, k_pr]
    return {
        "precision": (rf <= r_pr[:, None]).any(axis=0).mean(),
        "recall": (rf <= f_pr[None, :]).any(axis=1).mean(),
        "density": (rf <= r_dc[:, None]).sum() / (k_dc * len(fake)),
        "coverage": (rf.min(axis=1) <= r_dc).mean(),
    }


def test_matches_brute_force_reference_with_small_chunks():
    real, fake = _gaussian(150, 5, 0), _gaussian(130, 5, 1) * 1.3 + 0.3
    ours = precision_recall_density_coverage(real, fake, chunk_size=17)
    reference = _brute_force(real, fake)
    for name, value in reference.items():
        assert ours[name] == pytest.approx(value, abs=1e-12), name
    assert 0.1 < ours["precision"] < 0.99 and 0.1 < ours["recall"] < 0.99  # a non-trivial case


def test_identical_distributions():
    # N = M = 2000 two-dimensional Gaussians. Precision and recall average 0.98 (sd 0.004 over 20 seeds):
    # they fall short of 1 only where the k = 3 balls leave gaps in the sparse tails. Density is 1 in
    # expectation (sd 0.013). Coverage's exact expectation for identical distributions is
    # 1 - prod_{i<k} (N-1-i)/(N+M-1-i) (the k nearest other samples are all reals), ~1 - 2^-5; sd 0.006.
    n, k = 2000, 5
    result = precision_recall_density_coverage(_gaussian(n, 2, 2), _gaussian(n, 2, 3))
    expected_coverage = 1 - math.prod((n - 1 - i) / (2 * n - 1 - i) for i in range(k))
    assert expected_coverage == pytest.approx(1 - 2**-k, abs=1e-3)
    assert result["precision"] > 0.96 and result["recall"] > 0.96
    assert result["density"] == pytest.approx(1.0, abs=0.05)  # 4 sd
    assert result["coverage"] == pytest.approx(expected_coverage, abs=0.025)  # 4 sd


def test_identical_sets_are_fully_precise_and_covered():
    x = _gaussian(300, 8, 4)
    result = precision_recall_density_coverage(x, x.clone())
    assert result["precision"] == 1.0 and result["recall"] == 1.0 and result["coverage"] == 1.0


def test_mode_collapse_keeps_precision_and_loses_recall_and_coverage():
    real = _gaussian(1000, 4, 5)
    collapsed = real[0] + 1e-3 * _gaussian(1000, 4, 6)  # every fake sits next to real sample 0
    result = precision_recall_density_coverage(real, collapsed)
    assert result["precision"] == 1.0
    assert result["recall"] <= 2 / 1000
    # Covered reals are real 0 and the reals whose k = 5 ball reaches it (its reverse neighbours, 5 on average).
    assert result["coverage"] <= 20 / 1000


def test_streaming_is_independent_of_order_batching_and_chunk_size():
    real, fake = _gaussian(400, 6, 7), _gaussian(350, 6, 8) + 0.2
    one = PRDC()
    one.update(real, real=True)
    one.update(fake, real=False)
    streamed = PRDC(PRDCConfig(chunk_size=33))
    g = torch.Generator().manual_seed(0)
    for batch in fake[torch.randperm(350, generator=g)].split(41):
        streamed.update(batch, real=False)
    for batch in real[torch.randperm(400, generator=g)].split(9):
        streamed.update(batch, real=True)
    a, b = one.compute(), streamed.compute()
    for name in a:
        assert a[name] == pytest.approx(b[name], abs=1e-10), name


def test_bad_arguments():
    with pytest.raises(ConfigError, match="k_density_coverage"):
        PRDCConfig(k_density_coverage=0)
    with pytest.raises(DataError, match="more than 5 samples"):
        precision_recall_density_coverage(_gaussian(5, 2, 0), _gaussian(50, 2, 1))
