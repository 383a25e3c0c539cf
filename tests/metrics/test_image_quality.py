"""SSIM / MS-SSIM / PSNR / MSE against scikit-image, torchmetrics and closed forms."""

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from genlab.errors import ConfigError, DataError
from genlab.metrics.image_quality import MS_SSIM_WEIGHTS, PSNR_MAX_DB, ms_ssim, ms_ssim_scales, mse, psnr, psnr_from_mse
from genlab.metrics.image_quality import ssim, ssim_window

DATA_ROOT = Path(os.environ.get("GENLAB_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def _to_batch(image_hwc: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, C) NumPy image -> (1, C, H, W) float64 tensor."""
    if image_hwc.ndim == 2:
        image_hwc = image_hwc[..., None]
    return torch.from_numpy(np.ascontiguousarray(image_hwc.transpose(2, 0, 1)))[None].double()


def _skimage_ssim(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    return structural_similarity(
        x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=data_range,
        channel_axis=-1 if x.ndim == 3 else None,
    )


def _distort(image: np.ndarray, seed: int, noise: float) -> np.ndarray:
    """Noisy, slightly shifted copy: SSIM well below 1, so the comparison is not trivially 1 vs 1."""
    rng = np.random.default_rng(seed)
    shifted = np.roll(image, 1, axis=1)
    return 0.6 * image + 0.4 * shifted + noise * rng.standard_normal(image.shape)


def _real_images():
    """Real-looking images bundled with scikit-image, scaled to [0, 1]: grey and RGB crops."""
    camera = skdata.camera()[128:256, 128:256] / 255.0
    astronaut = skdata.astronaut()[0:96, 160:256] / 255.0  # (96, 96, 3)
    face = skdata.lfw_subset()[0]  # (25, 25) in [0, 1]
    return {"camera": camera, "astronaut": astronaut, "face": face}


@pytest.mark.parametrize("name", ["camera", "astronaut", "face"])
def test_ssim_matches_skimage_on_real_images(name):
    x = _real_images()[name]
    y = np.clip(_distort(x, seed=0, noise=0.05), 0, 1)
    reference = _skimage_ssim(x, y, data_range=1.0)
    ours = float(ssim(_to_batch(x), _to_batch(y), data_range=1.0))
    assert 0.2 < reference < 0.95
    assert ours == pytest.approx(reference, abs=1e-3)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_ssim_matches_skimage_on_random_images_per_image(channels):
    rng = np.random.default_rng(channels)
    # Images in genlab's [-1, 1] range with data_range 2, float32 like network outputs.
    xs = [rng.uniform(-1, 1, (40, 36, channels)) for _ in range(3)]
    ys = [np.clip(_distort(x, seed=i, noise=0.3), -1, 1) for i, x in enumerate(xs)]
    reference = [_skimage_ssim(x[..., 0] if channels == 1 else x, y[..., 0] if channels == 1 else y, 2.0) for x, y in zip(xs, ys)]
    x_batch = torch.cat([_to_batch(x) for x in xs]).float()
    y_batch = torch.cat([_to_batch(y) for y in ys]).float()
    per_image = ssim(x_batch, y_batch, data_range=2.0, reduction="none")
    assert per_image.shape == (3,)
    np.testing.assert_allclose(per_image.numpy(), reference, atol=1e-3)
    assert float(ssim(x_batch, y_batch)) == pytest.approx(float(np.mean(reference)), abs=1e-3)


def _mnist_test_images(n):
    path = DATA_ROOT / "mnist" / "t10k-images-idx3-ubyte.gz"
    if not path.is_file():
        pytest.skip(f"MNIST not found at {path} (set GENLAB_DATA to the shared data folder)")
    with gzip.open(path, "rb") as f:
        raw = f.read(16 + n * 28 * 28)
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, 28, 28)


@pytest.mark.data
def test_ssim_and_psnr_match_skimage_on_mnist_uint8_scale():
    digits = _mnist_test_images(8).astype(np.float64)  # 0..255, data_range 255
    x, y = digits[:4], digits[4:]  # different digits: low but non-trivial SSIM
    reference = [_skimage_ssim(a, b, data_range=255.0) for a, b in zip(x, y)]
    ours = ssim(torch.from_numpy(x)[:, None], torch.from_numpy(y)[:, None], data_range=255.0, reduction="none")
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-3)
    psnr_reference = [peak_signal_noise_ratio(a, b, data_range=255.0) for a, b in zip(x, y)]
    ours_psnr = psnr(torch.from_numpy(x)[:, None], torch.from_numpy(y)[:, None], data_range=255.0, reduction="none")
    np.testing.assert_allclose(ours_psnr.numpy(), psnr_reference, rtol=1e-10)


def test_psnr_and_mse_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    y = x + 0.1 * torch.randn(5, 3, 8, 8, generator=g, dtype=torch.float64)
    per_image_mse = ((x - y) ** 2).reshape(5, -1).mean(1)
    torch.testing.assert_close(mse(x, y, reduction="none"), per_image_mse)
    torch.testing.assert_close(mse(x, y), per_image_mse.mean())
    expected = 10 * np.log10(2.0**2 / per_image_mse.numpy())
    np.testing.assert_allclose(psnr(x, y, data_range=2.0, reduction="none").numpy(), expected, rtol=1e-12)
    assert float(psnr(x, y)) == pytest.approx(expected.mean(), rel=1e-12)
    assert float(psnr(x, x)) == pytest.approx(10 * np.log10(12 * 255**2))  # the 8-bit rounding-noise floor


def test_ssim_of_identical_images_is_one_and_is_differentiable():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64)
    assert float(ssim(x, x, data_range=1.0)) == pytest.approx(1.0, abs=1e-12)
    y = (x + 0.1 * torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)).requires_grad_()
    small_x, small_y = x[:1, :1, :9, :9], y.detach()[:1, :1, :9, :9].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda b: ssim(small_x, b, data_range=1.0, window_size=7), (small_y,))
    loss = 1 - ssim(x, y, data_range=1.0)
    loss.backward()
    # Gradient descent on 1 - SSIM moves y towards x.
    with torch.no_grad():
        assert float(ssim(x, y - 0.5 * y.grad, data_range=1.0)) > float(ssim(x, y, data_range=1.0))


