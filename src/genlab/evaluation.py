"""The evaluation pipeline: score a run or a file of images against a real split, with the protocol (SPEC E1-E5).

    from genlab.evaluation import evaluate
    result = evaluate("runs/demo", ref="mnist:test", n=10000, sampler="ddim", steps=50)
    result["metrics"]["fid"], result["std"]["kid"], result["protocol"]["extractor_sha256"]

Three pieces, each one job:

- :func:`reference_stats`: the real side (Gaussian statistics, features for KID / PR / DC, class
  probabilities) of a data split, computed once and cached under ``$GENLAB_CACHE/refs``. The cache
  file is named by a hash of its key (dataset, split, image size, number of images, extractor name
  and sha256 of its weights), the key is stored beside it and checked on read: change any part and
  the statistics are rebuilt, never silently reused.
- :func:`evaluate`: the fake side (samples of a run, an ``.npz`` file, or another data split), its
  features, the metrics, and the protocol every number carries (SPEC E5); written to the run's
  ``metrics.json``, one entry per protocol.
- :func:`compare`: one Markdown table and one bar chart over several runs' ``metrics.json``.

Samples of a run are rounded to 8-bit pixels before scoring, exactly as ``genlab sample --out
x.npz`` stores them, so ``genlab eval RUN`` and ``genlab eval x.npz`` give the same numbers.

:func:`export_evaluator` turns a trained ``classifier`` run into a shipped evaluator (weights and card).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch

from genlab.data import DataConfig, from_model_range, load_data, resolve_cache_dir, split_source_ref, to_model_range
from genlab.errors import ConfigError, DataError, GenlabError
from genlab.metrics import GaussianStats, frechet_distance, inception_score, kernel_inception_distance
from genlab.metrics import precision_recall_density_coverage
from genlab.metrics.extractors import FeatureExtractor, get_extractor, sha256_file

__all__ = [
    "METRICS",
    "DEFAULT_EXTRACTORS",
    "Reference",
    "reference_stats",
    "reference_cache_path",
    "evaluate",
    "score_images",
    "periodic_eval",
    "compare",
    "export_evaluator",
    "classifier_accuracy",
    "read_metrics",
    "merge_metrics",
    "evaluate_reconstruction",
    "evaluate_translation",
]

METRICS = ("fid", "kid", "is", "pr", "dc")
# Which extractor judges which data by default: the project's own evaluators where they exist
# (offline, and far more telling on grey digits than ImageNet features), else the FID Inception network.
DEFAULT_EXTRACTORS = {"mnist": "mnist", "mnist5k": "mnist", "digits": "mnist", "fashion-mnist": "fashion-mnist"}
# The standard settings of each metric (Binkowski et al. 2018; Salimans et al. 2016; Kynkaanniemi
# et al. 2019; Naeem et al. 2020); recorded in every protocol.
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000
IS_SPLITS = 10
K_PRECISION_RECALL, K_DENSITY_COVERAGE = 3, 5
REFERENCE_FORMAT = 1  # bump when what a reference file holds changes, to invalidate old caches
METRICS_FILE = "metrics.json"
DEFAULT_N = 10000  # samples drawn from a run when n is not given (the usual FID-10k protocol)
# Protocol fields that describe when, how fast and by which path, not what was measured: not part of an
# entry's identity (a run scored as runs/x and as /abs/runs/x/ merges into one entry).
_VOLATILE = ("date", "seconds", "target")


# ---------------------------------------------------------------------------------------------
# Small helpers.


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _publish(tmp: str, path: Path) -> None:
    """Rename a finished temporary file onto ``path`` with ordinary permissions (mkstemp makes it owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)  # atomic on POSIX and Windows


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        _publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _parse_ref(ref: str) -> tuple[str, str]:
    """``"mnist:test"`` -> ("mnist", "test"); a one-line error for anything else."""
    from genlab.data import get_source

    source, split = split_source_ref(str(ref))
    if split is None:
        head, sep, _ = str(ref).rpartition(":")
        if sep and head:
            get_source(head)  # an unknown source: DataError listing the valid ones
        raise ConfigError(f"reference {ref!r} must be SOURCE:SPLIT, e.g. mnist:test or fashion-mnist:train")
    get_source(source)  # DataError listing the valid sources
    return source, split


