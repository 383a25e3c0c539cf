"""Evaluation metrics: distribution metrics on features (FID, KID, IS, PR/DC) and image metrics (SSIM, PSNR)."""

from genlab.metrics.fid import FID, frechet_distance
from genlab.metrics.image_quality import MS_SSIM_WEIGHTS, PSNR_MAX_DB, gaussian_window, ms_ssim, ms_ssim_scales, mse, psnr
from genlab.metrics.image_quality import psnr_from_mse, ssim, ssim_window
from genlab.metrics.inception_score import InceptionScore, InceptionScoreConfig, inception_score, marginal_class_entropy
from genlab.metrics.kid import KID, KIDConfig, kernel_inception_distance, kid_real_kernel_sums, mmd2_unbiased
from genlab.metrics.kid import polynomial_kernel
from genlab.metrics.prdc import PRDC, PRDCConfig, knn_radii, precision_recall_density_coverage
from genlab.metrics.statistics import FeatureBank, GaussianStats, canonical_order

__all__ = [
    "FID",
    "frechet_distance",
    "KID",
    "KIDConfig",
    "kernel_inception_distance",
    "kid_real_kernel_sums",
    "mmd2_unbiased",
    "polynomial_kernel",
    "InceptionScore",
    "InceptionScoreConfig",
    "inception_score",
    "marginal_class_entropy",
    "PRDC",
    "PRDCConfig",
    "knn_radii",
    "precision_recall_density_coverage",
    "FeatureBank",
    "GaussianStats",
    "canonical_order",
    "MS_SSIM_WEIGHTS",
    "gaussian_window",
    "mse",
    "psnr",
    "psnr_from_mse",
    "PSNR_MAX_DB",
    "ssim",
    "ssim_window",
    "ms_ssim",
    "ms_ssim_scales",
]
