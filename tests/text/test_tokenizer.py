"""Tokenizers trained offline on captions: round trip, special tokens, padding and truncation."""

import pytest
import torch

from genlab.data.captions import caption_corpus, mnist_captions
from genlab.errors import ConfigError
from genlab.text.tokenizer import PAD_ID, Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def captions():
    labels = torch.arange(10)
    attrs = {"thickness": labels % 3, "slant": (labels + 1) % 3, "size": labels % 2}
    return [c for caps in mnist_captions(labels, attrs) for c in caps]


def test_wordpiece_round_trip_of_captions(captions):
    tok = train_tokenizer(caption_corpus("mnist-captions"), vocab_size=500)
    ids, mask = tok.encode(captions, max_length=32)
    assert tok.decode(ids) == [c.lower() for c in captions]
    assert (ids[:, 0] == tok.cls_id).all()
    lengths = mask.sum(1)
    assert (ids[torch.arange(len(ids)), lengths - 1] == tok.sep_id).all()  # [SEP] ends every caption
    assert (ids[~mask] == PAD_ID).all() and mask[:, :2].all()
    assert (ids[mask] != tok.backend.token_to_id("[UNK]")).all()  # the corpus covers every caption word


def test_bpe_round_trip_up_to_punctuation_spacing(captions):
    tok = train_tokenizer(caption_corpus("mnist-captions"), vocab_size=500, kind="bpe")
    ids, _ = tok.encode(captions, max_length=32)
    assert [d.replace(" ,", ",") for d in tok.decode(ids)] == [c.lower() for c in captions]


def test_truncation_keeps_sep_and_json_round_trip():
    tok = train_tokenizer(["one two three four five six"], vocab_size=100)
    ids, mask = tok.encode(["one two three four five six"], max_length=5)
    assert ids[0].tolist() == [tok.cls_id, *ids[0, 1:4].tolist(), tok.sep_id] and mask.all()
    assert tok.decode(ids) == ["one two three"]
    again = Tokenizer.from_json(tok.to_json())
    assert torch.equal(again.encode(["six five"], 6)[0], tok.encode(["six five"], 6)[0])


def test_bad_options():
    with pytest.raises(ConfigError, match="tokenizer kind"):
        train_tokenizer(["a"], kind="sentencepiece")
    with pytest.raises(TypeError):
        train_tokenizer(["a b"], 50).encode("a b", 8)