def _numpy_ms_ssim(x: np.ndarray, y: np.ndarray, data_range: float, weights) -> float:
    """Wang 2003 MS-SSIM of two (H, W) images with SciPy's Gaussian filter (skimage's way: filter, crop borders).

    Written independently of genlab; its scale-1 SSIM is checked against skimage below.
    """
    from scipy.ndimage import gaussian_filter

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    terms = []
    for scale, _ in enumerate(weights):
        blur = lambda image: gaussian_filter(image, sigma=1.5, truncate=3.5)[5:-5, 5:-5]  # noqa: E731
        mu_x, mu_y = blur(x), blur(y)
        var_x, var_y, cov = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
        cs = (2 * cov + c2) / (var_x + var_y + c2)
        luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
        terms.append((luminance * cs).mean() if scale == len(weights) - 1 else cs.mean())
        h, w = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2  # 2x2 block means, odd edges dropped
        x = x[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
        y = y[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    return float(np.prod([max(t, 0.0) ** w for t, w in zip(terms, weights)]))


def test_ms_ssim_five_scales_matches_reference():
    x = skdata.camera()[100:292, 100:292] / 255.0  # 192 >= 16 * 11: five scales fit
    y = np.clip(_distort(x, seed=0, noise=0.05), 0, 1)
    assert _numpy_ms_ssim(x, y, 1.0, [1.0]) == pytest.approx(_skimage_ssim(x, y, 1.0), abs=1e-10)
    assert ms_ssim_scales((192, 192)) == 5
    reference = _numpy_ms_ssim(x, y, 1.0, MS_SSIM_WEIGHTS)
    ours = float(ms_ssim(_to_batch(x), _to_batch(y), data_range=1.0, scales=5))
    assert 0.3 < reference < 0.99
    assert ours == pytest.approx(reference, abs=1e-6)
    assert float(ms_ssim(_to_batch(x), _to_batch(x), data_range=1.0)) == pytest.approx(1.0, abs=1e-12)


def test_ms_ssim_small_images_use_fewer_scales_with_renormalised_weights():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 1, 29, 29, generator=g, dtype=torch.float64) * 2 - 1  # odd size: pooling drops an edge
    y = (x + 0.3 * torch.randn(3, 1, 29, 29, generator=g, dtype=torch.float64)).clamp(-1, 1)
    assert ms_ssim_scales((29, 29)) == 2  # 29 -> 14 -> 7 < 11
    weights = np.array(MS_SSIM_WEIGHTS[:2]) / sum(MS_SSIM_WEIGHTS[:2])
    reference = [_numpy_ms_ssim(a[0].numpy(), b[0].numpy(), 2.0, weights) for a, b in zip(x, y)]
    np.testing.assert_allclose(ms_ssim(x, y, reduction="none").numpy(), reference, atol=1e-8)
    # One scale is plain SSIM.
    torch.testing.assert_close(ms_ssim(x, y, scales=1), ssim(x, y))
    with pytest.raises(DataError, match="176x176"):
        ms_ssim(x, y, scales=5)


def test_ms_ssim_of_anticorrelated_images_is_zero_with_finite_gradient():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 1, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    y = (-x).clone().requires_grad_()
    value = ms_ssim(x, y)
    assert float(value.detach()) == 0.0  # negative cs terms are clamped to 0
    value.backward()
    assert torch.isfinite(y.grad).all()


def test_bad_input():
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(DataError, match="window"):
        ssim(x, x, window_size=11)
    assert float(ssim(x, x, window_size=7)) == pytest.approx(1.0)
    with pytest.raises(DataError, match="same shape|one shape"):
        ssim(torch.zeros(1, 1, 16, 16), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ConfigError, match="data_range"):
        psnr(x, x, data_range=0)
    with pytest.raises(ConfigError, match="reduction"):
        mse(x, x, reduction="sum")


def test_psnr_is_skimage_above_the_8bit_noise_floor_and_capped_below_it():
    """genlab's one PSNR: skimage's per image, mean over images, MSE floored at (range / 255)^2 / 12."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 1, 28, 28)).astype(np.float64) / 127.5 - 1  # 8-bit images in [-1, 1]
    y = np.clip(x + rng.normal(0, [[[[0.02]]], [[[0.1]]], [[[0.3]]], [[[0.005]]]], x.shape), -1, 1)
    reference = [peak_signal_noise_ratio(a[0], b[0], data_range=2.0) for a, b in zip(x, y)]
    ours = psnr(torch.from_numpy(x), torch.from_numpy(y), reduction="none")
    np.testing.assert_allclose(ours.numpy(), reference, rtol=1e-12)
    assert float(psnr(torch.from_numpy(x), torch.from_numpy(y))) == pytest.approx(np.mean(reference), rel=1e-12)
    # An exact match, and one pixel off by one 8-bit step (MSE far below the floor): the cap, not inf or 77 dB.
    off_by_one = x.copy()
    off_by_one[0, 0, 5, 5] += 2 / 255
    for target in (x, off_by_one):
        value = float(psnr(torch.from_numpy(target[:1]), torch.from_numpy(x[:1])))
        assert value == pytest.approx(10 * np.log10(12 * 255**2)) == pytest.approx(PSNR_MAX_DB)
    assert PSNR_MAX_DB == pytest.approx(58.92, abs=0.01)
    # The cap is independent of the data range and image size; psnr_from_mse of a set's mean MSE.
    assert float(psnr(torch.zeros(1, 3, 5, 7), torch.zeros(1, 3, 5, 7), data_range=255.0)) == pytest.approx(PSNR_MAX_DB)
    mean_mse = float(((x - y) ** 2).mean())
    assert float(psnr_from_mse(torch.tensor(mean_mse, dtype=torch.float64))) == pytest.approx(10 * np.log10(4 / mean_mse), rel=1e-12)


@pytest.mark.parametrize("size", [(8, 8), (9, 9), (10, 7), (5, 6), (3, 3)])
def test_ssim_small_image_rule_matches_skimage_with_the_scaled_window(size):
    """Images under 11 px: the largest odd window that fits, sigma 1.5 * window / 11 (skimage's +-3.5 sigma)."""
    window, sigma = ssim_window(size)
    assert window == min(size) - (1 - min(size) % 2) and sigma == pytest.approx(1.5 * window / 11)
    assert 2 * int(3.5 * sigma + 0.5) + 1 == window  # the window skimage draws for this sigma
    rng = np.random.default_rng(size[0] * 10 + size[1])
    xs = rng.uniform(-1, 1, (3, *size))
    ys = np.clip(xs + rng.normal(0, 0.4, xs.shape), -1, 1)
    reference = [structural_similarity(a, b, gaussian_weights=True, sigma=sigma, use_sample_covariance=False,
                                       data_range=2.0) for a, b in zip(xs, ys)]
    ours = ssim(torch.from_numpy(xs)[:, None], torch.from_numpy(ys)[:, None], reduction="none")
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-6)
    assert ssim_window((28, 28)) == (11, 1.5) and ssim_window((11, 40)) == (11, 1.5)
