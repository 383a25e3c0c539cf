"""Control maps (genlab.data.controls) against images drawn by hand and independent reference implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genlab.data import controls as C
from genlab.errors import ConfigError


def _image(rows: list[str]) -> torch.Tensor:
    """A (1, 1, H, W) image in [-1, 1] from strings: '#' ink (+1), '.' background (-1)."""
    return torch.tensor([[[[1.0 if ch == "#" else -1.0 for ch in row] for row in rows]]])


def _bool(rows: list[str]) -> torch.Tensor:
    return _image(rows) > 0


def _rows(b: torch.Tensor) -> list[str]:
    return ["".join("#" if v else "." for v in row) for row in b[0, 0].tolist()]


def test_edges_are_one_pixel_wide_on_the_bright_side_of_a_step_in_every_direction():
    step = _image(["....####"] * 6)  # black left half, white right half
    # Sobel d/dx / 4 of a 0 -> 1 step is 1 on both columns beside it; suppression keeps the bright one.
    assert _rows(C.edges(step) > 0) == ["....#..."] * 6
    assert _rows(C.edges(step.flip(-1)) > 0) == ["...#...."] * 6
    assert _rows(C.edges(step.transpose(-1, -2)) > 0) == ["......"] * 4 + ["######"] + ["......"] * 3
    assert set(C.edges(step).unique().tolist()) == {-1.0, 1.0}
    line = _image(["...#...."] * 4)  # a one-pixel line: no gradient on it, an edge either side
    assert _rows(C.edges(line) > 0) == ["..#.#..."] * 4
    square = _image(["........", "........", "..####..", "..####..", "..####..", "..####..", "........", "........"])
    assert _rows(C.edges(square) > 0) == ["........", "........", "..####..", "..#..#..", "..#..#..", "..####..",
                                          "........", "........"]
    assert (C.edges(step * 0.2) == -1).all()  # a weak step: magnitude 0.2 is below the threshold 0.25


def test_a_diagonal_step_keeps_the_two_pixels_straddling_it_in_each_row():
    x = torch.tensor([[[[1.0 if c >= r else -1.0 for c in range(10)] for r in range(10)]]])  # bright from the diagonal on
    # Row r has Sobel magnitude 3 sqrt(2) / 4 at columns r - 1 and r and sqrt(2) / 4 at r - 2, r + 1: along the
    # gradient (45 degrees) both of the first two are maxima, so the edge is two pixels wide on a diagonal.
    e = C.edges(x)[0, 0] > 0
    for r in range(2, 9):
        assert torch.nonzero(e[r]).flatten().tolist() == [r - 1, r]


def test_mask_is_the_ink_and_colour_uses_its_luminance():
    x = torch.tensor([[[[-1.0, -0.2, 0.0, 0.1, 1.0]]]])
    assert C.mask(x).tolist() == [[[[-1.0, -1.0, -1.0, 1.0, 1.0]]]]  # luminance > 0 (strictly)
    rgb = x.expand(1, 3, 1, 5)
    assert torch.equal(C.mask(rgb), C.mask(x))


def _zhang_suen_reference(image: np.ndarray) -> np.ndarray:
    """Zhang & Suen (1984), pixel by pixel as in the paper (a slow, independent reference)."""
    img = np.pad(image.astype(np.uint8), 1)
    changed = True
    while changed:
        changed = False
        for step in (0, 1):
            remove = []
            for r in range(1, img.shape[0] - 1):
                for c in range(1, img.shape[1] - 1):
                    if not img[r, c]:
                        continue
                    p = [img[r - 1, c], img[r - 1, c + 1], img[r, c + 1], img[r + 1, c + 1], img[r + 1, c],
                         img[r + 1, c - 1], img[r, c - 1], img[r - 1, c - 1]]  # P2 .. P9
                    b = sum(p)
                    a = sum(p[i] == 0 and p[(i + 1) % 8] == 1 for i in range(8))
                    p2, p4, p6, p8 = p[0], p[2], p[4], p[6]
                    if step == 0:
                        ok = p2 * p4 * p6 == 0 and p4 * p6 * p8 == 0
                    else:
                        ok = p2 * p4 * p8 == 0 and p2 * p6 * p8 == 0
                    if 2 <= b <= 6 and a == 1 and ok:
                        remove.append((r, c))
            for r, c in remove:
                img[r, c] = 0
            changed = changed or bool(remove)
    return img[1:-1, 1:-1].astype(bool)


def test_thinning_a_thick_bar_leaves_a_line_and_a_thin_line_is_kept():
    bar = _bool([".........",
                 ".#######.",
                 ".#######.",
                 ".#######.",
                 "........."])
    # Zhang & Suen's two sub-iterations are not mirror images: the line keeps the west end (one pixel shorter
    # in the east), as the pixel-by-pixel reference below also gives.
    assert _rows(C.thin(bar)) == [".........",
                                  ".........",
                                  "..####...",
                                  ".........",
                                  "........."]
    line = _bool(["........", ".######.", "........"])
    assert torch.equal(C.thin(line), line)  # already one pixel wide: nothing to remove


def test_thinning_matches_the_paper_pixel_by_pixel_on_random_blobs_and_digits():
    from genlab.data import DataConfig, load_data

    g = torch.Generator().manual_seed(0)
    blobs = C.dilate(torch.rand(3, 1, 12, 12, generator=g) > 0.85, 1)  # random unions of 3x3 squares
    digits = C.ink(load_data(DataConfig(source="digits", limit=3)).to_model_range())
    for batch in (blobs, digits):
        ours = C.thin(batch)
        for i in range(len(batch)):
            np.testing.assert_array_equal(ours[i, 0].numpy(), _zhang_suen_reference(batch[i, 0].numpy()))


def test_scribble_is_the_skeleton_grown_by_one_pixel():
    bar = _image([".........",
                  ".#######.",
                  ".#######.",
                  ".#######.",
                  "........."])
    assert _rows(C.scribble(bar) > 0) == [".........",
                                          ".######..",
                                          ".######..",
                                          ".######..",
                                          "........."]  # skeleton ..####... on row 2, dilated by one pixel
    wide = _image(["." * 11] + [".#########."] * 5 + ["." * 11])  # a 5-row bar thins to its middle, then 3 rows
    assert _rows(C.scribble(wide) > 0)[1] == "." * 11 and _rows(C.scribble(wide) > 0)[5] == "." * 11


def test_chessboard_depth_matches_scipy():
    from scipy.ndimage import distance_transform_cdt

    square = _bool(["......."] + [".#####."] * 5 + ["......."])
    assert C.chessboard_depth(square)[0, 0, 3].tolist() == [0, 1, 2, 3, 2, 1, 0]
    b = C.dilate(torch.rand(4, 1, 20, 20, generator=torch.Generator().manual_seed(1)) > 0.9, 1)
    for i in range(4):  # scipy measures the distance to the nearest background pixel; the frame is background
        reference = distance_transform_cdt(np.pad(b[i, 0].numpy(), 1), metric="chessboard")[1:-1, 1:-1]
        np.testing.assert_array_equal(C.chessboard_depth(b)[i, 0].numpy(), reference)


@pytest.mark.parametrize("width", [1, 3, 5, 7])
def test_thickness_of_a_long_straight_stroke_is_its_width(width):
    rows = ["." * 30] * 2 + ["." + "#" * 28 + "."] * width + ["." * 30] * 2
    t = C.thickness(_image(rows), max_width=8.0)
    middle = t[0, 0, 2: 2 + width, 8:22]  # away from the stroke's ends
    torch.testing.assert_close(middle, torch.full_like(middle, 2 * width / 8.0 - 1))
    assert (t[0, 0, :2] == -1).all()  # background


def test_control_map_by_name_and_unknown_name():
    x = _image(["..##..", "..##.."])
    for kind in C.CONTROLS:
        out = C.control_map(kind, x)
        assert out.shape == (1, 1, 2, 6) and out.min() >= -1 and out.max() <= 1
    with pytest.raises(ConfigError, match="unknown control 'canny': choose one of edges, mask, scribble, thickness"):
        C.control_map("canny", x)
