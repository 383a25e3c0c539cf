"""data.classes: keep the examples of some classes (a base that never saw a class, a few images of one)."""

from __future__ import annotations

import pytest
import torch

from genlab.data import load_data
from genlab.errors import ConfigError, DataError


def test_classes_keep_those_examples_in_order_and_limit_counts_kept_ones():
    full = load_data(source="digits")
    kept = load_data(source="digits", classes=(3, 5), limit=7)
    chosen = torch.isin(full.labels, torch.tensor([3, 5])).nonzero().flatten()[:7]  # the first 7 threes and fives
    assert torch.equal(kept.labels, full.labels[chosen]) and torch.equal(kept.images, full.images[chosen])
    assert kept.num_classes == 10  # the class names stay those of the source


def test_bad_classes_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="has classes 0 to 9, not 12"):
        load_data(source="digits", classes=(1, 12))
    with pytest.raises(ConfigError, match="non-empty list of class indices"):
        load_data(source="digits", classes=())
    from PIL import Image

    for i in range(2):
        Image.new("L", (8, 8)).save(tmp_path / f"{i}.png")
    with pytest.raises(DataError, match="no class labels to filter by"):
        load_data(source=f"folder:{tmp_path}", classes=(0,))
