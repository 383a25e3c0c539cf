"""Subword tokenizers trained offline on captions with the ``tokenizers`` library (no download).

    tok = train_tokenizer(["a thick seven", "the digit 7, slanted right"], vocab_size=500)
    ids, mask = tok.encode(["a thin seven"], max_length=16)   # (1, 16) long, (1, 16) bool
    tok.decode(ids)                                              # ["a thin seven"]

Texts are lower-cased and accent-stripped (BERT's uncased normalisation), split on whitespace and
punctuation, then into WordPiece (Wu et al. 2016) or BPE (Sennrich et al. 2016) pieces. Every
sequence is ``[CLS] pieces [SEP]`` then ``[PAD]`` (id 0) up to ``max_length``; longer texts are cut
(keeping ``[SEP]``). A tokenizer is saved as its JSON text, so a run carries its own vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from genlab.errors import ConfigError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]  # ids 0..3 in this order
PAD_ID = 0
KINDS = ("wordpiece", "bpe")


class Tokenizer:
    """A trained ``tokenizers.Tokenizer`` with fixed-length batch encoding to (ids, mask) tensors."""

    def __init__(self, backend):
        self.backend = backend
        self.pad_id = backend.token_to_id("[PAD]")
        self.cls_id = backend.token_to_id("[CLS]")
        self.sep_id = backend.token_to_id("[SEP]")
        if None in (self.pad_id, self.cls_id, self.sep_id):
            raise ConfigError("a tokenizer needs the special tokens [PAD], [CLS] and [SEP] in its vocabulary")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (N, max_length) long and attention mask (N, max_length) bool (False on padding)."""
        if isinstance(texts, str):
            raise TypeError("Tokenizer.encode takes a list of texts, not one string")
        ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        for i, encoding in enumerate(self.backend.encode_batch(list(texts), add_special_tokens=False)):
            pieces = [self.cls_id, *encoding.ids[: max_length - 2], self.sep_id]  # keep [SEP] when cutting
            ids[i, : len(pieces)] = torch.tensor(pieces)
        return ids, ids != self.pad_id

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Texts of token ids (N, L), special tokens dropped (the normalised text for in-vocabulary words)."""
        return self.backend.decode_batch(ids.tolist(), skip_special_tokens=True)

    def to_json(self) -> str:
        return self.backend.to_str()

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        return cls(Backend.from_str(text))

    @classmethod
    def from_file(cls, path) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        return cls(Backend.from_file(str(path)))


def train_tokenizer(texts: Sequence[str], vocab_size: int = 1000, kind: Literal["wordpiece", "bpe"] = "wordpiece") -> Tokenizer:
    """A WordPiece or BPE tokenizer trained on ``texts`` with at most ``vocab_size`` tokens."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    if kind not in KINDS:
        raise ConfigError(f"tokenizer kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ConfigError(f"tokenizer vocab_size must be at least {len(SPECIAL_TOKENS) + 1}, got {vocab_size}")
    if kind == "wordpiece":
        backend = Backend(models.WordPiece(unk_token="[UNK]"))
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
        backend.decoder = decoders.WordPiece(cleanup=True)
    else:
        backend = Backend(models.BPE(unk_token="[UNK]", end_of_word_suffix="</w>"))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, end_of_word_suffix="</w>", show_progress=False)
        backend.decoder = decoders.BPEDecoder(suffix="</w>")
    backend.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # whitespace and punctuation
    backend.train_from_iterator(list(texts), trainer=trainer)
    return Tokenizer(backend)
