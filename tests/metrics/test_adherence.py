"""Control adherence scores against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from genlab.data.controls import control_map
from genlab.metrics.adherence import adherence, edge_f1, mask_iou


def _bool(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[[[ch == "#" for ch in row] for row in rows]]])


def test_edge_f1_by_hand():
    target = _bool(["....", "####", "....", "...."])
    shifted = _bool(["####", "....", "....", "...."])  # the same line one pixel up
    assert edge_f1(shifted, target, tolerance=0).item() == 0.0
    assert edge_f1(shifted, target, tolerance=1).item() == 1.0
    half = _bool(["....", "##..", "....", "..##"])
    # precision 2/4, recall 2/4 -> F1 = 0.5 (tolerance 0)
    assert edge_f1(half, target, tolerance=0).item() == pytest.approx(0.5)
    assert edge_f1(_bool(["...."]), _bool(["...."])).item() == 1.0  # nothing asked, nothing drawn
    assert edge_f1(_bool(["...."]), _bool(["#..."])).item() == 0.0


def test_mask_iou_by_hand():
    a = _bool(["##..", "##.."])
    b = _bool([".##.", ".##."])
    assert mask_iou(a, b).item() == pytest.approx(2 / 6)
    assert mask_iou(a, a).item() == 1.0


def test_an_image_follows_its_own_control_map_perfectly_and_not_a_blank_one():
    x = torch.full((2, 1, 12, 12), -1.0)
    x[:, :, 3:9, 5:7] = 1.0
    for kind in ("edges", "mask", "scribble", "thickness"):
        assert adherence(kind, x, control_map(kind, x)).tolist() == [1.0, 1.0]
        assert adherence(kind, x, torch.full((2, 1, 12, 12), -1.0)).tolist() == [0.0, 0.0]
