"""Diffusion Transformer (DiT, Peebles & Xie 2023) with four ways to condition on t and y (SPEC D10).

The image is cut into p x p patches by a stride-p convolution, each patch becomes a token, a fixed
2D sin-cos position embedding is added, N transformer blocks process the tokens and a linear layer
turns every token back into a patch (unpatchify). The conditioning c = embed(t) + embed(y) enters
the blocks in one of the four ways of the paper's section 3.2:

* ``in-context``: embed(t) and embed(y) are two extra tokens in the sequence (like ViT's [CLS]),
  dropped before the output layer; the blocks are plain pre-LN transformer blocks.
* ``cross-attention``: the two condition tokens form a context that every block attends to with an
  extra cross-attention layer after self-attention.
* ``adaln``: LayerNorm without affine parameters, then scale and shift regressed from c
  (adaptive layer norm, as in FiLM / StyleGAN).
* ``adaln-zero``: as adaln, plus a per-channel gate alpha regressed from c on each residual branch,
  with the regression layers initialised to zero so each block starts as the identity. The paper
  found this the best of the four (its figure 5).

With ``long_skips`` the blocks are joined as in U-ViT (Bao et al. 2023): block k's output is concatenated to
the input of block depth - 1 - k and projected back to the width.

Text (built with ``context_dim``): the text encoder's token states, projected to the width, are a
context every block attends to with a cross-attention layer after self-attention (masked where the
text is padding). In the ``cross-attention`` variant they join the condition tokens in the context of
its existing cross-attention layer; the other variants get that layer for the text alone, as
PixArt-alpha adds cross-attention to adaLN blocks (Chen et al. 2023), zero-initialised so an
adaLN-Zero block stays the identity at initialisation. With ``pooled_dim``, the pooled text vector
is lifted by an MLP and added to the timestep embedding (SDXL), so it enters c (and the t token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from genlab.errors import ConfigError
from genlab.nn.attention import Attention
from genlab.nn.embeddings import MicroConditionEmbedder, TimestepEmbedder

CONDITIONINGS = ("in-context", "cross-attention", "adaln", "adaln-zero")


@dataclass
class DiTConfig:
    """Patch size, width, depth, heads and the conditioning variant of a DiT."""

    patch_size: int | None = None  # None: derived from the image size (see ``derived_patch_size``)
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    conditioning: Literal["in-context", "cross-attention", "adaln", "adaln-zero"] = "adaln-zero"
    # Scale of the condition c = embed(t) + embed(y) at initialisation. "dit": the paper's N(0, 0.02)
    # class table and timestep MLP, so |c| ~ 0.03 and, behind the zero-initialised adaLN layers, t and y
    # reach the blocks only after many steps (fine at 400k steps, not at a few thousand). "unit": an
    # N(0, 1) class table and a Xavier timestep MLP (as the U-Net's), so c starts at O(1).
    embedding_init: Literal["dit", "unit"] = "dit"
    # U-ViT's long skip connections (Bao et al. 2023): the output of each of the first depth // 2 blocks is
    # concatenated to the input of its mirror among the last depth // 2 blocks and projected back to the
    # width by a linear layer, as a U-Net's skips carry fine detail past its middle; U-ViT's ablation found
    # them crucial for pixel-space diffusion. False: the paper's DiT (no extra weights).
    long_skips: bool = False


# The paper's sizes (table 1); the CPU presets use smaller ones.
DIT_SIZES = {
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
}


MAX_DERIVED_GRID = 8  # a derived patch size gives at most 8 x 8 = 64 tokens


def derived_patch_size(image_size: int) -> int:
    """The smallest patch size dividing ``image_size`` with at most 8 x 8 tokens (28 px: 4, 7 x 7 tokens).

    Attention costs grow with the square of the token count; 64 tokens keep a CPU step cheap (DiT's
    own 256 px latent models use 16 x 16 = 256 tokens: set patch_size for that).
    """
    return next(p for p in range(1, image_size + 1) if image_size % p == 0 and image_size // p <= MAX_DERIVED_GRID)


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Sin-cos features of positions (M,) -> (M, dim): first half sin, second half cos (Vaswani et al. 2017)."""
    if dim % 2:
        raise ConfigError(f"sin-cos position embedding needs an even width, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    angles = positions.double()[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(grid_size: int, dim: int) -> torch.Tensor:
    """Fixed 2D position embedding of a grid_size x grid_size patch grid -> (grid_size**2, dim).

    Half the channels encode the row, half the column (MAE / DiT); tokens are in raster order.
    """
    if dim % 4:
        raise ConfigError(f"2D sin-cos position embedding needs a width divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each
    embedding = torch.cat([sincos_1d(rows.flatten(), dim // 2), sincos_1d(cols.flatten(), dim // 2)], dim=1)
    return embedding.float()  # (G*G, dim)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Images (N, C, H, W) -> patch vectors (N, H/p * W/p, p*p*C), raster order over patches."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p)  # (N, C, gh, p, gw, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, p: int, channels: int) -> torch.Tensor:
    """Patch vectors (N, T, p*p*C) -> images (N, C, H, W) with H = W = p * sqrt(T); inverse of patchify."""
    n, t, _ = tokens.shape
    g = math.isqrt(t)
    x = tokens.reshape(n, g, g, p, p, channels)  # (N, gh, gw, p, p, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(n, channels, g * p, g * p)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, per sample and channel; x (N, T, D), shift/scale (N, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Mlp(nn.Sequential):
    """Linear -> GELU(tanh) -> Linear, the transformer's position-wise feed-forward network."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class DiTBlock(nn.Module):
    """One transformer block conditioned on c (N, D) as ``conditioning`` says."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, conditioning: str, text: bool = False):
        super().__init__()
        self.conditioning = conditioning
        adaptive = conditioning in ("adaln", "adaln-zero")
        # Adaptive variants regress the norms' scale and shift from c: the LayerNorms have no affine.
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=not adaptive, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=not adaptive, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if conditioning == "cross-attention" or text:
            self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
            self.cross = Attention(dim, num_heads, context_dim=dim)
        if adaptive:
            chunks = 6 if conditioning == "adaln-zero" else 4  # (shift, scale[, gate]) for attention and MLP
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, chunks * dim))
            if conditioning == "adaln-zero":  # gates start at 0: the block is the identity (section 3.2)
                nn.init.zeros_(self.adaLN_modulation[-1].weight)
                nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens x (N, T, D), condition c (N, D), context tokens (N, S, D) for cross-attention with
        their mask (N, S) bool (True on real tokens) -> (N, T, D)."""
        if self.conditioning == "adaln-zero":
            shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (N, D)
            x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
            x = self._cross(x, context, context_mask)
            return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))
        if self.conditioning == "adaln":
            shift1, scale1, shift2, scale2 = self.adaLN_modulation(c).chunk(4, dim=1)  # 4 x (N, D)
            x = x + self.attn(modulate(self.norm1(x), shift1, scale1))
            x = self._cross(x, context, context_mask)
            return x + self.mlp(modulate(self.norm2(x), shift2, scale2))
        x = x + self.attn(self.norm1(x))
        x = self._cross(x, context, context_mask)  # queries from patches, keys/values from (t, y) [and text]
        return x + self.mlp(self.norm2(x))

    def _cross(self, x: torch.Tensor, context: torch.Tensor | None, context_mask: torch.Tensor | None) -> torch.Tensor:
        """x + CrossAttention(LN(x), context) when the block has that layer, else x: (N, T, D)."""
        if not hasattr(self, "cross"):
            return x
        return x + self.cross(self.norm_cross(x), context, key_mask=context_mask)


class FinalLayer(nn.Module):
    """Norm (adaptive for adaLN variants) and a linear map from each token to its p*p*C_out patch."""

    def __init__(self, dim: int, patch_dim: int, conditioning: str):
        super().__init__()
        self.adaptive = conditioning in ("adaln", "adaln-zero")
        self.norm = nn.LayerNorm(dim, elementwise_affine=not self.adaptive, eps=1e-6)
        self.linear = nn.Linear(dim, patch_dim)
        if self.adaptive:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        if conditioning == "adaln-zero":  # DiT zero-initialises the output: the network starts at eps = 0
            nn.init.zeros_(self.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.adaLN_modulation[-1].bias)
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(N, T, D), (N, D) -> (N, T, patch_dim)."""
        if self.adaptive:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            return self.linear(modulate(self.norm(x), shift, scale))
        return self.linear(self.norm(x))


class DiT(nn.Module):
    """eps-prediction transformer: (x_t (N, C, H, W), t (N,), y (N,) or None) -> (N, C_out, H, W).

    ``self.config`` holds the configuration with the patch size resolved for ``image_size``.
    """

    def __init__(self, config: DiTConfig, in_channels: int, out_channels: int, image_size: int,
                 num_classes: int | None = None, context_dim: int | None = None, pooled_dim: int | None = None,
                 micro_conditions: int = 0):
        super().__init__()
        if config.patch_size is None:
            config = replace(config, patch_size=derived_patch_size(image_size))
        c = config
        if c.conditioning not in CONDITIONINGS:
            raise ConfigError(f"unknown DiT conditioning {c.conditioning!r}; valid: {', '.join(CONDITIONINGS)}")
        if c.patch_size < 1 or image_size % c.patch_size:
            raise ConfigError(f"DiT patch_size={c.patch_size} must divide the image size {image_size}")
        if c.embedding_init not in ("dit", "unit"):
            raise ConfigError(f"DiT embedding_init={c.embedding_init!r}: choose dit (the paper's N(0, 0.02)) or unit")
        if c.hidden_size % c.num_heads:
            raise ConfigError(f"DiT num_heads={c.num_heads} must divide hidden_size={c.hidden_size}")
        self.config, self.in_channels, self.out_channels = c, in_channels, out_channels
        self.num_classes = num_classes
        self.grid = image_size // c.patch_size
        dim = c.hidden_size
        self.patch_embed = nn.Conv2d(in_channels, dim, c.patch_size, stride=c.patch_size)  # patchify + linear
        self.register_buffer("pos_embed", sincos_2d(self.grid, dim)[None], persistent=False)  # (1, T, D), fixed
        self.t_embedder = TimestepEmbedder(256, dim)
        # num_classes + 1 rows: the last one is the null class of classifier-free guidance.
        self.y_embedder = nn.Embedding(num_classes + 1, dim) if num_classes else None
        self.context_dim, self.pooled_dim = context_dim, pooled_dim
        # Text modules exist only when asked for: checkpoints of runs without text keep their keys.
        if context_dim is not None:
            self.context_embed = nn.Linear(context_dim, dim)  # text token states -> the width D
        if pooled_dim is not None:
            self.pooled_embed = nn.Sequential(nn.Linear(pooled_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        # SDXL micro-conditions, added to the time token (so every conditioning variant sees them); zero at init.
        self.micro_embed = MicroConditionEmbedder(micro_conditions, 256, dim) if micro_conditions else None
        text = context_dim is not None
        self.blocks = nn.ModuleList([DiTBlock(dim, c.num_heads, c.mlp_ratio, c.conditioning, text) for _ in range(c.depth)])
        self.final = FinalLayer(dim, c.patch_size ** 2 * out_channels, c.conditioning)
        self._init_weights()
        # Built after the other weights are drawn, so these draw the same random numbers with or without them.
        # skip_proj[i] feeds block depth - depth // 2 + i: concat(x, skip) (N, T, 2D) -> (N, T, D).
        self.skip_proj = nn.ModuleList([nn.Linear(2 * dim, dim) for _ in range(c.depth // 2)]) if c.long_skips else None
        for proj in self.skip_proj or ():
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def _init_weights(self) -> None:
        """Xavier-uniform linears and patch embedding, N(0, 0.02) embeddings (DiT's initialisation)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        if self.config.embedding_init == "dit":  # "unit": the Xavier pass above, and an N(0, 1) class table
            nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02 if self.config.embedding_init == "dit" else 1.0)
        if self.micro_embed is not None:  # zero-initialised output, undone by the xavier pass above
            nn.init.zeros_(self.micro_embed.mlp[2].weight)
        if self.config.conditioning == "adaln-zero":  # the xavier pass above must not undo the zero init
            for block in self.blocks:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
            for layer in (self.final.adaLN_modulation[-1], self.final.linear):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        if self.context_dim is not None and self.config.conditioning in ("adaln", "adaln-zero"):
            for block in self.blocks:  # text cross-attention starts silent (PixArt-alpha): the block is as without text
                nn.init.zeros_(block.cross.proj.weight)
                nn.init.zeros_(block.cross.proj.bias)

    def condition_tokens(self, t: torch.Tensor, y: torch.Tensor | None, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """The condition as tokens (N, S, D): embed(t) (plus the lifted pooled text vector) and, for
        class-conditional models, embed(y)."""
        time = self.t_embedder(t)  # (N, D)
        if pooled is not None:
            if self.pooled_dim is None:
                raise ConfigError("a pooled text vector was given but the DiT has pooled_dim=None: "
                                  "build it with pooled_dim=... or pass pooled=None")
            time = time + self.pooled_embed(pooled)  # (N, D)
        tokens = [time]
        if self.y_embedder is not None:
            if y is None:
                y = torch.full_like(t, self.num_classes, dtype=torch.long)  # unconditional: the null class
            tokens.append(self.y_embedder(y))
        return torch.stack(tokens, dim=1)  # (N, S, D)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None, *, context_mask: torch.Tensor | None = None,
                pooled: torch.Tensor | None = None, micro: torch.Tensor | None = None) -> torch.Tensor:
        """x_t (N, C, H, W), t (N,), y (N,) -> (N, C_out, H, W); text: context (N, L, context_dim)
        token states with context_mask (N, L) bool (True on real tokens), pooled (N, pooled_dim);
        micro (N, K) micro-conditions (SDXL)."""
        n = x.shape[0]
        if t.ndim == 0:
            t = t.expand(n)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, D)
        cond = self.condition_tokens(t, y, pooled)  # (N, S, D)
        if self.micro_embed is not None:  # embed(t) + embed(micro), as SDXL adds them to the time embedding
            cond = torch.cat([cond[:, :1] + self.micro_embed(micro)[:, None], cond[:, 1:]], dim=1)  # (N, S, D)
        elif micro is not None:
            raise ConfigError("micro-conditions were given but the DiT has micro_conditions=0: build it with them")
        c = cond.sum(1)  # (N, D): embed(t) + embed(y), DiT's conditioning vector
        kind = self.config.conditioning
        if kind == "in-context":
            tokens = torch.cat([tokens, cond], dim=1)  # (N, T + S, D)
        keys, key_mask = self._cross_context(cond, context, context_mask)
        skips, first_out = [], len(self.blocks) - len(self.skip_proj or ())  # the mirrored half starts here
        for i, block in enumerate(self.blocks):
            if i >= first_out:  # U-ViT: the skip of the mirror block, concatenated and projected
                tokens = self.skip_proj[i - first_out](torch.cat([tokens, skips.pop()], dim=-1))  # (N, T, D)
            tokens = block(tokens, c, context=keys, context_mask=key_mask)
            if i < len(self.skip_proj or ()):
                skips.append(tokens)
        if kind == "in-context":
            tokens = tokens[:, : self.grid ** 2]  # drop the condition tokens
        patches = self.final(tokens, c)  # (N, T, p*p*C_out)
        return unpatchify(patches, self.config.patch_size, self.out_channels)  # (N, C_out, H, W)

    def _cross_context(self, cond: torch.Tensor, context: torch.Tensor | None, context_mask: torch.Tensor | None
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What the blocks' cross-attention attends to, and its key mask: the condition tokens (N, S, D)
        in the cross-attention variant, then the projected text tokens (N, L, D) when there is text."""
        if context is None:
            if self.context_dim is not None:
                raise ConfigError("this DiT was built with context_dim (text): pass context=... (text token states)")
            return (cond, None) if self.config.conditioning == "cross-attention" else (None, None)
        if self.context_dim is None:
            raise ConfigError("a text context was given but the DiT has context_dim=None: build it with context_dim=...")
        text = self.context_embed(context)  # (N, L, D)
        mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device) if context_mask is None else context_mask
        if self.config.conditioning != "cross-attention":
            return text, mask
        cond_mask = torch.ones(cond.shape[:2], dtype=torch.bool, device=cond.device)
        return torch.cat([cond, text], dim=1), torch.cat([cond_mask, mask], dim=1)  # (N, S + L, D), (N, S + L)
