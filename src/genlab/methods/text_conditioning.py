"""Text conditioning of the diffusion denoisers: Stable Diffusion's recipe at CPU scale (SPEC D8, D11, M1).

A ``ddpm`` / ``dit`` / ``ldm`` run with a ``model.text`` section (a
:class:`~genlab.text.encoders.TextEncoderConfig`) conditions its U-Net or DiT on captions:

- the text encoder's token states (N, L, D) are the context of cross-attention layers, with the
  padding mask, so a caption's padding never changes the output (Rombach et al. 2022, sec. 3.3);
- its pooled vector (N, D) is lifted by an MLP and added to the time embedding (SDXL, Podell et
  al. 2023, sec. 2.1);
- during training each image gets one of its captions, replaced by the empty prompt with
  probability ``p_uncond`` (caption dropout), so the same network is also the unconditional model
  that classifier-free guidance subtracts: the unconditional branch at sampling is the empty
  prompt, and a negative prompt replaces it (Ho & Salimans 2022);
- ``tiny`` is trained jointly with the denoiser (its WordPiece vocabulary is trained on the data
  source's caption corpus, :func:`genlab.methods.clip.training_corpus`, and stored in the
  checkpoint); ``minilm`` and ``clip`` (a genlab CLIP's text tower, ``model.text.clip``) are frozen, and
  their embeddings of repeated captions are cached.

The encoder is the method's ``text_encoder`` attribute; its token embedding table (``tiny``:
``text_encoder.token_embedding``, an ``nn.Embedding`` of ``vocab_size`` rows; ``minilm``:
``text_encoder.embeddings.word_embeddings``) and its ``tokenizer`` are what Textual Inversion and
DreamBooth build on (:func:`token_embedding`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from genlab.errors import ConfigError
from genlab.text.encoders import CORPUS_KINDS, TextEncoder, TextEncoderConfig, TextEncoding, build_text_encoder

EMPTY_PROMPT = ""  # the unconditional "caption": what caption dropout trains and CFG subtracts
PROMPT_OPTIONS = ("prompt", "prompts", "negative_prompt", "negative_prompts")


def text_encoder_for(config: TextEncoderConfig, source: str | None) -> TextEncoder:
    """The encoder of ``config``; ``tiny`` / ``onehot`` train their tokenizer on ``source``'s captions (as CLIP does)."""
    from genlab.methods.clip import training_corpus

    return build_text_encoder(config, training_corpus(source) if config.kind in CORPUS_KINDS else [])


def token_embedding(encoder: TextEncoder) -> nn.Embedding:
    """The encoder's token embedding table (vocabulary rows x width): what Textual Inversion optimises a row of."""
    table = getattr(encoder, "token_embedding", None)
    if table is None and hasattr(encoder, "embeddings"):
        table = encoder.embeddings.word_embeddings
    if not isinstance(table, nn.Embedding):
        raise ConfigError(f"the {type(encoder).__name__} text encoder has no token embedding table")
    return table


def is_trainable(encoder: TextEncoder) -> bool:
    """Whether the encoder learns with the denoiser (``tiny``), not frozen (``minilm``) or parameter-free (``onehot``)."""
    return any(p.requires_grad for p in encoder.parameters())


def encode_prompts(encoder: TextEncoder, prompts: Sequence[str]) -> TextEncoding:
    """Encodings of prompts; a frozen encoder (or one in eval mode) runs without gradients, from its cache."""
    if encoder.training and is_trainable(encoder):
        return encoder.encode(list(prompts))
    with torch.no_grad():
        return encoder.encode(list(prompts))


def training_prompts(batch: dict[str, Any], ctx, p_uncond: float) -> list[str]:
    """One caption per image, drawn through the step context (a resumed run draws the same), replaced by the
    empty prompt with probability ``p_uncond`` (caption dropout for classifier-free guidance)."""
    captions = batch.get("captions")
    if captions is None:
        raise ConfigError("model.text needs captioned data: --data mnist-captions, fashion-mnist-captions, "
                          "cifar10-captions, mnist-pairs, or folder:PATH with captions")
    pick = ctx.randint(0, 1 << 30).tolist()  # (n,) which caption of each image
    drop = (ctx.rand() < p_uncond).tolist()  # (n,) caption dropout
    return [EMPTY_PROMPT if d else options[k % len(options)] for options, k, d in zip(captions, pick, drop)]


def backbone_text_inputs(encoding: TextEncoding) -> dict[str, torch.Tensor]:
    """The denoiser's keyword arguments for a text encoding (the agreed U-Net / DiT forward)."""
    return {"context": encoding.tokens, "context_mask": encoding.mask, "pooled": encoding.pooled}


def _prompt_list(value: Any, n: int, flag: str) -> list[str]:
    """``n`` prompts from one string, a list of n, or a list of P (n a multiple of P: each repeated n / P times)."""
    if isinstance(value, str):
        return [value] * n
    prompts = list(value)
    if not prompts:
        raise ConfigError(f"{flag}: no prompts given; give at least one (an empty line is not a prompt)")
    if not all(isinstance(p, str) for p in prompts):
        raise ConfigError(f"{flag}: prompts must be strings, got {[type(p).__name__ for p in prompts][:3]}")
    if len(prompts) == n:
        return prompts
    if n % len(prompts):
        raise ConfigError(f"{flag}: {len(prompts)} prompts for {n} samples; give one per sample or a number that divides {n}")
    return [p for p in prompts for _ in range(n // len(prompts))]


def resolve_prompts(method: Any, options: dict[str, Any], n: int) -> dict[str, Any]:
    """``options`` with ``prompt`` / ``prompts`` (and the negative ones) as per-sample lists ``prompts`` /
    ``negative_prompts`` of length n; a one-line error when the run does not condition on text."""
    given = [k for k in PROMPT_OPTIONS if options.get(k) is not None]
    if not given:
        return options
    if getattr(method, "text_encoder", None) is None:
        flag = "--" + given[0].replace("_", "-")
        raise ConfigError(f"{flag} needs a text-conditioned run (train ddpm or ldm with a model.text section, e.g. "
                          f"--preset text_small on --data mnist-captions); this {getattr(method, 'name', 'run')} run has no text encoder")
    out = dict(options)
    for one, many in (("prompt", "prompts"), ("negative_prompt", "negative_prompts")):
        if out.get(one) is not None and out.get(many) is not None:
            raise ConfigError(f"--{one.replace('_', '-')} and --{many.replace('_', '-')}: give one of them")
        value = out.pop(one, None)
        value = out.get(many) if value is None else value
        if value is not None:
            out[many] = _prompt_list(value, n, f"--{many.replace('_', '-')}")
    return out


def read_prompts_file(path: str) -> list[str]:
    """The prompts of a text file, one per non-empty line."""
    from pathlib import Path

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"--prompts {path}: no such file; write one prompt per line")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"--prompts {path}: not UTF-8 text; save it as UTF-8 with one prompt per line") from None
    prompts = [" ".join(line.split()) for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"--prompts {path}: the file has no prompts; write one prompt per line")
    return prompts
