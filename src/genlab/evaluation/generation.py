"""Generation scoring: the fake side (samples of a run, an ``.npz`` file, or a data split), its features,
FID / KID / IS / PR / DC against a reference, and the protocol every number carries (SPEC E1-E5).

Samples of a run are rounded to 8-bit pixels before scoring, exactly as ``genlab sample --out
x.npz`` stores them, so ``genlab eval RUN`` and ``genlab eval x.npz`` give the same numbers.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from genlab.data import DataConfig, from_model_range, load_data, split_source_ref, to_model_range
from genlab.errors import ConfigError, DataError
from genlab.evaluation.common import as_run, default_device, is_run, now, parse_ref, resolve_extractor, versions
from genlab.evaluation.reference import Reference, features_and_probabilities, reference_stats
from genlab.evaluation.store import write_result
from genlab.metrics import frechet_distance, inception_score, kernel_inception_distance, marginal_class_entropy
from genlab.metrics import precision_recall_density_coverage
from genlab.metrics.extractors import FeatureExtractor, sha256_file

METRICS = ("fid", "kid", "is", "pr", "dc")
# The standard settings of each metric (Binkowski et al. 2018; Salimans et al. 2016; Kynkaanniemi
# et al. 2019; Naeem et al. 2020); recorded in every protocol.
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000
IS_SPLITS = 10
K_PRECISION_RECALL, K_DENSITY_COVERAGE = 3, 5
DEFAULT_N = 10000  # samples drawn from a run when n is not given (the usual FID-10k protocol)
PROBE_IMAGES = 32  # images sampled (and thrown away) to time a run before its long sampling starts


def parse_metrics(metrics: Sequence[str] | str) -> tuple[str, ...]:
    """Validated metric names, in the canonical order."""
    if isinstance(metrics, str):
        metrics = [m for m in metrics.split(",") if m.strip()]
    wanted = [m.strip().lower() for m in metrics]
    unknown = [m for m in wanted if m not in METRICS]
    if unknown or not wanted:
        raise ConfigError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METRICS)}")
    return tuple(m for m in METRICS if m in wanted)


def score_images(
    images_u8: torch.Tensor,
    reference: Reference,
    extractor: FeatureExtractor,
    metrics: Sequence[str] | str = METRICS,
    seed: int = 0,
    batch_size: int = 500,
    device: str | torch.device | None = None,
    progress: bool = False,
    timings: dict[str, float] | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """(values, stds) of ``metrics`` for uint8 images (N, C, H, W) against a reference, with the same extractor.

    ``timings``, when given, receives the seconds spent on features and on each metric.
    """
    metrics = parse_metrics(metrics)
    if reference.key["extractor_sha256"] != extractor.sha256:
        raise ConfigError(f"the reference was computed with extractor {reference.key['extractor']} "
                          f"({reference.key['extractor_sha256'][:12]}...), not {extractor.name} ({extractor.sha256[:12]}...)")
    device = torch.device(device) if device is not None else default_device()
    timings = timings if timings is not None else {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        t = time.perf_counter()
        timings[name] = round(t - clock, 3)
        clock = t

    stats, features, probabilities = features_and_probabilities(extractor, images_u8, batch_size, device, progress, "score")
    lap("features")
    values: dict[str, float] = {}
    stds: dict[str, float] = {}
    if "fid" in metrics:
        values["fid"] = frechet_distance(stats.mean, stats.covariance, reference.stats.mean, reference.stats.covariance)
        lap("fid")
    if "kid" in metrics:
        # The within-real kernel sums and the reals' k-NN radii below come from the reference cache when stored.
        real_sums = reference.kid_real_kernel_sums(len(features), KID_SUBSETS, KID_SUBSET_SIZE, seed)
        values["kid"], stds["kid"] = kernel_inception_distance(
            reference.features, features, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE,
            generator=torch.Generator().manual_seed(seed), real_kernel_sums=real_sums)
        lap("kid")
    if "is" in metrics:
        values["is"], stds["is"] = inception_score(probabilities, splits=min(IS_SPLITS, len(probabilities)),
                                                   generator=torch.Generator().manual_seed(seed))
        # IS's diversity half on its own: ln 10 = 2.30 when the samples spread evenly over the digits.
        values["class_entropy"] = marginal_class_entropy(probabilities)
        lap("is")
    if "pr" in metrics or "dc" in metrics:
        prdc = precision_recall_density_coverage(reference.features, features, K_PRECISION_RECALL, K_DENSITY_COVERAGE,
                                                 real_radii=reference.knn_radii((K_PRECISION_RECALL, K_DENSITY_COVERAGE)))
        names = (("precision", "recall") if "pr" in metrics else ()) + (("density", "coverage") if "dc" in metrics else ())
        values.update({name: prdc[name] for name in names})
        lap("prdc")
    return values, stds


def store_reference_parts(reference: Reference, n_fake: int = DEFAULT_N, seed: int = 0) -> None:
    """Compute and cache what scoring ``n_fake`` images with ``seed`` needs from the reals alone (the PR/DC
    radii, the KID subsets' within-real sums), so that the first score against a new reference is as fast as
    the next ones (``genlab eval ref``)."""
    reference.knn_radii((K_PRECISION_RECALL, K_DENSITY_COVERAGE))
    if min(reference.n, n_fake) >= 2:
        reference.kid_real_kernel_sums(n_fake, KID_SUBSETS, KID_SUBSET_SIZE, seed)


def classifier_predictions(extractor: FeatureExtractor, images_u8: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The class (N,) of each image (uint8 (N, C, H, W)): the argmax logit of the evaluator network."""
    return torch.cat([extractor.features_and_logits(to_model_range(x))[1].argmax(dim=1).cpu()
                      for x in images_u8.split(batch_size)])


def classifier_accuracy(extractor: FeatureExtractor, images_u8: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Share of images (uint8 (N, C, H, W)) whose argmax logit is their label (SPEC E4)."""
    if len(images_u8) != len(labels) or not len(labels):
        raise DataError(f"accuracy needs one label per image, got {len(images_u8)} images and {len(labels)} labels")
    return float((classifier_predictions(extractor, images_u8, batch_size) == labels.cpu()).double().mean())


def check_target(target: str | os.PathLike) -> None:
    """Fail fast (before any reference is computed) on a target that is neither a run, an .npz file nor a split."""
    if is_run(target):
        return
    text = str(target)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise DataError(f"{path}: not a run folder (no config.yaml)")
    elif path.suffix.lower() == ".npz":
        if not path.is_file():
            raise DataError(f"{path}: no such file")
    elif split_source_ref(text)[1] is None:
        raise DataError(f"{text}: not a run folder, an .npz file of images, or a data split SOURCE:SPLIT (e.g. mnist:train)")


def _duration(seconds: float) -> str:
    """``"40 s"``, ``"12 min"``, ``"1.5 h"``: a time estimate in the unit a person reads."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def sample_run(run, n: int, seed: int, batch_size: int, options: dict, progress: bool = False,
               log: Callable[[str], None] | None = None, timings: dict[str, float] | None = None) -> torch.Tensor:
    """``n`` samples (N, C, H, W) in [-1, 1] of a loaded run, saying first how many and how long they take.

    With ``progress`` or ``log``, a first batch of up to ``PROBE_IMAGES`` images is sampled (and
    thrown away: the returned samples are exactly ``run.sample(n, seed, batch_size)``) to time the
    sampler; ``log`` receives the estimate before the long sampling starts. The bar moves at every
    sampler step of a diffusion run (counted on the probe), else once per batch. ``timings["probe"]``
    receives the probe's seconds.
    """
    from genlab.methods.capabilities import Denoiser, has
    from genlab.runs import per_sample_slice
    from tqdm.auto import tqdm

    if not (progress or log is not None):
        return run.sample(n, seed=seed, batch_size=batch_size, **options)
    steps_seen = []
    diffusion = has(run.method, Denoiser)
    probe = min(n, batch_size, PROBE_IMAGES)
    # Per-image options (the class, control map or prompt of each sample) follow the probe's first images.
    probe_options = per_sample_slice(options, 0, probe)
    if diffusion:
        probe_options["callback"] = lambda *args: steps_seen.append(1)
    start = time.perf_counter()
    run.sample(probe, seed=seed + 1, batch_size=probe, **probe_options)
    seconds = time.perf_counter() - start
    per_image = seconds / probe
    if timings is not None:
        timings["probe"] = round(seconds, 3)
    if log is not None:
        log(f"sampling {n} images from {run.path} in batches of {batch_size}: about {_duration(per_image * n)} "
            f"({per_image * 1000:.0f} ms per image, timed on a first {probe})")
    if not diffusion or not steps_seen:
        return run.sample(n, seed=seed, batch_size=batch_size, progress=progress, **options)
    steps = len(steps_seen)
    with tqdm(total=n, disable=not progress, desc="sample", unit="img") as bar:
        def advance(step, t, x_t, x0_hat) -> None:  # one sampler step of a batch of len(x_t) images
            bar.update(min(len(x_t) / steps, n - bar.n))

        images = run.sample(n, seed=seed, batch_size=batch_size, callback=advance, **options)
        bar.update(n - bar.n)
    return images


# Sampling options of control runs (controlnet, t2i-adapter): where the control maps come from, their scale.
CONTROL_FLAGS = ("control_from", "control_image", "control_scale")


def _control(run, n: int, flags: dict, data_root, options: dict) -> dict | None:
    """Put the control maps of a control run into ``options`` (n maps of ``control_from``, ``control_image``, or by
    default the run's held-out split: a control run is scored on what it makes, controlled samples, not its
    frozen base's); what the protocol says about them, None for other runs (which refuse control flags)."""
    from genlab.api import control_options

    given = {k: v for k, v in flags.items() if v is not None}
    maps = control_options(run, n, **given, data_root=None if data_root is None else str(data_root),
                           heldout_default=True)
    if not maps:
        return None
    options.update(maps)
    if given.get("control_image") is not None:
        source = str(given["control_image"])
    else:
        from genlab.runs import heldout_split

        source = f"{given.get('control_from') or heldout_split(run.config.data)}[:{n}]"
    scale = maps.get("control_scale", run.config.model.control_scale)
    return {"maps_from": source, "scale": float(scale)}


def _target_images(
    target: str | os.PathLike, n: int | None, seed: int, sampler: str | None, steps: int | None, weights: str,
    data_root, batch_size: int, progress: bool, sample_options: dict, log: Callable[[str], None] | None = None,
    timings: dict[str, float] | None = None,
) -> tuple[torch.Tensor, dict, Path | None]:
    """The images to score as uint8 (N, C, H, W), what the protocol says about them, and the run folder if any."""
    from genlab.imageio import load_npz

    text = str(target.path if is_run(target) else target)
    path = Path(text).expanduser()
    if is_run(target) or path.is_dir():
        n = DEFAULT_N if n is None else n
        run = as_run(target, weights)
        control_flags = {k: sample_options.pop(k, None) for k in CONTROL_FLAGS}
        options = {k: v for k, v in (("sampler", sampler), ("steps", steps)) if v is not None}
        run.resolve_labels(sample_options, n)  # "all", or none asked of a class-conditional run: every class in turn
        options.update(sample_options)
        control = _control(run, n, control_flags, data_root, options)
        config = run.config.model
        # A control run samples with its frozen base's sampler (its own config has none).
        sampling = run.method.base.config if control is not None else config
        images = sample_run(run, n, seed, batch_size, options, progress=progress, log=log, timings=timings)
        # Round to 8-bit pixels as `genlab sample --out x.npz` stores them: the same samples give the same score.
        images_u8 = from_model_range(images)
        info = {
            "target": str(path),
            "method": run.config.method,
            "checkpoint_step": run.step,
            "weights": run.weights,
            "sampler": sampler or getattr(sampling, "sampler", None),
            # Without --steps the method picks them; the config's sample_steps is that choice for its own sampler.
            "steps": steps if steps is not None else (
                getattr(sampling, "sample_steps", None) if sampler in (None, getattr(sampling, "sampler", None))
                else "default"),
        }
        if sample_options:  # guidance scale, class labels, truncation...: part of what was measured
            info["sample_options"] = {k: _describe_option(v) for k, v in sample_options.items()}
        if control is not None:  # which maps steered the samples, and how closely the samples follow them
            from genlab.metrics.adherence import adherence, adherence_name

            kind = config.control
            info["control"] = {**control, "kind": kind, "adherence_metric": adherence_name(kind),
                               "adherence": float(adherence(kind, images, options["control"]).mean())}
        return images_u8, info, path
    if sampler is not None or steps is not None or sample_options:
        raise ConfigError(f"--sampler/--steps and sampling options apply to run folders; {text} is not a run folder")
    if path.suffix.lower() == ".npz":
        images_u8 = load_npz(path)
        info = {"target": str(path), "target_sha256": sha256_file(path)}
    else:
        source, split = split_source_ref(text)
        if split is None:
            raise DataError(f"{text}: not a run folder, an .npz file of images, or a data split SOURCE:SPLIT (e.g. mnist:train)")
        parse_ref(text)
        images_u8 = load_data(DataConfig(source=source, split=split, root=None if data_root is None else str(data_root),
                                         limit=n)).images
        info = {"target": text}
    if n is not None:
        if len(images_u8) < n:
            raise DataError(f"{text} holds {len(images_u8)} images, fewer than n={n}; lower --n or add images")
        images_u8 = images_u8[:n]
    info.update({"method": None, "checkpoint_step": None, "weights": None, "sampler": None, "steps": None})
    return images_u8, info, None


def _score_npz_captions(target, images_u8: torch.Tensor, ref_source: str, seed: int, values: dict) -> dict | None:
    """CLIP score and R-precision for an .npz with a ``captions`` array (SPEC M3, see genlab.evaluation.text); its protocol."""
    from genlab.imageio import load_npz_captions

    captions = load_npz_captions(target) if str(target).lower().endswith(".npz") else None
    if captions is None:
        return None
    from genlab.evaluation.text import score_captions

    text_values, text_protocol = score_captions(images_u8, captions[: len(images_u8)], ref_source, seed=seed)
    values.update(text_values)
    return text_protocol


def evaluate_generation(
    target: str | os.PathLike,
    ref: str = "mnist:test",
    metrics: Sequence[str] | str = METRICS,
    n: int | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    weights: str = "ema",
    extractor: str | os.PathLike | FeatureExtractor | None = None,
    data_root: str | os.PathLike | None = None,
    ref_n: int | None = None,
    batch_size: int = 500,
    device: str | torch.device | None = None,
    json_path: str | os.PathLike | None = None,
    write: bool = True,
    progress: bool = False,
    sample_options: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score ``target`` (a run folder, an ``.npz`` of uint8 images, or a data split ``SOURCE:SPLIT``) against ``ref``.

    A run is sampled (``n`` images, default 10,000, with ``seed``, EMA weights by default and its
    configured sampler unless ``sampler``/``steps`` say otherwise); a file or split contributes its
    first ``n`` images (all when ``n`` is None). Returns ``{"metrics": {name: value}, "std": {name: std},
    "protocol": {...}}``; for a run the entry is merged into ``RUN/metrics.json`` (``write=False`` skips
    that), and ``json_path`` receives the same dict. ``log`` receives the sampling estimate of a run.
    """
    metrics = parse_metrics(metrics)
    source, split = parse_ref(ref)
    if n is not None and n < 2:
        raise ConfigError(f"n must be at least 2 images, got {n}")
    if weights not in ("ema", "raw"):
        raise ConfigError(f"weights must be 'ema' or 'raw', got {weights!r}")
    check_target(target)
    device = torch.device(device) if device is not None else default_device()
    extractor = resolve_extractor(extractor, source, device)
    start = time.perf_counter()
    reference = reference_stats(source, split, extractor, data_root=data_root, n=ref_n, batch_size=batch_size,
                                device=device, progress=progress)
    reference_seconds = time.perf_counter() - start
    start = time.perf_counter()
    sample_options = dict(sample_options or {})  # _target_images resolves labels="all" in this copy
    probe: dict[str, float] = {}
    images_u8, info, run_dir = _target_images(target, n, seed, sampler, steps, weights, data_root, batch_size, progress,
                                              sample_options, log, probe)
    sample_seconds = time.perf_counter() - start - probe.get("probe", 0.0)  # the N images only (ms per image)
    timings: dict[str, float] = {}
    values, stds = score_images(images_u8, reference, extractor, metrics, seed=seed, batch_size=batch_size,
                                device=device, progress=progress, timings=timings)
    labels = sample_options.get("labels")
    if isinstance(labels, torch.Tensor) and extractor.name != "inception":
        # Samples asked for a class: the evaluator (a classifier of the data's own classes; Inception's
        # ImageNet classes cannot judge digits) says whether they got it (SPEC E4).
        values["class_accuracy"] = classifier_accuracy(extractor, images_u8, labels, batch_size=batch_size)
    if "control" in info:  # a control run: how closely its samples follow their maps (a metric, not protocol)
        values["adherence"] = info["control"].pop("adherence")
    text_protocol = _score_npz_captions(target, images_u8, source, seed, values)
    protocol = {
        "kind": "generation",
        "n": len(images_u8),
        "image_shape": list(images_u8.shape[1:]),
        **info,
        "seed": seed,
        "reference": f"{source}:{split}",
        "reference_n": reference.n,
        "reference_image_size": reference.key["image_size"],
        "extractor": extractor.name,
        "extractor_sha256": extractor.sha256,
        "kid_subsets": KID_SUBSETS,
        "kid_subset_size": min(KID_SUBSET_SIZE, reference.n, len(images_u8)),
        "is_splits": min(IS_SPLITS, len(images_u8)),
        "k_precision_recall": K_PRECISION_RECALL,
        "k_density_coverage": K_DENSITY_COVERAGE,
        **versions(),
        "date": now(),
        # Wall time of each stage; "score" is features plus metrics, i.e. the cost of scoring N images.
        "seconds": {"reference": round(reference_seconds, 3), "sample": round(sample_seconds, 3), **probe,
                    "score": round(sum(timings.values()), 3), **timings},
    }
    if text_protocol is not None:
        protocol["text"] = text_protocol
    return write_result({"metrics": values, "std": stds, "protocol": protocol}, run_dir, json_path, write)


def _describe_option(value: Any) -> Any:
    """A JSON-friendly description of a sampling option (tensors of labels become a class histogram)."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.long and value.ndim == 1:
            counts = torch.bincount(value.cpu())
            return {"classes": {int(k): int(c) for k, c in enumerate(counts) if c}}
        return f"tensor{tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return [_describe_option(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return getattr(value, "name", type(value).__name__)
