"""The U-Net denoiser of DDPM (Ho et al. 2020) and ADM (Dhariwal & Nichol 2021), SPEC D3.

An encoder of residual blocks at decreasing resolutions, a middle block (residual, attention,
residual) and a decoder that mirrors the encoder and concatenates its activations (skip
connections). The sinusoidal time embedding, plus an optional class embedding, is added in every
residual block; self-attention runs at the chosen feature-map resolutions, and cross-attention to a
context sequence (text) joins it there when the network is built with ``context_dim``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated

import torch
from torch import nn

from genlab.errors import ConfigError
from genlab.nn.attention import ContextRefiner, SpatialAttention
from genlab.nn.blocks import Downsample, ResBlock, Upsample, group_norm
from genlab.nn.embeddings import MicroConditionEmbedder, TimestepEmbedder
from genlab.ranges import PositiveInt, Range


@dataclass
class UNetConfig:
    """Width, depth and layout of the U-Net; the image and label shapes are given to UNet itself."""

    base_channels: PositiveInt = 64  # channels of the first level; level i has base_channels * channel_mult[i]
    # One entry per resolution level; None: derived from the image size (see ``resolve_unet_config``).
    channel_mult: tuple[PositiveInt, ...] | None = None
    num_res_blocks: int = 2  # residual blocks per level in the encoder (the decoder has one more)
    # Feature-map sizes (pixels) with self-attention; None: the lowest resolution (derived).
    attention_resolutions: tuple[int, ...] | None = None
    num_heads: PositiveInt = 4  # attention heads (ignored when num_head_channels is set)
    num_head_channels: PositiveInt | None = None  # fixed channels per head, heads = width // this (ADM)
    dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.1  # dropout before the second conv of every residual block
    use_scale_shift_norm: bool = True  # ADM's GN(h) * (1 + scale) + shift; False adds emb (DDPM)
    norm_groups: PositiveInt = 32  # GroupNorm groups; must divide every channel count
    mid_attention: bool = True  # self-attention in the middle block, as in DDPM and ADM
    # Two more input channels holding each position's (x, y) in [-1, 1] (CoordConv, Liu et al. 2018): the
    # layers, and the cross-attention queries built on them, know where they are, which zero padding alone
    # teaches slowly. Spatial prompts ("a 3 to the left of an 8") bind each digit to a side through it.
    coordinates: bool = False
    # Text models: trainable transformer blocks (genlab.nn.attention.ContextRefiner) that refine the text
    # encoder's token states before every cross-attention reads them (0: the states as they come), at
    # context_width channels (None: the encoder's width). A frozen encoder's states name the words; these
    # blocks learn the roles this data's captions give them ("the 8 is the right-hand digit").
    context_layers: Annotated[int, Range(0)] = 0
    context_width: PositiveInt | None = None
    # Text models: add the encoder's pooled vector to the time embedding (SDXL). The mean over the words is
    # blind to their order, and a network can settle on it as a bag of words; false leaves the text only
    # the cross-attention path.
    pooled_text: bool = True
    # Text models: a learned embedding of each position (zero at init) added to the cross-attention queries,
    # as a DiT's tokens carry theirs into every attention. CoordConv's two input channels reach the queries
    # only through the convolutions; spatial prompts need "where am I" in what each position asks the text.
    # Ties the network to its image size.
    query_positions: bool = False


# Width multipliers of derived levels: DDPM's (1, 2, 2, 2) for 32 px, extended as ADM's 256 px model.
DERIVED_CHANNEL_MULT = (1, 2, 2, 2, 4, 4)
MIN_DERIVED_RESOLUTION = 4  # derived levels stop before the feature map would drop below 4 px


def derived_levels(image_size: int) -> int:
    """Resolution levels for ``image_size``: halve while the map is even and stays >= 4 px (at most 6 levels)."""
    levels, size = 1, image_size
    while (size % 2 == 0 and size // 2 >= MIN_DERIVED_RESOLUTION
           and levels < len(DERIVED_CHANNEL_MULT)):
        levels, size = levels + 1, size // 2
    return levels


def resolve_unet_config(config: UNetConfig, image_size: int) -> UNetConfig:
    """``config`` with the size-dependent fields left at None derived from ``image_size``.

    channel_mult: DERIVED_CHANNEL_MULT cut to :func:`derived_levels` (28 px: (1, 2, 2), feature maps
    28, 14, 7); attention_resolutions: the lowest feature map only, where attention is cheapest and
    sees the whole image (ADM attends at the low resolutions).
    """
    mult = config.channel_mult
    if mult is None:
        mult = DERIVED_CHANNEL_MULT[: derived_levels(image_size)]
    attention = config.attention_resolutions
    if attention is None:
        attention = (max(1, image_size // 2 ** (len(mult) - 1)),) if mult else ()
    return replace(config, channel_mult=tuple(mult), attention_resolutions=tuple(attention))


class UNetLayer(nn.Module):
    """One U-Net layer: a residual block, then self-attention and cross-attention when enabled."""

    def __init__(
        self,
        res: ResBlock,
        attention: SpatialAttention | None = None,
        cross_attention: SpatialAttention | None = None,
    ):
        super().__init__()
        self.res = res
        self.attention = attention
        self.cross_attention = cross_attention

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (N, C_in, H, W), emb (N, E), context (N, S, D_ctx) or None, its mask (N, S) -> (N, C_out, H, W)."""
        h = self.res(x, emb)  # (N, C_out, H, W)
        if self.attention is not None:
            h = self.attention(h)  # (N, C_out, H, W)
        if self.cross_attention is not None:
            h = self.cross_attention(h, context, context_mask)  # (N, C_out, H, W)
        return h


