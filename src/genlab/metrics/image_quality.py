"""Reconstruction metrics: MSE, PSNR, SSIM (Wang et al. 2004) and MS-SSIM (Wang et al. 2003).

All functions are differentiable torch code (the SSIM loss is 1 - ssim), take image batches (N, C, H, W)
with any channel count on any device, and return per-image values (N,) with ``reduction="none"`` or
their mean with ``reduction="mean"``. ``data_range`` is max - min of the pixel scale: 2.0 for genlab's
images in [-1, 1] (the default), 1.0 for [0, 1], 255 for uint8 values.

genlab's one PSNR (every reconstruction, translation and inversion number uses it): per image,
10 log10(data_range^2 / max(MSE_i, q)) with q = (data_range / 255)^2 / 12, the variance of 8-bit
rounding noise, so an exact match scores PSNR_MAX_DB = 10 log10(12 * 255^2) = 58.92 dB instead of
infinity whatever the image size; a set's PSNR is the mean over its images (:func:`psnr`), and
:func:`psnr_from_mse` gives the PSNR of a set's mean MSE. Above the floor it is scikit-image's
``peak_signal_noise_ratio``.

genlab's one SSIM small-image rule: the 11x11 window with sigma 1.5 of Wang et al., and for images
smaller than 11 pixels a side the largest odd window that fits with sigma scaled alike,
1.5 * size / 11 (:func:`ssim_window`; 7x7 and sigma 0.95 for 8x8 digits): the window keeps its
shape, spanning +-3.5 sigma as scikit-image's Gaussian SSIM does.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from genlab.errors import ConfigError, DataError

__all__ = ["MS_SSIM_WEIGHTS", "PSNR_MAX_DB", "gaussian_window", "mse", "psnr", "psnr_from_mse", "ssim", "ssim_window",
           "ms_ssim", "ms_ssim_scales"]

Reduction = Literal["mean", "none"]

# Wang, Simoncelli & Bovik 2003, "Multi-scale structural similarity", exponents beta_1..beta_5 (finest first).
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
# PSNR of an exact match: the MSE floor is the variance of 8-bit rounding noise, (range / 255)^2 / 12.
PSNR_MAX_DB = 10 * math.log10(12 * 255**2)
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # Wang et al. 2004


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two image batches (N, C, H, W) of one shape; half precision is computed in float32."""
    if x.ndim != 4 or x.shape != y.shape:
        raise DataError(
            f"image metrics need two batches (N, C, H, W) of one shape, got {tuple(x.shape)} and {tuple(y.shape)}; "
            "add a batch dimension with x[None] for a single image"
        )
    if not x.is_floating_point():
        x = x.float()
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x, y.to(dtype=x.dtype, device=x.device)


