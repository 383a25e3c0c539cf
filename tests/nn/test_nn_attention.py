"""Multi-head attention: reference math, identity at init, equivariance, cross-attention."""

import pytest
import torch

from genlab.errors import ConfigError
from genlab.nn.attention import Attention, SpatialAttention, multihead_attention


def reference_attention(q, k, v, num_heads):
    """Per-head softmax(q k^T / sqrt(d)) v written out with explicit loops over heads."""
    n, length, dim = q.shape
    d = dim // num_heads
    outs = []
    for h in range(num_heads):
        sl = slice(h * d, (h + 1) * d)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / d**0.5  # (N, L, S)
        outs.append(scores.softmax(dim=-1) @ v[..., sl])  # (N, L, d)
    return torch.cat(outs, dim=-1)


def randomise_(module):
    """Give every parameter (including zero-initialised ones) a random value."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    return module


def test_multihead_attention_matches_reference():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 5, 12), torch.randn(2, 7, 12), torch.randn(2, 7, 12)
    for heads in (1, 3, 4):
        torch.testing.assert_close(
            multihead_attention(q, k, v, heads), reference_attention(q, k, v, heads)
        )


def test_spatial_attention_is_identity_at_init():
    torch.manual_seed(0)
    block = SpatialAttention(16, num_heads=4, norm_groups=8)
    x = torch.randn(2, 16, 5, 6)
    assert torch.equal(block(x), x)


def test_spatial_attention_equals_explicit_computation():
    torch.manual_seed(0)
    block = randomise_(SpatialAttention(8, num_heads=2, norm_groups=4))
    x = torch.randn(2, 8, 3, 4)
    tokens = torch.nn.functional.group_norm(x, 4, block.norm.weight, block.norm.bias)
    tokens = tokens.flatten(2).transpose(1, 2)  # (N, HW, C)
    q, k, v = (tokens @ block.attention.to_qkv.weight.T + block.attention.to_qkv.bias).chunk(3, -1)
    out = reference_attention(q, k, v, 2) @ block.attention.proj.weight.T + block.attention.proj.bias
    expected = x + out.transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(block(x), expected)


def test_spatial_attention_is_permutation_equivariant_over_positions():
    torch.manual_seed(0)
    block = randomise_(SpatialAttention(8, num_heads=2, norm_groups=4))
    x = torch.randn(2, 8, 4, 5)
    perm = torch.randperm(20)
    permute = lambda z: z.flatten(2)[:, :, perm].reshape(z.shape)  # noqa: E731
    out = block(x)
    assert not torch.allclose(out, x, atol=1e-3)  # the block does something
    torch.testing.assert_close(block(permute(x)), permute(out))


def test_self_attention_is_permutation_equivariant_over_tokens():
    torch.manual_seed(0)
    attention = Attention(12, num_heads=3)
    x = torch.randn(2, 9, 12)
    perm = torch.randperm(9)
    torch.testing.assert_close(attention(x[:, perm]), attention(x)[:, perm])


def test_cross_attention_to_identical_tokens_returns_value_projection():
    torch.manual_seed(0)
    attention = Attention(8, num_heads=2, context_dim=5)
    x = torch.randn(3, 6, 8)  # distinct queries
    token = torch.randn(3, 1, 5)
    context = token.expand(3, 4, 5)  # four identical context tokens per sample
    # Uniform weights over identical values: the output is proj(W_v c) whatever the query-key scores.
    value = attention.to_kv(token)[..., 8:]  # (3, 1, 8)
    expected = attention.proj(value).expand(3, 6, 8)
    torch.testing.assert_close(attention(x, context), expected)


def test_cross_attention_matches_reference():
    torch.manual_seed(0)
    attention = Attention(8, num_heads=4, context_dim=5)
    x, context = torch.randn(2, 6, 8), torch.randn(2, 3, 5)
    k, v = attention.to_kv(context).chunk(2, -1)
    expected = attention.proj(reference_attention(attention.to_q(x), k, v, 4))
    torch.testing.assert_close(attention(x, context), expected)


def test_spatial_cross_attention_is_identity_at_init_and_uses_context():
    torch.manual_seed(0)
    block = SpatialAttention(8, num_heads=2, norm_groups=4, context_dim=5)
    x, context = torch.randn(2, 8, 3, 3), torch.randn(2, 4, 5)
    assert torch.equal(block(x, context), x)
    randomise_(block)
    assert not torch.allclose(block(x, context), block(x, context + 1.0))


def test_attention_errors_are_config_errors():
    with pytest.raises(ConfigError, match="num_heads=3"):
        Attention(8, num_heads=3)
    cross = Attention(8, num_heads=2, context_dim=5)
    with pytest.raises(ConfigError, match="needs a context"):
        cross(torch.randn(1, 2, 8))
    with pytest.raises(ConfigError, match="context_dim=5"):
        cross(torch.randn(1, 2, 8), torch.randn(1, 3, 6))


def test_spatial_self_attention_on_nhwc_maps_equals_the_token_path():
    # NHWC input takes the 1x1-convolution path (train.channels_last); NCHW input the token path, checked
    # against the explicit computation above. Same values and gradients, and the output stays NHWC.
    torch.manual_seed(0)
    block = randomise_(SpatialAttention(16, num_heads=4, norm_groups=8))
    x = torch.randn(3, 16, 5, 6)
    nchw = x.clone().requires_grad_()
    nhwc = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    outputs, grads = [], []
    for inp in (nchw, nhwc):
        block.zero_grad()
        out = block(inp)
        (out * torch.arange(out.numel()).reshape(out.shape).sin()).sum().backward()
        outputs.append(out)
        grads.append([inp.grad] + [p.grad.clone() for p in block.parameters()])
    assert outputs[1].is_contiguous(memory_format=torch.channels_last) and not outputs[1].is_contiguous()
    torch.testing.assert_close(outputs[1], outputs[0])
    for g_nhwc, g_nchw in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_nhwc, g_nchw)


def test_masked_attention_keeps_float32_under_cpu_autocast():
    # bf16 mixed precision on a CPU: torch's bf16 attention kernel is 6x slower on short sequences, so masked
    # attention runs in float32 (the projections around it still follow autocast).
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 7, 16).unbind(0)
    mask = torch.rand(2, 7) > 0.3
    mask[:, 0] = True
    expected = multihead_attention(q, k, v, 4, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = multihead_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 4, mask)
    assert out.dtype == torch.float32
    reference = multihead_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), 4, mask)
    assert torch.equal(out, reference) and not torch.equal(out, expected)  # float32 maths on the bf16 inputs


def test_unmasked_attention_under_cpu_autocast_is_attention_at_bf16_precision():
    # Without a mask, the explicit form: bf16 products, float32 softmax. Same attention, to bf16's precision.
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 49, 64).unbind(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = multihead_attention(q, k, v, 4)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference_attention(q, k, v, 4), atol=2e-2, rtol=2e-2)
