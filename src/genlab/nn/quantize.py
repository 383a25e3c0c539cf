"""Vector quantisation with a learned codebook (VQ-VAE, van den Oord et al. 2017; SPEC AE4).

Each d-dimensional vector of the encoder's map z_e is replaced by its nearest codebook entry e_k.
The decoder sees the straight-through value z_e + sg[z_q - z_e] (forward: z_q; backward: identity),
so the reconstruction gradient reaches the encoder unchanged. The codebook learns either

* by gradient, from the codebook loss ||sg[z_e] - e||^2 (eq. 3, second term), or
* by exponential moving averages of the assigned vectors (van den Oord et al. 2017 appendix A.1,
  Razavi et al. 2019): per code, an EMA count N_k and an EMA sum m_k; e_k = m_k / N_k, with the counts
  Laplace-smoothed so that an unused code never divides by zero. No codebook loss then.

Either way the encoder is held close to its codes by the commitment loss beta ||z_e - sg[e]||^2.

Codes that stop being chosen waste capacity ("codebook collapse"). A code whose EMA count of
assignments per batch falls below ``dead_code_threshold`` is restarted at a random encoder output of
the current batch (Dhariwal et al. 2020, Jukebox, sec. 3.2). Which outputs is decided by a tensor
of uniform numbers the caller draws from the trainer's step context, so resumed runs stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from genlab.errors import ConfigError


@dataclass
class QuantizerConfig:
    """Codebook size and dimension, the commitment weight and how the codebook learns."""

    codebook_size: int = 256  # K
    dim: int = 16  # d, channels of the latent map that is quantised
    beta: float = 0.25  # commitment weight (van den Oord et al. 2017 use 0.25)
    ema: bool = True  # EMA codebook updates instead of the codebook loss
    ema_decay: float = 0.99  # decay of the EMA counts and sums (also of the usage statistics)
    eps: float = 1e-5  # Laplace smoothing of the EMA counts
    dead_code_threshold: float = 1.0  # restart codes whose EMA count per batch is below this; 0 disables
    usage_window: int = 100  # the logged running usage counts codes chosen in the last this many batches


class QuantizerOutput(NamedTuple):
    """What :meth:`VectorQuantizer.forward` returns."""

    z_q: torch.Tensor  # (N, d, h, w) straight-through quantised map: value z_q, gradient to z_e
    codes: torch.Tensor  # (N, h, w) long, index of the nearest code
    losses: dict[str, torch.Tensor]  # "commitment" and, without EMA, "codebook" (scalars, weighted)
    stats: dict[str, torch.Tensor]  # "usage", "usage_running", "perplexity" (detached scalars)


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code histogram ``counts`` (K,): K when uniform, 1 when one code takes all."""
    p = counts.float() / counts.sum().clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum()  # 0 log 0 = 0
    return entropy.exp()


