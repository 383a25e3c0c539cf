"""Embeddings of scalar conditions: sinusoidal timestep features and the MLP that lifts them."""

from __future__ import annotations

import math

import torch
from torch import nn

from genlab.errors import ConfigError


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps t (N,) -> (N, dim), as in DDPM / ADM.

    Feature i < dim // 2 is cos(t * w_i) and feature dim // 2 + i is sin(t * w_i), with frequencies
    w_i = max_period ** (-i / (dim // 2)) spaced geometrically from 1 down to ~1 / max_period (the
    transformer position encoding of Vaswani et al. 2017, used for t by Ho et al. 2020 and in the
    cos-first order of Dhariwal & Nichol 2021). An odd dim gets one trailing zero. Computed in
    float32 whatever t's dtype, so integer timesteps and half-precision models both work.
    """
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=t.device) / half  # (half,)
    frequencies = torch.exp(-math.log(max_period) * exponents)  # (half,)
    angles = t.to(torch.float32)[:, None] * frequencies[None, :]  # (N, half)
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (N, 2 * half)
    if dim % 2:
        embedding = nn.functional.pad(embedding, (0, 1))  # (N, dim)
    return embedding


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t followed by Linear -> SiLU -> Linear (DDPM, ADM and DiT alike)."""

    def __init__(self, frequency_dim: int, embed_dim: int, max_period: float = 10000.0):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Embed timesteps t (N,) (long or float) -> (N, embed_dim)."""
        features = timestep_embedding(t, self.frequency_dim, self.max_period)  # (N, frequency_dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # (N, embed_dim)


class MicroConditionEmbedder(nn.Module):
    """SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2): K scalar conditions (original size,
    crop coordinates, target size, a cascade's noise-augmentation level...) -> one embedding (N, E)
    that the denoiser adds to its time embedding.

    Each scalar gets its own sinusoidal (Fourier) features, as a timestep does, and the
    concatenation goes through Linear -> SiLU -> Linear. The last layer starts at zero, so a network
    built with micro-conditions computes exactly what the same network without them computes until
    training moves it (the zero-init habit of ControlNet and adaLN-Zero): adding the conditions to a
    recipe does not change its starting point.
    """

    def __init__(self, num_conditions: int, frequency_dim: int, embed_dim: int, max_period: float = 10000.0):
        super().__init__()
        self.num_conditions = num_conditions
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(num_conditions * frequency_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim)
        )
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, micro: torch.Tensor) -> torch.Tensor:
        """Conditions (N, K) float -> (N, embed_dim)."""
        if micro is None or micro.ndim != 2 or micro.shape[1] != self.num_conditions:
            got = "none" if micro is None else f"shape {tuple(micro.shape)}"
            raise ConfigError(f"this network is micro-conditioned on {self.num_conditions} values per image: pass "
                              f"micro of shape (N, {self.num_conditions}), got {got}")
        n, k = micro.shape
        features = timestep_embedding(micro.reshape(n * k), self.frequency_dim, self.max_period)  # (N K, F)
        return self.mlp(features.reshape(n, k * self.frequency_dim).to(self.mlp[0].weight.dtype))  # (N, E)
