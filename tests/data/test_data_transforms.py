"""uint8 <-> model range, size fitting (resize / pad / center-crop) and grey <-> RGB conversion."""

import numpy as np
import pytest
import torch
from PIL import Image

from genlab.data import from_model_range, to_model_range
from genlab.data.transforms import center_crop, convert_channels, fit_size, pad, resize, rgb_to_grey
from genlab.errors import ConfigError


def test_model_range_round_trip_is_exact_for_every_uint8_value():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = to_model_range(u)
    assert x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    # x = u / 127.5 - 1, computed independently in float64
    np.testing.assert_allclose(x.flatten().numpy(), np.arange(256) / 127.5 - 1.0, atol=1e-6)
    assert torch.equal(from_model_range(x), u)


def test_from_model_range_rounds_to_nearest_and_clips():
    x = torch.tensor([-3.0, -1.0, -1.0 + 0.49 / 127.5, -1.0 + 0.51 / 127.5, 0.0, 1.0, 7.0])
    assert from_model_range(x).tolist() == [0, 0, 0, 1, 128, 255, 255]  # 0.0 -> 127.5 -> 128 (half to even)


def test_to_model_range_rejects_float_input():
    with pytest.raises(TypeError):
        to_model_range(torch.zeros(1, 1, 2, 2))


def test_pad_centres_on_zeros_with_odd_margin_bottom_right():
    x = torch.tensor([[1, 2], [3, 4]], dtype=torch.uint8)[None, None]  # (1, 1, 2, 2)
    expected = torch.tensor(
        [[0, 0, 0, 0, 0],
         [0, 1, 2, 0, 0],
         [0, 3, 4, 0, 0],
         [0, 0, 0, 0, 0],
         [0, 0, 0, 0, 0]], dtype=torch.uint8)
    assert torch.equal(pad(x, 5)[0, 0], expected)
    assert torch.equal(fit_size(x, 4, "pad")[0, 0, 1:3, 1:3], x[0, 0])
    assert fit_size(x, 4, "pad").sum() == x.sum()


def test_center_crop_keeps_the_central_window():
    x = torch.arange(25, dtype=torch.uint8).reshape(1, 1, 5, 5)
    assert fit_size(x, 3, "center-crop")[0, 0].tolist() == [[6, 7, 8], [11, 12, 13], [16, 17, 18]]
    assert center_crop(x, 2)[0, 0].tolist() == [[6, 7], [11, 12]]  # odd margin: the extra pixel is cut bottom/right


def test_pad_and_crop_refuse_the_impossible_direction_with_a_hint():
    x = torch.zeros(1, 1, 6, 6, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="center-crop"):
        pad(x, 4)
    with pytest.raises(ConfigError, match="pad"):
        center_crop(x, 8)


def test_resize_matches_hand_computed_bilinear():
    # Upsampling 2 -> 4 (align_corners=False): output centres map to -0.25, 0.25, 0.75, 1.25 in
    # input pixels, clamped at the border: 0, 0.25 * 200, 0.75 * 200, 200.
    row = torch.tensor([[[[0, 200], [0, 200]]]], dtype=torch.uint8)  # (1, 1, 2, 2)
    assert resize(row, 4)[0, 0, 0].tolist() == [0, 50, 150, 200]
    # Downsampling 4 -> 2 with antialiasing: a triangle filter of half-width 2 input pixels.
    # Output 0 is centred at 1.0: pixels 0, 1, 2 at distances 0.5, 0.5, 1.5 weigh 0.75, 0.75, 0.25
    # (normalised by 1.75): (0 * .75 + 100 * .75 + 200 * .25) / 1.75 = 71.4 -> 71; output 1 is
    # centred at 3.0: (100 * .25 + 200 * .75 + 40 * .75) / 1.75 = 117.1 -> 117.
    x = torch.tensor([0, 100, 200, 40], dtype=torch.uint8).repeat(4, 1)[None, None]  # (1, 1, 4, 4)
    assert resize(x, 2)[0, 0].tolist() == [[71, 117], [71, 117]]


def test_resize_agrees_with_pil_bilinear():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 37, 37), dtype=torch.uint8, generator=g)
    for size in (16, 28, 64):
        y = fit_size(x, size, "resize")
        assert y.dtype == torch.uint8 and y.shape == (2, 3, size, size)
        for n in range(2):
            ref = Image.fromarray(x[n].permute(1, 2, 0).numpy()).resize((size, size), Image.BILINEAR)
            ref = torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1)
            assert (y[n].int() - ref.int()).abs().max() <= 1  # fixed-point rounding may differ by 1


def test_rgb_to_grey_is_bit_exact_with_pil():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (3, 3, 20, 20), dtype=torch.uint8, generator=g)
    grey = rgb_to_grey(x)
    assert grey.shape == (3, 1, 20, 20)
    for n in range(3):
        ref = np.asarray(Image.fromarray(x[n].permute(1, 2, 0).numpy()).convert("L"))
        np.testing.assert_array_equal(grey[n, 0].numpy(), ref)


def test_grey_rgb_round_trip_and_repetition():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    rgb = convert_channels(u, 3)
    assert rgb.shape == (1, 3, 16, 16)
    assert all(torch.equal(rgb[:, c : c + 1], u) for c in range(3))
    assert torch.equal(convert_channels(rgb, 1), u)  # the luma weights sum to 1 exactly (65536)
    assert convert_channels(u, 1) is u
    with pytest.raises(ConfigError, match="channels=4"):
        convert_channels(u, 4)


def test_fit_size_rejects_unknown_fit():
    with pytest.raises(ConfigError, match="stretch"):
        fit_size(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), 2, "stretch")
