"""StyleGAN2-lite networks (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN"), SPEC G7.

Generator (paper fig. 2d and 7): a mapping MLP turns a latent z into a style vector w; a
*synthesis* network starts from a learned constant and, at each resolution, applies modulated and
demodulated 3x3 convolutions whose per-sample weights are scaled by styles A(w), adds per-pixel
noise with learned per-channel strength (B), and sums the outputs of modulated 1x1 toRGB layers
over resolutions ("skip" architecture). The discriminator is residual, with a minibatch-stddev
feature before its last layers. Every layer uses the equalised learning rate of Karras et al. 2018.

Simplifications of this "lite" version, chosen for small images on a CPU:

* Resampling: 2x upsampling is bilinear (align_corners=False), which *is* the separable [1, 3, 3, 1]
  FIR filter of the paper with edge padding; the modulated conv runs after it instead of being
  fused into a transposed convolution. Downsampling in D is a 2x2 average (box filter).
* Resolutions: the constant input has size r0 = image_size / 2^k, the smallest such size >= 4
  reached by halving (8 px: 4 -> 8; 28 px: 7 -> 14 -> 28; 32 px: 4 -> 8 -> 16 -> 32). 28 px data
  is therefore synthesised at its own size (7x7 constant) rather than at 32 and cropped: no pixel
  is wasted and D sees the data untouched.
* Channels: ``channels`` at the output resolution, doubled at every halving up to ``max_channels``.
* Output: the paper's summed toRGB outputs (``output="linear"``) or their tanh (``"tanh"``), for data
  whose pixels pile up at the end of the range (MNIST's background).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from genlab.errors import ConfigError

LRELU_GAIN = math.sqrt(2.0)  # keeps the second moment of activations ~1 through leaky ReLU (He et al.)


@dataclass
class StyleGANNetConfig:
    """Sizes of the StyleGAN2-lite generator and discriminator; image shape comes from the data."""

    z_dim: int = 128  # latent z ~ N(0, I)
    w_dim: int = 128  # style vector w (intermediate latent space W)
    mapping_layers: int = 8  # depth of the mapping MLP z -> w
    mapping_lr_multiplier: float = 0.01  # paper sec. C: the mapping learns 100x slower
    channels: int = 64  # generator channels at the output resolution
    max_channels: int = 128  # cap when channels double at lower resolutions
    d_channels: int = 64  # discriminator channels at the input resolution
    d_max_channels: int = 128
    mbstd_group_size: int = 4  # minibatch-stddev groups (Karras et al. 2018, sec. 3)
    # How per-sample weights are applied: "grouped" builds them and runs one grouped conv (groups = N,
    # the paper's definition); "activation" scales the input channels by s and the output channels
    # by the demodulation factor around one shared conv (paper's fused_modconv=False path). Same
    # maths; "activation" is several times faster on CPUs.
    modconv: Literal["grouped", "activation"] = "activation"
    # The generator's last operation: "linear" (the paper: the summed toRGB outputs, unbounded) or "tanh"
    # (DCGAN's bounded output). Data whose pixels sit on the range's end (MNIST: ~80 % exactly -1) need
    # "tanh": a linear output reaches that point mass only by exact cancellation, and D separates real from
    # fake by background level alone (docs/results.md, issue 17 point 5, sgan).
    output: Literal["linear", "tanh"] = "linear"


def lrelu(x: torch.Tensor) -> torch.Tensor:
    """Leaky ReLU (slope 0.2) times sqrt(2), StyleGAN's activation with its gain."""
    return F.leaky_relu(x, 0.2) * LRELU_GAIN


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pixel norm of vectors: x / sqrt(mean(x^2) + eps) over dim 1 (StyleGAN's input normalisation)."""
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + eps)


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """2x bilinear upsampling = the paper's [1, 3, 3, 1] FIR upsampling filter with edge padding."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def downsample2x(x: torch.Tensor) -> torch.Tensor:
    """2x downsampling by a 2x2 average (box filter; the paper blurs with [1, 3, 3, 1])."""
    return F.avg_pool2d(x, 2)


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate (Karras et al. 2018, sec. 4.1).

    The stored weight is N(0, 1/lr_multiplier^2) and is multiplied at run time by
    lr_multiplier / sqrt(in_features): the effective weight has He-initialisation scale, while
    Adam's (scale-free) update of the stored weight moves the effective weight by
    lr * lr_multiplier / sqrt(in_features), the same relative speed for every layer.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bias_init: float = 0.0,
                 lr_multiplier: float = 1.0, activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init) / lr_multiplier)) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier
        self.activation = activation

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer multiplies by: stored weight * lr_multiplier / sqrt(in_features)."""
        return self.weight * self.weight_gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in) -> (N, out)."""
        bias = None if self.bias is None else self.bias * self.bias_gain
        y = F.linear(x, self.effective_weight(), bias)
        return lrelu(y) if self.activation else y


class EqualConv2d(nn.Module):
    """Conv2d ('same' padding) with equalised learning rate: weight N(0, 1) scaled by 1/sqrt(fan_in)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H, W)."""
        y = F.conv2d(x, self.weight * self.weight_gain, self.bias, padding=self.weight.shape[-1] // 2)
        return lrelu(y) if self.activation else y


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, demodulate: bool = True,
                     grouped: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Karras et al. 2020, eq. 1-3: conv with per-sample weights w'_oik = s_i w_oik, demodulated to
    w''_oik = w'_oik / sqrt(sum_ik w'_oik^2 + eps) so that unit-variance inputs give unit-variance outputs.

    x (N, I, H, W), weight (O, I, k, k), styles (N, I) -> (N, O, H, W); 'same' padding.
    ``grouped=True`` builds the N weight tensors and runs one conv with groups = N; ``False`` uses the
    equivalent form conv(x * s, w) * d, with d_o = 1 / sqrt(sum_i s_i^2 sum_k w_oik^2 + eps).
    """
    n, in_channels, height, width = x.shape
    out_channels, _, k, _ = weight.shape
    if grouped:
        w = weight[None] * styles[:, None, :, None, None]  # (N, O, I, k, k): modulation, eq. 1
        if demodulate:
            w = w * torch.rsqrt(w.square().sum(dim=(2, 3, 4), keepdim=True) + eps)  # eq. 3
        y = F.conv2d(x.reshape(1, n * in_channels, height, width), w.reshape(n * out_channels, in_channels, k, k),
                     padding=k // 2, groups=n)  # (1, N O, H, W)
        return y.reshape(n, out_channels, height, width)
    y = F.conv2d(x * styles[:, :, None, None], weight, padding=k // 2)  # (N, O, H, W)
    if demodulate:
        # sum_ik (s_i w_oik)^2 = sum_i s_i^2 (sum_k w_oik^2): an (N, I) x (I, O) product.
        d = torch.rsqrt(styles.square() @ weight.square().sum(dim=(2, 3)).t() + eps)  # (N, O)
        y = y * d[:, :, None, None]
    return y


class ModulatedConv2d(nn.Module):
    """A conv whose weights are modulated per sample by a style s = A(w) (learned affine map of w)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, w_dim: int, demodulate: bool = True,
                 grouped: bool = False):
        super().__init__()
        # A: the affine "style" layer; bias 1 so that styles start around 1 (paper's init).
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)  # equalised lr
        self.demodulate = demodulate
        self.grouped = grouped

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x (N, I, H, W), w (N, w_dim) -> (N, O, H, W)."""
        styles = self.affine(w)  # (N, I)
        return modulated_conv2d(x, self.weight * self.weight_gain, styles, self.demodulate, self.grouped)


class SynthesisLayer(nn.Module):
    """Optional 2x upsampling, modulated+demodulated 3x3 conv, noise (B), bias and leaky ReLU (fig. 2d)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: bool = False,
                 grouped: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, w_dim, demodulate=True, grouped=grouped)
        self.noise_strength = nn.Parameter(torch.zeros(out_channels))  # per channel; 0 at init
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.resolution = resolution
        self.up = up

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x (N, C_in, r', r') with r' = r/2 if up else r, w (N, w_dim), noise (N, 1, r, r) -> (N, C_out, r, r)."""
        if self.up:
            x = upsample2x(x)  # (N, C_in, r, r)
        x = self.conv(x, w)  # (N, C_out, r, r)
        x = x + noise * self.noise_strength[None, :, None, None]  # single-channel noise, scaled per channel
        return lrelu(x + self.bias[None, :, None, None])


class ToRGB(nn.Module):
    """Modulated 1x1 conv to image channels without demodulation (the skip generator's outputs)."""

    def __init__(self, in_channels: int, image_channels: int, w_dim: int, grouped: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, image_channels, 1, w_dim, demodulate=False, grouped=grouped)
        self.bias = nn.Parameter(torch.zeros(image_channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x (N, C, r, r), w (N, w_dim) -> (N, image_channels, r, r)."""
        return self.conv(x, w) + self.bias[None, :, None, None]


def base_resolution(image_size: int) -> int:
    """Size of the constant input: image_size halved while the result stays an integer >= 4."""
    if image_size < 4:
        raise ConfigError(f"stylegan needs images of at least 4x4 pixels, got {image_size}x{image_size}")
    r = image_size
    while r % 2 == 0 and r // 2 >= 4:
        r //= 2
    return r


def resolutions(image_size: int) -> list[int]:
    """Feature-map sizes from the constant input up to the image: e.g. 28 -> [7, 14, 28]."""
    r = base_resolution(image_size)
    out = [r]
    while out[-1] < image_size:
        out.append(out[-1] * 2)
    return out


def _channels_at(resolution: int, image_size: int, channels: int, max_channels: int) -> int:
    """``channels`` at the image size, doubled at each halving of the resolution, capped at max_channels."""
    return min(max_channels, channels * (image_size // resolution))


class MappingNetwork(nn.Module):
    """z -> w: pixel-normalised z (and class embedding), then an MLP of equalised-lr layers (lr x 0.01)."""

    def __init__(self, z_dim: int, w_dim: int, num_layers: int = 8, num_classes: int | None = None,
                 lr_multiplier: float = 0.01):
        super().__init__()
        self.num_classes = num_classes
        # Class conditioning as in StyleGAN2-ADA: embed the one-hot label, normalise, concatenate to z.
        self.embed = EqualLinear(num_classes, w_dim) if num_classes else None
        dims = [z_dim + (w_dim if num_classes else 0)] + [w_dim] * num_layers
        self.layers = nn.ModuleList(
            EqualLinear(dims[i], dims[i + 1], lr_multiplier=lr_multiplier, activation=True) for i in range(num_layers)
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """z (N, z_dim), labels (N,) long or None -> w (N, w_dim)."""
        x = normalize_2nd_moment(z)  # (N, z_dim)
        if self.embed is not None:
            if labels is None:
                raise ConfigError("this StyleGAN is class-conditional: pass labels (e.g. --class 3)")
            y = self.embed(F.one_hot(labels.long(), self.num_classes).to(z.dtype))  # (N, w_dim)
            x = torch.cat([x, normalize_2nd_moment(y)], dim=1)
        for layer in self.layers:
            x = layer(x)  # (N, w_dim)
        return x


class SynthesisNetwork(nn.Module):
    """Styles ws (N, num_ws, w_dim) and noise maps -> image, skip architecture (paper fig. 7b).

    Layer order and style indices follow the paper's code: the block at the base resolution has one
    conv (style 0) and a toRGB (style 1); every later block has an upsampling conv, a conv and a toRGB,
    and its first conv shares its style with the previous toRGB. num_ws = number of convs + 1.
    """

    def __init__(self, w_dim: int, image_size: int, image_channels: int, channels: int, max_channels: int,
                 grouped: bool = False, output: str = "linear"):
        super().__init__()
        self.image_size = image_size
        self.output = output
        self.resolutions = resolutions(image_size)
        ch = [_channels_at(r, image_size, channels, max_channels) for r in self.resolutions]
        r0 = self.resolutions[0]
        self.const = nn.Parameter(torch.randn(ch[0], r0, r0))  # the learned constant input
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.conv_w_index: list[int] = []  # style index of every conv
        self.rgb_w_index: list[int] = []  # style index of every toRGB
        self.block_convs: list[list[int]] = []  # which convs belong to each resolution block
        for i, r in enumerate(self.resolutions):
            block = []
            if i > 0:
                block.append(len(self.convs))
                self.convs.append(SynthesisLayer(ch[i - 1], ch[i], w_dim, r, up=True, grouped=grouped))
            block.append(len(self.convs))
            self.convs.append(SynthesisLayer(ch[i], ch[i], w_dim, r, grouped=grouped))
            self.block_convs.append(block)
            self.to_rgbs.append(ToRGB(ch[i], image_channels, w_dim, grouped=grouped))
        self.conv_w_index = list(range(len(self.convs)))
        self.rgb_w_index = [block[-1] + 1 for block in self.block_convs]
        self.num_ws = len(self.convs) + 1

    def noise_shapes(self) -> list[tuple[int, int, int]]:
        """Shape (1, r, r) of the noise map of every conv, in layer order."""
        return [(1, layer.resolution, layer.resolution) for layer in self.convs]

    def forward(self, ws: torch.Tensor, noise: list[torch.Tensor]) -> torch.Tensor:
        """ws (N, num_ws, w_dim), noise [(N, 1, r, r) per conv] -> (N, image_channels, H, W)."""
        n = ws.shape[0]
        x = self.const[None].expand(n, -1, -1, -1)  # (N, C0, r0, r0)
        image = None
        for b, block in enumerate(self.block_convs):
            for j in block:
                x = self.convs[j](x, ws[:, self.conv_w_index[j]], noise[j])  # (N, C_b, r_b, r_b)
            rgb = self.to_rgbs[b](x, ws[:, self.rgb_w_index[b]])  # (N, image_channels, r_b, r_b)
            image = rgb if image is None else upsample2x(image) + rgb  # skip architecture: sum of upsampled RGBs
        return torch.tanh(image) if self.output == "tanh" else image


class Generator(nn.Module):
    """StyleGAN2-lite generator: mapping z -> w, truncation around ``w_avg``, synthesis w -> image."""

    def __init__(self, config: StyleGANNetConfig, image_size: int, image_channels: int,
                 num_classes: int | None = None):
        super().__init__()
        if config.modconv not in ("grouped", "activation"):
            raise ConfigError(f"model.net.modconv must be 'grouped' or 'activation', got {config.modconv!r}")
        if config.output not in ("linear", "tanh"):
            raise ConfigError(f"model.net.output must be 'linear' or 'tanh', got {config.output!r}")
        self.z_dim, self.w_dim = config.z_dim, config.w_dim
        self.num_classes = num_classes
        self.mapping = MappingNetwork(config.z_dim, config.w_dim, config.mapping_layers, num_classes,
                                      config.mapping_lr_multiplier)
        self.synthesis = SynthesisNetwork(config.w_dim, image_size, image_channels, config.channels,
                                          config.max_channels, grouped=config.modconv == "grouped",
                                          output=config.output)
        self.num_ws = self.synthesis.num_ws
        # Running mean of mapped w (paper's truncation trick centre), updated by the training step.
        self.register_buffer("w_avg", torch.zeros(config.w_dim))

    @torch.no_grad()
    def update_w_avg(self, w: torch.Tensor, beta: float) -> None:
        """w_avg <- beta w_avg + (1 - beta) mean(w) over the batch (w: (N, w_dim))."""
        self.w_avg.lerp_(w.detach().mean(dim=0).to(self.w_avg.dtype), 1.0 - beta)

    def truncate(self, w: torch.Tensor, psi: float) -> torch.Tensor:
        """Truncation trick: w_avg + psi (w - w_avg); psi = 1 is identity, psi = 0 the mean image."""
        return self.w_avg.to(w.dtype).lerp(w, psi)

    def broadcast(self, w: torch.Tensor) -> torch.Tensor:
        """(N, w_dim) -> (N, num_ws, w_dim) (one w for every layer); (N, num_ws, w_dim) passes through."""
        if w.ndim == 2:
            return w[:, None, :].expand(-1, self.num_ws, -1)
        if w.ndim != 3 or w.shape[1] != self.num_ws:
            raise ConfigError(f"styles must be (N, {self.w_dim}) or (N, {self.num_ws}, {self.w_dim}), got {tuple(w.shape)}")
        return w

    def mix_styles(self, w1: torch.Tensor, w2: torch.Tensor, crossover: int | torch.Tensor) -> torch.Tensor:
        """Style mixing: layers with style index < crossover use w1, the others w2 -> (N, num_ws, w_dim).

        ``crossover`` is an int or a per-sample (N,) tensor; crossover = num_ws means no mixing.
        """
        ws1, ws2 = self.broadcast(w1), self.broadcast(w2)
        crossover = torch.as_tensor(crossover, device=ws1.device).reshape(-1, 1)  # (N or 1, 1)
        layer = torch.arange(self.num_ws, device=ws1.device)[None, :]  # (1, num_ws)
        return torch.where((layer < crossover)[:, :, None], ws1, ws2)

    def noise_shapes(self) -> list[tuple[int, int, int]]:
        """Shape (1, r, r) of each per-layer noise input."""
        return self.synthesis.noise_shapes()

    def make_noise(self, n: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Fresh N(0, 1) noise maps for ``n`` samples (drawn on the generator's device, else the model's)."""
        device = generator.device if generator is not None else self.const_device
        return [torch.randn(n, *shape, generator=generator, device=device) for shape in self.noise_shapes()]

    @property
    def const_device(self) -> torch.device:
        return self.synthesis.const.device

    def synthesize_w(self, ws: torch.Tensor, noise: list[torch.Tensor] | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Styles (N, w_dim) or (N, num_ws, w_dim) -> images (N, C, H, W) (not clamped).

        ``noise``: one (N, 1, r, r) map per conv (see :meth:`noise_shapes`); None draws it from ``generator``.
        """
        ws = self.broadcast(ws)
        if noise is None:
            noise = self.make_noise(ws.shape[0], generator)
        if len(noise) != len(self.synthesis.convs):
            raise ConfigError(f"noise must hold {len(self.synthesis.convs)} maps (one per layer), got {len(noise)}")
        noise = [m.to(device=ws.device, dtype=ws.dtype) for m in noise]
        return self.synthesis(ws, noise)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None, truncation: float = 1.0,
                noise: list[torch.Tensor] | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """z (N, z_dim) -> images (N, C, H, W): map, truncate, synthesise."""
        w = self.mapping(z, labels)  # (N, w_dim)
        if truncation != 1.0:
            w = self.truncate(w, truncation)
        return self.synthesize_w(w, noise, generator)


def minibatch_stddev(x: torch.Tensor, group_size: int = 4, eps: float = 1e-8) -> torch.Tensor:
    """Append the mean over features of the per-group standard deviation as one channel (Karras 2018, sec. 3).

    (N, C, H, W) -> (N, C + 1, H, W); groups are samples {m, m + M, m + 2M, ...} with M = N / G, and
    G the largest divisor of N not above ``group_size``.
    """
    n, c, h, w = x.shape
    g = max(d for d in range(1, min(group_size, n) + 1) if n % d == 0)
    y = x.reshape(g, n // g, c, h, w)  # (G, M, C, H, W)
    y = (y - y.mean(dim=0)).square().mean(dim=0)  # (M, C, H, W): variance over each group
    y = (y + eps).sqrt().mean(dim=(1, 2, 3))  # (M,)
    y = y.reshape(-1, 1, 1, 1).repeat(g, 1, h, w)  # (N, 1, H, W)
    return torch.cat([x, y], dim=1)


class DiscriminatorBlock(nn.Module):
    """Residual block (paper fig. 7c): two 3x3 convs with 2x downsampling, plus a 1x1 downsampled skip."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv0 = EqualConv2d(in_channels, in_channels, 3, activation=True)
        self.conv1 = EqualConv2d(in_channels, out_channels, 3, activation=True)
        self.skip = EqualConv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, r, r) -> (N, C_out, r/2, r/2)."""
        skip = self.skip(downsample2x(x))  # (N, C_out, r/2, r/2)
        h = self.conv1(downsample2x(self.conv0(x)))  # (N, C_out, r/2, r/2)
        return (skip + h) * math.sqrt(0.5)  # sum of two unit-variance branches, kept unit-variance


class Discriminator(nn.Module):
    """Residual StyleGAN2 discriminator: fromRGB, blocks down to the base resolution, minibatch stddev,
    conv, dense, logit (or a projection onto a class embedding when class-conditional)."""

    def __init__(self, config: StyleGANNetConfig, image_size: int, image_channels: int,
                 num_classes: int | None = None):
        super().__init__()
        res = resolutions(image_size)[::-1]  # from the image down to the base
        ch = [_channels_at(r, image_size, config.d_channels, config.d_max_channels) for r in res]
        self.mbstd_group_size = config.mbstd_group_size
        self.from_rgb = EqualConv2d(image_channels, ch[0], 1, activation=True)
        self.blocks = nn.ModuleList(DiscriminatorBlock(ch[i], ch[i + 1]) for i in range(len(res) - 1))
        c, r0 = ch[-1], res[-1]
        self.conv = EqualConv2d(c + 1, c, 3, activation=True)
        self.fc = EqualLinear(c * r0 * r0, c, activation=True)
        self.num_classes = num_classes
        # Projection discriminator (Miyato & Koyama 2018, as in StyleGAN2-ADA): logit = <phi(x), embed(y)> / sqrt(dim).
        self.out = EqualLinear(c, c if num_classes else 1)
        self.embed = EqualLinear(num_classes, c) if num_classes else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] (labels (N,) if conditional) -> logits (N,)."""
        h = self.from_rgb(x)  # (N, C_top, H, W)
        for block in self.blocks:
            h = block(h)  # halves the resolution
        h = minibatch_stddev(h, self.mbstd_group_size)  # (N, C + 1, r0, r0)
        h = self.conv(h)  # (N, C, r0, r0)
        h = self.fc(h.flatten(1))  # (N, C)
        out = self.out(h)  # (N, 1) or (N, C)
        if self.embed is None:
            return out[:, 0]
        if labels is None:
            raise ConfigError("this discriminator is class-conditional: pass labels")
        cmap = self.embed(F.one_hot(labels.long(), self.num_classes).to(out.dtype))  # (N, C)
        return (out * cmap).sum(dim=1) / math.sqrt(cmap.shape[1])
