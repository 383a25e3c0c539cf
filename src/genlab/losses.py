"""Training losses (SPEC L1-L7): pixel, SSIM, perceptual and style, KL, adversarial, and their weighted sum.

Every image loss takes ``(x_hat, x)``: the prediction first, the target second, both (N, C, H, W) in
[-1, 1], and returns a scalar mean unless said otherwise. The adversarial losses take raw logits
(critic scores for WGAN), never probabilities. Nothing here draws random numbers: methods pass the
noise (``eps``, the mixing weights of the gradient penalty) from their training context, which keeps
resumes exact.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.error
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genlab.errors import ConfigError, DataError
from genlab.metrics.extractors import LUMA_WEIGHTS, SHIPPED_EVALUATORS, ClassifierExtractor, get_extractor
from genlab.metrics.image_quality import ms_ssim, ssim

__all__ = [
    "mse_loss",
    "l1_loss",
    "charbonnier_loss",
    "ssim_loss",
    "ms_ssim_loss",
    "kl_diagonal_gaussian",
    "kl_between_diagonal_gaussians",
    "reparameterize",
    "PERCEPTUAL_NETWORKS",
    "PerceptualLoss",
    "gram_matrix",
    "style_loss",
    "ReconstructionLossConfig",
    "ReconstructionLoss",
    "GAN_LOSSES",
    "discriminator_loss",
    "generator_loss",
    "gradient_penalty",
    "r1_penalty",
    "clip_weights_",
    "adaptive_weight",
]

# ----------------------------------------------------------------------------------------------- pixel (L1)


def _check_pair(x_hat: torch.Tensor, x: torch.Tensor) -> None:
    """Refuse prediction/target batches of different shapes (broadcasting would silently average wrongly)."""
    if x_hat.shape != x.shape:
        raise DataError(
            f"loss needs prediction and target of one shape, got {tuple(x_hat.shape)} and {tuple(x.shape)}"
        )


def mse_loss(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements."""
    _check_pair(x_hat, x)
    return (x_hat - x).square().mean()


def l1_loss(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over all elements."""
    _check_pair(x_hat, x)
    return (x_hat - x).abs().mean()


def charbonnier_loss(x_hat: torch.Tensor, x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Charbonnier (smooth L1) penalty, mean of sqrt((x_hat - x)^2 + eps^2): L1-like, differentiable at 0."""
    _check_pair(x_hat, x)
    if not eps > 0:
        raise ConfigError(f"charbonnier eps must be > 0, got {eps}")
    return torch.sqrt((x_hat - x).square() + eps**2).mean()


# ------------------------------------------------------------------------------------------------ SSIM (L2)

SSIM_WINDOW = 11  # Wang et al. 2004


def _ssim_window(x: torch.Tensor) -> int:
    """11x11 (Wang 2004) when it fits, else the largest odd window that does (7 for 8x8 digits)."""
    side = min(x.shape[-2:])
    if side >= SSIM_WINDOW:
        return SSIM_WINDOW
    return side if side % 2 == 1 else side - 1


def ssim_loss(x_hat: torch.Tensor, x: torch.Tensor, window_size: int | None = None) -> torch.Tensor:
    """1 - SSIM for images in [-1, 1] (data range 2); ``window_size=None``: 11, or smaller for tiny images."""
    _check_pair(x_hat, x)
    window = window_size if window_size is not None else _ssim_window(x)
    return 1 - ssim(x_hat, x, data_range=2.0, window_size=window)


def ms_ssim_loss(x_hat: torch.Tensor, x: torch.Tensor, window_size: int | None = None) -> torch.Tensor:
    """1 - MS-SSIM for images in [-1, 1], with as many scales as the image size allows (see metrics.ms_ssim)."""
    _check_pair(x_hat, x)
    window = window_size if window_size is not None else _ssim_window(x)
    return 1 - ms_ssim(x_hat, x, data_range=2.0, scales=None, window_size=window)


# -------------------------------------------------------------------------------------------------- KL (L6)


def _check_gaussian(mu: torch.Tensor, logvar: torch.Tensor) -> None:
    if mu.shape != logvar.shape or mu.ndim < 1:
        raise DataError(
            f"Gaussian mu and logvar must have one shape (N, ...), got {tuple(mu.shape)} and {tuple(logvar.shape)}"
        )


def kl_diagonal_gaussian(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, e^logvar) || N(0, I)) per sample (N,), summed over the non-batch dims (Kingma & Welling 2014, app. B)."""
    _check_gaussian(mu, logvar)
    kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar)  # (N, ...) per dimension
    return kl.flatten(1).sum(dim=1)  # (N,)


def kl_between_diagonal_gaussians(
    mu1: torch.Tensor, logvar1: torch.Tensor, mu2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mu1, e^logvar1) || N(mu2, e^logvar2)) per sample (N,), summed over the non-batch dims."""
    _check_gaussian(mu1, logvar1)
    _check_gaussian(mu2, logvar2)
    # 0.5 [log s2^2/s1^2 + (s1^2 + (mu1 - mu2)^2) / s2^2 - 1] per dimension
    kl = 0.5 * (logvar2 - logvar1 + (logvar1.exp() + (mu1 - mu2).square()) * torch.exp(-logvar2) - 1)
    return kl.flatten(1).sum(dim=1)  # (N,)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + exp(logvar / 2) * eps with eps ~ N(0, I) given (from ctx.randn): differentiable in mu and logvar."""
    _check_gaussian(mu, logvar)
    if eps.shape != mu.shape:
        raise DataError(f"reparameterize: eps must have mu's shape {tuple(mu.shape)}, got {tuple(eps.shape)}")
    return mu + torch.exp(0.5 * logvar) * eps


