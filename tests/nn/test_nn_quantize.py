"""Vector quantiser: true nearest codes, straight-through and stop-gradient flows, EMA and restart maths."""

from __future__ import annotations

import math

import pytest
import torch

from genlab.errors import ConfigError
from genlab.nn.quantize import VectorQuantizer, perplexity


def _vq(k=16, d=3, **kw) -> VectorQuantizer:
    torch.manual_seed(0)
    vq = VectorQuantizer(k, d, **kw)
    with torch.no_grad():  # a spread-out codebook so that many codes are nearest to something
        vq.embedding.data = torch.randn(k, d)
    return vq


@pytest.mark.parametrize("ema", [False, True])
def test_codes_are_the_brute_force_nearest_neighbours(ema):
    vq = _vq(k=37, d=5, ema=ema).eval()
    z_e = torch.randn(3, 5, 6, 7, generator=torch.Generator().manual_seed(1))
    out = vq(z_e)
    z_flat = z_e.permute(0, 2, 3, 1).reshape(-1, 5)
    expected = torch.cdist(z_flat, vq.embedding).argmin(1).view(3, 6, 7)
    assert torch.equal(out.codes, expected)
    assert len(out.codes.unique()) > 10  # a test that would notice "always code 0"
    # ... and the forward value is exactly the chosen code vectors.
    assert torch.allclose(out.z_q, vq.lookup(expected), atol=1e-6)
    # Chunked distance computation gives the same answer.
    assert torch.equal(vq.nearest_codes(z_flat, chunk=7), expected.flatten())


def test_straight_through_gradient_reaches_the_encoder_unchanged():
    vq = _vq(ema=True).eval()
    z_e = torch.randn(2, 3, 4, 4, requires_grad=True)
    upstream = torch.randn(2, 3, 4, 4)
    (vq(z_e).z_q * upstream).sum().backward()
    assert torch.equal(z_e.grad, upstream)


def test_codebook_loss_moves_only_the_codebook_and_commitment_only_the_encoder():
    vq = _vq(ema=False, beta=0.25).eval()
    z_e = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = vq(z_e)
    g_z, g_e = torch.autograd.grad(out.losses["codebook"], [z_e, vq.embedding], allow_unused=True)
    assert g_z is None or torch.count_nonzero(g_z) == 0
    assert g_e is not None and g_e.abs().sum() > 0
    out = vq(z_e)
    g_z, g_e = torch.autograd.grad(out.losses["commitment"], [z_e, vq.embedding], allow_unused=True)
    assert g_e is None or torch.count_nonzero(g_e) == 0
    # d/dz_e of beta * mean((z_e - sg[z_q])^2) = 2 beta (z_e - z_q) / numel
    z_q = vq.lookup(out.codes)
    assert torch.allclose(g_z, 2 * 0.25 * (z_e - z_q).detach() / z_e.numel(), atol=1e-7)
    # EMA mode has no codebook loss at all.
    assert set(_vq(ema=True).eval()(z_e).losses) == {"commitment"}


def test_ema_update_matches_a_hand_computation():
    decay, eps = 0.9, 0.1
    vq = VectorQuantizer(3, 1, ema=True, ema_decay=decay, eps=eps, dead_code_threshold=0.0)
    vq.embedding.copy_(torch.tensor([[0.0], [10.0], [-10.0]]))
    vq.embed_sum.copy_(vq.embedding)
    vq.train()
    # Four 1-d vectors: 1 and 3 go to code 0, 9 to code 1, nothing to code 2.
    z_e = torch.tensor([1.0, 3.0, 9.0, 11.0]).view(1, 1, 2, 2)
    out = vq(z_e)
    assert out.codes.flatten().tolist() == [0, 0, 1, 1]
    counts = torch.tensor([2.0, 2.0, 0.0])
    sums = torch.tensor([4.0, 20.0, 0.0])
    n_k = decay * 1.0 + (1 - decay) * counts  # cluster sizes start at 1
    m_k = decay * torch.tensor([0.0, 10.0, -10.0]) + (1 - decay) * sums
    n = n_k.sum()
    smoothed = (n_k + eps) / (n + 3 * eps) * n  # Laplace smoothing
    assert torch.allclose(vq.cluster_size, n_k)
    assert torch.allclose(vq.embed_sum.squeeze(1), m_k)
    assert torch.allclose(vq.embedding.squeeze(1), m_k / smoothed)
    # Code 0 moved towards the mean (2) of its vectors, code 1 towards 10 stays put.
    assert 0.0 < vq.embedding[0, 0] < 2.0
    # In eval mode nothing changes.
    before = vq.embedding.clone()
    vq.eval()(z_e)
    assert torch.equal(vq.embedding, before)


