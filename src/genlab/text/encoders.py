"""Text encoders behind one interface (SPEC M1): captions -> token states, a pooled vector, a mask.

    encoder = build_text_encoder(TextEncoderConfig(kind="tiny"), corpus=caption_corpus("mnist-captions"))
    out = encoder.encode(["a thick seven", "a 3 left of an 8"])
    out.tokens   # (N, L, D) per-token states, e.g. for cross-attention
    out.pooled   # (N, D) one vector per caption (masked mean of the token states)
    out.mask     # (N, L) bool, False on padding

Kinds:

- ``tiny``: a WordPiece tokenizer trained on the captions and a small pre-LN transformer trained
  from scratch (jointly with the model that uses it, e.g. CLIP). The tokenizer's JSON is kept in a
  fixed-size byte buffer of the module, so checkpoints carry it.
- ``onehot``: no parameters; token states are one-hot vectors of the token ids and the pooled
  vector the normalised bag of words (for tests and baselines).
- ``minilm``: the frozen sentence encoder all-MiniLM-L6-v2 (see :mod:`genlab.text.minilm`).
- ``clip``: the frozen text tower of a genlab CLIP evaluator (``clip=`` a shipped name such as
  ``clip-mnist-pairs``, or a clip run exported by ``genlab export-evaluator RUN NAME``), as Stable Diffusion
  conditions on CLIP's text tower.
  Contrastive training with word-order negatives makes its pooled vector tell "3 left of 8" from
  "8 left of 3", which a sentence encoder's mean hardly does (docs/results.md, mnist-pairs composition).
  ``finetune=True`` trains the tower on from those weights instead.
- ``minilm+clip``: both, read as one encoder (:class:`JointTextEncoder`), as SDXL and SD3 condition on two or
  three: MiniLM's token states name the digits well, the CLIP's pooled vector knows their order.

Embeddings of repeated captions are cached while an encoder is frozen (eval mode, or ``minilm``):
:meth:`TextEncoder.encode` then computes each distinct caption once. Switching to train mode
empties the cache, since the weights are about to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from genlab.errors import ConfigError
from genlab.nn.attention import TransformerBlock
from genlab.text.tokenizer import Tokenizer, train_tokenizer

ENCODER_KINDS = ("tiny", "onehot", "minilm", "clip", "minilm+clip")
CORPUS_KINDS = ("tiny", "onehot")  # kinds that train their tokenizer on the captions given to build_text_encoder
TOKENIZER_CAPACITY = 1 << 16  # bytes reserved for a tokenizer's JSON in a checkpoint (a caption vocabulary needs ~5-20 KB)
CACHE_SIZE = 100_000  # captions whose embeddings a frozen encoder keeps


@dataclass
class TextEncoderConfig:
    """Which text encoder and, for ``tiny``, its size."""

    kind: Literal["tiny", "onehot", "minilm", "clip", "minilm+clip"] = "tiny"
    clip: str | None = None  # clip, minilm+clip: the CLIP evaluator whose text tower is used (shipped or exported)
    finetune: bool = False  # clip, minilm+clip: train the tower with the model that uses it, from the CLIP's weights
    vocab_size: int = 512  # tiny / onehot: most tokens the tokenizer may learn (the embedding table's rows)
    tokenizer: Literal["wordpiece", "bpe"] = "wordpiece"
    max_length: int = 32  # tokens per caption, [CLS] and [SEP] included
    width: int = 128  # tiny: D
    layers: int = 2
    heads: int = 4

    def __post_init__(self):
        if self.kind not in ENCODER_KINDS:
            raise ConfigError(f"text encoder kind must be one of {', '.join(ENCODER_KINDS)}, got {self.kind!r}")
        uses_clip = self.kind in ("clip", "minilm+clip")
        if uses_clip != (self.clip is not None):
            raise ConfigError("model.text.clip names the CLIP evaluator whose text tower a clip encoder uses: set it (e.g. "
                              "clip-mnist-pairs, or a clip run exported by genlab export-evaluator) with kind=clip or "
                              "minilm+clip, and only then")
        if self.finetune and not uses_clip:
            raise ConfigError(f"model.text.finetune=true starts from a trained CLIP's text tower: it needs kind=clip, not {self.kind}")
        if self.max_length < 3:
            raise ConfigError(f"text max_length must be at least 3 ([CLS], a token, [SEP]), got {self.max_length}")
        if self.width < 1 or self.layers < 0 or self.heads < 1 or self.width % self.heads:
            raise ConfigError(f"text encoder width={self.width} must be a positive multiple of heads={self.heads} (layers >= 0)")


@dataclass
class TextEncoding:
    """What a text encoder gives: per-token states, a pooled vector and the padding mask."""

    tokens: torch.Tensor  # (N, L, D)
    pooled: torch.Tensor  # (N, D)
    mask: torch.Tensor  # (N, L) bool, True on real tokens

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def cat(cls, encodings: Sequence["TextEncoding"]) -> "TextEncoding":
        """Encodings stacked along the batch, token states zero-padded (and masked) to the longest L."""
        length = max(e.tokens.shape[1] for e in encodings)

        def pad(e: TextEncoding) -> tuple[torch.Tensor, torch.Tensor]:
            extra = length - e.tokens.shape[1]
            return F.pad(e.tokens, (0, 0, 0, extra)), F.pad(e.mask, (0, extra), value=False)  # (N, L, D), (N, L)

        tokens, masks = zip(*(pad(e) for e in encodings))
        return cls(torch.cat(tokens), torch.cat([e.pooled for e in encodings]), torch.cat(masks))


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of states (N, L, D) over the positions where mask (N, L) is True -> (N, D)."""
    weights = mask.to(states.dtype).unsqueeze(-1)  # (N, L, 1)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class TextEncoder(nn.Module):
    """Base class: a tokenizer, ``forward(ids, mask) -> TextEncoding`` and cached :meth:`encode`."""

    width: int
    max_length: int
    tokenizer: Tokenizer

    def __init__(self):
        super().__init__()
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> TextEncoding:
        raise NotImplementedError

    @property
    def frozen(self) -> bool:
        """Weights cannot change: in eval mode, or without trainable parameters."""
        return not self.training or not any(p.requires_grad for p in self.parameters())

    def train(self, mode: bool = True):
        if mode:
            self._cache.clear()  # the weights are about to change
        return super().train(mode)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask (N, max_length) on the encoder's device."""
        ids, mask = self.tokenizer.encode(texts, self.max_length)
        device = self.device
        return ids.to(device), mask.to(device)

    @property
    def device(self) -> torch.device:
        tensor = next(iter(self.buffers()), None) if next(iter(self.parameters()), None) is None else next(self.parameters())
        return torch.device("cpu") if tensor is None else tensor.device

    def encode(self, texts: Sequence[str]) -> TextEncoding:
        """Encode captions; while frozen (and without gradients), each distinct caption is computed once."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of captions, not one string")
        if not (self.frozen and not torch.is_grad_enabled()):
            return self(*self.tokenize(texts))
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            out = self(*self.tokenize(missing))
            lengths = out.mask.sum(1).tolist()
            if len(self._cache) + len(missing) > CACHE_SIZE:
                self._cache.clear()
            for i, text in enumerate(missing):
                self._cache[text] = (out.tokens[i, : lengths[i]], out.pooled[i])
        entries = [self._cache[t] for t in texts]
        length = max(len(e[0]) for e in entries) if entries else 0
        tokens = torch.zeros(len(texts), length, self.width, device=self.device)
        mask = torch.zeros(len(texts), length, dtype=torch.bool, device=self.device)
        for i, (states, _) in enumerate(entries):
            tokens[i, : len(states)] = states
            mask[i, : len(states)] = True
        pooled = torch.stack([e[1] for e in entries]) if entries else torch.zeros(0, self.width, device=self.device)
        return TextEncoding(tokens, pooled, mask)


class _StoredTokenizer(TextEncoder):
    """A text encoder whose tokenizer travels in its state dict (a fixed-size uint8 buffer of the JSON)."""

    def _store_tokenizer(self, tokenizer: Tokenizer) -> None:
        data = tokenizer.to_json().encode("utf-8")
        if len(data) > TOKENIZER_CAPACITY:
            raise ConfigError(f"the trained tokenizer's JSON has {len(data)} bytes, more than the {TOKENIZER_CAPACITY} "
                              "a checkpoint reserves: lower model.text.vocab_size")
        buffer = torch.zeros(TOKENIZER_CAPACITY, dtype=torch.uint8)
        buffer[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if "tokenizer_json" in self._buffers:
            self.tokenizer_json.copy_(buffer)
        else:
            self.register_buffer("tokenizer_json", buffer)
        self.tokenizer = tokenizer

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        key = prefix + "tokenizer_json"
        if key in state_dict:  # the saved vocabulary replaces the one built at construction
            data = bytes(state_dict[key].cpu().numpy().tobytes()).rstrip(b"\0")
            self.tokenizer = Tokenizer.from_json(data.decode("utf-8"))


class TinyTextEncoder(_StoredTokenizer):
    """A small pre-LN transformer over subword tokens, trained from scratch (CLIP's text tower, shrunk)."""

    def __init__(self, config: TextEncoderConfig, tokenizer: Tokenizer):
        super().__init__()
        if tokenizer.vocab_size > config.vocab_size:
            raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than model.text.vocab_size={config.vocab_size}")
        self._store_tokenizer(tokenizer)
        self.width, self.max_length = config.width, config.max_length
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Parameter(torch.zeros(config.max_length, config.width))
        self.blocks = nn.ModuleList(TransformerBlock(config.width, config.heads) for _ in range(config.layers))
        self.final_norm = nn.LayerNorm(config.width)
        # CLIP's text-tower initialisation (Radford et al. 2021, model.py): N(0, 0.02) tokens, N(0, 0.01) positions.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> TextEncoding:
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]  # (N, L, D)
        for block in self.blocks:
            x = block(x, mask)
        x = self.final_norm(x)  # (N, L, D)
        return TextEncoding(x, masked_mean(x, mask), mask)


