"""Precision/recall and density/coverage on synthetic Gaussians, exact cases, and a brute-force reference."""

import math

import numpy as np
import pytest
import torch

from genlab.errors import ConfigError, DataError
from genlab.metrics.prdc import PRDC, PRDCConfig, knn_radii, precision_recall_density_coverage


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


# ------------------------------------------------------------------------ the tiled, shared-radii pass


def _row_chunked_reference(real, fake, k_pr=3, k_dc=5, chunk_size=1024):
    """The direct implementation the tiled one replaced: full rows of distances, one top-k per set and radius."""
    sq = lambda x, y: ((x * x).sum(1, keepdim=True) + (y * y).sum(1) - 2 * x @ y.T).clamp_min(0)  # noqa: E731

    def radius(x, k):
        return torch.cat([sq(c, x).topk(k + 1, dim=1, largest=False).values[:, k] for c in torch.split(x, chunk_size)])

    r_pr, r_dc, f_pr = radius(real, k_pr), radius(real, k_dc), radius(fake, k_pr)
    d = sq(real, fake)  # (N, M)
    return {
        "precision": float((d <= r_pr[:, None]).any(0).double().mean()),
        "recall": float((d <= f_pr[None, :]).any(1).double().mean()),
        "density": float((d <= r_dc[:, None]).sum().double() / (k_dc * fake.shape[0])),
        "coverage": float((d <= r_dc[:, None]).any(1).double().mean()),
    }


@pytest.mark.parametrize("n_real, n_fake, dim, chunk_size, k_pr, k_dc", [
    (700, 500, 16, 128, 3, 5),  # tiles that do not divide either set
    (300, 301, 4, 1024, 3, 5),  # one tile each
    (257, 64, 3, 50, 1, 7),  # other k, fewer fakes than a row of tiles
])
def test_equals_the_row_chunked_implementation(n_real, n_fake, dim, chunk_size, k_pr, k_dc):
    real = _gaussian(n_real, dim, 20).relu()  # post-ReLU features, with exact zeros
    fake = (_gaussian(n_fake, dim, 21) * 1.2 + 0.1).relu()
    fake[:10] = real[:10]  # fakes that copy reals: distance 0
    ours = precision_recall_density_coverage(real, fake, k_pr, k_dc, chunk_size)
    assert ours == _row_chunked_reference(real, fake, k_pr, k_dc)  # exactly: the same decisions


def test_knn_radii_equal_sorted_brute_force_distances_at_any_tile_size():
    x = _gaussian(103, 6, 22)
    d = ((x[:, None] - x[None]) ** 2).sum(-1).sort(dim=1).values  # (N, N), column 0 is the sample itself
    for chunk_size in (3, 7, 64, 500):
        radii = knn_radii(x, (1, 3, 5), chunk_size)
        for k in (1, 3, 5):
            assert torch.allclose(radii[k], d[:, k], rtol=1e-12, atol=1e-12), (chunk_size, k)


def test_points_on_a_line_with_known_answers():
    # Reals at 0, 1, ..., 9: 1st-neighbour radius 1; 2nd-neighbour radius 1 inside, 2 at both ends.
    # Fakes 0.5, 4.2, 20: 1st-neighbour radii 3.7, 3.7, 15.8.
    # Precision: 0.5 and 4.2 lie in a real ball, 20 does not -> 2/3. Recall: every real lies within 3.7 of
    # 0.5 or 4.2 or within 15.8 of 20 -> 1. Density (k = 2): 0.5 is in the balls of reals 0 and 1, 4.2 in
    # those of 4 and 5, 20 in none -> 4 / (2 * 3). Coverage: reals 0, 1, 4, 5 hold a fake -> 0.4.
    line = lambda *t: torch.tensor([[v, 0.0] for v in t], dtype=torch.float64)  # noqa: E731
    result = precision_recall_density_coverage(line(*range(10)), line(0.5, 4.2, 20.0), k_precision_recall=1,
                                               k_density_coverage=2, chunk_size=3)
    assert result == pytest.approx({"precision": 2 / 3, "recall": 1.0, "density": 2 / 3, "coverage": 0.4}, abs=1e-15)


def test_given_real_radii_are_used_as_they_are():
    real, fake = _gaussian(200, 5, 23), _gaussian(180, 5, 24) + 0.3
    radii = knn_radii(real, (3, 5))
    assert precision_recall_density_coverage(real, fake, real_radii=radii) == precision_recall_density_coverage(real, fake)
    wider = {k: 4 * r for k, r in radii.items()}  # balls of twice the radius hold more fakes
    assert precision_recall_density_coverage(real, fake, real_radii=wider)["precision"] > \
        precision_recall_density_coverage(real, fake)["precision"]
    with pytest.raises(DataError, match="real_radii"):
        precision_recall_density_coverage(real, fake, real_radii={3: radii[3][:10], 5: radii[5]})
