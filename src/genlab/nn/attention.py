"""Multi-head attention, the one implementation shared by the U-Net, DiT and text conditioning.

:class:`Attention` works on token sequences (N, L, D): self-attention, or cross-attention when
built with ``context_dim`` (queries from the tokens, keys and values from a context (N, S, D_ctx),
e.g. text encoder states, as in Stable Diffusion). :class:`SpatialAttention` applies it over the
H*W positions of a feature map, as the attention block of DDPM / ADM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genlab.errors import ConfigError
from genlab.nn.blocks import group_norm


def multihead_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_head)) v per head (Vaswani et al. 2017, eq. 1).

    q (N, L, D), k and v (N, S, D) -> (N, L, D); D is split into num_heads heads of D / num_heads.
    ``key_mask`` (N, S) bool, True where a key may be attended to (padding tokens of text are False).
    """
    n, length, dim = q.shape
    head_dim = dim // num_heads
    # Views only: the head split is a reshape of the last axis, SDPA reads the strides as they are.
    q = q.view(n, length, num_heads, head_dim).transpose(1, 2)  # (N, h, L, d_head)
    k = k.view(n, -1, num_heads, head_dim).transpose(1, 2)  # (N, h, S, d_head)
    v = v.view(n, -1, num_heads, head_dim).transpose(1, 2)  # (N, h, S, d_head)
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (N, 1, 1, S), broadcast over heads and queries
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # train.mixed_precision=bf16 on a CPU: torch's bf16 attention kernel splits the work into thousands of
        # tiny matrix products (6x slower than float32 on the small U-Net's 49 tokens). Without a mask the explicit
        # form is faster still: two batched bf16 products and a float32 softmax (autocast's own choice for each).
        if mask is None:
            out = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (N, h, L, S) logits
            out = out.softmax(dim=-1) @ v  # (N, h, L, d_head)
        else:
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (N, h, L, d_head)
    return out.transpose(1, 2).reshape(n, length, dim)  # (N, L, D)


class Attention(nn.Module):
    """Multi-head self-attention over tokens, or cross-attention to a context when context_dim is set."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, bias: bool = True):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ConfigError(
                f"num_heads={num_heads} does not divide the attention width {dim}: "
                "choose a number of heads that divides every attention layer's channel count"
            )
        self.num_heads = num_heads
        self.context_dim = context_dim
        if context_dim is None:
            self.to_qkv = nn.Linear(dim, 3 * dim, bias=bias)  # one matmul for q, k, v
        else:
            self.to_q = nn.Linear(dim, dim, bias=bias)
            self.to_kv = nn.Linear(context_dim, 2 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from tokens x (N, L, D) to themselves or to context (N, S, D_ctx) -> (N, L, D); key_mask (N, S) bool."""
        if self.context_dim is None:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)  # 3 x (N, L, D)
        else:
            if context is None:
                raise ConfigError(
                    "this cross-attention layer needs a context (N, S, D_ctx); pass context=... "
                    "(e.g. text encoder states) or build the model without context_dim"
                )
            if context.shape[-1] != self.context_dim:
                raise ConfigError(
                    f"context has width {context.shape[-1]} but this layer was built with "
                    f"context_dim={self.context_dim}: make them equal"
                )
            q = self.to_q(x)  # (N, L, D)
            k, v = self.to_kv(context).chunk(2, dim=-1)  # 2 x (N, S, D)
        return self.proj(multihead_attention(q, k, v, self.num_heads, key_mask))  # (N, L, D)