def _parse_metrics(metrics: Sequence[str] | str) -> tuple[str, ...]:
    """Validated metric names, in the canonical order."""
    if isinstance(metrics, str):
        metrics = [m for m in metrics.split(",") if m.strip()]
    wanted = [m.strip().lower() for m in metrics]
    unknown = [m for m in wanted if m not in METRICS]
    if unknown or not wanted:
        raise ConfigError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METRICS)}")
    return tuple(m for m in METRICS if m in wanted)


def _resolve_extractor(extractor: str | os.PathLike | FeatureExtractor | None, source: str, device) -> FeatureExtractor:
    """The extractor object: given, named, or the default one for ``source``."""
    if extractor is None:
        extractor = DEFAULT_EXTRACTORS.get(source, "inception")
    if isinstance(extractor, (str, os.PathLike)):
        extractor = get_extractor(extractor)
    if hasattr(extractor, "to"):
        extractor.to(device)
    return extractor


def _features_and_probabilities(
    extractor: FeatureExtractor, images_u8: torch.Tensor, batch_size: int, device, progress: bool, desc: str
) -> tuple[GaussianStats, torch.Tensor, torch.Tensor]:
    """Gaussian statistics, features (N, D) and class probabilities (N, C) of uint8 images (N, C, H, W)."""
    from tqdm.auto import tqdm

    stats = GaussianStats()
    features, probabilities = [], []
    with tqdm(total=len(images_u8), disable=not progress, desc=desc, unit="img") as bar:
        for batch in images_u8.split(batch_size):
            x = to_model_range(batch.to(device))  # (B, C, H, W) in [-1, 1]
            f, logits = extractor.features_and_logits(x)  # (B, D), (B, K)
            stats.update(f)
            features.append(f.float().cpu())
            # Softmax in float64: the Inception Score takes logs of small probabilities.
            probabilities.append(torch.softmax(logits.double(), dim=1).cpu())
            bar.update(len(batch))
    if not features:
        raise DataError("no images to score")
    return stats, torch.cat(features), torch.cat(probabilities)


# ---------------------------------------------------------------------------------------------
# Reference statistics.


@dataclass
class Reference:
    """The real side of a comparison: Gaussian statistics, features and class probabilities of a split."""

    key: dict  # what the statistics were computed from (see reference_cache_path)
    stats: GaussianStats
    features: torch.Tensor  # (N, D) float32
    probabilities: torch.Tensor  # (N, C) float64
    path: Path | None  # cache file, or None when it could not be written

    @property
    def n(self) -> int:
        """Number of real images summarised."""
        return self.stats.n


def reference_key(source: str, split: str, extractor: FeatureExtractor, image_size: int | None, n: int | None) -> dict:
    """What identifies a reference: change any value and the cached statistics are rebuilt."""
    return {
        "format": REFERENCE_FORMAT,
        "dataset": source,
        "split": split,
        "image_size": image_size,  # None: the source's native size
        "n": n,  # None: the whole split
        "extractor": extractor.name,
        "extractor_sha256": extractor.sha256,
    }


def reference_cache_path(key: dict) -> Path:
    """``$GENLAB_CACHE/refs/<dataset>-<split>-<hash of key>.safetensors`` (default cache ~/.cache/genlab)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    safe = f"{key['dataset']}-{key['split']}".replace("/", "_").replace(":", "_")
    return resolve_cache_dir() / "refs" / f"{safe}-{digest}.safetensors"


def _read_reference(path: Path, key: dict) -> Reference | None:
    """The cached reference at ``path`` when it exists, is readable and was stored for ``key``; else None."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            stored_key = json.loads((f.metadata() or {}).get("key", "null"))
        tensors = load_file(str(path))
        if stored_key != key:
            return None
        stats = GaussianStats.from_state_dict({k[len("stats."):]: v for k, v in tensors.items() if k.startswith("stats.")})
    except (SafetensorError, OSError, ValueError, RuntimeError, GenlabError):
        return None
    return Reference(key, stats, tensors["features"], tensors["probabilities"], path)


