"""A small GPT over raster-scanned code maps (Radford et al. 2018/2019; nanoGPT layout; Esser et al.
2021 use the same model as the prior of VQGAN codes).

The sequence of L = h * w codes c_0 .. c_{L-1} is modelled as p(c) = prod_p p(c_p | s, c_<p), where
s is a start token (one for unconditional models, one per class for class-conditional ones). The
network reads [s, c_0, .., c_{L-2}] and its output at position p is the distribution of c_p: a
causal mask lets position p attend to inputs 0..p only, i.e. to s and c_<p.

Blocks are pre-LayerNorm (x + Attn(LN(x)), x + MLP(LN(x)), GPT-2), with learned token and position
embeddings. :meth:`GPT.step` runs one new position against a key/value cache, so sampling L codes
costs L single-token passes instead of L full-sequence passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genlab.errors import ConfigError


@dataclass
class GPTConfig:
    """Sizes of a small causal transformer."""

    dim: int = 128  # token width
    num_layers: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0  # hidden width of the MLP / dim
    dropout: float = 0.0  # on attention weights, residual branches and embeddings


class KVCache:
    """Keys and values (N, heads, S, d_head) of every layer for the positions processed so far."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def cached(self, layer: int = 0) -> int:
        """Number of positions already cached in ``layer``."""
        return 0 if self.keys[layer] is None else self.keys[layer].shape[2]

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this layer's new keys/values and return all of them (past + new)."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position p attends to positions <= p (Vaswani et al. 2017)."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ConfigError(f"model.net.num_heads={num_heads} must divide model.net.dim={dim}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """Tokens x (N, T, D), the T positions after those in ``cache`` -> (N, T, D)."""
        n, t, dim = x.shape
        past = 0 if cache is None else cache.cached(layer)
        q, k, v = (z.view(n, t, self.num_heads, dim // self.num_heads).transpose(1, 2)
                   for z in self.to_qkv(x).chunk(3, dim=-1))  # 3 x (N, heads, T, d_head)
        if cache is not None:
            k, v = cache.extend(layer, k, v)  # (N, heads, past + T, d_head)
        mask, is_causal = None, False
        if past == 0:
            is_causal = t > 1  # query p sees keys 0..p (SDPA's lower-triangular mask)
        elif t > 1:  # new queries past..past+T-1 against keys 0..past+T-1: bottom-right aligned
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                             dropout_p=self.dropout if self.training else 0.0)  # (N, heads, T, d_head)
        return self.proj(out.transpose(1, 2).reshape(n, t, dim))  # (N, T, D)


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attention = CausalSelfAttention(cfg.dim, cfg.num_heads, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """(N, T, D) -> (N, T, D)."""
        x = x + self.drop(self.attention(self.norm1(x), cache, layer))
        return x + self.drop(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    """Causal transformer over sequences of L codes in [0, K): logits (N, L, K) of p(c_p | start, c_<p)."""

    def __init__(self, cfg: GPTConfig, num_codes: int, length: int, num_classes: int | None = None):
        super().__init__()
        self.num_codes = num_codes
        self.length = length
        self.num_classes = num_classes
        # Input vocabulary: the K codes, then the start token(s): one, or one per class.
        self.token_embedding = nn.Embedding(num_codes + (num_classes or 1), cfg.dim)
        self.position_embedding = nn.Parameter(torch.zeros(length, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, num_codes, bias=False)
        self._init_weights(cfg)

    def _init_weights(self, cfg: GPTConfig) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.position_embedding, std=0.02)
        for block in self.blocks:
            for proj in (block.attention.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.num_layers))

    def start_tokens(self, n: int, y: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """The first input token (n,): the start token, or the class token of each label."""
        if self.num_classes is None:
            return torch.full((n,), self.num_codes, dtype=torch.long, device=device)
        if y is None:
            raise ConfigError("this GPT is class-conditional: pass labels (N,)")
        return self.num_codes + y.to(device=device, dtype=torch.long)

    def logits_from_tokens(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Input tokens (N, T) at positions cache.cached() .. cache.cached() + T - 1 -> logits (N, T, K)."""
        start = 0 if cache is None else cache.cached()
        if start + tokens.shape[1] > self.length:
            raise ConfigError(f"sequence of {start + tokens.shape[1]} tokens is longer than the model's {self.length}")
        x = self.token_embedding(tokens) + self.position_embedding[start: start + tokens.shape[1]]  # (N, T, D)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        return self.head(self.norm(x))  # (N, T, K)

    def forward(self, codes: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Codes (N, L) -> logits (N, L, K); logit p sees the start token and codes 0..p-1 (teacher forcing)."""
        start = self.start_tokens(codes.shape[0], y, codes.device)[:, None]  # (N, 1)
        tokens = torch.cat([start, codes[:, :-1]], dim=1)  # (N, L): shifted right by one
        return self.logits_from_tokens(tokens)

    def step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new input token per sequence (N,) appended to ``cache`` -> logits of the next code (N, K)."""
        return self.logits_from_tokens(tokens[:, None], cache)[:, 0]
