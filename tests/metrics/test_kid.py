"""KID against a NumPy unbiased MMD^2 on the same subsets, and against torchmetrics."""

import numpy as np
import pytest
import torch

from genlab.errors import ConfigError, DataError
from genlab.metrics import kid as kid_module
from genlab.metrics.kid import KID, KIDConfig, kernel_inception_distance, kid_real_kernel_sums, mmd2_unbiased
from genlab.metrics.statistics import canonical_order


def _features(n, d, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + shift


def _numpy_mmd2(x, y):
    """Unbiased MMD^2: mean kernel over distinct pairs within each sample, minus twice the cross mean."""
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1.0) ** 3  # noqa: E731
    off_diagonal = ~np.eye(len(x), dtype=bool)
    return k(x, x)[off_diagonal].mean() + k(y, y)[off_diagonal].mean() - 2 * k(x, y).mean()


def _numpy_kid(real, fake, subsets, subset_size, seed):
    """The documented protocol: lexicographic order, then per subset randperm(real), randperm(fake) on one generator."""
    real, fake = real.numpy(), fake.numpy()
    real = real[np.lexsort(real.T[::-1])]
    fake = fake[np.lexsort(fake.T[::-1])]
    m = min(subset_size, len(real), len(fake))
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        i = torch.randperm(len(real), generator=g)[:m].numpy()
        j = torch.randperm(len(fake), generator=g)[:m].numpy()
        values.append(_numpy_mmd2(real[i], fake[j]))
    return np.mean(values), np.std(values)


def test_matches_numpy_estimator_on_the_same_subsets():
    real, fake = _features(150, 8, 0), _features(120, 8, 1, shift=0.4)
    mean, std = kernel_inception_distance(real, fake, subsets=5, subset_size=50, generator=torch.Generator().manual_seed(3))
    ref_mean, ref_std = _numpy_kid(real, fake, subsets=5, subset_size=50, seed=3)
    assert mean == pytest.approx(ref_mean, rel=1e-10)
    assert std == pytest.approx(ref_std, rel=1e-8)
    assert mean > 5 * std > 0  # a shifted distribution is clearly detected


def test_same_distribution_gives_kid_near_zero():
    real, fake = _features(400, 8, 2), _features(400, 8, 3)
    shifted = kernel_inception_distance(real, fake + 0.4, subsets=20, subset_size=200)[0]
    mean, std = kernel_inception_distance(real, fake, subsets=20, subset_size=200)
    # Unbiased: zero in expectation. Over seeds |mean| stayed < 0.025 (subset std ~0.02) while a 0.4 shift
    # gives ~0.7: demand |mean| below 5% of the shifted value.
    assert abs(mean) < 0.05 * shifted
    assert mean == pytest.approx(_numpy_kid(real, fake, 20, 200, 0)[0], rel=1e-9)


def test_identical_sets_match_closed_form():
    # When both subsets are the same m points, the unbiased estimate is -2 (mean k(x_i, x_i) - mean_{i != j}
    # k(x_i, x_j)) / m: it tends to 0 like 1/m (the diagonal is excluded within, included across).
    x = _features(80, 8, 2)
    k = (x @ x.T / 8 + 1) ** 3
    m = 80
    mean_diagonal = k.diagonal().mean()
    mean_off_diagonal = (k.sum() - k.diagonal().sum()) / (m * (m - 1))
    expected = float(-2 * (mean_diagonal - mean_off_diagonal) / m)
    mean, std = kernel_inception_distance(x, x.clone(), subsets=2, subset_size=m)
    assert mean == pytest.approx(expected, rel=1e-10)


def test_reproducible_and_independent_of_order_and_batching():
    real, fake = _features(100, 6, 4), _features(90, 6, 5, shift=0.2)
    one = KID(KIDConfig(subsets=4, subset_size=40, seed=7))
    one.update(real, real=True)
    one.update(fake, real=False)
    streamed = KID(KIDConfig(subsets=4, subset_size=40, seed=7))
    g = torch.Generator().manual_seed(1)
    for batch in fake[torch.randperm(90, generator=g)].split(13):
        streamed.update(batch, real=False)
    for batch in real[torch.randperm(100, generator=g)].split(7):
        streamed.update(batch, real=True)
    a, b = one.compute(), streamed.compute()
    assert a == pytest.approx(b, rel=1e-10, abs=1e-12)
    assert one.compute() == a  # same seed, same value


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_subset_size_is_capped_by_sample_count_and_agrees_with_torchmetrics():
    kid_module = pytest.importorskip("torchmetrics.image.kid")

    class Identity(torch.nn.Module):
        """Features are the inputs."""

        def forward(self, x):
            return x

    real, fake = _features(60, 5, 8), _features(60, 5, 9, shift=0.3)
    # With subsets of all samples every subset is the whole set: the random draws no longer matter.
    metric = kid_module.KernelInceptionDistance(feature=Identity(), subsets=2, subset_size=60)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    theirs = float(metric.compute()[0])
    ours, ours_std = kernel_inception_distance(real, fake, subsets=3, subset_size=1000)
    assert ours == pytest.approx(theirs, rel=1e-8)
    assert ours_std < 1e-12 * abs(ours) + 1e-15