def _write_reference(path: Path, reference: Reference) -> Path | None:
    """Store a reference atomically (safetensors + a readable JSON copy of its key); None when not writable."""
    import warnings

    from safetensors.torch import save_file

    tensors = {f"stats.{k}": v for k, v in reference.stats.state_dict().items()}
    tensors["features"] = reference.features.contiguous()
    tensors["probabilities"] = reference.probabilities.contiguous()
    key_text = json.dumps(reference.key, sort_keys=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"key": key_text})
            _publish(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        _atomic_write_text(path.with_suffix(".json"), json.dumps({**reference.key, "n_images": reference.n}, indent=2) + "\n")
    except OSError as e:
        warnings.warn(f"could not write reference statistics to {path} ({e}); set GENLAB_CACHE to a writable folder",
                      stacklevel=3)
        return None
    return path


def reference_stats(
    source: str,
    split: str,
    extractor: str | os.PathLike | FeatureExtractor | None = None,
    data_root: str | os.PathLike | None = None,
    image_size: int | None = None,
    n: int | None = None,
    batch_size: int = 500,
    device: str | torch.device | None = None,
    rebuild: bool = False,
    progress: bool = False,
) -> Reference:
    """Statistics of the real images of ``source:split`` (first ``n``, default all), cached and reused by key."""
    device = torch.device(device) if device is not None else _default_device()
    extractor = _resolve_extractor(extractor, source, device)
    if n is not None and n < 2:
        raise ConfigError(f"a reference needs at least 2 images, got n={n}")
    key = reference_key(source, split, extractor, image_size, n)
    path = reference_cache_path(key)
    if not rebuild:
        cached = _read_reference(path, key)
        if cached is not None:
            return cached
    images = load_data(DataConfig(source=source, split=split, root=None if data_root is None else str(data_root),
                                  image_size=image_size, limit=n)).images  # (N, C, H, W) uint8
    if n is not None and len(images) < n:
        raise DataError(f"{source}:{split} has {len(images)} images, fewer than the {n} asked for the reference")
    stats, features, probabilities = _features_and_probabilities(extractor, images, batch_size, device, progress,
                                                                 f"reference {source}:{split}")
    reference = Reference(key, stats, features, probabilities, None)
    reference.path = _write_reference(path, reference)
    return reference


# ---------------------------------------------------------------------------------------------
# Scoring.


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
    metrics = _parse_metrics(metrics)
    if reference.key["extractor_sha256"] != extractor.sha256:
        raise ConfigError(f"the reference was computed with extractor {reference.key['extractor']} "
                          f"({reference.key['extractor_sha256'][:12]}...), not {extractor.name} ({extractor.sha256[:12]}...)")
    device = torch.device(device) if device is not None else _default_device()
    timings = timings if timings is not None else {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    stats, features, probabilities = _features_and_probabilities(extractor, images_u8, batch_size, device, progress, "score")
    lap("features")
    values: dict[str, float] = {}
    stds: dict[str, float] = {}
    if "fid" in metrics:
        values["fid"] = frechet_distance(stats.mean, stats.covariance, reference.stats.mean, reference.stats.covariance)
        lap("fid")
    if "kid" in metrics:
        values["kid"], stds["kid"] = kernel_inception_distance(
            reference.features, features, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE,
            generator=torch.Generator().manual_seed(seed))
        lap("kid")
    if "is" in metrics:
        values["is"], stds["is"] = inception_score(probabilities, splits=min(IS_SPLITS, len(probabilities)),
                                                   generator=torch.Generator().manual_seed(seed))
        lap("is")
    if "pr" in metrics or "dc" in metrics:
        prdc = precision_recall_density_coverage(reference.features, features, K_PRECISION_RECALL, K_DENSITY_COVERAGE)
        names = (("precision", "recall") if "pr" in metrics else ()) + (("density", "coverage") if "dc" in metrics else ())
        values.update({name: prdc[name] for name in names})
        lap("prdc")
    return values, stds


def _versions() -> dict[str, str]:
    import genlab

    return {"genlab": genlab.__version__, "torch": torch.__version__, "python": platform.python_version()}


def _check_target(target: str | os.PathLike) -> None:
    """Fail fast (before any reference is computed) on a target that is neither a run, an .npz file nor a split."""
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


def _target_images(
    target: str | os.PathLike, n: int | None, seed: int, sampler: str | None, steps: int | None, weights: str,
    data_root, batch_size: int, progress: bool, sample_options: dict,
) -> tuple[torch.Tensor, dict, Path | None]:
    """The images to score as uint8 (N, C, H, W), what the protocol says about them, and the run folder if any."""
    from genlab.imageio import load_npz

    text = str(target)
    path = Path(text).expanduser()
    if path.is_dir():
        from genlab.api import load_run

        n = DEFAULT_N if n is None else n
        run = load_run(path, weights=weights)
        options = {k: v for k, v in (("sampler", sampler), ("steps", steps)) if v is not None}
        options.update(sample_options)
        if isinstance(options.get("labels"), str):  # "all": balanced classes, resolved by the run
            options["labels"] = sample_options["labels"] = run.labels(options["labels"], n)
        config = run.config.model
        images = run.sample(n, seed=seed, batch_size=batch_size, progress=progress, **options)
        # Round to 8-bit pixels as `genlab sample --out x.npz` stores them: the same samples give the same score.
        images_u8 = from_model_range(images)
        info = {
            "target": str(path),
            "method": run.config.method,
            "checkpoint_step": run.step,
            "weights": run.weights,
            "sampler": sampler or getattr(config, "sampler", None),
            # Without --steps the method picks them; the config's sample_steps is that choice for its own sampler.
            "steps": steps if steps is not None else (
                getattr(config, "sample_steps", None) if sampler in (None, getattr(config, "sampler", None)) else "default"),
        }
        if sample_options:  # guidance scale, class labels, truncation...: part of what was measured
            info["sample_options"] = {k: _describe_option(v) for k, v in sample_options.items()}
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
        _parse_ref(text)
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
    """CLIP score and R-precision for an .npz with a ``captions`` array (SPEC M3, see genlab.text.evaluate); its protocol."""
    from genlab.imageio import load_npz_captions

    captions = load_npz_captions(target) if str(target).lower().endswith(".npz") else None
    if captions is None:
        return None
    from genlab.text.evaluate import score_captions

    text_values, text_protocol = score_captions(images_u8, captions[: len(images_u8)], ref_source, seed=seed)
    values.update(text_values)
    return text_protocol


def evaluate(
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
) -> dict[str, Any]:
    """Score ``target`` (a run folder, an ``.npz`` of uint8 images, or a data split ``SOURCE:SPLIT``) against ``ref``.

    A run is sampled (``n`` images, default 10,000, with ``seed``, EMA weights by default and its
    configured sampler unless ``sampler``/``steps`` say otherwise); a file or split contributes its
    first ``n`` images (all when ``n`` is None). Returns ``{"metrics": {name: value}, "std": {name: std}, "protocol": {...}}``; for
    a run the entry is merged into ``RUN/metrics.json`` (``write=False`` skips that), and ``json_path``
    receives the same dict.
    """
    metrics = _parse_metrics(metrics)
    source, split = _parse_ref(ref)
    if n is not None and n < 2:
        raise ConfigError(f"n must be at least 2 images, got {n}")
    if weights not in ("ema", "raw"):
        raise ConfigError(f"weights must be 'ema' or 'raw', got {weights!r}")
    _check_target(target)
    device = torch.device(device) if device is not None else _default_device()
    extractor = _resolve_extractor(extractor, source, device)
    start = time.perf_counter()
    reference = reference_stats(source, split, extractor, data_root=data_root, n=ref_n, batch_size=batch_size,
                                device=device, progress=progress)
    reference_seconds = time.perf_counter() - start
    start = time.perf_counter()
    sample_options = dict(sample_options or {})  # _target_images resolves labels="all" in this copy
    images_u8, info, run_dir = _target_images(target, n, seed, sampler, steps, weights, data_root, batch_size, progress,
                                              sample_options)
    sample_seconds = time.perf_counter() - start
    timings: dict[str, float] = {}
    values, stds = score_images(images_u8, reference, extractor, metrics, seed=seed, batch_size=batch_size,
                                device=device, progress=progress, timings=timings)
    labels = sample_options.get("labels")
    if isinstance(labels, torch.Tensor) and extractor.name != "inception":
        # Samples asked for a class: the evaluator (a classifier of the data's own classes; Inception's
        # ImageNet classes cannot judge digits) says whether they got it (SPEC E4).
        values["class_accuracy"] = classifier_accuracy(extractor, images_u8, labels, batch_size=batch_size)
    text_protocol = _score_npz_captions(target, images_u8, source, seed, values)
    protocol = {
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
        **_versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # Wall time of each stage; "score" is features plus metrics, i.e. the cost of scoring N images.
        "seconds": {"reference": round(reference_seconds, 3), "sample": round(sample_seconds, 3),
                    "score": round(sum(timings.values()), 3), **timings},
    }
    if text_protocol is not None:
        protocol["text"] = text_protocol
    result = {"metrics": values, "std": stds, "protocol": protocol}
    if write and run_dir is not None:
        merge_metrics(run_dir / METRICS_FILE, result)
    if json_path is not None:
        _atomic_write_text(Path(json_path), json.dumps(result, indent=2) + "\n")
    return result


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


# ---------------------------------------------------------------------------------------------
# Reconstruction quality of autoencoder-family runs.

RECONSTRUCTION_METRICS = ("mse", "psnr", "psnr_dataset", "ssim")


def evaluate_reconstruction(
    target: str | os.PathLike,
    data: str | None = None,
    n: int | None = None,
    weights: str = "ema",
    data_root: str | os.PathLike | None = None,
    batch_size: int = 500,
    json_path: str | os.PathLike | None = None,
    write: bool = True,
    progress: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Reconstruction MSE / PSNR / SSIM of an autoencoder-family run on held-out images (SPEC E4), plus
    the test ELBO of a VAE and the codebook usage of a VQ model.

    Reconstructions are rounded to 8-bit pixels first (what a saved image holds); images are in
    [-1, 1] so the data range is 2. ``psnr`` is the mean over images of each image's PSNR (the usual
    convention of autoencoder papers); ``psnr_dataset`` is the PSNR of the mean MSE, which is never
    higher (Jensen). SSIM is Wang et al. 2004 with the 11x11 Gaussian window (sigma 1.5).
    """
    from tqdm.auto import tqdm

    from genlab.api import heldout_images, load_run
    from genlab.metrics import ssim

    run = load_run(target, weights=weights)
    run._need("reconstruct", "be scored on reconstructions")
    held = heldout_images(run, data, n, None if data_root is None else str(data_root))
    images = held.to_model_range()
    method = run.method
    sq_err, ssims, nll, codes = [], [], [], []
    generator = torch.Generator().manual_seed(seed)  # the ELBO's one-sample estimate: reproducible
    start = time.perf_counter()
    with torch.no_grad():
        for i in tqdm(range(0, len(images), batch_size), disable=not progress, desc="reconstruct"):
            x = images[i: i + batch_size].to(method.device)
            x_hat = to_model_range(from_model_range(method.reconstruct(x)))  # 8-bit, as saved
            x_hat, xc = x_hat.cpu().double(), x.cpu().double()
            sq_err.append(((x_hat - xc) ** 2).flatten(1).mean(1))
            if min(x.shape[-2:]) >= 11:
                ssims.append(ssim(x_hat, xc, data_range=2.0, reduction="none"))
            if hasattr(method, "negative_elbo"):
                nll.append(method.negative_elbo(x, generator=generator).double().cpu())
            if hasattr(method, "encode_codes"):
                codes.append(method.encode_codes(x).flatten().cpu())
    seconds = time.perf_counter() - start
    mse_per_image = torch.cat(sq_err)
    # A perfect 8-bit reconstruction has MSE 0 and infinite PSNR; floor it at one 8-bit step in one pixel.
    floor = (2.0 / 255) ** 2 / images[0].numel()
    values: dict[str, float] = {
        "mse": float(mse_per_image.mean()),
        "psnr": float((10 * torch.log10(4.0 / mse_per_image.clamp_min(floor))).mean()),
        "psnr_dataset": float(10 * torch.log10(4.0 / mse_per_image.mean())),
    }
    if ssims:
        values["ssim"] = float(torch.cat(ssims).mean())
    if nll:
        nats = torch.cat(nll)
        values["nll_nats"] = float(nats.mean())  # negative ELBO: an upper bound on -log p(x)
        values["bits_per_dim"] = float(nats.mean() / (images[0].numel() * math.log(2)))
    if codes:
        counts = torch.bincount(torch.cat(codes), minlength=int(method.codebook_size)).double()
        p = counts / counts.sum()
        values["code_usage"] = float((counts > 0).double().mean())
        values["code_perplexity"] = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    protocol = {
        "kind": "reconstruction",
        "n": len(images),
        "image_shape": list(images.shape[1:]),
        "data": f"{held.source}:{held.split}",
        "method": run.config.method,
        "checkpoint_step": run.step,
        "weights": run.weights,
        "rounding": "reconstructions rounded to 8-bit before scoring",
        "seed": seed,
        "data_range": 2.0,
        "ssim_window": "gaussian 11x11, sigma 1.5, K1 0.01, K2 0.03",
        "psnr": "mean over images of 10 log10(4 / MSE_i); psnr_dataset = 10 log10(4 / mean MSE)",
        **({"nll": "negative ELBO in nats per image (1 latent sample); bits/dim = nats / (C H W ln 2)"} if nll else {}),
        **({"code_usage": f"fraction of the {int(method.codebook_size)} codes used on the data; perplexity = exp(H)"}
           if codes else {}),
        **_versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": {"reconstruct": round(seconds, 3)},
        "target": str(target),
    }
    result = {"metrics": values, "std": {}, "protocol": protocol}
    if write:
        merge_metrics(Path(target) / METRICS_FILE, result)
    if json_path is not None:
        _atomic_write_text(Path(json_path), json.dumps(result, indent=2) + "\n")
    return result


def evaluate_translation(
    target: str | os.PathLike,
    data: str | None = None,
    n: int | None = None,
    weights: str = "ema",
    data_root: str | os.PathLike | None = None,
    seed: int = 0,
    write: bool = True,
) -> dict[str, Any]:
    """Test PSNR / SSIM of an image-to-image run (pix2pix) on held-out pairs: translate(input) vs target.

    Derived tasks build the inputs from the targets (edges, masked with a seeded mask, low-res);
    paired data uses the split's own A images. See :func:`genlab.methods.pix2pix.evaluate_pairs`.
    """
    from genlab.api import heldout_images, load_run
    from genlab.methods.pix2pix import evaluate_pairs

    run = load_run(target, weights=weights)
    held = heldout_images(run, data, n, None if data_root is None else str(data_root))
    start = time.perf_counter()
    values = evaluate_pairs(run.method, held.images, torch.Generator().manual_seed(seed), images_a=held.conditions)
    count = values.pop("n")
    protocol = {
        "kind": "translation",
        "task": run.config.model.task,
        "n": count,
        "data": f"{held.source}:{held.split}",
        "method": run.config.method,
        "checkpoint_step": run.step,
        "weights": run.weights,
        "seed": seed,
        "data_range": 2.0,
        "psnr": "mean over images of 10 log10(4 / MSE_i), MSE floored at 8-bit quantisation noise",
        "ssim_window": "gaussian 11x11 (the largest odd size that fits smaller images), sigma 1.5",
        "receptive_field": run.method.receptive_field,
        **_versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": {"translate": round(time.perf_counter() - start, 3)},
        "target": str(target),
    }
    result = {"metrics": values, "std": {}, "protocol": protocol}
    if write:
        merge_metrics(Path(target) / METRICS_FILE, result)
    return result


def _protocol_identity(protocol: dict) -> dict:
    """The protocol without when/how-fast fields: entries with equal identities measured the same thing."""
    return {k: v for k, v in protocol.items() if k not in _VOLATILE}


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Entries of a ``metrics.json`` (a run folder or the file itself); [] when there is none yet."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e}); delete it and evaluate again") from None
    if isinstance(data, dict) and "entries" in data:
        return list(data["entries"])
    if isinstance(data, dict) and "metrics" in data and "protocol" in data:  # a single result (--json FILE)
        return [data]
    raise DataError(f"{path} is not a genlab metrics file (no 'entries')")


@contextlib.contextmanager
def _exclusive(path: Path):
    """Hold an exclusive lock on ``path`` + ".lock" (POSIX; elsewhere no lock): evaluations of one run
    started in parallel must not read the same metrics.json and each write back without the other's entry."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; parallel evaluations of one run may lose an entry
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def merge_metrics(path: str | os.PathLike, result: dict) -> Path:
    """Add ``result`` to ``metrics.json``: merged into the entry with the same protocol, else appended."""
    path = Path(path)
    with _exclusive(path):
        entries = read_metrics(path)
        identity = _protocol_identity(result["protocol"])
        for entry in entries:
            if _protocol_identity(entry["protocol"]) == identity:
                entry["metrics"].update(result["metrics"])
                entry["std"] = {**entry.get("std", {}), **result["std"]}
                entry["protocol"] = result["protocol"]  # newest date and timings
                break
        else:
            entries.append(result)
        _atomic_write_text(path, json.dumps({"entries": entries}, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Evaluation during training.


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
    source, split = _parse_ref(ref)
    extractor = _resolve_extractor(extractor, source, device)
    reference = reference_stats(source, split, extractor, data_root=data_root, batch_size=batch_size, device=device)
    generator = torch.Generator().manual_seed(seed)  # fixed seed: scores at different steps are comparable
    was_training = method.training
    method.eval()
    try:
        chunks = []
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            chunks.append(from_model_range(method.sample(m, generator=generator, **(sample_options or {})).cpu()))
    finally:
        method.train(was_training)
    values, stds = score_images(torch.cat(chunks), reference, extractor, metrics, seed=seed, batch_size=batch_size,
                                device=device)
    return {**values, **{f"{k}_std": v for k, v in stds.items()}, "eval_n": n}


# ---------------------------------------------------------------------------------------------
# Comparing runs.

_COLUMNS = ("fid", "kid", "is", "precision", "recall", "density", "coverage")
_LOWER_IS_BETTER = {"fid", "kid"}


def _pick_entry(entries: list[dict], ref: str | None) -> dict | None:
    """The newest entry (for ``ref`` when given)."""
    chosen = [e for e in entries if ref is None or e["protocol"].get("reference") == ref]
    return max(chosen, key=lambda e: e["protocol"].get("date", "")) if chosen else None


def compare(
    runs: Sequence[str | os.PathLike],
    ref: str | None = None,
    out: str | os.PathLike | None = "compare.png",
) -> tuple[str, list[dict]]:
    """One Markdown table (and a PNG bar chart at ``out``) of the newest metrics of each run.

    ``runs`` are run folders (their ``metrics.json``) or metrics JSON files. Returns (table, rows).
    Protocol fields that differ between the rows are listed under the table: numbers measured under
    different protocols are not comparable.
    """
    if not runs:
        raise ConfigError("compare needs at least one run folder or metrics JSON file")
    if out is not None and Path(out).suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: the chart is a PNG; give a file name ending in .png")
    rows = []
    for run in runs:
        path = Path(run)
        if not path.exists():
            raise DataError(f"{path}: no such run folder or metrics file")
        entry = _pick_entry(read_metrics(path), ref)
        if entry is None:
            what = f" against {ref}" if ref else ""
            raise DataError(f"{path} has no metrics{what} yet; run `genlab eval {path} --ref {ref or 'SOURCE:SPLIT'}` first")
        rows.append({"run": str(path), **entry})
    columns = [c for c in _COLUMNS if any(c in r["metrics"] for r in rows)]
    header = ["run", "step", "N", "reference", "extractor", "sampler", "steps", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        p = r["protocol"]
        cells = [Path(r["run"]).name or r["run"], p.get("checkpoint_step"), p.get("n"), p.get("reference"),
                 p.get("extractor"), p.get("sampler"), p.get("steps")]
        for c in columns:
            value = r["metrics"].get(c)
            std = r.get("std", {}).get(c)
            cells.append("-" if value is None else f"{value:.4g}" + (f" +- {std:.2g}" if std is not None else ""))
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    differing = [k for k in ("n", "reference", "reference_n", "extractor_sha256", "seed", "weights", "kid_subset_size")
                 if len({json.dumps(r["protocol"].get(k)) for r in rows}) > 1]
    if differing:
        lines.append("")
        lines.append(f"warning: the protocols differ in {', '.join(differing)}; these numbers are not directly comparable")
    table = "\n".join(lines)
    if out is not None:
        _bar_chart(rows, columns, Path(out))
    return table, rows


def _bar_chart(rows: list[dict], columns: list[str], out: Path) -> Path:
    """One panel per metric, one bar per run (with the std as an error bar where there is one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [Path(r["run"]).name or r["run"] for r in rows]
    fig, axes = plt.subplots(1, max(1, len(columns)), figsize=(2.6 * max(1, len(columns)) + 1, 3.2), squeeze=False)
    for ax, column in zip(axes[0], columns):
        values = [r["metrics"].get(column, math.nan) for r in rows]
        errors = [r.get("std", {}).get(column, 0.0) for r in rows]
        ax.bar(range(len(rows)), values, yerr=errors, color=[f"C{i % 10}" for i in range(len(rows))])
        ax.set_title(column + (" (lower is better)" if column in _LOWER_IS_BETTER else ""), fontsize=9)
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        _publish(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


# ---------------------------------------------------------------------------------------------
# Shipping an evaluator.


def _evaluators_dir() -> Path:
    return Path(str(resources.files("genlab") / "evaluators"))


def classifier_accuracy(extractor: FeatureExtractor, images_u8: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Share of images (uint8 (N, C, H, W)) whose argmax logit is their label (SPEC E4)."""
    if len(images_u8) != len(labels) or not len(labels):
        raise DataError(f"accuracy needs one label per image, got {len(images_u8)} images and {len(labels)} labels")
    correct = 0
    for x, y in zip(images_u8.split(batch_size), labels.split(batch_size)):
        _, logits = extractor.features_and_logits(to_model_range(x))  # (B, num_classes)
        correct += int((logits.argmax(dim=1).cpu() == y.cpu()).sum())
    return correct / len(labels)


def export_evaluator(
    run_dir: str | os.PathLike,
    name: str,
    out_dir: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    training_command: str | None = None,
    weights: str = "ema",
) -> dict:
    """Write a trained ``classifier`` run as evaluator ``<out_dir>/<name>.safetensors`` + ``<name>.json``; returns the card.

    The test accuracy is measured on the official test split of the run's data source, with the
    exported weights reloaded through :class:`~genlab.metrics.extractors.ClassifierExtractor` (what
    the metrics will use). ``out_dir`` defaults to the package's ``evaluators/`` folder.
    """
    from genlab.api import load_run
    from genlab.metrics.extractors import ClassifierExtractor, save_classifier_evaluator

    run = load_run(run_dir, weights=weights, device="cpu")
    if run.config.method != "classifier":
        raise ConfigError(f"{run_dir} is a '{run.config.method}' run; export_evaluator needs a 'classifier' run")
    data = run.config.data
    test = load_data(DataConfig(source=data.source, split="test",
                                root=str(data_root) if data_root is not None else data.root,
                                image_size=data.image_size, fit=data.fit, channels=data.channels))
    if test.labels is None:
        raise DataError(f"{data.source}:test has no labels; an evaluator's accuracy needs a labelled test split")
    net = run.method.net
    accuracy = classifier_accuracy(ClassifierExtractor(net, name, sha256=""), test.images, test.labels)
    if training_command is None:
        training_command = f"genlab train classifier --preset {Path(run_dir) / 'config.yaml'}"
    from genlab.train.checkpoint import latest_checkpoint, load_checkpoint

    _, state = load_checkpoint(latest_checkpoint(Path(run_dir)), device="cpu")
    out_dir = Path(out_dir) if out_dir is not None else _evaluators_dir()
    weights_path, card_path = save_classifier_evaluator(
        net, out_dir, name,
        training_command=training_command,
        seed=run.config.train.seed,
        test_accuracy=accuracy,
        dataset=data.source,
        test_split=f"{data.source}:test",
        test_images=len(test),
        train_steps=run.step,
        train_batch_size=run.config.train.batch_size,
        train_seconds=round(float(state.get("elapsed_seconds", 0.0)), 1),
        ema=run.weights == "ema",
        parameters=sum(p.numel() for p in net.parameters()),
        genlab_version=_versions()["genlab"],
        torch_version=_versions()["torch"],
        date=datetime.date.today().isoformat(),
    )
    # What the metrics will load must be what was measured: reload through the extractor and re-check.
    reloaded = classifier_accuracy(ClassifierExtractor.from_files(weights_path, card_path), test.images, test.labels)
    if reloaded != accuracy:
        raise GenlabError(f"exported evaluator scores {reloaded:.4%} on {data.source}:test but the run scored "
                          f"{accuracy:.4%}; the export is inconsistent")
    return json.loads(card_path.read_text())
