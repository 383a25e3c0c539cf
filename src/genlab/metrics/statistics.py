"""Streaming feature statistics shared by the distribution metrics (FID, KID, IS, PR/DC).

Everything is accumulated in float64 so that a metric does not depend on batch size, update order
or the number of processes beyond the last few bits: ``GaussianStats`` keeps the sufficient
statistics of a Gaussian fit (n, sum x, sum x x^T), which add up across batches and processes;
``FeatureBank`` keeps the raw features for metrics that need every sample (KID, PR/DC, IS).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from genlab.errors import DataError

__all__ = ["GaussianStats", "FeatureBank", "canonical_order", "as_features"]


def _accumulation_device(device: torch.device) -> torch.device:
    """The device that holds float64 accumulators for features living on ``device``."""
    # Apple's MPS backend has no float64: accumulate on the CPU there.
    return torch.device("cpu") if device.type == "mps" else device


def as_features(features, name: str = "features") -> torch.Tensor:
    """``features`` (N, D) as a finite float64 tensor on an accumulation device, or a DataError."""
    x = torch.as_tensor(features)
    if x.ndim != 2:
        raise DataError(f"{name} must have shape (N, D), got {tuple(x.shape)}; flatten each sample to one row")
    x = x.detach().to(device=_accumulation_device(x.device), dtype=torch.float64)
    if not torch.isfinite(x).all():
        raise DataError(f"{name} contain NaN or infinite values; check the feature extractor's input")
    return x


def canonical_order(x: torch.Tensor) -> torch.Tensor:
    """Indices that sort the rows of ``x`` (N, D) lexicographically: the same for any input order.

    Metrics that draw random subsets or splits (KID, IS) first put the samples in this order, so that
    their value depends on the set of samples and the seed, not on how batches were fed or gathered.
    """
    _, inverse = torch.unique(x, dim=0, return_inverse=True)  # unique() sorts rows lexicographically
    return torch.argsort(inverse, stable=True)


def _is_distributed() -> bool:
    """True inside an initialised torch.distributed process group with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device(tensor: torch.Tensor) -> torch.device:
    """The device a collective needs: NCCL only reduces CUDA tensors."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all processes (returned on the input's device)."""
    buffer = tensor.to(_collective_device(tensor)).clone()
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(tensor.device)