def test_bad_arguments():
    with pytest.raises(ConfigError, match="subset_size"):
        KIDConfig(subset_size=1)
    with pytest.raises(ConfigError, match="subsets"):
        kernel_inception_distance(_features(5, 2, 0), _features(5, 2, 1), subsets=0)
    with pytest.raises(DataError, match="dimension"):
        kernel_inception_distance(_features(5, 2, 0), _features(5, 3, 1))


# ---------------------------------------------------------------------------------- the batched estimator


def _loop_kid(real, fake, subsets, subset_size, seed):
    """The direct implementation the batched one replaced: one subset at a time, full kernel matrices."""
    real, fake = real[canonical_order(real)], fake[canonical_order(fake)]
    m = min(subset_size, len(real), len(fake))
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        x = real[torch.randperm(len(real), generator=g)[:m]]
        y = fake[torch.randperm(len(fake), generator=g)[:m]]
        k_xx, k_yy, k_xy = ((a @ b.T / a.shape[1] + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
        values.append(within - 2 * k_xy.sum() / (m * m))
    values = torch.stack(values)
    return float(values.mean()), float(values.std(correction=0))


def test_unbiased_mmd2_of_a_batch_equals_the_sum_over_distinct_pairs():
    """Tiny sets, every pair spelled out: (1 / m(m-1)) sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] - (2 / m^2) sum k(x_i, y_j)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 5, 4, generator=g, dtype=torch.float64), torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    k = lambda a, b: (float(a @ b) / 4 + 1) ** 3  # noqa: E731
    m = 5
    for s in range(3):
        within = sum(k(x[s, i], x[s, j]) + k(y[s, i], y[s, j]) for i in range(m) for j in range(m) if i != j)
        across = sum(k(x[s, i], y[s, j]) for i in range(m) for j in range(m))
        assert float(mmd2_unbiased(x, y)[s]) == pytest.approx(within / (m * (m - 1)) - 2 * across / m**2, rel=1e-12)


@pytest.mark.parametrize("n_real, n_fake, dim, subsets, subset_size, batch_elements", [
    (150, 120, 8, 7, 50, 3 * 50 * 50),  # 3 subsets per batch: batches of 3, 3, 1
    (90, 200, 5, 5, 37, 2**22),  # odd m: uneven symmetric blocks
    (10, 12, 3, 4, 3, 1),  # m = 3 < 4 blocks; one subset per batch
])
def test_batched_subsets_equal_the_one_subset_at_a_time_loop(n_real, n_fake, dim, subsets, subset_size,
                                                             batch_elements, monkeypatch):
    monkeypatch.setattr(kid_module, "_BATCH_ELEMENTS", batch_elements)
    real, fake = _features(n_real, dim, 10).relu(), _features(n_fake, dim, 11, shift=0.3).relu()
    ours = kernel_inception_distance(real, fake, subsets, subset_size, generator=torch.Generator().manual_seed(4))
    reference = _loop_kid(real, fake, subsets, subset_size, seed=4)
    assert ours == pytest.approx(reference, rel=1e-11, abs=1e-15)


def _numpy_real_sums(real, n_fake, subsets, subset_size, seed):
    """sum_{i != j} k(x_i, x_j) over the reals of each subset of the documented protocol (see _numpy_kid)."""
    real = real.numpy()
    real = real[np.lexsort(real.T[::-1])]
    m = min(subset_size, len(real), n_fake)
    g = torch.Generator().manual_seed(seed)
    sums = []
    for _ in range(subsets):
        x = real[torch.randperm(len(real), generator=g)[:m].numpy()]
        torch.randperm(n_fake, generator=g)  # the fake draw of the subset: only its count matters
        k = (x @ x.T / x.shape[1] + 1.0) ** 3
        sums.append(k.sum() - np.trace(k))
    return np.array(sums)


@pytest.mark.parametrize("n_real, n_fake, subsets, subset_size", [(150, 120, 7, 50), (40, 90, 3, 1000)])
def test_cached_real_kernel_sums_are_the_subsets_sums_and_leave_kid_unchanged(n_real, n_fake, subsets, subset_size):
    real, fake = _features(n_real, 6, 12).relu(), _features(n_fake, 6, 13, shift=0.2).relu()
    sums = kid_real_kernel_sums(real[torch.randperm(n_real)], n_fake, subsets, subset_size,
                                generator=torch.Generator().manual_seed(5))  # any order of the reals
    np.testing.assert_allclose(sums.numpy(), _numpy_real_sums(real, n_fake, subsets, subset_size, 5), rtol=1e-12)
    direct = kernel_inception_distance(real, fake, subsets, subset_size, generator=torch.Generator().manual_seed(5))
    cached = kernel_inception_distance(real, fake, subsets, subset_size, generator=torch.Generator().manual_seed(5),
                                       real_kernel_sums=sums)
    assert cached == pytest.approx(direct, rel=1e-12, abs=1e-15)
    # The sums are used as given: other sums give another KID; sums for the wrong subset count are refused.
    assert kernel_inception_distance(real, fake, subsets, subset_size, generator=torch.Generator().manual_seed(5),
                                     real_kernel_sums=sums * 1.01)[0] > direct[0]
    with pytest.raises(DataError, match="real_kernel_sums"):
        kernel_inception_distance(real, fake, subsets + 1, subset_size, real_kernel_sums=sums)


def test_unbiased_mmd2_stays_differentiable():
    """The kernel works in place, yet autograd's gradients match finite differences (an MMD can be a loss)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: mmd2_unbiased(a, b), (x, y))