@pytest.mark.parametrize("ema", [False, True])
def test_dead_code_is_restarted_at_an_encoder_output(ema):
    vq = VectorQuantizer(4, 2, ema=ema, ema_decay=0.5, dead_code_threshold=1.0)
    with torch.no_grad():
        vq.embedding.data = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 1.0], [100.0, 100.0]])
        if ema:
            vq.embed_sum.copy_(vq.embedding)
    vq.train()
    z_e = torch.tensor([[0.1, 0.0], [1.0, 0.9], [-0.9, 1.0], [0.0, 0.2], [1.1, 1.0], [-1.0, 0.8]])  # (6, 2)
    z_e = z_e.t().reshape(1, 2, 2, 3)  # rows in (h, w) order
    restart_rand = torch.tensor([0.9, 0.8, 0.7, 0.05, 0.6, 0.5]).view(1, 2, 3)  # row 3 is drawn first
    vq(z_e, restart_rand=restart_rand)
    # Code 3 was never chosen: its count fell to 0.5 < 1 and it now sits on encoder output 3.
    assert torch.allclose(vq.embedding[3], torch.tensor([0.0, 0.2]))
    assert vq.cluster_size[3] == 1.0
    # Codes in use were not restarted.
    assert vq.embedding[:3].sub(torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 1.0]])).abs().max() < 0.2
    # Without the random numbers no code is restarted: code 3 stays far from the data.
    vq2 = VectorQuantizer(4, 2, ema=ema, ema_decay=0.5, dead_code_threshold=1.0)
    with torch.no_grad():
        vq2.embedding.data = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 1.0], [100.0, 100.0]])
        if ema:
            vq2.embed_sum.copy_(vq2.embedding)
    vq2.train()(z_e)
    assert vq2.embedding[3].min() > 50


def test_perplexity_is_exp_entropy_of_the_assignment():
    assert math.isclose(float(perplexity(torch.tensor([5.0, 5.0, 5.0, 5.0]))), 4.0, rel_tol=1e-6)
    assert math.isclose(float(perplexity(torch.tensor([7.0, 0.0, 0.0]))), 1.0, rel_tol=1e-6)
    # Through the quantiser: codes 0,0,0,1 -> p = (3/4, 1/4).
    vq = VectorQuantizer(4, 1, ema=True, dead_code_threshold=0.0)
    vq.embedding.copy_(torch.tensor([[0.0], [10.0], [20.0], [30.0]]))
    stats = vq.eval()(torch.tensor([0.1, -0.2, 0.3, 9.0]).view(1, 1, 2, 2)).stats
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert math.isclose(float(stats["perplexity"]), math.exp(entropy), rel_tol=1e-6)
    assert float(stats["usage"]) == 0.5


def test_running_usage_forgets_codes_after_the_window():
    vq = VectorQuantizer(2, 1, ema=True, dead_code_threshold=0.0, usage_window=2).train()
    vq.embedding.copy_(torch.tensor([[0.0], [10.0]]))
    vq.embed_sum.copy_(vq.embedding)
    both, low = torch.tensor([0.0, 10.0]).view(1, 1, 1, 2), torch.tensor([0.0, 0.0]).view(1, 1, 1, 2)
    assert float(vq(both).stats["usage_running"]) == 1.0
    assert float(vq(low).stats["usage_running"]) == 1.0  # code 1 used one batch ago
    assert float(vq(low).stats["usage_running"]) == 0.5  # two batches ago: out of the window


def test_bad_inputs_are_config_errors():
    vq = VectorQuantizer(4, 3)
    with pytest.raises(ConfigError, match="expects"):
        vq(torch.randn(1, 2, 3, 3))
    with pytest.raises(ConfigError, match="codes"):
        vq.lookup(torch.tensor([[[4]]]))
    with pytest.raises(ConfigError, match="ema_decay"):
        VectorQuantizer(4, 3, ema_decay=1.0)