class OneHotTextEncoder(_StoredTokenizer):
    """No parameters: token states are one-hot ids (N, L, V); pooled is the L2-normalised bag of words."""

    def __init__(self, config: TextEncoderConfig, tokenizer: Tokenizer):
        super().__init__()
        self._store_tokenizer(tokenizer)
        self.width, self.max_length = config.vocab_size, config.max_length
        if tokenizer.vocab_size > config.vocab_size:
            raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than model.text.vocab_size={config.vocab_size}")

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> TextEncoding:
        tokens = F.one_hot(ids, self.width).float() * mask.unsqueeze(-1)  # (N, L, V)
        special = (ids == self.tokenizer.cls_id) | (ids == self.tokenizer.sep_id)
        counts = (tokens * (~special).unsqueeze(-1)).sum(1)  # (N, V) word counts
        return TextEncoding(tokens, F.normalize(counts, dim=-1), mask)


class JointTextEncoder(TextEncoder):
    """Two encoders read as one, as SDXL and SD3 read theirs: the context is both token sequences, one after the
    other (SD3 joins its encoders' sequences), and the pooled vector both pooled vectors side by side (SDXL, SD3).
    Each encoder keeps its own coordinates of the joint width D1 + D2 (zeros in the other's), so no projection
    comes before the model's own key, value and pooled maps."""

    def __init__(self, first: TextEncoder, second: TextEncoder):
        super().__init__()
        self.first, self.second = first, second
        self.width, self.max_length = first.width + second.width, first.max_length + second.max_length
        self.tokenizer = first.tokenizer

    def encode(self, texts: Sequence[str]) -> TextEncoding:
        a, b = self.first.encode(texts), self.second.encode(texts)  # each with its own cache
        tokens = torch.cat([F.pad(a.tokens, (0, self.second.width)), F.pad(b.tokens, (self.first.width, 0))], dim=1)
        return TextEncoding(tokens, torch.cat([a.pooled, b.pooled], dim=-1), torch.cat([a.mask, b.mask], dim=1))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> TextEncoding:
        raise TypeError("a joint text encoder has one tokenizer per encoder: call encode(captions)")


def build_text_encoder(config: TextEncoderConfig, corpus: Sequence[str] = ()) -> TextEncoder:
    """The encoder of ``config``; ``tiny`` and ``onehot`` train their tokenizer on ``corpus`` here."""
    if config.kind == "minilm":
        from genlab.text.minilm import MiniLMEncoder

        return MiniLMEncoder.load()
    if config.kind in ("clip", "minilm+clip"):
        from genlab.models.clip import load_clip_evaluator

        # A named evaluator, not a run folder: the text model then depends on fixed, hash-checked weights.
        # The tower keeps its own tokenizer and max_length; frozen (its embeddings then cached) unless fine-tuned.
        tower = load_clip_evaluator(config.clip)[0].text_encoder.requires_grad_(config.finetune)
        if config.kind == "clip":
            return tower
        from genlab.text.minilm import MiniLMEncoder

        return JointTextEncoder(MiniLMEncoder.load(), tower)
    if not corpus:
        raise ConfigError(f"the {config.kind} text encoder trains its tokenizer on captions, but none were given")
    tokenizer = train_tokenizer(corpus, config.vocab_size, config.tokenizer)
    return TinyTextEncoder(config, tokenizer) if config.kind == "tiny" else OneHotTextEncoder(config, tokenizer)
