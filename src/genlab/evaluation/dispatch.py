"""Which scoring a target gets: dispatch on the run's declared capabilities (``kind="auto"``).

A run that ``Translates`` is scored on translations; one that ``Reconstructs`` on reconstructions,
and on its samples too when it also ``Generates``; one that only ``Generates`` on its samples. An
``.npz`` of images or a data split is always scored as generated images. Asking for a kind a run
cannot do names the capability it lacks (:func:`genlab.methods.capabilities.require`). A run
conditioned on text (a ``model.text`` section, a run-time choice) is scored by ``kind="text"``
(:mod:`genlab.evaluation.text_to_image`): samples of held-out captions and of class and attribute prompts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from genlab.config import read_config_file
from genlab.errors import ConfigError
from genlab.evaluation.common import is_run
from genlab.evaluation.generation import check_target, evaluate_generation
from genlab.evaluation.reconstruction import evaluate_reconstruction
from genlab.evaluation.translation import evaluate_translation
from genlab.methods import get_method
from genlab.methods.capabilities import Capability, Generates, Reconstructs, Translates, has, require

KINDS = ("auto", "generation", "reconstruction", "translation", "text")
_NEEDS: dict[str, type[Capability]] = {"generation": Generates, "reconstruction": Reconstructs,
                                       "translation": Translates}
# Options only one kind takes; the others ignore them (a VAE's `eval --ref` is for its samples).
_GENERATION_ONLY = ("ref", "metrics", "sampler", "steps", "extractor", "ref_n", "device", "sample_options")
_HELDOUT_ONLY = ("data",)


def _method_class(target: str | os.PathLike):
    """The method class of a run (folder: from its config.yaml, no weights loaded); None for files and splits."""
    if is_run(target):
        return type(target.method)
    check_target(target)
    path = Path(str(target)).expanduser()
    if not path.is_dir():
        return None
    return get_method(read_config_file(path / "config.yaml")["method"])


def _conditions_on_text(target) -> bool:
    """Whether a run (loaded, or a folder: its config.yaml, no weights loaded) has a text encoder."""
    from genlab.evaluation.text_to_image import conditions_on_text_config
    from genlab.methods.capabilities import conditions_on_text

    if is_run(target):
        return conditions_on_text(target.method)
    return conditions_on_text_config(read_config_file(Path(str(target)).expanduser() / "config.yaml").get("model"))


def kinds_for(target: str | os.PathLike, kind: str = "auto") -> tuple[str, ...]:
    """The kinds of scoring ``kind`` means for ``target``, in the order they are run."""
    if kind not in KINDS:
        raise ConfigError(f"kind {kind!r}: choose from {', '.join(KINDS)}")
    cls = _method_class(target)
    where = str(target.path if is_run(target) else target)
    if cls is None:  # images from a file or a data split
        if kind not in ("auto", "generation"):
            raise ConfigError(f"{where} is not a run folder: only generation metrics apply to images (kind {kind!r})")
        return ("generation",)
    if kind in ("auto", "text") and _conditions_on_text(target):
        return ("text",)
    if kind == "text":
        raise ConfigError(f"{where}: a {cls.name} run without a text encoder cannot be scored on text (kind 'text' needs "
                          "a text-conditioned run, trained with a model.text section)")
    if kind != "auto":
        require(cls, _NEEDS[kind], f"be scored on {kind}", where=where)
        return (kind,)
    if has(cls, Translates):
        return ("translation",)
    if has(cls, Reconstructs):
        return ("reconstruction", "generation") if has(cls, Generates) else ("reconstruction",)
    require(cls, Generates, "be evaluated (it neither generates, reconstructs nor translates images)", where=where)
    return ("generation",)


def _score(target, kind: str, options: dict[str, Any], json_path) -> dict[str, Any]:
    """One kind of scoring with the options that kind takes."""
    if kind == "generation":
        return evaluate_generation(target, json_path=json_path,
                                   **{k: v for k, v in options.items() if k not in _HELDOUT_ONLY})
    if kind == "text":
        from genlab.evaluation.text_to_image import evaluate_text

        return evaluate_text(target, json_path=json_path, **options)
    held = {k: v for k, v in options.items() if k not in _GENERATION_ONLY}
    if kind == "reconstruction":
        return evaluate_reconstruction(target, json_path=json_path, **held)
    held.pop("batch_size", None)
    held.pop("progress", None)
    return evaluate_translation(target, json_path=json_path, **held)


def evaluate_all(
    target: str | os.PathLike,
    kind: str = "auto",
    *,
    json_path: str | os.PathLike | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Every scoring ``kind`` means for ``target`` (see :func:`kinds_for`): one result dict per kind.

    ``options`` are :func:`evaluate`'s; ``json_path`` receives the last result (the only one, unless a
    run both reconstructs and generates).
    """
    kinds = kinds_for(target, kind)
    return [_score(target, k, options, json_path if k == kinds[-1] else None) for k in kinds]


def evaluate(
    target: str | os.PathLike,
    kind: str = "auto",
    *,
    ref: str = "mnist:test",
    metrics="fid,kid,is,pr,dc",
    n: int | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    weights: str = "ema",
    extractor=None,
    data_root: str | os.PathLike | None = None,
    data: str | None = None,
    ref_n: int | None = None,
    batch_size: int = 500,
    device=None,
    json_path: str | os.PathLike | None = None,
    write: bool = True,
    progress: bool = False,
    sample_options: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score ``target`` (a run folder, an ``.npz`` of uint8 images, or a data split ``SOURCE:SPLIT``): one result.

    ``kind="auto"`` picks by the run's capabilities (:func:`kinds_for`); for a run that both
    reconstructs and generates (a VAE) it means generation here, the score of its samples; use
    :func:`evaluate_all` for every kind. Generation (``ref``, ``metrics``, ``sampler``, ``steps``,
    ``extractor``, ``ref_n``, ``sample_options``): :func:`~genlab.evaluation.generation.evaluate_generation`;
    reconstruction / translation on held-out images ``data`` (SOURCE:SPLIT, default the run's test
    split). Returns ``{"metrics": {name: value}, "std": {name: std}, "protocol": {...}}`` and, for a
    run, merges it into ``RUN/metrics.json`` (``write=False`` skips that).
    """
    options = dict(ref=ref, metrics=metrics, n=n, sampler=sampler, steps=steps, seed=seed, weights=weights,
                   extractor=extractor, data_root=data_root, data=data, ref_n=ref_n, batch_size=batch_size,
                   device=device, write=write, progress=progress, sample_options=sample_options, log=log)
    kinds = kinds_for(target, kind)
    return _score(target, kinds[-1], options, json_path)


def evaluate_run(run, kind: str = "auto", **options: Any) -> list[dict[str, Any]]:
    """Score a loaded :class:`~genlab.runs.Run` as it is (its weights, its device; what ``Run.evaluate`` calls).

    One result per kind its capabilities allow, as :func:`evaluate_all`; each is merged into the run's
    ``metrics.json`` unless ``write=False``.
    """
    if "weights" in options:
        raise ConfigError(f"evaluate_run scores the run with the weights it was loaded with ({run.weights}); "
                          "load it with load_run(path, weights=...) to choose")
    return evaluate_all(run, kind, **options)
