"""paired:PATH pairs and the derived pix2pix inputs (edges, masks, low-res, luminance): DATA1-3, G6."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from genlab.data import DataConfig, ImageSet, load_data, split_source_ref
from genlab.data.paired import (
    apply_mask,
    lowres,
    luminance,
    patch_grid,
    random_patch_mask,
    sobel_edges,
    square_hole_mask,
)
from genlab.data.transforms import rgb_to_grey
from genlab.errors import DataError


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _random(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _one_line_naming(excinfo, *names):
    message = str(excinfo.value)
    assert "\n" not in message
    for name in names:
        assert str(name) in message, message


@pytest.fixture
def pairs(tmp_path):
    """PATH/A grey PNGs and PATH/B RGB BMPs named img1, img2, img10 (written out of order)."""
    arrays = {}
    for i, stem in enumerate(["img10", "img2", "img1"]):
        a, b = _random((6, 5), seed=i), _random((6, 5, 3), seed=10 + i)
        _save(tmp_path / "facades" / "A" / f"{stem}.png", a)
        _save(tmp_path / "facades" / "B" / f"{stem}.bmp", b)  # another extension: pairs match by name
        arrays[stem] = (a, b)
    return tmp_path / "facades", arrays


# ------------------------------------------------------------------ paired:PATH


def test_pairs_are_matched_by_name_in_natural_order(pairs):
    folder, arrays = pairs
    data = load_data(DataConfig(source=f"paired:{folder}"))
    assert data.images.shape == (3, 3, 6, 5) and data.conditions.shape == (3, 1, 6, 5)
    assert data.labels is None
    for i, stem in enumerate(["img1", "img2", "img10"]):
        a, b = arrays[stem]
        np.testing.assert_array_equal(data.conditions[i, 0].numpy(), a)  # inputs: A
        np.testing.assert_array_equal(data.images[i].permute(1, 2, 0).numpy(), b)  # targets: B
    limited = load_data(DataConfig(source=f"paired:{folder}", limit=2))
    assert torch.equal(limited.images, data.images[:2]) and torch.equal(limited.conditions, data.conditions[:2])


def test_split_folders_and_image_size_fit_both_sides(tmp_path):
    for split, seed in (("train", 0), ("test", 1)):
        _save(tmp_path / "p" / split / "A" / "x.png", _random((10, 10, 3), seed))
        _save(tmp_path / "p" / split / "B" / "x.png", _random((10, 10, 3), seed + 5))
    test = load_data(DataConfig(source=f"paired:{tmp_path / 'p'}", split="test", image_size=4))
    assert test.images.shape == (1, 3, 4, 4) and test.conditions.shape == (1, 3, 4, 4)
    direct = torch.from_numpy(_random((10, 10, 3), 1)).permute(2, 0, 1)[None]
    from genlab.data.transforms import fit_size

    assert torch.equal(test.conditions, fit_size(direct, 4))  # the A side was fitted too
    assert split_source_ref(f"paired:{tmp_path / 'p'}:test") == (f"paired:{tmp_path / 'p'}", "test")
    with pytest.raises(DataError) as e:
        load_data(DataConfig(source=f"paired:{tmp_path / 'p'}", split="val"))
    _one_line_naming(e, "val", "train, test")


def test_unmatched_names_are_listed(pairs):
    folder, _ = pairs
    _save(folder / "A" / "extra7.png", _random((6, 5), 99))
    _save(folder / "B" / "lonely.bmp", _random((6, 5, 3), 98))
    with pytest.raises(DataError) as e:
        load_data(DataConfig(source=f"paired:{folder}"))
    _one_line_naming(e, "extra7", "lonely", "no partner")


def test_size_mismatch_names_the_pair(pairs):
    folder, _ = pairs
    for stem in ("img1", "img2", "img10"):
        _save(folder / "B" / f"{stem}.bmp", _random((7, 5, 3), 3))
    with pytest.raises(DataError) as e:
        load_data(DataConfig(source=f"paired:{folder}"))
    _one_line_naming(e, "img1.png", "6x5", "7x5")


def test_missing_or_empty_side_and_unreadable_file(pairs, tmp_path):
    folder, _ = pairs
    empty = tmp_path / "empty"
    (empty / "A").mkdir(parents=True)
    (empty / "B").mkdir()
    with pytest.raises(DataError) as e:
        load_data(DataConfig(source=f"paired:{empty}"))
    _one_line_naming(e, "A")
    only_a = tmp_path / "only_a"
    _save(only_a / "A" / "x.png", _random((4, 4), 0))
    with pytest.raises(DataError) as e:
        load_data(DataConfig(source=f"paired:{only_a}"))
    _one_line_naming(e, f"{only_a}/B")
    (folder / "A" / "img2.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as e:
        load_data(DataConfig(source=f"paired:{folder}"))
    _one_line_naming(e, "img2.png", "not a readable image")


def test_imageset_conditions_are_validated_and_follow_subsets():
    images = torch.arange(4 * 3 * 2 * 2, dtype=torch.uint8).view(4, 3, 2, 2)
    conditions = images[:, :1] + 100
    data = ImageSet(images, None, None, "x", "train", conditions=conditions)
    part = data.subset(torch.tensor([3, 1]))
    assert torch.equal(part.conditions, conditions[[3, 1]]) and torch.equal(part.images, images[[3, 1]])
    with pytest.raises(ValueError, match="conditions"):
        ImageSet(images, None, None, "x", "train", conditions=conditions[:3])  # not aligned
    with pytest.raises(ValueError, match="conditions"):
        ImageSet(images, None, None, "x", "train", conditions=conditions.float())


# ------------------------------------------------------------------ derived inputs


def test_sobel_edges_of_a_vertical_step_match_the_hand_values():
    x = -torch.ones(1, 1, 6, 8)
    x[..., 4:] = 1.0  # black | white, step between columns 3 and 4
    soft = sobel_edges(x, threshold=None)
    # Gx = (1 + 2 + 1) * (1 - 0) = 4 on both columns next to the step, 0 elsewhere; /4 -> 1 -> +1.
    expected = -torch.ones(1, 1, 6, 8)
    expected[..., 3:5] = 1.0
    assert torch.equal(soft, expected)
    half = torch.where(x > 0, torch.zeros_like(x), -torch.ones_like(x))  # step of 0.5 in [0, 1]
    assert torch.allclose(sobel_edges(half, threshold=None)[..., 3:5], torch.zeros(1, 1, 6, 2))  # 0.5 -> 0
    assert torch.equal(sobel_edges(half, threshold=0.25), expected)  # 0.5 > 0.25
    assert torch.equal(sobel_edges(half, threshold=0.6), -torch.ones_like(x))  # 0.5 < 0.6


def test_sobel_edges_of_random_rgb_images_match_scipy():
    x = torch.rand(2, 3, 9, 7, generator=torch.Generator().manual_seed(0)) * 2 - 1
    grey = ((luminance(x) + 1) / 2)[:, 0].double().numpy()
    expected = np.stack([
        np.hypot(ndimage.sobel(g, axis=0, mode="nearest"), ndimage.sobel(g, axis=1, mode="nearest")) / 4 for g in grey
    ])
    got = (sobel_edges(x, threshold=None)[:, 0] + 1) / 2
    np.testing.assert_allclose(got.numpy(), np.minimum(expected, 1.0), atol=1e-5)


def test_luminance_matches_the_uint8_grey_conversion():
    u = torch.from_numpy(_random((3, 3, 5, 5), 7))
    x = u.float() / 127.5 - 1
    assert (luminance(x) - (rgb_to_grey(u).float() / 127.5 - 1)).abs().max() <= 1 / 127.5 + 1e-6
    assert torch.equal(luminance(x[:, :1]), x[:, :1])


@pytest.mark.parametrize("size", [8, 7])
@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_lowres_of_a_constant_image_is_the_constant(size, upsample):
    x = torch.full((2, 3, size, size), 0.3125)
    assert torch.allclose(lowres(x, 2, upsample), x, atol=1e-7)


def test_lowres_averages_2x2_blocks():
    x = torch.tensor([[1.0, 3.0, 0.0, 0.0], [5.0, 7.0, 0.0, 4.0], [2.0, 2.0, 1.0, 1.0], [2.0, 2.0, 1.0, 1.0]])[None, None]
    expected = torch.tensor([[4.0, 4.0, 1.0, 1.0], [4.0, 4.0, 1.0, 1.0], [2.0, 2.0, 1.0, 1.0], [2.0, 2.0, 1.0, 1.0]])
    assert torch.equal(lowres(x, 2, "nearest")[0, 0], expected)


def test_square_hole_has_the_requested_area_and_stays_inside():
    u = torch.rand(500, 2, generator=torch.Generator().manual_seed(0))
    u[0], u[1] = torch.tensor([0.0, 0.0]), torch.tensor([0.9999, 0.9999])
    mask = square_hole_mask(u, 28, 20, 7)
    assert mask.shape == (500, 1, 28, 20) and mask.dtype == torch.bool
    assert (mask.flatten(1).sum(1) == 49).all()  # exactly side^2 pixels: never cut by the border
    assert mask[0, 0, :7, :7].all() and mask[1, 0, -7:, -7:].all()  # corners reachable
    # Top rows 0..21 equally likely: row r is covered by 7 of the 22 positions in the interior
    # (6 <= r <= 21) and by r + 1 of them near the top border.
    row_coverage = mask.any(dim=3).float().mean(dim=(0, 1))  # (28,)
    assert (row_coverage[6:22] - 7 / 22).abs().max() < 0.08
    assert abs(row_coverage[0].item() - 1 / 22) < 0.03


def test_patch_mask_hides_the_requested_fraction():
    rows, cols = patch_grid(28, 28, 4)
    assert (rows, cols) == (7, 7)
    u = torch.rand(2000, rows * cols, generator=torch.Generator().manual_seed(1))
    mask = random_patch_mask(u, 28, 28, 4, 0.3)
    assert abs(mask.float().mean().item() - 0.3) < 0.01  # binomial std ~0.0015
    cells = mask.view(2000, 1, 7, 4, 7, 4)
    assert (cells.all(dim=(3, 5)) | ~cells.any(dim=(3, 5))).all()  # whole 4x4 patches only
    x = torch.rand(2000, 2, 28, 28)
    masked = apply_mask(x, mask)
    assert (masked[mask.expand_as(x)] == -1).all() and torch.equal(masked[~mask.expand_as(x)], x[~mask.expand_as(x)])
    odd = random_patch_mask(torch.zeros(1, 4), 7, 6, 4, 0.5)  # grid 2 x 2 cropped to 7 x 6: all hidden
    assert odd.shape == (1, 1, 7, 6) and odd.all()
