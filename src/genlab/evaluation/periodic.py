"""Evaluation during training: the trainer's ``train.eval_every`` hook (injected, never imported by train/)."""

from __future__ import annotations

import os
from typing import Sequence

import torch

from genlab.data import from_model_range
from genlab.evaluation.common import parse_ref, resolve_extractor
from genlab.evaluation.generation import score_images
from genlab.evaluation.reference import reference_stats
from genlab.metrics.extractors import FeatureExtractor
from genlab.runs import per_sample_slice


def periodic_eval(
    method,
    *,
    ref: str = "mnist:test",
    n: int = 1000,
    metrics: Sequence[str] | str = ("fid", "kid"),
    seed: int = 0,
    extractor: str | os.PathLike | FeatureExtractor | None = None,
    data_root: str | os.PathLike | None = None,
    batch_size: int = 250,
    sample_options: dict | None = None,
) -> dict[str, float]:
    """Sample ``n`` images from ``method`` (with whatever weights it holds now) and score them: flat log values.

    For the trainer's ``train.eval_every``: call it with the EMA weights swapped in and log the result
    as ``kind="eval"``. The reference comes from the cache after the first call. Returns e.g.
    ``{"fid": ..., "kid": ..., "kid_std": ..., "eval_n": n}``.
    """
    device = method.device
    source, split = parse_ref(ref)
    extractor = resolve_extractor(extractor, source, device)
    reference = reference_stats(source, split, extractor, data_root=data_root, batch_size=batch_size, device=device)
    generator = torch.Generator().manual_seed(seed)  # fixed seed: scores at different steps are comparable
    was_training = method.training
    method.eval()
    try:
        chunks = []
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            options = per_sample_slice(sample_options or {}, start, start + m)  # the class, map or prompt of each sample
            chunks.append(from_model_range(method.sample(m, generator=generator, **options).cpu()))
    finally:
        method.train(was_training)
    values, stds = score_images(torch.cat(chunks), reference, extractor, metrics, seed=seed, batch_size=batch_size,
                                device=device)
    return {**values, **{f"{k}_std": v for k, v in stds.items()}, "eval_n": n}
