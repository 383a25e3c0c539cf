"""Text encoders: one interface, padding invariance, the embedding cache, the tokenizer inside the state dict."""

import pytest
import torch
import torch.nn.functional as F

from genlab.text.encoders import OneHotTextEncoder, TextEncoderConfig, TinyTextEncoder, build_text_encoder, masked_mean

CORPUS = ["a thick seven", "a thin one", "the digit 7 is left of the digit 1", "a small eight, slanted right"]


def test_onehot_pooled_is_the_normalised_bag_of_words():
    enc = build_text_encoder(TextEncoderConfig(kind="onehot", vocab_size=200), CORPUS)
    assert isinstance(enc, OneHotTextEncoder)
    out = enc.encode(["a thick seven a", "seven"])
    vocab = enc.tokenizer.backend.get_vocab()
    expected = torch.zeros(2, enc.width)
    for word, count in (("a", 2), ("thick", 1), ("seven", 1)):
        expected[0, vocab[word]] = count
    expected[1, vocab["seven"]] = 1
    assert torch.allclose(out.pooled, F.normalize(expected, dim=-1))
    assert out.tokens.shape == (2, enc.max_length, enc.width) and out.mask.sum().item() == 6 + 3


def test_masked_mean():
    states = torch.arange(12.0).view(1, 4, 3)
    assert torch.equal(masked_mean(states, torch.tensor([[True, False, True, False]])), torch.tensor([[3.0, 4.0, 5.0]]))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return build_text_encoder(TextEncoderConfig(kind="tiny", width=32, layers=2, heads=4, vocab_size=200, max_length=16), CORPUS).eval()


def test_tiny_is_invariant_to_padding_and_batch(tiny):
    assert isinstance(tiny, TinyTextEncoder)
    ids, mask = tiny.tokenize(["a thin one", "the digit 7 is left of the digit 1"])
    n = int(mask[0].sum())
    with torch.no_grad():
        alone = tiny(ids[:1, :n], mask[:1, :n])  # no padding at all
        batch = tiny(ids, mask)  # padded to max_length, next to a longer caption
    assert torch.allclose(alone.pooled[0], batch.pooled[0], atol=1e-5)
    assert torch.allclose(alone.tokens[0, :n], batch.tokens[0, :n], atol=1e-5)
    assert batch.tokens.shape == (2, 16, 32) and batch.pooled.shape == (2, 32)


def test_cache_computes_each_caption_once_and_clears_in_train_mode(tiny):
    calls = []
    tiny.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        first = tiny.encode(["a thin one", "a thick seven", "a thin one"])
        second = tiny.encode(["a thick seven", "a thin one"])
    assert calls == [2]  # two distinct captions, computed once
    assert torch.allclose(second.pooled, first.pooled[[1, 0]]) and torch.equal(first.pooled[0], first.pooled[2])
    direct = tiny(*tiny.tokenize(["a thick seven"])).pooled
    assert torch.allclose(first.pooled[1], direct[0], atol=1e-5)
    tiny.train()
    tiny.encode(["a thin one"])  # training: no cache, gradients flow
    assert calls == [2, 1, 1] and tiny.encode(["a thin one"]).pooled.requires_grad


def test_tokenizer_travels_in_the_state_dict(tiny):
    other = build_text_encoder(TextEncoderConfig(kind="tiny", width=32, layers=2, heads=4, vocab_size=200, max_length=16),
                               ["completely different words here"])
    other.load_state_dict(tiny.state_dict())
    assert other.tokenizer.to_json() == tiny.tokenizer.to_json()
    with torch.no_grad():
        assert torch.allclose(other.eval().encode(["a thick seven"]).pooled, tiny.encode(["a thick seven"]).pooled)


def test_joint_encoder_puts_both_sequences_in_their_own_coordinates(tiny):
    from genlab.text.encoders import JointTextEncoder

    onehot = build_text_encoder(TextEncoderConfig(kind="onehot", vocab_size=200, max_length=12), CORPUS)
    joint = JointTextEncoder(tiny, onehot).eval()
    texts = ["a thin one", "the digit 7 is left of the digit 1", ""]
    with torch.no_grad():
        a, b, both = tiny.encode(texts), onehot.encode(texts), joint.encode(texts)
    la, da = a.tokens.shape[1], tiny.width
    assert joint.width == da + onehot.width and both.tokens.shape[1] == la + b.tokens.shape[1]
    assert torch.equal(both.tokens[:, :la, :da], a.tokens) and torch.equal(both.tokens[:, la:, da:], b.tokens)
    assert not both.tokens[:, :la, da:].any() and not both.tokens[:, la:, :da].any()
    assert torch.equal(both.mask, torch.cat([a.mask, b.mask], 1))
    assert torch.equal(both.pooled, torch.cat([a.pooled, b.pooled], 1))
    with pytest.raises(TypeError, match="call encode"):
        joint(*tiny.tokenize(texts))
