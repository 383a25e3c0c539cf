"""GaussianStats and FeatureBank: float64 streaming statistics, invariant to batching, order and merging."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from genlab.errors import DataError
from genlab.metrics.statistics import FeatureBank, GaussianStats, canonical_order


def _features(n=300, d=16, seed=0, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g)
    return (torch.randn(n, d, generator=g) @ mixing + offset).float()  # float32 input, like a network's output


def _stream(features, batch_size, order=None):
    stats = GaussianStats()
    x = features if order is None else features[order]
    for batch in x.split(batch_size):
        stats.update(batch)
    return stats


def test_mean_and_unbiased_covariance_match_numpy():
    x = _features()
    stats = _stream(x, 64)
    reference = x.double().numpy()
    assert stats.n == 300
    assert stats.mean.dtype == torch.float64
    np.testing.assert_allclose(stats.mean.numpy(), reference.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.covariance.numpy(), np.cov(reference, rowvar=False, ddof=1), rtol=1e-10, atol=1e-10)


def test_statistics_do_not_depend_on_batch_size_or_order():
    x = _features()
    one_pass = _stream(x, 300)
    permutation = torch.randperm(300, generator=torch.Generator().manual_seed(1))
    for other in (_stream(x, 7), _stream(x, 1), _stream(x, 64, order=permutation)):
        torch.testing.assert_close(other.mean, one_pass.mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(other.covariance, one_pass.covariance, rtol=1e-10, atol=1e-10)


def test_merge_of_two_halves_equals_one_pass():
    x = _features()
    merged = _stream(x[:120], 50).merge(_stream(x[120:], 33))
    one_pass = _stream(x, 300)
    assert merged.n == one_pass.n
    torch.testing.assert_close(merged.mean, one_pass.mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(merged.covariance, one_pass.covariance, rtol=1e-10, atol=1e-10)
    # Merging into an empty accumulator copies; merging an empty one changes nothing.
    torch.testing.assert_close(GaussianStats().merge(one_pass).covariance, one_pass.covariance, rtol=0, atol=0)
    torch.testing.assert_close(one_pass.copy().merge(GaussianStats()).mean, one_pass.mean, rtol=0, atol=0)


def test_all_reduce_is_a_no_op_without_a_process_group():
    stats = _stream(_features(), 100)
    before = stats.covariance.clone()
    assert stats.all_reduce() is stats
    torch.testing.assert_close(stats.covariance, before, rtol=0, atol=0)


def test_state_dict_round_trips_through_safetensors(tmp_path):
    stats = _stream(_features(), 100)
    save_file(stats.state_dict(), str(tmp_path / "ref.safetensors"))
    restored = GaussianStats.from_state_dict(load_file(str(tmp_path / "ref.safetensors")))
    assert restored.n == stats.n
    torch.testing.assert_close(restored.mean, stats.mean, rtol=0, atol=0)
    torch.testing.assert_close(restored.covariance, stats.covariance, rtol=0, atol=0)
    stats.save(tmp_path / "ref2.safetensors")
    torch.testing.assert_close(GaussianStats.load(tmp_path / "ref2.safetensors").covariance, stats.covariance, rtol=0, atol=0)


def test_bad_input_raises_data_error(tmp_path):
    stats = GaussianStats().update(torch.zeros(3, 4))
    with pytest.raises(DataError, match="dimension 5"):
        stats.update(torch.zeros(2, 5))
    with pytest.raises(DataError, match="NaN"):
        stats.update(torch.full((2, 4), float("nan")))
    with pytest.raises(DataError, match="at least 2"):
        GaussianStats().update(torch.zeros(1, 4)).covariance
    with pytest.raises(DataError, match="no Gaussian statistics file"):
        GaussianStats.load(tmp_path / "missing.safetensors")
    with pytest.raises(DataError, match="lack"):
        GaussianStats.from_state_dict({"n": torch.tensor(3)})


def test_feature_bank_keeps_float64_rows_in_update_order():
    x = _features(50, 4)
    bank = FeatureBank()
    for batch in x.split(8):
        bank.update(batch)
    assert len(bank) == 50
    torch.testing.assert_close(bank.gather(), x.double(), rtol=0, atol=0)
    with pytest.raises(DataError, match="no features"):
        FeatureBank().features()


def test_canonical_order_is_lexicographic_and_order_free():
    x = torch.tensor([[1.0, 2.0], [0.0, 5.0], [1.0, -1.0], [0.0, 5.0]], dtype=torch.float64)
    torch.testing.assert_close(x[canonical_order(x)], torch.tensor([[0.0, 5.0], [0.0, 5.0], [1.0, -1.0], [1.0, 2.0]], dtype=torch.float64))
    y = _features(200, 8).double()
    shuffled = y[torch.randperm(200, generator=torch.Generator().manual_seed(3))]
    torch.testing.assert_close(y[canonical_order(y)], shuffled[canonical_order(shuffled)], rtol=0, atol=0)