def _all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (N_r, D) from every process, concatenated in rank order; N_r may differ."""
    device = _collective_device(x)
    world_size = dist.get_world_size()
    count = torch.tensor([x.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    # all_gather needs equal shapes: pad every shard to the largest, then trim.
    padded = torch.zeros((max(counts), *x.shape[1:]), dtype=x.dtype, device=device)
    padded[: x.shape[0]] = x.to(device)
    shards = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(shards, padded)
    return torch.cat([shard[:c] for shard, c in zip(shards, counts)]).to(x.device)


def _agree_on_dim(dim: int | None, what: str) -> int | None:
    """The feature dimension every process agrees on (processes without data send -1)."""
    mine = torch.tensor([-1 if dim is None else dim], dtype=torch.int64)
    mine = mine.to(_collective_device(mine))
    dims = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(dims, mine)
    known = {int(d.item()) for d in dims} - {-1}
    if len(known) > 1:
        raise DataError(f"{what}: processes hold features of different dimensions {sorted(known)}; use one extractor")
    return known.pop() if known else None


class GaussianStats:
    """Streaming mean and covariance of feature vectors from float64 sufficient statistics."""

    def __init__(self, dim: int | None = None):
        self.dim = dim
        self.n = 0
        self.sum: torch.Tensor | None = None  # (D,)   sum_i x_i
        self.outer_sum: torch.Tensor | None = None  # (D, D) sum_i x_i x_i^T
        if dim is not None:
            self._allocate(dim, torch.device("cpu"))

    def _allocate(self, dim: int, device: torch.device) -> None:
        """Zero accumulators for ``dim``-dimensional features on ``device``."""
        self.dim = dim
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer_sum = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features) -> GaussianStats:
        """Add a batch of features (N, D); returns self."""
        x = as_features(features)  # (N, D) float64
        if self.sum is None:
            self._allocate(x.shape[1], x.device)
        elif x.shape[1] != self.dim:
            raise DataError(f"features have dimension {x.shape[1]}, but these statistics hold dimension {self.dim}")
        elif self.n == 0 and self.sum.device != x.device:  # dim given up front: follow the data's device
            self._allocate(self.dim, x.device)
        x = x.to(self.sum.device)
        self.n += x.shape[0]
        self.sum += x.sum(dim=0)
        self.outer_sum += x.T @ x  # (D, D)
        return self

    def merge(self, other: GaussianStats) -> GaussianStats:
        """Add the samples summarised by ``other`` (as if its batches had been fed here); returns self."""
        if other.sum is None:
            return self
        if self.sum is None:
            self._allocate(other.dim, other.sum.device)
        elif other.dim != self.dim:
            raise DataError(f"cannot merge statistics of dimension {other.dim} into dimension {self.dim}")
        self.n += other.n
        self.sum += other.sum.to(self.sum.device)
        self.outer_sum += other.outer_sum.to(self.sum.device)
        return self

    def all_reduce(self) -> GaussianStats:
        """Sum the statistics of every torch.distributed process into each one (no-op when not distributed)."""
        if not _is_distributed():
            return self
        dim = _agree_on_dim(self.dim, "GaussianStats.all_reduce")
        if dim is None:
            return self
        if self.sum is None:  # this process saw no data: contribute zeros
            self._allocate(dim, torch.device("cpu"))
        n = _all_reduce_sum(torch.tensor([self.n], dtype=torch.int64, device=self.sum.device))
        self.n = int(n.item())
        self.sum = _all_reduce_sum(self.sum)
        self.outer_sum = _all_reduce_sum(self.outer_sum)
        return self

    def copy(self) -> GaussianStats:
        """An independent copy."""
        return GaussianStats().merge(self)

    def _require_samples(self, minimum: int) -> None:
        if self.n < minimum:
            raise DataError(f"a Gaussian fit needs at least {minimum} feature vectors, got {self.n}; feed more samples")

    @property
    def mean(self) -> torch.Tensor:
        """Sample mean (D,), float64."""
        self._require_samples(1)
        return self.sum / self.n

    @property
    def covariance(self) -> torch.Tensor:
        """Unbiased sample covariance (D, D), float64: (sum x x^T - n mu mu^T) / (n - 1)."""
        self._require_samples(2)
        mean = self.mean
        covariance = (self.outer_sum - self.n * torch.outer(mean, mean)) / (self.n - 1)
        return (covariance + covariance.T) / 2  # exactly symmetric despite rounding

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The sufficient statistics as CPU tensors (safetensors-compatible)."""
        self._require_samples(1)
        return {
            "n": torch.tensor(self.n, dtype=torch.int64),
            "sum": self.sum.cpu().contiguous(),
            "outer_sum": self.outer_sum.cpu().contiguous(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> GaussianStats:
        """Statistics restored from :meth:`state_dict`."""
        missing = {"n", "sum", "outer_sum"} - set(state)
        if missing:
            raise DataError(f"Gaussian statistics lack the tensors {sorted(missing)}; were they saved by GaussianStats?")
        total, outer_sum = state["sum"], state["outer_sum"]
        if total.ndim != 1 or tuple(outer_sum.shape) != (total.shape[0], total.shape[0]):
            raise DataError(
                f"inconsistent Gaussian statistics: sum {tuple(total.shape)}, outer_sum {tuple(outer_sum.shape)}"
            )
        stats = cls()
        stats.dim = total.shape[0]
        stats.n = int(state["n"].item())
        stats.sum = total.to(torch.float64).clone()
        stats.outer_sum = outer_sum.to(torch.float64).clone()
        return stats

    def save(self, path: str | Path) -> None:
        """Write the statistics to a safetensors file atomically (e.g. cached reference statistics)."""
        from safetensors.torch import save as safetensors_bytes

        from genlab.fileio import atomic_write_bytes

        atomic_write_bytes(path, safetensors_bytes(self.state_dict()))

    @classmethod
    def load(cls, path: str | Path) -> GaussianStats:
        """Read statistics written by :meth:`save`."""
        from safetensors.torch import load_file

        if not Path(path).is_file():
            raise DataError(f"no Gaussian statistics file at {path}; compute the reference statistics first")
        return cls.from_state_dict(load_file(str(path)))


class FeatureBank:
    """Raw feature vectors (float64) accumulated over batches, gathered across processes on demand."""

    def __init__(self):
        self._chunks: list[torch.Tensor] = []

    def update(self, features) -> FeatureBank:
        """Append a batch of features (N, D); returns self."""
        x = as_features(features)
        if self._chunks and x.shape[1] != self._chunks[0].shape[1]:
            raise DataError(f"features have dimension {x.shape[1]}, but this bank holds {self._chunks[0].shape[1]}")
        self._chunks.append(x)
        return self

    def __len__(self) -> int:
        return sum(chunk.shape[0] for chunk in self._chunks)

    def features(self) -> torch.Tensor:
        """This process's features (N, D), in update order."""
        if not self._chunks:
            raise DataError("no features were added; call update() with at least one batch")
        return torch.cat(self._chunks)

    def gather(self) -> torch.Tensor:
        """Features of every torch.distributed process (in rank order), or this process's when not distributed."""
        if not _is_distributed():
            return self.features()
        dim = _agree_on_dim(self._chunks[0].shape[1] if self._chunks else None, "FeatureBank.gather")
        if dim is None:
            raise DataError("no features were added on any process; call update() with at least one batch")
        local = torch.cat(self._chunks) if self._chunks else torch.zeros(0, dim, dtype=torch.float64)
        return _all_gather_rows(local)
