"""`genlab demo`: what the picture shows is the preset's sampler on the demo recipe, one digit per column."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from genlab import api
from genlab.demo import DEMO_OVERRIDES, run_demo
from genlab.imageio import save_grid

SHORT = ["train.steps=2", "train.batch_size=8", "data.limit=64", "train.sample_n=4", "model.sample_steps=2",
         "train.threads=1", "train.checkpoint_every=2"]


def test_demo_draws_each_digit_in_its_column_with_the_presets_sampler(tmp_path):
    out = run_demo(tmp_path / "demo", SHORT)
    run = api.load_run(tmp_path / "demo")
    model = run.config.model
    # The demo recipe: class-conditional, with the preset's sampler (DDPM, chosen by measurement).
    assert "model.class_conditional=true" in DEMO_OVERRIDES and model.class_conditional
    assert (model.sampler, model.sample_steps) == ("ddpm", 2)
    expected = save_grid(run.sample(100, seed=0, labels=torch.arange(100) % 10), tmp_path / "expected.png",
                         nrow=10, scale=3)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(expected)))
    other = save_grid(run.sample(100, seed=0, labels=(torch.arange(100) + 1) % 10), tmp_path / "other.png",
                      nrow=10, scale=3)
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(other)))  # the labels matter