def _world_size() -> int:
    """Number of training processes (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantisation of (N, d, h, w) maps against a codebook of K vectors of size d."""

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        beta: float = 0.25,
        ema: bool = True,
        ema_decay: float = 0.99,
        eps: float = 1e-5,
        dead_code_threshold: float = 1.0,
        usage_window: int = 100,
    ):
        super().__init__()
        if codebook_size < 2 or dim < 1:
            raise ConfigError(f"codebook_size={codebook_size} must be >= 2 and dim={dim} >= 1")
        if not 0.0 < ema_decay < 1.0:
            raise ConfigError(f"ema_decay={ema_decay} must be in (0, 1), e.g. 0.99")
        if beta < 0 or dead_code_threshold < 0 or usage_window < 1:
            raise ConfigError(f"beta={beta} and dead_code_threshold={dead_code_threshold} must be >= 0, "
                              f"usage_window={usage_window} >= 1")
        self.codebook_size, self.dim = codebook_size, dim
        self.beta, self.use_ema, self.ema_decay, self.eps = beta, ema, ema_decay, eps
        self.dead_code_threshold, self.usage_window = dead_code_threshold, usage_window
        # van den Oord et al.'s initialisation: small uniform vectors; dead-code restart soon moves
        # the unused ones onto the data.
        init = torch.empty(codebook_size, dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        if ema:
            self.register_buffer("embedding", init)  # (K, d), e_k = embed_sum_k / smoothed N_k
            self.register_buffer("embed_sum", init.clone())  # (K, d) EMA of the sum of assigned vectors
        else:
            self.embedding = nn.Parameter(init)  # (K, d), learned by the codebook loss
        # EMA count N_k of vectors assigned per batch; starts at 1 so that e_k = embed_sum_k / N_k
        # holds from the first step. Also the usage signal for dead-code restart without EMA.
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("last_used", torch.full((codebook_size,), -1, dtype=torch.long))  # batch index
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_config(cls, cfg: QuantizerConfig) -> "VectorQuantizer":
        """The quantiser a :class:`QuantizerConfig` describes."""
        return cls(cfg.codebook_size, cfg.dim, beta=cfg.beta, ema=cfg.ema, ema_decay=cfg.ema_decay, eps=cfg.eps,
                   dead_code_threshold=cfg.dead_code_threshold, usage_window=cfg.usage_window)

    # ------------------------------------------------------------------ lookup

    @torch.no_grad()
    def nearest_codes(self, z: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """Index of the nearest code for each row of z (M, d) -> (M,) long.

        ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2 as one matrix product, in chunks of rows so memory stays
        O(chunk K) rather than O(M K d) of a broadcast difference.
        """
        e = self.embedding.detach().float()  # (K, d)
        e_sq = (e * e).sum(1)  # (K,)
        codes = []
        for part in z.detach().float().split(chunk):
            dist_sq = torch.addmm(e_sq, part, e.t(), alpha=-2.0)  # (m, K): ||e||^2 - 2 z.e
            dist_sq += (part * part).sum(1, keepdim=True)  # + ||z||^2 (constant per row, kept for clarity)
            codes.append(dist_sq.argmin(1))
        return torch.cat(codes) if codes else torch.zeros(0, dtype=torch.long, device=z.device)

    def nearest_code_map(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code at every position of a map (N, d, h, w) -> (N, h, w) long; no updates."""
        n, d, h, w = z.shape
        return self.nearest_codes(z.permute(0, 2, 3, 1).reshape(-1, d)).view(n, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors of an index map (N, h, w) -> (N, d, h, w)."""
        if codes.dtype != torch.long or codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ConfigError(f"codes must be long indices in [0, {self.codebook_size}), got dtype {codes.dtype} "
                              f"and range [{int(codes.min())}, {int(codes.max())}]")
        return F.embedding(codes, self.embedding).permute(0, 3, 1, 2)  # (N, d, h, w)

    # ------------------------------------------------------------------ forward

    def forward(self, z_e: torch.Tensor, restart_rand: torch.Tensor | None = None) -> QuantizerOutput:
        """Quantise z_e (N, d, h, w); in training mode also update the codebook statistics.

        ``restart_rand`` (N, h, w) uniform numbers, one per encoder output, choose which outputs
        restart dead codes (a random permutation: their argsort). Without it no code is restarted.
        """
        if z_e.dim() != 4 or z_e.shape[1] != self.dim:
            raise ConfigError(f"the quantiser expects (N, {self.dim}, h, w) maps, got shape {tuple(z_e.shape)}")
        n, d, h, w = z_e.shape
        z_flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)  # (N h w, d)
        codes = self.nearest_codes(z_flat)  # (N h w,)
        z_q = F.embedding(codes, self.embedding).view(n, h, w, d).permute(0, 3, 1, 2).to(z_e.dtype)  # (N, d, h, w)

        # Eq. 3 of van den Oord et al. 2017: the codebook term moves e towards sg[z_e]; the commitment
        # term moves z_e towards sg[e]. With EMA the codebook follows the data without a loss.
        losses = {"commitment": self.beta * F.mse_loss(z_e, z_q.detach())}
        if not self.use_ema:
            losses["codebook"] = F.mse_loss(z_q, z_e.detach())
        z_q_st = z_e + (z_q - z_e).detach()  # straight-through estimator

        counts = torch.bincount(codes, minlength=self.codebook_size).float()  # (K,)
        if self.training:
            with torch.no_grad():
                counts = self._update(z_flat.detach().float(), codes, counts, restart_rand)
        stats = {
            "usage": (counts > 0).float().mean(),
            "usage_running": self.running_usage(),
            "perplexity": perplexity(counts),
        }
        return QuantizerOutput(z_q_st, codes.view(n, h, w), losses, stats)

    def running_usage(self) -> torch.Tensor:
        """Fraction of codes chosen in at least one of the last ``usage_window`` training batches."""
        recent = (self.last_used >= 0) & (self.batches_seen - self.last_used < self.usage_window)
        return recent.float().mean()

    # ------------------------------------------------------------------ training updates

    def _update(self, z: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor,
                restart_rand: torch.Tensor | None) -> torch.Tensor:
        """EMA statistics, EMA codebook and dead-code restart for one batch; returns the (global) counts."""
        world = _world_size()
        sums = torch.zeros(self.codebook_size, self.dim, device=z.device).index_add_(0, codes, z) if self.use_ema else None
        if world > 1:  # every process sees the global batch's statistics, so codebooks stay identical
            dist.all_reduce(counts)
            if sums is not None:
                dist.all_reduce(sums)
        decay = self.ema_decay
        self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.batches_seen += 1
        self.last_used[counts > 0] = self.batches_seen
        if self.use_ema:
            self.embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
            self._refresh_embedding()
        if self.dead_code_threshold > 0 and restart_rand is not None:
            self.restart_dead_codes(z, restart_rand)
        return counts

    def _refresh_embedding(self) -> None:
        """e_k = m_k / N~_k with Laplace-smoothed counts N~_k = (N_k + eps) / (n + K eps) n (Sonnet's VQ-VAE-EMA)."""
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n  # (K,)
        self.embedding.copy_(self.embed_sum / smoothed[:, None])

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, restart_rand: torch.Tensor) -> torch.Tensor:
        """Move codes with EMA count < threshold onto random rows of z (M, d); returns the restarted indices.

        The rows are the first ones of the permutation argsort(restart_rand) (cycled if there are more dead
        codes than rows). A restarted code gets count = threshold (just alive) and, with EMA, a sum that
        keeps e_k = sum / count. With several processes, rank 0's choice is broadcast.
        """
        dead = torch.nonzero(self.cluster_size < self.dead_code_threshold).squeeze(1)  # (n_dead,)
        if len(dead) == 0 or len(z) == 0:
            return dead
        if restart_rand.numel() != len(z):
            raise ConfigError(f"restart_rand has {restart_rand.numel()} numbers for {len(z)} encoder outputs")
        order = restart_rand.reshape(-1).to(z.device).argsort()  # a uniformly random permutation of the rows
        chosen = z[order[torch.arange(len(dead), device=z.device) % len(z)]]  # (n_dead, d)
        self.embedding.data[dead] = chosen.to(self.embedding.dtype)
        self.cluster_size[dead] = self.dead_code_threshold
        if self.use_ema:
            self.embed_sum[dead] = chosen * self.dead_code_threshold
        if _world_size() > 1:
            for tensor in (self.embedding.data, self.cluster_size, *((self.embed_sum,) if self.use_ema else ())):
                dist.broadcast(tensor, src=0)
        return dead
