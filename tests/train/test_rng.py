"""RNG capture/restore: draws after restore equal the draws made right after capture."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from genlab.errors import GenlabError
from genlab.train.checkpoint import load_checkpoint, save_checkpoint
from genlab.train.rng import capture_rng_state, restore_rng_state


def _draw():
    return (
        [random.random() for _ in range(3)] + [random.gauss(0, 1)],
        np.random.standard_normal(3).tolist() + np.random.randint(0, 1000, 3).tolist(),
        torch.randn(5),
    )


def _assert_same(a, b):
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_restore_replays_the_same_draws_through_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached second Gaussian in Python's state
    np.random.standard_normal(1)  # and in NumPy's (has_gauss = 1)
    tensors, json_state = capture_rng_state()
    assert json_state["numpy"]["has_gauss"] == 1

    path = save_checkpoint(tmp_path, 0, {"rng": tensors}, {"rng": json_state})
    first = _draw()
    second = _draw()
    with pytest.raises(AssertionError):
        _assert_same(first, second)  # the generators do move on: the comparison below can fail

    loaded_tensors, state = load_checkpoint(path)
    restore_rng_state(loaded_tensors["rng"], json.loads(json.dumps(state["rng"])))
    _assert_same(_draw(), first)


def test_malformed_state_is_a_genlab_error():
    tensors, json_state = capture_rng_state()
    del json_state["numpy"]
    with pytest.raises(GenlabError, match="RNG"):
        restore_rng_state(tensors, json_state)
