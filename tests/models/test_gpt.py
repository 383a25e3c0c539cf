"""The GPT prior network: causal, and its key/value-cache path equals the full-sequence pass."""

from __future__ import annotations

import pytest
import torch

from genlab.errors import ConfigError
from genlab.models.gpt import GPT, GPTConfig, KVCache

K, L = 11, 12


def _gpt(num_classes=None) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(dim=32, num_layers=2, num_heads=4), num_codes=K, length=L, num_classes=num_classes).eval()


@pytest.mark.parametrize("j", [0, 5, L - 2])
def test_changing_code_j_changes_only_logits_after_it(j):
    # Logit p is p(c_p | start, c_0..c_{p-1}): code j may influence positions j+1..L-1 and no other.
    net = _gpt()
    codes = torch.randint(0, K, (3, L), generator=torch.Generator().manual_seed(1))
    changed = codes.clone()
    changed[:, j] = (codes[:, j] + 1) % K
    a, b = net(codes), net(changed)  # (3, L, K)
    assert torch.allclose(a[:, : j + 1], b[:, : j + 1], atol=1e-6, rtol=0)
    assert (a[:, j + 1:] - b[:, j + 1:]).abs().amax(dim=-1).min() > 1e-5  # every later position moved


def test_last_code_is_never_read():
    net = _gpt()
    codes = torch.randint(0, K, (2, L), generator=torch.Generator().manual_seed(2))
    changed = codes.clone()
    changed[:, -1] = (codes[:, -1] + 3) % K
    assert torch.equal(net(codes), net(changed))


def test_kv_cache_steps_equal_the_full_pass():
    net = _gpt()
    codes = torch.randint(0, K, (4, L), generator=torch.Generator().manual_seed(3))
    full = net(codes)  # (4, L, K)
    tokens = torch.cat([net.start_tokens(4, None, codes.device)[:, None], codes[:, :-1]], dim=1)  # (4, L)
    cache = KVCache(len(net.blocks))
    one_by_one = torch.stack([net.step(tokens[:, p], cache) for p in range(L)], dim=1)
    assert torch.allclose(one_by_one, full, atol=1e-5)
    # Chunks after a non-empty cache need a bottom-right-aligned causal mask.
    cache = KVCache(len(net.blocks))
    chunks = [net.logits_from_tokens(tokens[:, a:b], cache) for a, b in [(0, 3), (3, 4), (4, 9), (9, L)]]
    assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-5)


def test_class_token_conditions_the_first_position():
    net = _gpt(num_classes=3)
    codes = torch.randint(0, K, (2, L), generator=torch.Generator().manual_seed(4))
    a, b = net(codes, torch.tensor([0, 0])), net(codes, torch.tensor([2, 2]))
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4
    with pytest.raises(ConfigError, match="labels"):
        net(codes)


def test_too_long_sequence_and_bad_heads_are_rejected():
    net = _gpt()
    with pytest.raises(ConfigError, match="longer"):
        net.logits_from_tokens(torch.zeros(1, L + 1, dtype=torch.long))
    with pytest.raises(ConfigError, match="num_heads=3"):
        GPT(GPTConfig(dim=32, num_heads=3), num_codes=K, length=L)
