"""Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) from class probabilities."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genlab.errors import ConfigError, DataError
from genlab.metrics.statistics import FeatureBank, as_features, canonical_order

__all__ = ["InceptionScoreConfig", "inception_score", "InceptionScore", "marginal_class_entropy"]


@dataclass
class InceptionScoreConfig:
    """Options of the Inception Score: number of splits and the seed that assigns samples to splits."""

    splits: int = 10
    seed: int = 0

    def __post_init__(self):
        if self.splits < 1:
            raise ConfigError(f"inception score splits must be >= 1, got {self.splits}")


def marginal_class_entropy(probabilities: torch.Tensor) -> float:
    """H(p(y)) in nats, p(y) the mean over samples of the class probabilities p(y|x) (N, C).

    The diversity half of the Inception Score (IS = exp(H(p(y)) - E_x H(p(y|x)))): ln C when the
    samples spread evenly over the C classes, 0 when every sample is the same class.
    """
    p_y = as_features(probabilities, "class probabilities").mean(dim=0)  # (C,)
    return float(-torch.special.xlogy(p_y, p_y).sum())


def inception_score(probabilities, splits: int = 10, generator: torch.Generator | None = None) -> tuple[float, float]:
    """Mean and (population) std over ``splits`` disjoint splits of exp(E_x KL(p(y|x) || p(y))).

    ``probabilities`` (N, C) are class probabilities p(y|x) (rows sum to 1; apply softmax to logits
    first). p(y) is the mean of p(y|x) within each split, as in Salimans et al.'s code. Samples are put
    in a canonical order and then shuffled with ``generator`` (default: CPU generator seeded with 0)
    before splitting: the score depends on the set of samples, not on their order, and splits stay
    unbiased random subsets.
    """
    InceptionScoreConfig(splits=splits)
    p_y_given_x = as_features(probabilities, "class probabilities")  # (N, C)
    if (p_y_given_x < 0).any() or not torch.allclose(
        p_y_given_x.sum(dim=1), torch.ones((), dtype=torch.float64, device=p_y_given_x.device), atol=1e-4
    ):
        raise DataError("class probabilities must be >= 0 and sum to 1 per row; apply softmax to logits first")
    n = p_y_given_x.shape[0]
    if splits > n:
        raise ConfigError(f"inception score splits ({splits}) exceed the number of samples ({n}); lower splits")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    p_y_given_x = p_y_given_x[canonical_order(p_y_given_x)]
    p_y_given_x = p_y_given_x[torch.randperm(n, generator=generator).to(p_y_given_x.device)]
    scores = []
    for split in torch.tensor_split(p_y_given_x, splits):  # (N / splits, C) each
        p_y = split.mean(dim=0, keepdim=True)  # (1, C) marginal over the split
        # KL(p(y|x) || p(y)) = sum_y p(y|x) (log p(y|x) - log p(y)); xlogy gives 0 log 0 = 0.
        kl = (torch.special.xlogy(split, split) - torch.special.xlogy(split, p_y)).sum(dim=1)  # (N / splits,)
        scores.append(kl.mean().exp())
    scores = torch.stack(scores)
    # Population std (ddof = 0), as np.std in Salimans et al.'s code.
    return float(scores.mean()), float(scores.std(correction=0))


class InceptionScore:
    """Streaming Inception Score: accumulate class probabilities, compute over all processes."""

    def __init__(self, config: InceptionScoreConfig | None = None):
        self.config = config if config is not None else InceptionScoreConfig()
        self.probabilities = FeatureBank()

    def update(self, probabilities) -> None:
        """Add a batch of class probabilities (N, C)."""
        self.probabilities.update(probabilities)

    def compute(self) -> tuple[float, float]:
        """(mean, std) of the Inception Score over the configured splits."""
        return inception_score(
            self.probabilities.gather(),
            splits=self.config.splits,
            generator=torch.Generator().manual_seed(self.config.seed),
        )
