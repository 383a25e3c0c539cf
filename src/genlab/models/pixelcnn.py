"""Gated PixelCNN over maps of discrete codes (van den Oord et al. 2016, "Conditional Image
Generation with PixelCNN Decoders").

The model factorises p(c) = prod_i p(c_i | c_<i) over the positions of an (h, w) code map in raster
order (row by row, left to right). Two stacks of gated convolutions keep it causal without the
blind spot of the original masked PixelCNN:

- the **vertical stack** sees the rows above: a (k//2 + 1) x k convolution whose output at row i
  covers input rows i - k//2 .. i. Its features at row i therefore depend on rows <= i; before they
  feed the horizontal stack they are shifted down by one row, so the horizontal stack only ever
  receives rows strictly above (rows i-1-k//2 .. i-1 from one layer; paper, Section 2.2 and Fig. 2);
- the **horizontal stack** sees the current row to the left: a 1 x (k//2 + 1) convolution whose
  output at column j covers input columns j - k//2 .. j. In the first layer (mask type "A") the tap
  at column j is zeroed, so position i never sees its own code; later layers (type "B") keep it,
  because their input at position i already depends only on positions < i.

Every layer is gated, y = tanh(W_f * x) * sigmoid(W_g * x) (paper eq. 2), optionally with a class
bias V^T h added inside both gates (eq. 4), and the horizontal stack is residual after the first
layer (the first layer's input is the current code itself: a residual there would leak it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from genlab.errors import ConfigError


@dataclass
class PixelCNNConfig:
    """Sizes of a Gated PixelCNN."""

    hidden_channels: int = 64  # width of both stacks (the code embedding has the same width)
    num_layers: int = 8  # gated layers; the receptive field grows by kernel_size // 2 per layer
    kernel_size: int = 5  # odd; the n x n receptive field of one layer
    head_channels: int = 256  # width of the 1x1 output head before the K logits


def gate(x: torch.Tensor) -> torch.Tensor:
    """Gated activation tanh(a) * sigmoid(b) of x = [a, b] split along channels (paper eq. 2)."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def shift_down(x: torch.Tensor) -> torch.Tensor:
    """Move a feature map down by one row (zeros enter at the top): row i then holds row i - 1."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


class GatedMaskedLayer(nn.Module):
    """One gated layer of both stacks; mask "A" (first layer) hides the current position, "B" keeps it."""

    def __init__(self, channels: int, kernel_size: int, mask: Literal["A", "B"], num_classes: int | None = None):
        super().__init__()
        if mask not in ("A", "B"):
            raise ConfigError(f"mask type must be 'A' or 'B', got {mask!r}")
        self.mask = mask
        self.half = kernel_size // 2
        self.vertical = nn.Conv2d(channels, 2 * channels, (self.half + 1, kernel_size))
        self.horizontal = nn.Conv2d(channels, 2 * channels, (1, self.half + 1))
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horizontal_out = nn.Conv2d(channels, channels, 1)
        self.class_bias = nn.Embedding(num_classes, 4 * channels) if num_classes else None
        if mask == "A":
            # The horizontal tap at the current column is the code being predicted: zero it for good.
            self.register_buffer("horizontal_mask", torch.ones_like(self.horizontal.weight), persistent=False)
            self.horizontal_mask[..., -1] = 0.0

    def forward(
        self, v: torch.Tensor, h: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vertical and horizontal features (N, C, h, w), labels (N,) -> the next layer's (v, h)."""
        k = self.half
        v_pre = self.vertical(F.pad(v, (k, k, k, 0)))  # (N, 2C, h, w): rows i-k..i, cols j-k..j+k
        weight = self.horizontal.weight
        if self.mask == "A":
            weight = weight * self.horizontal_mask
        h_pre = F.conv2d(F.pad(h, (k, 0, 0, 0)), weight, self.horizontal.bias)  # (N, 2C, h, w): cols j-k..j
        h_pre = h_pre + self.vertical_to_horizontal(shift_down(v_pre))  # rows strictly above only
        if self.class_bias is not None:
            if y is None:
                raise ConfigError("this PixelCNN is class-conditional: pass labels (N,)")
            bias_v, bias_h = self.class_bias(y)[:, :, None, None].chunk(2, dim=1)  # 2 x (N, 2C, 1, 1)
            v_pre, h_pre = v_pre + bias_v, h_pre + bias_h
        v_out = gate(v_pre)  # (N, C, h, w)
        h_out = self.horizontal_out(gate(h_pre))  # (N, C, h, w)
        if self.mask == "B":
            h_out = h_out + h  # residual on the horizontal stack (paper Fig. 2)
        return v_out, h_out


class GatedPixelCNN(nn.Module):
    """Autoregressive model of (N, h, w) code maps over K codes: codes -> logits (N, K, h, w)."""

    def __init__(self, cfg: PixelCNNConfig, num_codes: int, num_classes: int | None = None):
        super().__init__()
        if cfg.kernel_size < 3 or cfg.kernel_size % 2 == 0:
            raise ConfigError(f"model.net.kernel_size={cfg.kernel_size} must be odd and >= 3 (e.g. 3, 5, 7)")
        if cfg.num_layers < 1:
            raise ConfigError(f"model.net.num_layers={cfg.num_layers} must be at least 1")
        self.num_codes = num_codes
        self.num_classes = num_classes
        c = cfg.hidden_channels
        self.embedding = nn.Embedding(num_codes, c)
        self.layers = nn.ModuleList(
            GatedMaskedLayer(c, cfg.kernel_size, "A" if i == 0 else "B", num_classes) for i in range(cfg.num_layers)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(c, cfg.head_channels, 1), nn.ReLU(),
                                  nn.Conv2d(cfg.head_channels, num_codes, 1))

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (N, h, w) long -> embedded map (N, C, h, w)."""
        return self.embedding(codes).permute(0, 3, 1, 2)

    def logits_from_embedding(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Embedded map (N, C, h, w) -> logits (N, K, h, w); logit i depends on x at positions < i only."""
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h, y)
        return self.head(h)  # (N, K, h, w)

    def forward(self, codes: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Codes (N, h, w), labels (N,) or None -> logits of p(c_i | c_<i, y), (N, K, h, w)."""
        return self.logits_from_embedding(self.embed(codes), y)
