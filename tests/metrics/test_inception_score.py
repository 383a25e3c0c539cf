"""Inception Score: closed forms (uniform -> 1, confident and balanced -> C), torchmetrics, invariances."""

import numpy as np
import pytest
import torch

from genlab.errors import ConfigError, DataError
from genlab.metrics.inception_score import InceptionScore, InceptionScoreConfig, inception_score, marginal_class_entropy


def _dirichlet(n, c, seed, concentration=0.3):
    g = torch.Generator().manual_seed(seed)
    gammas = -torch.log(torch.rand(n, c, generator=g, dtype=torch.float64))  # Gamma(1) draws
    weights = gammas ** (1 / concentration)  # sharper rows
    return weights / weights.sum(dim=1, keepdim=True)


def _numpy_inception_score(p, splits, seed):
    """The documented protocol in NumPy: lexicographic order, randperm(seed), contiguous splits."""
    p = p.numpy()
    p = p[np.lexsort(p.T[::-1])]
    p = p[torch.randperm(len(p), generator=torch.Generator().manual_seed(seed)).numpy()]
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(axis=0)
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(marginal)), axis=1))))
    return np.mean(scores), np.std(scores)


def test_matches_numpy_reference_with_splits():
    p = _dirichlet(203, 6, seed=4)  # 203 = uneven splits
    mean, std = inception_score(p, splits=7, generator=torch.Generator().manual_seed(5))
    ref_mean, ref_std = _numpy_inception_score(p, 7, 5)
    assert mean == pytest.approx(ref_mean, rel=1e-10)
    assert std == pytest.approx(ref_std, rel=1e-8)


def test_uniform_predictions_score_one():
    mean, std = inception_score(torch.full((100, 10), 0.1, dtype=torch.float64), splits=5)
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("classes", [2, 10])
def test_confident_balanced_predictions_score_number_of_classes(classes):
    one_hot = torch.eye(classes, dtype=torch.float64).repeat(50, 1)  # (50 C, C), each class 50 times
    mean, _ = inception_score(one_hot, splits=1)
    assert mean == pytest.approx(classes, rel=1e-12)
    # With random splits each split's score is exp(entropy of its class histogram) <= C.
    mean_split, _ = inception_score(one_hot, splits=5)
    assert 0.8 * classes < mean_split <= classes + 1e-9


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_agrees_with_torchmetrics_single_split():
    inception = pytest.importorskip("torchmetrics.image.inception")

    class LogProbabilities(torch.nn.Module):
        """Returns log p as 'logits': torchmetrics' softmax turns them back into p."""

        def forward(self, p):
            return p.log()

    p = _dirichlet(400, 10, seed=0)
    metric = inception.InceptionScore(feature=LogProbabilities(), splits=1)
    metric.update(p)
    theirs = float(metric.compute()[0])
    ours, _ = inception_score(p, splits=1)
    assert 1.5 < ours < 10
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_streaming_is_independent_of_order_and_batching():
    p = _dirichlet(300, 7, seed=1)
    one = InceptionScore(InceptionScoreConfig(splits=10, seed=3))
    one.update(p)
    streamed = InceptionScore(InceptionScoreConfig(splits=10, seed=3))
    for batch in p[torch.randperm(300, generator=torch.Generator().manual_seed(2))].split(23):
        streamed.update(batch)
    a, b = one.compute(), streamed.compute()
    assert a[0] == pytest.approx(b[0], rel=1e-10)
    assert a[1] == pytest.approx(b[1], rel=1e-8, abs=1e-12)
    assert a[1] > 0  # splits differ


def test_bad_input():
    with pytest.raises(DataError, match="softmax"):
        inception_score(torch.randn(10, 3), splits=1)
    with pytest.raises(ConfigError, match="splits"):
        inception_score(torch.full((4, 2), 0.5), splits=5)
    with pytest.raises(ConfigError, match="splits"):
        InceptionScoreConfig(splits=0)


def test_marginal_class_entropy_is_the_entropy_of_the_mean_prediction_and_the_diversity_half_of_is():
    probabilities = torch.softmax(torch.randn(200, 10, generator=torch.Generator().manual_seed(1)) * 3, dim=1).double()
    p_y = probabilities.numpy().mean(axis=0)
    assert marginal_class_entropy(probabilities) == pytest.approx(-(p_y * np.log(p_y)).sum(), rel=1e-12)
    # IS (one split) = exp(H(p(y)) - E_x H(p(y|x))).
    conditional = -(probabilities * probabilities.log()).sum(dim=1).mean().item()
    score, _ = inception_score(probabilities, splits=1)
    assert score == pytest.approx(np.exp(marginal_class_entropy(probabilities) - conditional), rel=1e-9)
    one_hot = torch.eye(10, dtype=torch.float64)
    assert marginal_class_entropy(one_hot.repeat(3, 1)) == pytest.approx(np.log(10), rel=1e-12)  # every class
    assert marginal_class_entropy(one_hot[[4] * 30]) == 0.0  # one class only