def _reduce(values: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """Per-image values (N,) or their mean."""
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ConfigError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _check_data_range(data_range: float) -> None:
    if not data_range > 0:
        raise ConfigError(f"data_range must be > 0 (max - min of the pixel scale, 2.0 for [-1, 1]), got {data_range}")


def mse(x: torch.Tensor, y: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """Mean squared error per image over (C, H, W)."""
    x, y = _check_pair(x, y)
    return _reduce((x - y).square().flatten(1).mean(dim=1), reduction)


def psnr_from_mse(mse_values: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """10 log10(data_range^2 / max(MSE, q)) in dB, q = (data_range / 255)^2 / 12 (8-bit rounding noise).

    The floor caps an exact match at PSNR_MAX_DB (58.92 dB) instead of infinity, the same for every
    image size, so per-image PSNRs can be averaged; MSEs above it give scikit-image's PSNR.
    """
    _check_data_range(data_range)
    floor = (data_range / 255) ** 2 / 12
    return 10 * torch.log10(data_range**2 / mse_values.clamp_min(floor))


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, reduction: Reduction = "mean") -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB (:func:`psnr_from_mse` of each image's MSE).

    The mean is over per-image PSNRs, not the PSNR of the mean MSE (which is never higher).
    """
    _check_data_range(data_range)
    return _reduce(psnr_from_mse(mse(x, y, reduction="none"), data_range), reduction)


def gaussian_window(size: int, sigma: float, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian window (size,), centred; its outer product is the 2-D SSIM window."""
    coordinates = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    window = torch.exp(-(coordinates**2) / (2 * sigma**2))
    return window / window.sum()


def _filter(images: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of each channel, 'valid' region only: (N, C, H, W) -> (N, C, H-s+1, W-s+1)."""
    channels = images.shape[1]
    vertical = window.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    horizontal = window.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    return F.conv2d(F.conv2d(images, vertical, groups=channels), horizontal, groups=channels)


def _ssim_and_contrast_structure(
    x: torch.Tensor, y: torch.Tensor, data_range: float, window: torch.Tensor, k1: float, k2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mean SSIM and mean contrast-structure term cs (Wang et al. 2004, eqs. 6-13): (N,), (N,)."""
    # Only windows lying fully inside the image are used ('valid'), which equals skimage's
    # reflect-filter-then-crop of (size - 1) / 2 border pixels.
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    n = x.shape[0]
    moments = _filter(torch.cat([x, y, x * x, y * y, x * y]), window)  # (5N, C, H', W'), one conv for all
    mu_x, mu_y, e_xx, e_yy, e_xy = moments.split(n)
    # Population (not sample) local variances, as in the paper's Gaussian-weighted statistics.
    sigma_xx = e_xx - mu_x * mu_x
    sigma_yy = e_yy - mu_y * mu_y
    sigma_xy = e_xy - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    contrast_structure = (2 * sigma_xy + c2) / (sigma_xx + sigma_yy + c2)
    ssim_map = luminance * contrast_structure  # (N, C, H', W')
    return ssim_map.flatten(1).mean(dim=1), contrast_structure.flatten(1).mean(dim=1)


def _check_window(size: tuple[int, int], window_size: int, sigma: float) -> None:
    if window_size < 1 or window_size % 2 == 0 or not sigma > 0:
        raise ConfigError(f"SSIM window_size must be odd and >= 1 and sigma > 0, got {window_size} and {sigma}")
    if min(size) < window_size:
        raise DataError(
            f"images of {size[0]}x{size[1]} are smaller than the {window_size}x{window_size} SSIM window; "
            "pass a smaller odd window_size (e.g. 7 for 8x8 images)"
        )


def ssim_window(size: tuple[int, int]) -> tuple[int, float]:
    """(window size, sigma) for images of ``size``: 11 and 1.5, or the largest odd size that fits and 1.5 * size / 11."""
    side = min(size)
    if side >= SSIM_WINDOW:
        return SSIM_WINDOW, SSIM_SIGMA
    if side < 1:
        raise DataError(f"images of {size[0]}x{size[1]} have no pixels to compare")
    window = side if side % 2 else side - 1
    return window, SSIM_SIGMA * window / SSIM_WINDOW


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 2.0,
    window_size: int | None = None,
    sigma: float | None = None,
    k1: float = 0.01,
    k2: float = 0.03,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004): Gaussian window (default :func:`ssim_window`), K1 = 0.01, K2 = 0.03.

    Per image, the mean of the SSIM map over channels and valid window positions (as skimage's
    ``structural_similarity(gaussian_weights=True, sigma=sigma, use_sample_covariance=False)`` with
    ``channel_axis``). Without ``window_size``/``sigma``, images under 11 px a side get the small-image rule.
    """
    x, y = _check_pair(x, y)
    _check_data_range(data_range)
    if window_size is None:
        window_size, rule_sigma = ssim_window(x.shape[-2:])
        sigma = rule_sigma if sigma is None else sigma
    sigma = SSIM_SIGMA if sigma is None else sigma
    _check_window(x.shape[-2:], window_size, sigma)
    window = gaussian_window(window_size, sigma, dtype=x.dtype, device=x.device)
    return _reduce(_ssim_and_contrast_structure(x, y, data_range, window, k1, k2)[0], reduction)


def ms_ssim_scales(size: tuple[int, int], window_size: int = 11) -> int:
    """How many scales (at most 5) fit: the coarsest image, halved scales - 1 times, must hold one window."""
    scales = 1
    while scales < len(MS_SSIM_WEIGHTS) and min(size) // 2**scales >= window_size:
        scales += 1
    return scales


def ms_ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 2.0,
    scales: int | None = None,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Multi-scale SSIM (Wang et al. 2003): l_M^b_M * prod_j cs_j^b_j over 2x-downsampled scales.

    Five scales need images of at least 16 * window_size pixels a side (176 for an 11x11 window).
    ``scales=None`` uses as many scales as fit (``ms_ssim_scales``; e.g. 2 for 28x28 or 32x32) with the
    first Wang weights renormalised to sum to 1 -- a documented adaptation for small images, not the
    paper's 5-scale number; pass ``scales=5`` to insist on the standard definition (DataError if too small).
    Negative cs / SSIM terms (anti-correlated images) are clamped to 0 before the fractional powers, as in
    torchmetrics' ``normalize="relu"``, since a fractional power of a negative number is undefined.
    """
    x, y = _check_pair(x, y)
    _check_data_range(data_range)
    _check_window(x.shape[-2:], window_size, sigma)
    available = ms_ssim_scales(x.shape[-2:], window_size)
    if scales is None:
        scales = available
    elif not 1 <= scales <= len(MS_SSIM_WEIGHTS):
        raise ConfigError(f"ms_ssim scales must be between 1 and {len(MS_SSIM_WEIGHTS)}, got {scales}")
    elif scales > available:
        side = window_size * 2 ** (scales - 1)
        raise DataError(
            f"MS-SSIM with {scales} scales needs images of at least {side}x{side}, got "
            f"{x.shape[-2]}x{x.shape[-1]}; pass scales=None (renormalised weights) or scales<={available}"
        )
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=x.dtype, device=x.device)
    if scales < len(MS_SSIM_WEIGHTS):  # the published five weights are used as is (they sum to 1.0001)
        weights = weights / weights.sum()
    window = gaussian_window(window_size, sigma, dtype=x.dtype, device=x.device)
    terms = []
    for scale in range(scales):
        ssim_value, contrast_structure = _ssim_and_contrast_structure(x, y, data_range, window, k1, k2)
        if scale < scales - 1:
            terms.append(contrast_structure)  # (N,) cs_j at the finer scales
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        else:
            terms.append(ssim_value)  # (N,) l_M * cs_M at the coarsest scale
    terms = torch.stack(terms, dim=1)  # (N, scales)
    positive = terms > 0
    # where() twice: 0 for non-positive terms with a zero (not NaN) gradient through the fractional power.
    powered = torch.where(positive, torch.where(positive, terms, torch.ones_like(terms)) ** weights, 0.0)
    return _reduce(powered.prod(dim=1), reduction)
