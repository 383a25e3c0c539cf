"""Reference statistics: the real side of a comparison, computed once per key and cached.

The cache file is ``$GENLAB_CACHE/refs/<dataset>-<split>-<hash of key>.safetensors``, named by a hash
of its key (dataset, split, image size, number of images, extractor name and sha256 of its weights);
the key is stored beside it and checked on read: change any part and the statistics are rebuilt,
never silently reused.

Besides the statistics, the file keeps what the metrics derive from the reference alone (the reals'
k-NN radii of PR/DC, the within-real kernel sums of KID's subsets), each under a name that spells every
setting it depends on (k; seed, subsets, subset size and fake count): computed the first time a score
needs them, stored, and read back afterwards, so scoring against a cached reference skips that work.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from genlab.data import DataConfig, load_data, resolve_cache_dir, to_model_range
from genlab.errors import ConfigError, DataError, GenlabError
from genlab.evaluation.common import default_device, resolve_extractor
from genlab.fileio import atomic_write, atomic_write_text
from genlab.metrics import GaussianStats, kid_real_kernel_sums, knn_radii
from genlab.metrics.statistics import as_features
from genlab.metrics.extractors import FeatureExtractor

# Bump when what a reference file holds changes, or how a derived part (k-NN radii, KID sums) is computed:
# it invalidates old caches.
REFERENCE_FORMAT = 1


@dataclass
class Reference:
    """The real side of a comparison: Gaussian statistics, features and class probabilities of a split."""

    key: dict  # what the statistics were computed from (see reference_cache_path)
    stats: GaussianStats
    features: torch.Tensor  # (N, D) float32
    probabilities: torch.Tensor  # (N, C) float64
    path: Path | None  # cache file, or None when it could not be written
    derived: dict[str, torch.Tensor] = field(default_factory=dict)  # reference-only metric parts, by name

    @property
    def n(self) -> int:
        """Number of real images summarised."""
        return self.stats.n

    def _derived(self, names: list[str], compute) -> list[torch.Tensor]:
        """The derived tensors ``names``, from the cache; when one is missing, ``compute()`` gives all of them
        (same order) and they are stored in the cache file (when writable) for the next score."""
        if any(name not in self.derived for name in names):
            self.derived.update(zip(names, compute()))
            if self.path is not None:
                self.path = _write_reference(self.path, self)
        return [self.derived[name] for name in names]

    def knn_radii(self, ks: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """The reals' squared k-NN radii (N,) for each k of ``ks``, as :func:`genlab.metrics.knn_radii` gives them."""
        names = [f"knn_radii.k{k}" for k in ks]
        return dict(zip(ks, self._derived(names, lambda: [*knn_radii(as_features(self.features), tuple(ks)).values()])))

    def kid_real_kernel_sums(self, n_fake: int, subsets: int, subset_size: int, seed: int) -> torch.Tensor:
        """KID's within-real kernel sums (subsets,) for ``n_fake`` fakes and a CPU generator seeded with ``seed``."""
        name = f"kid_real_kernel_sums.seed{seed}.subsets{subsets}.m{subset_size}.nfake{n_fake}"
        return self._derived([name], lambda: [kid_real_kernel_sums(
            self.features, n_fake, subsets, subset_size, torch.Generator().manual_seed(seed))])[0]


def features_and_probabilities(
    extractor: FeatureExtractor, images_u8: torch.Tensor, batch_size: int, device, progress: bool, desc: str
) -> tuple[GaussianStats, torch.Tensor, torch.Tensor]:
    """Gaussian statistics, features (N, D) and class probabilities (N, C) of uint8 images (N, C, H, W).

    The bar moves every few of the extractor's own batches (4 x 32 images for Inception), not once
    per ``batch_size`` images, which take a minute through Inception on a CPU.
    """
    from tqdm.auto import tqdm

    stats = GaussianStats()
    features, probabilities = [], []
    chunk = min(batch_size, 4 * getattr(extractor, "batch_size", batch_size))
    with tqdm(total=len(images_u8), disable=not progress, desc=desc, unit="img") as bar:
        for batch in images_u8.split(chunk):
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
    derived = {k[len("derived."):]: v for k, v in tensors.items() if k.startswith("derived.")}
    return Reference(key, stats, tensors["features"], tensors["probabilities"], path, derived)


def _write_reference(path: Path, reference: Reference) -> Path | None:
    """Store a reference atomically (safetensors + a readable JSON copy of its key); None when not writable."""
    import warnings

    from safetensors.torch import save_file

    tensors = {f"stats.{k}": v for k, v in reference.stats.state_dict().items()}
    tensors["features"] = reference.features.contiguous()
    tensors["probabilities"] = reference.probabilities.contiguous()
    tensors.update({f"derived.{name}": v.contiguous() for name, v in reference.derived.items()})
    key_text = json.dumps(reference.key, sort_keys=True)
    try:
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"key": key_text}))
        atomic_write_text(path.with_suffix(".json"), json.dumps({**reference.key, "n_images": reference.n}, indent=2) + "\n")
    except OSError as e:  # a cache is optional (WriteError is an OSError): warn and score without it
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
    device = torch.device(device) if device is not None else default_device()
    extractor = resolve_extractor(extractor, source, device)
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
    stats, features, probabilities = features_and_probabilities(extractor, images, batch_size, device, progress,
                                                                f"reference {source}:{split}")
    reference = Reference(key, stats, features, probabilities, None)
    reference.path = _write_reference(path, reference)
    return reference
