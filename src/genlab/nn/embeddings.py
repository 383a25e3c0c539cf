"""Embeddings of scalar conditions: sinusoidal timestep features and the MLP that lifts them."""

from __future__ import annotations

import math

import torch
from torch import nn


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
