"""DCGAN networks (Radford et al. 2016), sized for 8, 28, 32 and 64 px, with class conditioning (SPEC G1, G5).

Both networks work on a pyramid of ``k`` factor-2 levels between a small base grid ``s x s`` and the
image (:func:`base_grid`): 8 px = 4 x 2, 28 px = 7 x 2^2, 32 px = 4 x 2^3, 64 px = 4 x 2^4::

    Generator      z (N, Z) [+ class embedding]  -> linear -> (N, g * 2^(k-1), s, s) -> norm, ReLU
                   k - 1 times: up x2, halve channels, norm, ReLU, dropout
                   up x2 to the image channels, tanh                          -> (N, C, H, W) in [-1, 1]
    Discriminator  (N, C, H, W) -> conv4x4/2 to d channels, LeakyReLU(0.2) (no norm on the input layer)
                   k - 1 times: conv4x4/2, double channels, norm, LeakyReLU(0.2)  -> (N, d * 2^(k-1), s, s)
                   flatten = phi(x); logit = w . phi(x) + b [+ <embed(y), phi(x)>]

The generator's linear stem is DCGAN's first transposed convolution from a 1x1 input (the same map).
Class conditioning: G concatenates a learned class embedding to z; D is a projection discriminator
(Miyato & Koyama 2018, eq. 3): f(x, y) = psi(phi(x)) + embed(y)^T phi(x).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from genlab.errors import ConfigError
from genlab.nn.blocks import norm_2d
from genlab.nn.init import dcgan_init_

__all__ = ["base_grid", "Generator", "Discriminator", "NormKind"]

NormKind = Literal["batch", "instance", "none"]


def base_grid(image_size: int) -> tuple[int, int]:
    """(s, k) with image_size = s * 2^k, k >= 1 and s <= 7: the base grid and the number of x2 levels."""
    s, k = image_size, 0
    while s > 7 and s % 2 == 0:
        s, k = s // 2, k + 1
    if k == 0 or s < 3 or s > 7:
        raise ConfigError(
            f"DCGAN cannot size its networks for {image_size} px images: the size must be s * 2^k with s in 3..7 "
            "and k >= 1 (e.g. 8, 28, 32, 64); resize the data with data.image_size"
        )
    return s, k



def _upsample(c_in: int, c_out: int, kind: str, bias: bool) -> nn.Module:
    """x2 upsampling: a 4x4 stride-2 transposed conv, or nearest upsampling then a 3x3 conv (no checkerboard)."""
    if kind == "transposed":
        return nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=bias)
    if kind == "upsample":
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias))
    raise ConfigError(f"unknown upsampling {kind!r}; valid: transposed, upsample")


class Generator(nn.Module):
    """z (N, latent_dim) [+ labels (N,)] -> images (N, C, H, W) in [-1, 1]."""

    def __init__(
        self,
        latent_dim: int,
        channels: int,
        image_size: int,
        base_channels: int = 64,
        norm: NormKind = "batch",
        upsample: Literal["transposed", "upsample"] = "transposed",
        dropout: float = 0.0,
        num_classes: int | None = None,
        class_embed_dim: int = 32,
    ):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"generator dropout must be in [0, 1), got {dropout}")
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.s, k = base_grid(image_size)
        widths = [base_channels * 2 ** (k - 1 - i) for i in range(k)]  # (g 2^(k-1), ..., g)
        bias = norm == "none"  # a norm layer's shift makes the conv bias redundant
        self.class_embed = nn.Embedding(num_classes, class_embed_dim) if num_classes else None
        stem_in = latent_dim + (class_embed_dim if num_classes else 0)
        self.stem = nn.Linear(stem_in, widths[0] * self.s * self.s, bias=bias)
        self.stem_act = nn.Sequential(norm_2d(norm, widths[0]), nn.ReLU(inplace=True))
        blocks = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            blocks += [_upsample(c_in, c_out, upsample, bias), norm_2d(norm, c_out), nn.ReLU(inplace=True)]
            if dropout > 0:
                blocks.append(nn.Dropout(dropout))
        self.blocks = nn.Sequential(*blocks)
        self.to_image = _upsample(widths[-1], channels, upsample, bias=True)
        dcgan_init_(self)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if (labels is None) != (self.class_embed is None):
            raise ConfigError("a class-conditional generator needs labels; an unconditional one takes none")
        if self.class_embed is not None:
            z = torch.cat([z, self.class_embed(labels)], dim=1)  # (N, Z + E)
        h = self.stem(z).view(z.shape[0], -1, self.s, self.s)  # (N, g 2^(k-1), s, s)
        h = self.blocks(self.stem_act(h))  # (N, g, H/2, W/2)
        return torch.tanh(self.to_image(h))  # (N, C, H, W)


class Discriminator(nn.Module):
    """images (N, C, H, W) [+ labels (N,)] -> logits (N,); a projection discriminator when class-conditional."""

    def __init__(
        self,
        channels: int,
        image_size: int,
        base_channels: int = 64,
        norm: NormKind = "batch",
        spectral_norm: bool = False,
        num_classes: int | None = None,
    ):
        super().__init__()
        self.num_classes = num_classes
        s, k = base_grid(image_size)
        widths = [base_channels * 2**i for i in range(k)]  # (d, 2d, ..., d 2^(k-1))
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=norm == "none"), norm_2d(norm, c_out),
                       nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        self.feature_dim = widths[-1] * s * s
        self.head = nn.Linear(self.feature_dim, 1)  # psi
        self.class_embed = nn.Embedding(num_classes, self.feature_dim) if num_classes else None  # V (projection)
        dcgan_init_(self)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, 0.0, 0.02)
        if spectral_norm:  # Miyato et al. 2018: every weight of D, the projection V included, as in their code
            for m in list(self.modules()):
                if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
                    _spectral_norm(m)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x): the flattened last feature map, (N, feature_dim)."""
        return self.body(x).flatten(1)  # (N, d 2^(k-1) s s)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if (labels is None) != (self.class_embed is None):
            raise ConfigError("a class-conditional discriminator needs labels; an unconditional one takes none")
        phi = self.features(x)  # (N, F)
        logits = self.head(phi).squeeze(1)  # (N,)
        if self.class_embed is not None:
            logits = logits + (self.class_embed(labels) * phi).sum(dim=1)  # + <V y, phi(x)>
        return logits
