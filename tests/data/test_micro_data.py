"""Micro-conditioning augmentations (random shifted crops, up-scaled small originals) and aspect buckets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from genlab import api
from genlab.data import DataConfig, load_data
from genlab.data.buckets import BucketedImageSet, bucket_of, bucket_sizes
from genlab.data.micro import micro_augment, micro_vector, parse_crop, parse_size
from genlab.errors import ConfigError
from tiny_configs import TINY_DDPM


def _uniform_for(offset: int, max_shift: int) -> float:
    """The draw in [0, 1) that micro_augment turns into ``offset`` (the middle of its bin)."""
    return (offset + max_shift + 0.5) / (2 * max_shift + 1)


def test_a_shifted_crop_is_the_window_at_top_left_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 2, 6, 7, generator=g) * 2 - 1
    offsets = [(0, 0), (2, -3), (-3, 1)]
    u = torch.tensor([[0.99, _uniform_for(dy, 3), _uniform_for(dx, 3)] for dy, dx in offsets])
    out, micro = micro_augment(images, u, max_shift=3)
    for i, (dy, dx) in enumerate(offsets):
        # Reference: out[y, x] = image[y + top, x + left] where that pixel exists, background (-1) elsewhere.
        expected = np.full((2, 6, 7), -1.0, dtype=np.float32)
        src = images[i].numpy()
        for y in range(6):
            for x in range(7):
                if 0 <= y + dy < 6 and 0 <= x + dx < 7:
                    expected[:, y, x] = src[:, y + dy, x + dx]
        np.testing.assert_array_equal(out[i].numpy(), expected)
        assert micro[i].tolist() == [6, 7, dy, dx, 6, 7]
    assert torch.equal(out[0], images[0])  # crop (0, 0) is the image itself


def test_up_scaled_small_originals_record_their_size_and_lose_detail():
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None]) % 2 * 2.0 - 1  # finest detail there is
    images = checker.expand(2, 1, 16, 16).clone()
    u = torch.tensor([[0.0, 0.5, 0.5], [0.999, 0.5, 0.5]])  # the smallest original (8) and the full size (16)
    out, micro = micro_augment(images, u, min_original_size=8)
    assert micro[:, :2].tolist() == [[8, 8], [16, 16]] and micro[:, 2:].tolist() == [[0, 0, 16, 16]] * 2
    assert torch.equal(out[1], images[1])  # full size: untouched
    assert out[0].std() < 0.1 * images[0].std()  # shrunk to 8 px and back: the 1-px checker is gone
    flat, _ = micro_augment(torch.full((1, 1, 16, 16), 0.25), u[:1], min_original_size=8)
    torch.testing.assert_close(flat, torch.full((1, 1, 16, 16), 0.25))  # a flat image stays flat


def test_micro_vector_and_the_sampling_flags():
    assert micro_vector(2, (28, 28)).tolist() == [[28, 28, 0, 0, 28, 28]] * 2
    assert micro_vector(1, (20, 40), (14, 14), (3, -2)).tolist() == [[14, 14, 3, -2, 20, 40]]
    assert parse_crop("4,-2") == (4, -2) and parse_size("28") == (28, 28) and parse_size("20x40") == (20, 40)
    for bad in ("4", "a,b"):
        with pytest.raises(ConfigError, match="TOP,LEFT"):
            parse_crop(bad)
    with pytest.raises(ConfigError, match="HxW"):
        parse_size("0x3")


def test_buckets_have_about_the_area_of_the_square_and_fitting_sides():
    assert bucket_sizes(28) == [(40, 20), (32, 24), (28, 28), (24, 32), (20, 40)]
    for h, w in bucket_sizes(64):
        assert h % 4 == 0 and w % 4 == 0 and abs(h * w / 64**2 - 1) < 0.1


@pytest.fixture
def mixed_folder(tmp_path):
    """Images of several aspect ratios (width, height) -> the bucket each must land in (height, width)."""
    expected = {(60, 30): (20, 40), (30, 60): (40, 20), (50, 50): (28, 28), (40, 31): (24, 32), (31, 40): (32, 24),
                (93, 30): (20, 40), (52, 48): (28, 28)}
    for i, (w, h) in enumerate(expected):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    return tmp_path, list(expected.items())


def test_each_image_goes_to_the_bucket_of_its_aspect_ratio(mixed_folder):
    folder, expected = mixed_folder
    data = load_data(DataConfig(source=f"folder:{folder}", image_size=28, fit="buckets"))
    assert isinstance(data, BucketedImageSet) and data.image_size == 28
    assert data.sizes.tolist() == [list(bucket) for _, bucket in expected]
    assert data.original_sizes.tolist() == [[h, w] for (w, h), _ in expected]
    for i, (h, w) in enumerate(data.sizes.tolist()):
        assert bucket_of(*data.original_sizes[i].tolist(), bucket_sizes(28)) == bucket_sizes(28).index((h, w))
        # Stored top-left on the canvas: the resized image there, background elsewhere.
        assert data.images[i, :, h:, :].sum() == 0 and data.images[i, :, :, w:].sum() == 0
        assert data.images[i, :, :h, :w].float().std() > 20
    order = data.epoch_order(torch.Generator().manual_seed(0), batch=2)
    chunks = order.split(2)
    assert all(len({tuple(s) for s in data.sizes[c].tolist()}) == 1 for c in chunks)  # one bucket per batch
    assert set(order.tolist()) == set(range(len(data)))  # every image seen in an epoch
    assert data.bucket_shape(chunks[0]) == tuple(data.sizes[chunks[0][0]].tolist())


def test_buckets_need_a_folder_and_an_image_size(mixed_folder):
    folder, _ = mixed_folder
    with pytest.raises(ConfigError, match="folder:PATH"):
        load_data(DataConfig(source="digits", image_size=8, fit="buckets"))
    with pytest.raises(Exception, match="data.image_size=N"):
        load_data(DataConfig(source=f"folder:{folder}", fit="buckets"))


def test_multi_aspect_training_draws_one_bucket_per_batch_and_samples_any_bucket(mixed_folder, tmp_path):
    folder, _ = mixed_folder
    overrides = [o for o in TINY_DDPM if "attention_resolutions" not in o and "batch_size" not in o] + [
        "model.unet.attention_resolutions=[]", "model.patch_size=1", "train.batch_size=2", "train.steps=3",
        "data.image_size=28", "data.fit=buckets", "model.micro_conditioning=true"]
    run = api.train("ddpm", data=f"folder:{folder}", overrides=overrides, run_dir=tmp_path / "r", progress=False)
    wide = run.sample(2, seed=0, target_size=(20, 40), steps=2)
    assert wide.shape == (2, 1, 20, 40)
    assert run.sample(1, seed=0, steps=2).shape == (1, 1, 28, 28)


def test_micro_conditioned_ddpm_trains_on_shifted_crops_and_samples_any_crop(tmp_path):
    run = api.train("ddpm", data="digits", run_dir=tmp_path / "r", progress=False,
                    overrides=TINY_DDPM + ["train.steps=3", "data.random_shift=2", "data.min_original_size=4",
                                           "model.micro_conditioning=true"])
    # The recorded conditions reached the network: its zero-initialised last layer got gradients.
    raw = api.load_run(tmp_path / "r", weights="raw").method
    assert raw.unet.micro_embed.mlp[2].weight.abs().sum() > 0
    assert run.sample(2, seed=0, crop=(2, -2), original_size=4, steps=2).shape == (2, 1, 8, 8)
    plain = api.train("ddpm", data="digits", run_dir=tmp_path / "p", progress=False,
                      overrides=TINY_DDPM + ["train.steps=1"])
    with pytest.raises(ConfigError, match="model.micro_conditioning=true"):
        plain.sample(1, crop=(0, 0))