class SpatialAttention(nn.Module):
    """x + Attention(GroupNorm(x)) over the H*W positions of a feature map (DDPM / ADM attention block).

    The output projection starts at zero (Ho et al. 2020 use init_scale=0 there), so the block is
    the identity at initialisation and the network starts as its attention-free version. With
    ``context_dim`` set it is a cross-attention block: queries from the positions, keys and values
    from the context. ``positions`` (cross-attention only) = H*W adds a learned embedding of each
    position (zero at init) to the queries, so what a position asks the context can depend on where it is.
    """

    def __init__(
        self, channels: int, num_heads: int, norm_groups: int = 32, context_dim: int | None = None,
        positions: int | None = None,
    ):
        super().__init__()
        if positions is not None and context_dim is None:
            raise ConfigError("query position embeddings are for cross-attention: build the block with context_dim")
        self.norm = group_norm(channels, norm_groups)
        self.query_position = None if positions is None else nn.Parameter(torch.zeros(positions, channels))
        self.attention = Attention(channels, num_heads, context_dim=context_dim)
        nn.init.zeros_(self.attention.proj.weight)
        nn.init.zeros_(self.attention.proj.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feature map x (N, C, H, W), optional context (N, S, D_ctx) with its mask (N, S) bool
        (True on real tokens: text padding is never attended to) -> (N, C, H, W)."""
        n, c, h, w = x.shape
        if self.attention.context_dim is None and x.is_contiguous(memory_format=torch.channels_last):
            return x + self._self_attention_nhwc(self.norm(x))
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (N, H*W, C)
        if self.query_position is not None:
            if self.query_position.shape[0] != h * w:
                raise ConfigError(f"this cross-attention block has query positions for {self.query_position.shape[0]} "
                                  f"pixels, the feature map has {h}x{w}: sample at the size the run was trained at")
            tokens = tokens + self.query_position  # (N, H*W, C): only the queries read it (keys come from the context)
        out = self.attention(tokens, context, key_mask=context_mask)  # (N, H*W, C)
        return x + out.transpose(1, 2).reshape(n, c, h, w)  # (N, C, H, W)

    def _self_attention_nhwc(self, h: torch.Tensor) -> torch.Tensor:
        """Self-attention of a normalised NHWC feature map h (N, C, H, W) -> (N, C, H, W), NHWC.

        The same maths as Attention on h's tokens, with the q/k/v and output projections as 1x1 convolutions
        over the map: on NHWC memory the map *is* the token matrix (N, H*W, C), so no copy is made, and the
        products run in oneDNN (this CPU's fast kernels; MKL takes its AVX2 path on AMD). 1.02x per training
        step of the small U-Net (docs/results.md, "Issue 17 point 1")."""
        n, c, height, width = h.shape
        a = self.attention
        qkv = F.conv2d(h, a.to_qkv.weight[:, :, None, None], a.to_qkv.bias)  # (N, 3C, H, W), NHWC
        q, k, v = qkv.flatten(2).transpose(1, 2).chunk(3, dim=-1)  # 3 x (N, H*W, C), views
        out = multihead_attention(q, k, v, a.num_heads)  # (N, H*W, C), contiguous
        out = out.transpose(1, 2).view(n, c, height, width)  # NHWC view, no copy
        return F.conv2d(out, a.proj.weight[:, :, None, None], a.proj.bias)  # (N, C, H, W)


class TransformerBlock(nn.Module):
    """x + Attention(LN(x)), then x + MLP(LN(x)): the pre-LN block of GPT-2 / CLIP's text tower."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask=mask)  # (N, L, D); padding is never attended to
        return x + self.mlp(self.norm2(x))


class ContextRefiner(nn.Module):
    """Trainable transformer blocks over a (frozen) text encoder's token states: (N, S, D_in) -> (N, S, W).

    A frozen sentence encoder's state of a word carries its own meaning but little of its role in this
    data's captions: MiniLM's state of the "8" in "an 8 to the right of a 3" does not say "right-hand
    digit" in a form that carries across phrasings (a linear probe fitted on the other templates reads
    most held-out ones backwards; benchmarks/pairs_binding.py). A cross-attention query cannot combine
    two tokens (the digit and the relation word) in one step, so these blocks, trained with the
    denoiser, let every token read the others first (as a trainable text tower does). On mnist-pairs at
    20 CPU-minutes they did not help (docs/results.md, "mnist-pairs composition").
    """

    def __init__(self, in_dim: int, width: int, layers: int, heads: int):
        super().__init__()
        self.proj_in = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.proj_in(context)  # (N, S, W)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)  # (N, S, W)
