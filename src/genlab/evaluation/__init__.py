"""The evaluation pipeline: score a run or a file of images, with the protocol every number carries (SPEC E1-E5).

    from genlab.evaluation import evaluate
    result = evaluate("runs/demo", ref="mnist:test", n=10000, sampler="ddim", steps=50)
    result["metrics"]["fid"], result["std"]["kid"], result["protocol"]["extractor_sha256"]

One module per job:

- :mod:`~genlab.evaluation.reference`: the real side (Gaussian statistics, features, class
  probabilities) of a data split, cached under ``$GENLAB_CACHE/refs`` by a key checked on read.
- :mod:`~genlab.evaluation.generation`: samples of a run (or an ``.npz``, or a split) scored with
  FID / KID / IS / PR / DC and class accuracy; says how many images and how long before sampling.
- :mod:`~genlab.evaluation.reconstruction` and :mod:`~genlab.evaluation.translation`: held-out
  images through an autoencoder or an image-to-image run (MSE / PSNR / SSIM, ELBO, codebook usage).
- :mod:`~genlab.evaluation.dispatch`: :func:`evaluate` / :func:`evaluate_all` pick the scoring from
  the run's declared capabilities (``kind="auto"``).
- :mod:`~genlab.evaluation.store`: ``metrics.json``, one entry per protocol, merged under a lock.
- :mod:`~genlab.evaluation.periodic`: the trainer's ``train.eval_every`` hook.
- :mod:`~genlab.evaluation.evaluators`: a trained classifier exported as a user evaluator.

The comparison tables and chart of several runs live in :mod:`genlab.report` (which reads the
store; evaluation never imports report).
"""

from __future__ import annotations

from genlab.evaluation.common import DEFAULT_EXTRACTORS
from genlab.evaluation.dispatch import KINDS, evaluate, evaluate_all, evaluate_run, kinds_for
from genlab.evaluation.evaluators import export_evaluator
from genlab.evaluation.generation import (
    DEFAULT_N,
    METRICS,
    classifier_accuracy,
    evaluate_generation,
    score_images,
    store_reference_parts,
)
from genlab.evaluation.periodic import periodic_eval
from genlab.evaluation.reconstruction import evaluate_reconstruction
from genlab.evaluation.reference import Reference, reference_cache_path, reference_key, reference_stats
from genlab.evaluation.store import METRICS_FILE, merge_metrics, read_metrics
from genlab.evaluation.translation import evaluate_translation


__all__ = [
    "METRICS",
    "KINDS",
    "DEFAULT_EXTRACTORS",
    "DEFAULT_N",
    "METRICS_FILE",
    "Reference",
    "reference_stats",
    "reference_key",
    "reference_cache_path",
    "evaluate",
    "evaluate_all",
    "evaluate_run",
    "evaluate_generation",
    "kinds_for",
    "score_images",
    "store_reference_parts",
    "periodic_eval",
    "export_evaluator",
    "classifier_accuracy",
    "read_metrics",
    "merge_metrics",
    "evaluate_reconstruction",
    "evaluate_translation",
]