# ------------------------------------------------------------------------------------ perceptual, style (L3, L7)

PERCEPTUAL_NETWORKS = ("auto", "vgg16") + tuple(f"evaluator:{name}" for name in SHIPPED_EVALUATORS)
# VGG16 taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (indices into torchvision's vgg16().features), as LPIPS.
VGG16_TAPS = (3, 8, 15, 22, 29)
VGG16_MIN_SIZE = 32  # smaller inputs are upsampled so relu5_3 (1/16 of the input) still has 2x2 positions
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _load_vgg16_features() -> nn.Sequential:
    """torchvision's VGG16 ``features`` with ImageNet weights (torch hub cache, else a download)."""
    from torchvision.models import VGG16_Weights
    from torchvision.models.vgg import cfgs, make_layers

    weights = VGG16_Weights.IMAGENET1K_V1
    try:
        state = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise ConfigError(
            f"perceptual network 'vgg16' needs ImageNet weights that could not be downloaded ({reason}); "
            "set the perceptual network to 'evaluator:mnist' (or 'evaluator:fashion-mnist'), "
            f"or put {weights.url} at {cache}"
        ) from None
    features = make_layers(cfgs["D"])  # the convolutional part only, without the 120M-parameter classifier
    features.load_state_dict({k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")})
    return features


class _FrozenNetwork:
    """Holds a frozen feature network out of nn.Module's sight: not in parameters(), state_dict() or .to().

    Deep copies (EMA copies of a method) share the one network instead of duplicating it.
    """

    def __init__(self, network: nn.Module):
        self.network = network.eval().requires_grad_(False)

    def __deepcopy__(self, memo) -> _FrozenNetwork:
        return self

    def on(self, device: torch.device) -> nn.Module:
        """The network on ``device`` (moved lazily, on first use there), in eval mode."""
        parameter = next(self.network.parameters(), None)
        if parameter is not None and parameter.device != device:
            self.network.to(device)
        return self.network.eval()


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey -> RGB by repetition, RGB -> grey by ITU-R BT.601 luma (as metrics.extractors.prepare_images)."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)  # (N, 3, H, W)
    if x.shape[1] == 3 and channels == 1:
        luma = torch.tensor(LUMA_WEIGHTS, dtype=x.dtype, device=x.device)
        return torch.einsum("nchw,c->nhw", x, luma)[:, None]  # (N, 1, H, W)
    raise DataError(f"cannot feed {x.shape[1]}-channel images to a {channels}-channel perceptual network")


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize on pixel centres, the extractors' rule (identity when already that size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def _normalize_channels(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit length along channels at every position (LPIPS, Zhang et al. 2018, eq. 1)."""
    return features / (features.square().sum(dim=1, keepdim=True).sqrt() + eps)


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Gram matrix F F^T / (C H W) of feature maps (N, C, H, W) -> (N, C, C) (Gatys et al. 2016; Johnson et al. 2016)."""
    n, c, h, w = features.shape
    flat = features.reshape(n, c, h * w)  # (N, C, HW)
    return flat @ flat.transpose(1, 2) / (c * h * w)  # (N, C, C)


def style_loss(
    features_hat: Sequence[torch.Tensor],
    features_style: Sequence[torch.Tensor],
    layer_weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Sum over layers of w_l ||G(F_hat) - G(F_style)||_F^2, mean over the batch (Johnson et al. 2016, eq. 4).

    The style batch may have one image (broadcast over the predictions) and another spatial size.
    """
    if len(features_hat) != len(features_style):
        raise DataError(
            f"style_loss needs one feature map per layer for both, got {len(features_hat)} and {len(features_style)}"
        )
    weights = layer_weights if layer_weights is not None else (1.0,) * len(features_hat)
    total = features_hat[0].new_zeros(())
    for weight, f_hat, f_style in zip(weights, features_hat, features_style, strict=True):
        difference = gram_matrix(f_hat) - gram_matrix(f_style)  # (N, C, C), style broadcast from (1, C, C)
        total = total + weight * difference.square().sum(dim=(1, 2)).mean()
    return total


class _VGGFeatures(nn.Module):
    """VGG16 conv stack tapped at relu1_2 ... relu5_3, for [-1, 1] images of any size and 1 or 3 channels."""

    in_channels = 3

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.features = features[: VGG16_TAPS[-1] + 1]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = _match_channels(x, 3)  # (N, 3, H, W)
        side = min(x.shape[-2:])
        if side < VGG16_MIN_SIZE:
            scale = VGG16_MIN_SIZE / side
            x = _resize(x, (round(x.shape[-2] * scale), round(x.shape[-1] * scale)))
        h = ((x + 1) / 2 - self.mean) / self.std  # [-1, 1] -> ImageNet-normalised [0, 1]
        taps = []
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in VGG16_TAPS:
                taps.append(h)  # (N, C_l, H / 2^l, W / 2^l)
        return taps


class _ClassifierFeatures(nn.Module):
    """The project's evaluator classifier tapped after every conv-BN-ReLU block of its body."""

    def __init__(self, extractor: ClassifierExtractor):
        super().__init__()
        self.classifier = extractor.model
        config = self.classifier.config
        self.in_channels, self.image_size = config.in_channels, config.image_size
        blocks = list(self.classifier.body)
        self.taps = [i for i, block in enumerate(blocks) if any(isinstance(m, nn.Conv2d) for m in block.modules())]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = _resize(_match_channels(x, self.in_channels), (self.image_size, self.image_size))  # (N, C, 28, 28)
        taps, h = [], x
        for index, block in enumerate(self.classifier.body[: self.taps[-1] + 1]):
            h = block(h)
            if index in self.taps:
                taps.append(h)  # (N, channels[s], S / 2^s, S / 2^s)
        return taps


def _load_feature_network(network: str, channels: int) -> nn.Module:
    """Resolve a PerceptualLoss ``network`` name (see PERCEPTUAL_NETWORKS) or evaluator path to a tapped network."""
    if network == "auto":
        if channels not in (1, 3):
            raise ConfigError(
                f"perceptual network 'auto' picks by channels (1: evaluator:mnist, 3: vgg16), got {channels}; name a network"
            )
        network = "evaluator:mnist" if channels == 1 else "vgg16"
    if network == "vgg16":
        return _VGGFeatures(_load_vgg16_features())
    if network.startswith("evaluator:"):
        name = network.removeprefix("evaluator:")
        if name not in SHIPPED_EVALUATORS:
            raise ConfigError(
                f"unknown perceptual network '{network}'; use one of {list(PERCEPTUAL_NETWORKS)} or an evaluator path"
            )
        extractor = get_extractor(name)
    elif network.endswith((".json", ".safetensors")):
        extractor = get_extractor(network)
    else:
        raise ConfigError(
            f"unknown perceptual network '{network}'; use one of {list(PERCEPTUAL_NETWORKS)} "
            "or the path of an evaluator <name>.safetensors with its .json card"
        )
    if not isinstance(extractor, ClassifierExtractor):
        raise ConfigError(f"perceptual network '{network}' is not an evaluator classifier (it has no .json card beside it)")
    return _ClassifierFeatures(extractor)


class PerceptualLoss(nn.Module):
    """LPIPS-style distance between the feature maps of a frozen network (Zhang et al. 2018, without learned weights).

    ``network``: "evaluator:mnist" / "evaluator:fashion-mnist" (the project's own classifiers, offline; taps
    after each conv block), "vgg16" (ImageNet VGG16 at relu1_2 ... relu5_3), "auto" (1 channel: the MNIST
    evaluator, 3 channels: VGG16) or the path of an evaluator ``.safetensors`` with its card. Per layer l the
    distance is the squared difference of channel-unit-normalised features, summed over channels and
    averaged over positions and images; the loss is sum_l w_l d_l with ``layer_weights`` (default: equal
    weights 1 / L, so the loss lies in [0, 4]). Inputs in [-1, 1] are mapped to what the network expects
    (grey <-> RGB, resize to the evaluator's size). The target ``x`` is treated as a constant.

    The frozen network is held outside nn.Module's registry: it is not in ``parameters()`` or
    ``state_dict()`` of any owner, ``train()`` never reaches it (it stays in eval mode), and it moves
    to the input's device on first use there.
    """

    def __init__(self, network: str = "auto", channels: int = 1, layer_weights: Sequence[float] | None = None):
        super().__init__()
        self.network_name, self.channels = str(network), channels
        self._frozen = _FrozenNetwork(_load_feature_network(self.network_name, channels))
        num_layers = self._num_layers()
        if layer_weights is None:
            layer_weights = (1.0 / num_layers,) * num_layers
        layer_weights = tuple(float(w) for w in layer_weights)
        if len(layer_weights) != num_layers or any(w < 0 for w in layer_weights):
            raise ConfigError(
                f"perceptual layer_weights must be {num_layers} non-negative numbers for '{self.network_name}', "
                f"got {layer_weights}"
            )
        self.layer_weights = layer_weights

    def _num_layers(self) -> int:
        network = self._frozen.network
        return len(VGG16_TAPS) if isinstance(network, _VGGFeatures) else len(network.taps)

    @property
    def network(self) -> nn.Module:
        """The frozen tapped network (deliberately not a registered submodule)."""
        return self._frozen.network

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps [(N, C_l, H_l, W_l)] of [-1, 1] images, differentiable w.r.t. x, computed in float32."""
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise DataError(f"perceptual loss expects images (N, {self.channels}, H, W), got shape {tuple(x.shape)}")
        return self._frozen.on(x.device)(x.float())

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Scalar perceptual distance between predictions x_hat and targets x (N, C, H, W)."""
        _check_pair(x_hat, x)
        features_hat = self.features(x_hat)
        with torch.no_grad():
            features = self.features(x)
        total = features_hat[0].new_zeros(())
        for weight, f_hat, f in zip(self.layer_weights, features_hat, features, strict=True):
            if weight == 0:
                continue
            distance = (_normalize_channels(f_hat) - _normalize_channels(f)).square().sum(dim=1)  # (N, H_l, W_l)
            total = total + weight * distance.mean()
        return total

    def style(self, x_hat: torch.Tensor, style_images: torch.Tensor) -> torch.Tensor:
        """Gram-matrix style loss (L7) of x_hat (N, C, H, W) to style images (N or 1, C, H', W'), layer-weighted."""
        features_hat = self.features(x_hat)
        with torch.no_grad():
            features_style = self.features(style_images)
        return style_loss(features_hat, features_style, self.layer_weights)

    def extra_repr(self) -> str:
        return f"network={self.network_name!r}, channels={self.channels}, layer_weights={self.layer_weights}"


# ------------------------------------------------------------------------------------------- combined (L5)


@dataclasses.dataclass
class ReconstructionLossConfig:
    """Weights of the reconstruction terms; a term with weight 0 is neither computed nor logged."""

    mse: float = 1.0
    l1: float = 0.0
    charbonnier: float = 0.0
    ssim: float = 0.0  # weight of 1 - SSIM
    ms_ssim: float = 0.0  # weight of 1 - MS-SSIM
    perceptual: float = 0.0
    perceptual_network: str = "auto"  # see PerceptualLoss

    def __post_init__(self):
        weights = {name: getattr(self, name) for name in RECONSTRUCTION_TERMS}
        negative = {name: w for name, w in weights.items() if not w >= 0}
        if negative:
            raise ConfigError(f"reconstruction loss weights must be >= 0, got {negative}")
        if not any(w > 0 for w in weights.values()):
            raise ConfigError(
                f"reconstruction loss has every weight at 0; set one of {list(RECONSTRUCTION_TERMS)} > 0 (e.g. mse=1)"
            )


RECONSTRUCTION_TERMS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None] = {
    "mse": mse_loss,
    "l1": l1_loss,
    "charbonnier": charbonnier_loss,
    "ssim": ssim_loss,
    "ms_ssim": ms_ssim_loss,
    "perceptual": None,  # the PerceptualLoss module, built by ReconstructionLoss
}


class ReconstructionLoss(nn.Module):
    """Weighted sum of the reconstruction terms declared by a ReconstructionLossConfig (SPEC L5)."""

    def __init__(self, cfg: ReconstructionLossConfig, channels: int):
        super().__init__()
        self.cfg = cfg
        self.weights = {name: float(getattr(cfg, name)) for name in RECONSTRUCTION_TERMS if getattr(cfg, name) > 0}
        # A parameter-free module: its frozen network stays out of the owner's parameters and state_dict.
        self.perceptual = PerceptualLoss(cfg.perceptual_network, channels) if cfg.perceptual > 0 else None

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(sum_k w_k L_k(x_hat, x), {k: L_k detached, unweighted}) over the terms with w_k > 0."""
        _check_pair(x_hat, x)
        total, terms = None, {}
        for name, weight in self.weights.items():
            loss_fn = self.perceptual if name == "perceptual" else RECONSTRUCTION_TERMS[name]
            value = loss_fn(x_hat, x)
            terms[name] = value.detach()
            total = weight * value if total is None else total + weight * value
        return total, terms


# --------------------------------------------------------------------------------------- adversarial (L4)

GAN_LOSSES = ("vanilla", "nonsaturating", "hinge", "lsgan", "wgan", "wgan-gp")


def _check_kind(kind: str) -> None:
    if kind not in GAN_LOSSES:
        raise ConfigError(f"unknown GAN loss '{kind}'; use one of {list(GAN_LOSSES)}")


def _target_like(target: float | torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """A float or per-sample (N,) target broadcast to the logits' shape (N, ...) (e.g. PatchGAN maps)."""
    if not isinstance(target, torch.Tensor):
        return torch.full_like(logits, float(target))
    target = target.to(dtype=logits.dtype, device=logits.device)
    if target.ndim == 1 and logits.ndim >= 1 and target.shape[0] == logits.shape[0]:
        target = target.view(-1, *([1] * (logits.ndim - 1)))  # (N, 1, ...)
    try:
        return target.expand_as(logits)
    except RuntimeError:
        raise DataError(
            f"GAN target of shape {tuple(target.shape)} does not fit logits {tuple(logits.shape)}; pass (N,) or a float"
        ) from None


def discriminator_loss(
    kind: str,
    real_logits: torch.Tensor,
    fake_logits: torch.Tensor,
    real_target: float | torch.Tensor = 1.0,
    fake_target: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """The discriminator's (critic's) loss to minimise; compute fake_logits on detached fakes.

    - vanilla / nonsaturating: BCE(real, a) + BCE(fake, b) = -log D(x) - log(1 - D(G(z))) for a=1, b=0
      (Goodfellow et al. 2014, eq. 1); a, b may be smoothed/flipped per-sample (N,) targets.
    - hinge: relu(1 - real) + relu(1 + fake) (Lim & Ye 2017; Miyato et al. 2018).
    - lsgan: 0.5 (real - a)^2 + 0.5 (fake - b)^2 (Mao et al. 2017, eq. 2).
    - wgan / wgan-gp: fake - real, the negated Wasserstein estimate (Arjovsky et al. 2017); add
      ``gradient_penalty`` for wgan-gp (Gulrajani et al. 2017) or ``clip_weights_`` after the step for wgan.
    Each term is averaged over its logits; targets are ignored by hinge and wgan.
    """
    _check_kind(kind)
    if kind in ("vanilla", "nonsaturating"):
        real = F.binary_cross_entropy_with_logits(real_logits, _target_like(real_target, real_logits))
        fake = F.binary_cross_entropy_with_logits(fake_logits, _target_like(fake_target, fake_logits))
        return real + fake
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    if kind == "lsgan":
        real = (real_logits - _target_like(real_target, real_logits)).square().mean()
        fake = (fake_logits - _target_like(fake_target, fake_logits)).square().mean()
        return 0.5 * (real + fake)
    return fake_logits.mean() - real_logits.mean()  # wgan, wgan-gp


def generator_loss(kind: str, fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's loss to minimise, from the discriminator's logits on (non-detached) fakes.

    - vanilla: log(1 - D(G(z))) = -softplus(fake), the original minimax objective (saturates early on).
    - nonsaturating: -log D(G(z)) = softplus(-fake) (Goodfellow et al. 2014, sec. 3).
    - hinge, wgan, wgan-gp: -fake.   - lsgan: 0.5 (fake - 1)^2 (Mao et al. 2017, eq. 2 with c = 1).
    """
    _check_kind(kind)
    if kind == "vanilla":
        return -F.softplus(fake_logits).mean()
    if kind == "nonsaturating":
        return F.softplus(-fake_logits).mean()
    if kind == "lsgan":
        return 0.5 * (fake_logits - 1).square().mean()
    return -fake_logits.mean()  # hinge, wgan, wgan-gp


def gradient_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    mix: torch.Tensor,
    target_norm: float = 1.0,
) -> torch.Tensor:
    """WGAN-GP penalty mean (||grad_xhat critic(xhat)||_2 - target_norm)^2 (Gulrajani et al. 2017, eq. 3).

    xhat = mix * real + (1 - mix) * fake with mix (N, 1, 1, 1) uniform in [0, 1] (from ctx.rand); real
    and fake are detached, and the graph is kept (create_graph) so the penalty trains the critic.
    Critics with several outputs per image (patches) use the gradient of their sum. Multiply by lambda (10).
    """
    if real.shape != fake.shape:
        raise DataError(
            f"gradient_penalty needs real and fake of one shape, got {tuple(real.shape)} and {tuple(fake.shape)}"
        )
    mix_shape = (real.shape[0],) + (1,) * (real.ndim - 1)  # (N, 1, 1, 1)
    if tuple(mix.shape) != mix_shape:
        raise DataError(f"gradient_penalty mix must have shape (N, 1, 1, 1) = {mix_shape}, got {tuple(mix.shape)}")
    mix = mix.to(dtype=real.dtype)
    x_hat = (mix * real.detach() + (1 - mix) * fake.detach()).requires_grad_(True)  # (N, C, H, W)
    scores = critic(x_hat)
    (gradient,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)  # (N, C, H, W)
    norm = gradient.flatten(1).norm(dim=1)  # (N,)
    return (norm - target_norm).square().mean()


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """R1 penalty mean ||grad_x D(x)||^2 on real images (Mescheder et al. 2018, eq. 9); multiply by gamma / 2.

    ``real_images`` must have had ``requires_grad_(True)`` before D was applied to them.
    """
    if not real_images.requires_grad:
        raise ConfigError("r1_penalty needs real_images.requires_grad_(True) set before computing real_logits")
    (gradient,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)  # (N, C, H, W)
    return gradient.flatten(1).square().sum(dim=1).mean()


@torch.no_grad()
def clip_weights_(module: nn.Module, bound: float) -> None:
    """Clamp every parameter of the critic to [-bound, bound] in place (WGAN, Arjovsky et al. 2017, alg. 1; c = 0.01)."""
    if not bound > 0:
        raise ConfigError(f"WGAN weight clipping bound must be > 0 (e.g. 0.01), got {bound}")
    for parameter in module.parameters():
        parameter.clamp_(-bound, bound)


def adaptive_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer_weight: torch.Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> torch.Tensor:
    """VQGAN adaptive adversarial weight ||grad_L rec|| / (||grad_L g|| + eps), clamped to [0, max_weight], detached.

    L is the decoder's last layer (Esser et al. 2021, eq. 7): it balances the two gradients where they meet.
    """
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)
    weight = rec_grad.norm() / (g_grad.norm() + eps)
    return weight.clamp(0.0, max_weight).detach()
