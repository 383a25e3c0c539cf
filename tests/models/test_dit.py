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


@pytest.mark.parametrize("long_skips", [False, True])
@pytest.mark.parametrize("kind", CONDITIONINGS)
def test_every_variant_depends_on_t_and_y(kind, long_skips):
    torch.manual_seed(0)
    model = DiT(DiTConfig(patch_size=2, hidden_size=32, depth=2, num_heads=4, conditioning=kind, long_skips=long_skips),
                1, 1, 8, 10)
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


def _perturbed(model: DiT, seed: int = 1) -> DiT:
    """The model with every weight moved off its (partly zero) initialisation, the same way for equal shapes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_long_skips_off_is_the_plain_dit_and_on_adds_only_the_skip_path():
    config = dict(patch_size=2, hidden_size=32, depth=4, num_heads=4)
    torch.manual_seed(0)
    plain = DiT(DiTConfig(**config), 1, 1, 8, 10)
    torch.manual_seed(0)
    skipped = DiT(DiTConfig(**config, long_skips=True), 1, 1, 8, 10)
    assert plain.config.long_skips is False and plain.skip_proj is None  # off by default: no extra weights
    assert not any("skip" in k for k in plain.state_dict())
    extra = set(skipped.state_dict()) - set(plain.state_dict())
    assert extra == {f"skip_proj.{i}.{w}" for i in range(2) for w in ("weight", "bias")}
    for key, value in plain.state_dict().items():  # registered last: the other weights draw the same numbers
        assert torch.equal(value, skipped.state_dict()[key]), key
    _perturbed(plain)
    skipped.load_state_dict(plain.state_dict(), strict=False)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 500]), torch.tensor([1, 7])
    with torch.no_grad():
        for proj in skipped.skip_proj:  # [I, 0]: pass x through, ignore the skip -> exactly the plain DiT
            proj.weight.copy_(torch.cat([torch.eye(32), torch.zeros(32, 32)], dim=1))
            proj.bias.zero_()
        torch.testing.assert_close(skipped(x, t, y), plain(x, t, y), rtol=0, atol=1e-6)
        skipped.skip_proj[0].weight[:, 32:].normal_(0, 0.1)  # now the skip carries something
        assert not torch.allclose(skipped(x, t, y), plain(x, t, y), atol=1e-3)


@pytest.mark.parametrize("depth", [4, 5])
def test_long_skips_join_each_early_block_to_its_mirror(depth):
    model = _perturbed(DiT(DiTConfig(patch_size=2, hidden_size=32, depth=depth, num_heads=4, long_skips=True), 1, 1, 8, 10))
    inputs, outputs = {}, {}
    def record(i):
        def hook(module, args, out):
            inputs[i], outputs[i] = args[0], out
        return hook
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(record(i))
    with torch.no_grad():
        for proj in model.skip_proj:  # [0, I]: a block of the second half sees only its skip
            proj.weight.copy_(torch.cat([torch.zeros(32, 32), torch.eye(32)], dim=1))
            proj.bias.zero_()
        model(torch.randn(2, 1, 8, 8), torch.tensor([5, 500]), torch.tensor([1, 7]))
    half = depth // 2
    for k in range(half):  # block depth-1-k is fed by block k (U-ViT's stack order); the middle one has no skip
        torch.testing.assert_close(inputs[depth - 1 - k], outputs[k], rtol=0, atol=1e-6)
    if depth % 2:
        assert torch.equal(inputs[half], outputs[half - 1])