class UNet(nn.Module):
    """Noise-prediction U-Net: forward(x_t, t, y=None, context=None) -> (N, out_channels, H, W).

    With ``num_classes`` set, the class embedding table has num_classes + 1 rows; row num_classes
    is the "null" class of classifier-free guidance (Ho & Salimans 2022) and ``y=None`` means every
    sample is unconditional. With ``context_dim`` set, cross-attention to ``context`` (N, S,
    context_dim) follows every self-attention layer (Rombach et al. 2022), masked by ``context_mask``
    (N, S) bool (True on real tokens). With ``pooled_dim`` set, a pooled text vector ``pooled`` (N,
    pooled_dim) is lifted by an MLP and added to the time embedding (SDXL's pooled text embedding,
    Podell et al. 2023). ``self.config`` holds the
    configuration with its size-dependent fields resolved for ``image_size``.
    """

    def __init__(
        self,
        config: UNetConfig,
        in_channels: int,
        out_channels: int,
        image_size: int,
        num_classes: int | None = None,
        context_dim: int | None = None,
        pooled_dim: int | None = None,
        micro_conditions: int = 0,
    ):
        super().__init__()
        config = resolve_unet_config(config, image_size)
        _validate(config, in_channels, out_channels, image_size, num_classes, context_dim)
        self.config = config
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.context_refiner = None
        if context_dim is not None and config.context_layers:
            width = config.context_width or context_dim
            self.context_refiner = ContextRefiner(context_dim, width, config.context_layers, config.num_heads)
            context_dim = width  # what the cross-attention layers read
        self.context_dim = context_dim
        if not config.pooled_text:
            pooled_dim = None
        self.downsample_factor = 2 ** (len(config.channel_mult) - 1)

        base = config.base_channels
        emb_dim = 4 * base  # DDPM / ADM: the embedding is four times the base width
        self.time_embed = TimestepEmbedder(base, emb_dim)
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        if pooled_dim is not None:  # only then: checkpoints of runs without text keep their keys
            self.pooled_embed = nn.Sequential(nn.Linear(pooled_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.pooled_dim = pooled_dim
        # SDXL micro-conditions (N, micro_conditions), added to the time embedding; zero at init.
        self.micro_embed = MicroConditionEmbedder(micro_conditions, base, emb_dim) if micro_conditions else None

        def res_block(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(
                c_in, c_out, emb_dim, config.dropout, config.use_scale_shift_norm, config.norm_groups
            )

        def layer(c_in: int, c_out: int, resolution: int) -> UNetLayer:
            if resolution not in config.attention_resolutions:
                return UNetLayer(res_block(c_in, c_out))
            return UNetLayer(res_block(c_in, c_out), *self._attention_pair(c_out, resolution))

        # Encoder: conv_in, then num_res_blocks layers per level and a Downsample between levels.
        self.conv_in = nn.Conv2d(in_channels + (2 if config.coordinates else 0), base, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [base]  # the width of every activation the decoder will concatenate
        self.level_ends: list[int] = []  # index in self.down of each level's last layer (adapter features join there)
        channels, resolution = base, image_size
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                self.down.append(layer(channels, base * mult, resolution))
                channels = base * mult
                skip_channels.append(channels)
            self.level_ends.append(len(self.down) - 1)
            if level < len(config.channel_mult) - 1:
                self.down.append(Downsample(channels))
                skip_channels.append(channels)
                resolution //= 2
        self.skip_channels = tuple(skip_channels)  # (C,) of each skip activation, conv_in's first

        # Middle: residual, attention, residual at the lowest resolution.
        mid_attention = self._attention_pair(channels, resolution) if config.mid_attention else ()
        self.middle = nn.ModuleList(
            [
                UNetLayer(res_block(channels, channels), *mid_attention),
                UNetLayer(res_block(channels, channels)),
            ]
        )

        # Decoder: num_res_blocks + 1 layers per level, each eating one skip; Upsample between levels.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for _ in range(config.num_res_blocks + 1):
                self.up.append(layer(channels + skip_channels.pop(), base * mult, resolution))
                channels = base * mult
            if level > 0:
                self.up.append(Upsample(channels))
                resolution *= 2

        # Output head; the last conv starts at zero so the initial prediction is exactly 0 (DDPM).
        self.norm_out = group_norm(channels, config.norm_groups)
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _attention_pair(self, channels: int, resolution: int) -> tuple[SpatialAttention, SpatialAttention | None]:
        """Self-attention at this width, plus cross-attention when the model has a context (at a square
        feature map of ``resolution`` pixels a side: its query positions, when configured)."""
        c = self.config
        heads = channels // c.num_head_channels if c.num_head_channels else c.num_heads
        self_attention = SpatialAttention(channels, heads, c.norm_groups)
        if self.context_dim is None:
            return self_attention, None
        positions = resolution * resolution if c.query_positions else None
        return self_attention, SpatialAttention(channels, heads, c.norm_groups, self.context_dim, positions)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        *,
        context_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
        micro: torch.Tensor | None = None,
        down_residuals: list[torch.Tensor] | None = None,
        mid_residual: torch.Tensor | None = None,
        adapter_features: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Predict from x (N, C_in, H, W) at t (N,) (long or float) -> (N, C_out, H, W).

        y: (N,) long class labels, or None for the null class; context: (N, S, context_dim) or None,
        context_mask: (N, S) bool, True on real tokens (None: all); pooled: (N, pooled_dim) or None;
        micro: (N, micro_conditions) float micro-conditions (SDXL), needed iff built with them.
        Control (None: the plain U-Net, bit for bit): ``down_residuals``, one tensor per skip
        activation (shapes :meth:`skip_shapes`), are added to the skips and ``mid_residual`` to the
        middle block's output (ControlNet, Zhang et al. 2023); ``adapter_features``, one per level
        (shapes :meth:`level_shapes`), are added to the encoder's features at the end of each level,
        before they are kept as skips and downsampled (T2I-Adapter, Mou et al. 2023).
        """
        n, _, height, width = x.shape
        if height % self.downsample_factor or width % self.downsample_factor:
            raise ConfigError(
                f"input of size {height}x{width} is not divisible by {self.downsample_factor} "
                f"(2 ** (len(channel_mult) - 1)): resize or pad the images, or use fewer levels"
            )
        emb = self.embed(x, t, y, pooled, micro)  # (N, E)
        context = self.refine_context(context, context_mask)  # (N, S, D_ctx)
        h = self.stem(x)  # (N, base, H, W)
        skips = [h]
        features = {}
        if adapter_features is not None:
            features = dict(zip(self.level_ends, _checked(adapter_features, self.level_shapes(x), "adapter_features")))
        for i, module in enumerate(self.down):
            h = module(h, emb, context, context_mask) if isinstance(module, UNetLayer) else module(h)
            if i in features:
                h = h + features[i]  # T2I-Adapter: (N, C_level, H_level, W_level)
            skips.append(h)  # (N, C_level, H_level, W_level)
        for module in self.middle:
            h = module(h, emb, context, context_mask)  # (N, C_last, H / f, W / f)
        if down_residuals is not None:  # ControlNet: zero convolutions' outputs join the skips
            skips = [s + r for s, r in zip(skips, _checked(down_residuals, self.skip_shapes(x), "down_residuals"))]
        if mid_residual is not None:
            h = h + _checked([mid_residual], [tuple(h.shape)], "mid_residual")[0]  # (N, C_last, H / f, W / f)
        for module in self.up:
            if isinstance(module, UNetLayer):
                h = module(torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)  # (N, C_level, ., .)
            else:
                h = module(h)  # Upsample: (N, C, 2H', 2W')
        h = nn.functional.silu(self.norm_out(h))  # (N, base * channel_mult[0], H, W)
        return self.conv_out(h)  # (N, C_out, H, W)

    def refine_context(self, context: torch.Tensor | None, mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """The text context every cross-attention reads: the encoder's states (N, S, D), through the
        context refiner when configured -> (N, S, context_dim)."""
        if context is None or self.context_refiner is None:
            return context
        return self.context_refiner(context, mask)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv_in of the input x (N, C_in, H, W), with the coordinate channels when configured -> (N, base, H, W)."""
        if self.config.coordinates:
            x = torch.cat([x, coordinate_channels(x)], dim=1)  # (N, C_in + 2, H, W)
        return self.conv_in(x)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
              pooled: torch.Tensor | None = None, micro: torch.Tensor | None = None) -> torch.Tensor:
        """The embedding (N, E) every residual block receives: time, plus class when the U-Net has classes,
        plus the lifted pooled text vector when it has ``pooled_dim``, plus the micro-conditions' embedding."""
        n = x.shape[0]
        if t.ndim == 0:
            t = t.expand(n)
        emb = self.time_embed(t)  # (N, E)
        if self.class_embed is not None:
            if y is None:  # all-null: the unconditional branch of classifier-free guidance
                y = torch.full((n,), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.class_embed(y)  # (N, E)
        elif y is not None:
            raise ConfigError("class labels y were given but the UNet has num_classes=None: "
                              "build it with num_classes=... or pass y=None")
        if pooled is not None and self.config.pooled_text:
            if self.pooled_dim is None:
                raise ConfigError("a pooled text vector was given but the UNet has pooled_dim=None: "
                                  "build it with pooled_dim=... or pass pooled=None")
            emb = emb + self.pooled_embed(pooled)  # (N, E)
        if self.micro_embed is not None:
            emb = emb + self.micro_embed(micro)  # (N, E)
        elif micro is not None:
            raise ConfigError("micro-conditions were given but the UNet has micro_conditions=0: build it with them")
        return emb

    def skip_shapes(self, x: torch.Tensor) -> list[tuple[int, ...]]:
        """Shapes (N, C, H', W') of the skip activations for input x, conv_in's first (``down_residuals``)."""
        n, _, height, width = x.shape
        shapes, scale = [(n, self.skip_channels[0], height, width)], 1
        for module, channels in zip(self.down, self.skip_channels[1:]):
            scale *= 1 if isinstance(module, UNetLayer) else 2
            shapes.append((n, channels, height // scale, width // scale))
        return shapes

    def level_shapes(self, x: torch.Tensor) -> list[tuple[int, ...]]:
        """Shapes (N, C_level, H_level, W_level) of the encoder's levels for input x (``adapter_features``)."""
        return [self.skip_shapes(x)[i + 1] for i in self.level_ends]


def coordinate_channels(x: torch.Tensor) -> torch.Tensor:
    """(N, 2, H, W): each position's column and row, linearly from -1 (left, top) to 1 (right, bottom)."""
    n, _, height, width = x.shape
    rows = torch.linspace(-1, 1, height, device=x.device, dtype=x.dtype)
    columns = torch.linspace(-1, 1, width, device=x.device, dtype=x.dtype)
    grid = torch.stack([columns.expand(height, width), rows[:, None].expand(height, width)])  # (2, H, W): x, y
    return grid.expand(n, 2, height, width)


def _checked(tensors: list[torch.Tensor] | None, shapes: list[tuple[int, ...]], name: str) -> list[torch.Tensor]:
    """``tensors`` (empty for None) after checking they match ``shapes`` one to one; a one-line error otherwise."""
    if tensors is None:
        return []
    got = [tuple(t.shape) for t in tensors]
    if got != [tuple(s) for s in shapes]:
        raise ConfigError(f"{name}: got shapes {got}, this U-Net needs {[tuple(s) for s in shapes]} for its input: "
                          "build the control network from this U-Net (same widths, levels and input size)")
    return list(tensors)


def _validate(
    config: UNetConfig,
    in_channels: int,
    out_channels: int,
    image_size: int,
    num_classes: int | None,
    context_dim: int | None,
) -> None:
    """Raise ConfigError, naming the value and the fix, for a U-Net that cannot be built."""
    c = config
    if context_dim is None:  # these shape what the cross-attention reads, and a model without text has none
        text_only = {"context_layers": c.context_layers != 0, "context_width": c.context_width is not None,
                     "pooled_text": not c.pooled_text, "query_positions": c.query_positions}
        given = [f"model.unet.{k}" for k, v in text_only.items() if v]
        if given:
            raise ConfigError(f"{', '.join(given)} only act on a text-conditioned model: remove them, or add a "
                              "model.text section and captioned data (e.g. --preset text_small --data mnist-captions)")
    if c.base_channels < 1 or not c.channel_mult or min(c.channel_mult) < 1:
        raise ConfigError(
            f"base_channels={c.base_channels}, channel_mult={c.channel_mult}: need base_channels >= 1 "
            "and a non-empty channel_mult of positive integers, e.g. (1, 2, 2)"
        )
    if c.num_res_blocks < 1:
        raise ConfigError(f"num_res_blocks={c.num_res_blocks}: use at least 1")
    if in_channels < 1 or out_channels < 1:
        raise ConfigError(f"in_channels={in_channels}, out_channels={out_channels}: both must be >= 1")
    if not 0.0 <= c.dropout < 1.0:
        raise ConfigError(f"dropout={c.dropout}: use a probability in [0, 1)")
    factor = 2 ** (len(c.channel_mult) - 1)
    if image_size < factor or image_size % factor:
        raise ConfigError(
            f"image_size={image_size} is not divisible by {factor} = 2 ** (len(channel_mult) - 1) "
            f"for channel_mult={c.channel_mult}: use fewer levels or a multiple of {factor}"
        )
    resolutions = [image_size // 2**i for i in range(len(c.channel_mult))]
    missing = [r for r in c.attention_resolutions if r not in resolutions]
    if missing:
        raise ConfigError(
            f"attention_resolutions={c.attention_resolutions} includes {missing}, which never occurs: "
            f"the feature maps of this U-Net are {resolutions} pixels wide; pick among those or use ()"
        )
    if c.num_head_channels is not None:
        widths = [c.base_channels * m for m in c.channel_mult]
        bad = [w for w in widths if w % c.num_head_channels]
        if c.num_head_channels < 1 or bad:
            raise ConfigError(
                f"num_head_channels={c.num_head_channels} does not divide the widths {bad}: "
                "choose a divisor of every level's width, or set num_head_channels=None and use num_heads"
            )
    if num_classes is not None and num_classes < 1:
        raise ConfigError(f"num_classes={num_classes}: use a positive count or None (unconditional)")
    if context_dim is not None and context_dim < 1:
        raise ConfigError(f"context_dim={context_dim}: use a positive width or None (no cross-attention)")
    if context_dim is not None and not c.attention_resolutions and not c.mid_attention:
        raise ConfigError("context_dim is set but the U-Net has no attention layer to put cross-attention in: "
                          "set attention_resolutions (e.g. the lowest feature map) or mid_attention=true")


def unet_ddpm_cifar10(**kwargs) -> UNet:
    """The CIFAR-10 model of Ho et al. 2020 (35.7M parameters): ch 128, mult (1, 2, 2, 2), attention at 16."""
    config = UNetConfig(
        base_channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        num_heads=1,  # DDPM's attention is single-head
        dropout=0.1,
        use_scale_shift_norm=False,  # DDPM adds the embedding; scale-shift is ADM's later change
        norm_groups=32,
    )
    return UNet(config, in_channels=3, out_channels=3, image_size=32, **kwargs)
