"""Sinusoidal timestep embedding against its closed form."""

import math

import numpy as np
import pytest
import torch

from genlab.nn.embeddings import TimestepEmbedder, timestep_embedding


@pytest.mark.parametrize("dim", [8, 7, 128])
def test_timestep_embedding_equals_closed_form(dim):
    t = torch.tensor([0.0, 1.0, 2.5, 37.0, 999.0])
    half = dim // 2
    expected = np.zeros((len(t), dim))
    for n, t_n in enumerate(t.tolist()):
        for i in range(half):
            w_i = 10000.0 ** (-i / half)  # geometric frequencies from 1 to ~1e-4
            expected[n, i] = math.cos(t_n * w_i)
            expected[n, half + i] = math.sin(t_n * w_i)
    got = timestep_embedding(t, dim).double().numpy()
    np.testing.assert_allclose(got, expected, atol=2e-4)  # float32 angles up to ~1000 rad
    if dim % 2:
        assert (got[:, -1] == 0).all()


def test_timestep_embedding_max_period_and_integer_timesteps():
    t = torch.tensor([3, 250])
    got = timestep_embedding(t, 6, max_period=100.0)
    w = torch.tensor([100.0 ** (-i / 3) for i in range(3)], dtype=torch.float64)
    angles = t.double()[:, None] * w
    expected = torch.cat([angles.cos(), angles.sin()], dim=1)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    assert got.dtype == torch.float32


def test_timestep_embedder_is_mlp_of_sinusoid():
    torch.manual_seed(0)
    embedder = TimestepEmbedder(16, 32)
    t = torch.tensor([0, 10, 500])
    features = timestep_embedding(t.float(), 16)
    lin1, lin2 = embedder.mlp[0], embedder.mlp[2]
    expected = lin2(torch.nn.functional.silu(lin1(features)))
    torch.testing.assert_close(embedder(t), expected)
