"""User evaluators: a trained ``classifier`` (or ``clip``) run exported as weights + a JSON card (``genlab export-evaluator``).

Exports go to the user's folder (:func:`~genlab.metrics.extractors.user_evaluators_dir`, i.e.
``$GENLAB_CACHE/evaluators``), where ``--extractor NAME`` finds them, or to any other folder given
(``--extractor PATH``); never into the installed package, and never under a shipped name in the
user's folder (the shipped one would shadow it). Maintainers renew a shipped evaluator by exporting
it elsewhere and copying the two files into ``src/genlab/evaluators/``.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

from genlab.errors import ConfigError, DataError, GenlabError
from genlab.evaluation.common import versions
from genlab.evaluation.generation import classifier_accuracy
from genlab.metrics.extractors import (
    SHIPPED_EVALUATORS,
    _evaluators_dir,
    is_evaluator_name,
    user_evaluators_dir,
)


def _check_destination(name: str, out_dir: Path, overwrite: bool) -> None:
    """One-line errors for a name or folder that would shadow or replace a shipped or existing evaluator."""
    if not is_evaluator_name(name):
        raise ConfigError(f"evaluator name {name!r}: use letters, digits, '-' and '_' only (e.g. my-digits)")
    if name.lower() in (*SHIPPED_EVALUATORS, "inception") and out_dir.resolve() == user_evaluators_dir().resolve():
        # --extractor NAME finds the shipped extractor first: an export under its name would never be used.
        raise ConfigError(f"evaluator name {name!r} is a shipped extractor's; choose another name (e.g. {name}-mine)")
    if out_dir.resolve() == _evaluators_dir().resolve():
        raise ConfigError(f"--out {out_dir} is the installed package's evaluators folder; export into your own "
                          f"folder (default {user_evaluators_dir()})")
    existing = [p for p in (out_dir / f"{name}.safetensors", out_dir / f"{name}.json") if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]} exists; choose another NAME or pass --force to replace it")


def export_evaluator(
    run_dir: str | os.PathLike,
    name: str,
    out_dir: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    training_command: str | None = None,
    weights: str = "ema",
    overwrite: bool = False,
) -> dict:
    """Write a trained ``classifier`` run as evaluator ``<out_dir>/<name>.safetensors`` + ``<name>.json``; returns the card.

    The test accuracy is measured on the official test split of the run's data source, with the
    exported weights reloaded through :class:`~genlab.metrics.extractors.ClassifierExtractor` (what
    the metrics will use). ``out_dir`` defaults to the user's evaluators folder (``$GENLAB_CACHE/evaluators``).
    """
    from genlab.metrics.extractors import ClassifierExtractor, save_classifier_evaluator
    from genlab.runs import heldout_images, load_run
    from genlab.train.checkpoint import latest_checkpoint, load_checkpoint

    out_dir = Path(out_dir).expanduser() if out_dir is not None else user_evaluators_dir()
    _check_destination(name, out_dir, overwrite)
    run = load_run(run_dir, weights=weights, device="cpu")
    if run.config.method == "clip":  # a CLIP judge for captioned data (genlab.evaluation.text)
        from genlab.evaluation.text import export_clip_evaluator

        return export_clip_evaluator(run_dir, name, data_root=None if data_root is None else str(data_root),
                                     training_command=training_command, out_dir=out_dir)
    if run.config.method != "classifier":
        raise ConfigError(f"{run_dir} is a '{run.config.method}' run; an evaluator is exported from a 'classifier' "
                          f"run (genlab train classifier --data SOURCE) or a 'clip' run")
    data = run.config.data
    # The run's held-out split, as everywhere (mnist5k, training images only, is scored on mnist:test).
    test = heldout_images(run, data_root=None if data_root is None else str(data_root))
    test_split = f"{test.source}:{test.split}"
    if test.labels is None:
        raise DataError(f"{test_split} has no labels; an evaluator's accuracy needs a labelled test split")
    net = run.method.net
    accuracy = classifier_accuracy(ClassifierExtractor(net, name, sha256=""), test.images, test.labels)
    if training_command is None:
        training_command = f"genlab train classifier --preset {Path(run_dir) / 'config.yaml'}"
    _, state = load_checkpoint(latest_checkpoint(Path(run_dir)), device="cpu")
    weights_path, card_path = save_classifier_evaluator(
        net, out_dir, name,
        training_command=training_command,
        seed=run.config.train.seed,
        test_accuracy=accuracy,
        dataset=data.source,
        test_split=test_split,
        test_images=len(test),
        train_steps=run.step,
        train_batch_size=run.config.train.batch_size,
        train_seconds=round(float(state.get("elapsed_seconds", 0.0)), 1),
        ema=run.weights == "ema",
        parameters=sum(p.numel() for p in net.parameters()),
        genlab_version=versions()["genlab"],
        torch_version=versions()["torch"],
        date=datetime.date.today().isoformat(),
    )
    # What the metrics will load must be what was measured: reload through the extractor and re-check.
    reloaded = classifier_accuracy(ClassifierExtractor.from_files(weights_path, card_path), test.images, test.labels)
    if reloaded != accuracy:
        raise GenlabError(f"exported evaluator scores {reloaded:.4%} on {test_split} but the run scored "
                          f"{accuracy:.4%}; the export is inconsistent")
    return json.loads(card_path.read_text())
