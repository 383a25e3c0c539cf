"""DiT: patchify/unpatchify, the fixed 2D position embedding, and the four conditioning variants."""

from __future__ import annotations

import math

import pytest
import torch

from genlab.errors import ConfigError
from genlab.models.dit import CONDITIONINGS, DiT, DiTBlock, DiTConfig, patchify, sincos_2d, unpatchify


def test_unpatchify_inverts_patchify_and_patches_are_contiguous_squares():
    x = torch.randn(2, 3, 8, 8)
    tokens = patchify(x, 4)  # (2, 4, 48)
    assert torch.equal(unpatchify(tokens, 4, 3), x)
    # token 1 is the top-right 4x4 square, channel-last inside the patch
    assert torch.equal(tokens[0, 1].view(4, 4, 3), x[0, :, :4, 4:].permute(1, 2, 0))


def test_2d_sincos_embedding_matches_its_closed_form():
    dim, g = 16, 3
    emb = sincos_2d(g, dim)  # (9, 16)
    quarter = dim // 4
    omega = [1 / 10000 ** (k / quarter) for k in range(quarter)]
    for index in range(g * g):
        row, col = divmod(index, g)
        expected = [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega] + \
                   [math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
        torch.testing.assert_close(emb[index], torch.tensor(expected, dtype=torch.float32))


def test_adaln_zero_block_is_the_identity_at_initialisation():
    block = DiTBlock(32, 4, 4.0, "adaln-zero")
    x, c = torch.randn(3, 5, 32), torch.randn(3, 32)
    assert torch.equal(block(x, c), x)
    # ...and stops being one as soon as the gates move
    with torch.no_grad():
        block.adaLN_modulation[-1].bias.fill_(0.1)
    assert not torch.allclose(block(x, c), x)


def test_adaln_zero_dit_outputs_zero_at_initialisation_and_others_do_not():
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 50]), torch.tensor([1, 2])
    for kind in CONDITIONINGS:
        model = DiT(DiTConfig(patch_size=2, hidden_size=32, depth=2, num_heads=4, conditioning=kind), 1, 1, 8, 10)
        out = model(x, t, y)
        assert out.shape == x.shape
        assert (out.abs().max() == 0) == (kind == "adaln-zero"), kind


@pytest.mark.parametrize("kind", CONDITIONINGS)
def test_every_variant_depends_on_t_and_y(kind):
    torch.manual_seed(0)
    model = DiT(DiTConfig(patch_size=2, hidden_size=32, depth=2, num_heads=4, conditioning=kind), 1, 1, 8, 10)
    with torch.no_grad():  # leave the zero init so the condition paths are exercised
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 1, 8, 8)
    base = model(x, torch.tensor([5, 5]), torch.tensor([1, 1]))
    assert not torch.allclose(base, model(x, torch.tensor([500, 500]), torch.tensor([1, 1])), atol=1e-4)
    assert not torch.allclose(base, model(x, torch.tensor([5, 5]), torch.tensor([7, 7])), atol=1e-4)


def test_bad_sizes_are_rejected():
    with pytest.raises(ConfigError, match="patch_size"):
        DiT(DiTConfig(patch_size=3), 1, 1, 8)
    with pytest.raises(ConfigError, match="conditioning"):
        DiT(DiTConfig(conditioning="film"), 1, 1, 8)


def test_embedding_init_sets_the_scale_of_the_condition_and_dit_is_the_papers():
    t, y = torch.arange(0, 1000, 50), torch.arange(20) % 10
    torch.manual_seed(0)
    paper = DiT(DiTConfig(patch_size=2, hidden_size=64, depth=1, num_heads=4), 1, 1, 8, 10)
    assert paper.config.embedding_init == "dit"  # the default is the paper's N(0, 0.02)
    assert paper.y_embedder.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert paper.t_embedder.mlp[2].weight.std().item() == pytest.approx(0.02, rel=0.1)
    unit = DiT(DiTConfig(patch_size=2, hidden_size=64, depth=1, num_heads=4, embedding_init="unit"), 1, 1, 8, 10)
    assert unit.y_embedder.weight.std().item() == pytest.approx(1.0, rel=0.1)
    w = unit.t_embedder.mlp[0].weight  # Xavier uniform: std sqrt(2 / (fan_in + fan_out))
    assert w.std().item() == pytest.approx(math.sqrt(2 / sum(w.shape)), rel=0.1)
    # c = embed(t) + embed(y): ~0.03 in the paper's init, O(1) with unit
    c_paper, c_unit = (m.condition_tokens(t, y).sum(1).std().item() for m in (paper, unit))
    assert c_paper < 0.1 < 0.5 < c_unit
    with pytest.raises(ConfigError, match="embedding_init"):
        DiT(DiTConfig(embedding_init="big"), 1, 1, 8, 10)
