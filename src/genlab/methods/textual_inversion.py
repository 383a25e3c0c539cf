"""Textual Inversion (Gal et al. 2022, "An Image is Worth One Word"; SPEC A4).

A new word -- the placeholder ``S*`` -- is added to the vocabulary of a frozen text-conditioned
diffusion run (ddpm, dit or ldm with a ``model.text`` section), and only its embedding v* (``num_vectors``
rows of the text encoder's width) is learned from a few images of a concept with the base's own
diffusion loss (the paper's eq. 2):

    v* = argmin_v  E_{x, t, eps} || eps - eps_theta(x_t, t, c_theta("a photo of S*")) ||^2,

the text encoder c_theta and the denoiser eps_theta frozen. The prompts are templates ("a photo of
{}", ...) with the placeholder in the braces. With ``num_vectors`` = k > 1 the placeholder stands for
k tokens, ``S* S*_1 ... S*_{k-1}``, as diffusers writes multi-vector embeddings.

The base run is the frozen parent (role ``base``, ARCHITECTURE: "A child run"); its weights, its
tokenizer buffer included, are never changed: the placeholder's tokens are added to a copy of the
tokenizer (ids after the base's vocabulary) and spliced into the embedding lookup by hooks
(:class:`PlaceholderEmbedding`). The learned vectors are saved as ``{token: tensor[num_vectors, dim]}``
safetensors, the file diffusers' ``load_textual_inversion`` reads, and load into any run of the same
base (:func:`load_embeddings`).

    genlab train textual-inversion --base runs/t2i --data mnist-captions data.classes=[7] data.limit=10
    genlab sample runs/textual-inversion-... --prompt "a photo of S*" --out concept.png
    genlab export-embeddings runs/textual-inversion-... s_star.safetensors
    genlab sample runs/t2i --embeddings s_star.safetensors --prompt "a photo of S*" --out concept.png
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Mapping

import torch
from torch import nn

from genlab.errors import ConfigError
from genlab.methods.base import DataInfo, Method, ParentRun
from genlab.methods.capabilities import Denoiser, Generates, conditions_on_text
from genlab.methods.text_conditioning import token_embedding
from genlab.ranges import PositiveInt, Range
from genlab.text.encoders import TextEncoder
from genlab.text.tokenizer import Tokenizer

MIN_CONCEPT_IMAGES = 3  # Gal et al. use 3-5 images; fewer cannot tell the concept from one image's accidents
TEMPLATES = ("a photo of {}", "a {}", "a handwritten {}", "{}", "a picture of {}")


def placeholder_tokens(token: str, num_vectors: int) -> list[str]:
    """The vocabulary entries of a placeholder: ``S*`` then ``S*_1`` ... ``S*_{k-1}`` (diffusers' names)."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def check_concept_images(data_info: DataInfo, method: str) -> None:
    """A one-line error when the data holds fewer images than a personalisation method needs."""
    n = data_info.num_images
    if n is not None and n < MIN_CONCEPT_IMAGES:
        raise ConfigError(f"{method} learns a concept from {MIN_CONCEPT_IMAGES}-20 images, the data has {n}: give at "
                          "least 3 (e.g. --data folder:PATH, or data.classes=[7] data.limit=10)")


def personalisation_base(method: Method, data_info: DataInfo) -> TextEncoder:
    """The text encoder of ``method.base`` after the checks Textual Inversion and DreamBooth share: a text
    base, a few images, of the base's size."""
    encoder = text_base(method.base, method.name, method.config.base)
    check_concept_images(data_info, method.name)
    seen = method.base.data_info
    if (seen.channels, seen.image_size) != (data_info.channels, data_info.image_size):
        raise ConfigError(f"the base run makes {seen.channels}x{seen.image_size}px images, the {method.name} images are "
                          f"{data_info.channels}x{data_info.image_size}px: use data.image_size={seen.image_size}")
    return encoder


def text_base(base: nn.Module, method: str, where: Any) -> TextEncoder:
    """The text encoder of a base run a personalisation method builds on; one-line errors otherwise."""
    from genlab.methods.ddpm import DDPM

    if not isinstance(base, DDPM) or not conditions_on_text(base):
        raise ConfigError(f"model.base={where}: {method} needs a text-conditioned ddpm, dit or ldm run (trained with a "
                          f"model.text section, e.g. --preset text_small --data mnist-captions); this {base.name} run has "
                          "no text encoder")
    return base.text_encoder


class PlaceholderTokenizer(Tokenizer):
    """A tokenizer with a placeholder's tokens added (matched before normalisation, ids after the existing
    vocabulary), each placeholder expanded to its k tokens in the texts it encodes. Built on another
    PlaceholderTokenizer it keeps that one's placeholders too; ``base`` is always the run's own tokenizer."""

    def __init__(self, current: Tokenizer, token: str, tokens: list[str]):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_str(current.to_json())  # a copy: the run's tokenizer stays as it is
        backend.add_tokens([AddedToken(name, normalized=False, single_word=False) for name in tokens])
        super().__init__(backend)
        self.base = current.base if isinstance(current, PlaceholderTokenizer) else current
        self.expansions = {**getattr(current, "expansions", {}), token: list(tokens)}

    def expand(self, text: str) -> str:
        """``text`` with every placeholder written out as its k tokens ("S*" -> "S* S*_1 S*_2")."""
        for token, tokens in self.expansions.items():
            if len(tokens) > 1:
                text = text.replace(token, " ".join(tokens))
        return text

    def encode(self, texts, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            raise TypeError("Tokenizer.encode takes a list of texts, not one string")
        return super().encode([self.expand(t) for t in texts], max_length)


class PlaceholderEmbedding(nn.Module):
    """The learned vectors v* (num_vectors, D) of one placeholder, spliced into a frozen text encoder.

    :meth:`attach` gives the encoder a :class:`PlaceholderTokenizer` and hooks on its token embedding
    table: ids of the placeholder's tokens are looked up as row 0 (they may lie beyond the table) and
    their rows replaced by v*, so the table and everything else in the encoder stay untouched.
    """

    def __init__(self, token: str, vectors: torch.Tensor):
        super().__init__()
        if not token or token != token.strip() or any(c.isspace() for c in token):
            raise ConfigError(f"placeholder token {token!r}: give one word without spaces, e.g. 'S*'")
        self.token = token
        self.vectors = nn.Parameter(vectors.detach().clone().float())  # (k, D)
        self._handles: list = []
        self._placeholder: torch.Tensor | None = None  # (N, L) bool: where the current lookup has placeholder ids

    @property
    def tokens(self) -> list[str]:
        return placeholder_tokens(self.token, len(self.vectors))

    def attach(self, encoder: TextEncoder) -> None:
        """Add the placeholder to ``encoder`` (again after its state was loaded, which restores the base tokenizer)."""
        table = token_embedding(encoder)
        if table.embedding_dim != self.vectors.shape[1]:
            raise ConfigError(f"the embedding of {self.token!r} has {self.vectors.shape[1]} dimensions, the text encoder's "
                              f"tokens {table.embedding_dim}: it was learned for another base run")
        current = encoder.tokenizer  # the run's own, or one with other placeholders already added
        if self._handles and isinstance(current, PlaceholderTokenizer) and self.token in current.expansions:
            return  # still attached (an encoder whose tokenizer is not in its state, e.g. minilm, kept it on load)
        for name in self.tokens:
            normalised = current.backend.normalizer.normalize_str(name) if current.backend.normalizer else name
            if current.backend.token_to_id(name) is not None or current.backend.token_to_id(normalised) is not None:
                raise ConfigError(f"placeholder token {name!r} is already in the base's vocabulary: choose a new word "
                                  "(e.g. placeholder=S* or <my-concept>)")
        for handle in self._handles:
            handle.remove()
        tokenizer = encoder.tokenizer = PlaceholderTokenizer(current, self.token, self.tokens)
        ids = torch.tensor([tokenizer.backend.token_to_id(name) for name in self.tokens])  # (k,) consecutive
        if type(encoder).tokenize is not TextEncoder.tokenize:
            # An encoder that tokenizes with its backend directly (minilm) gets the expansion here.
            encoder.tokenize = lambda texts: type(encoder).tokenize(encoder, [tokenizer.expand(t) for t in texts])

        def before(module: nn.Module, args: tuple) -> tuple:
            (token_ids,) = args  # (N, L)
            self._placeholder = torch.isin(token_ids, ids.to(token_ids.device))
            self._index = (token_ids - int(ids[0])).clamp(0, len(ids) - 1)  # (N, L) row of v* per position
            return (token_ids.masked_fill(self._placeholder, 0),)

        def after(module: nn.Module, args: tuple, rows: torch.Tensor) -> torch.Tensor:
            learned = self.vectors.to(rows.dtype)[self._index]  # (N, L, D)
            return torch.where(self._placeholder.unsqueeze(-1), learned, rows)  # (N, L, D)

        self._handles = [table.register_forward_pre_hook(before), table.register_forward_hook(after)]
        encoder._cache.clear()  # cached encodings of frozen prompts predate the placeholder

    def save(self, path: str | Path) -> Path:
        """Write ``{token: tensor[num_vectors, dim]}`` as safetensors (diffusers' load_textual_inversion format)."""
        from safetensors.torch import save

        from genlab.fileio import atomic_write_bytes

        path = Path(path)
        if path.suffix != ".safetensors":
            raise ConfigError(f"{path}: the embeddings file must end in .safetensors")
        return atomic_write_bytes(path, save({self.token: self.vectors.detach().cpu().contiguous()}))


def read_embeddings(path: str | Path) -> dict[str, torch.Tensor]:
    """``{token: tensor[num_vectors, dim]}`` of a textual-inversion safetensors file (a 1-d tensor is one vector)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{path}: no such embeddings file; write one with `genlab export-embeddings TI_RUN FILE`")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a safetensors file of token embeddings ({e})") from None
    if not tensors or any(v.dim() not in (1, 2) for v in tensors.values()):
        raise ConfigError(f"{path}: expected {{token: tensor[num_vectors, dim]}}, got "
                          f"{ {k: tuple(v.shape) for k, v in tensors.items()} }")
    return {token: v.reshape(-1, v.shape[-1]).float() for token, v in tensors.items()}


def load_embeddings(method: nn.Module, path: str | Path) -> list[PlaceholderEmbedding]:
    """Add the placeholders of an embeddings file to a loaded text-conditioned run's method (diffusers'
    ``pipe.load_textual_inversion``); prompts may then name them. Returns the spliced embeddings."""
    encoder = text_base(method, "--embeddings", path)
    out = []
    for token, vectors in read_embeddings(path).items():
        embedding = PlaceholderEmbedding(token, vectors.to(method.device))
        embedding.attach(encoder)
        out.append(embedding)
    method._textual_inversion = out  # keep the hooks' owners alive with the method
    return out


@dataclass
class TextualInversionConfig:
    """The frozen base run, the placeholder word, its number of vectors and initialisation, and the prompts."""

    base: str | None = None  # run folder of a text-conditioned ddpm / dit / ldm run (required; --base RUN)
    placeholder: str = "S*"  # the new word; must not be in the base's vocabulary
    num_vectors: PositiveInt = 1  # k vectors for the placeholder (S* S*_1 ... in the prompt)
    # A word of the base's vocabulary whose embedding starts v* (the paper's coarse descriptor, e.g. "digit");
    # None: the mean row of the base's token embeddings.
    init_word: str | None = None
    init_noise: Annotated[float, Range(0)] = 0.0  # std of Gaussian noise added to the start (breaks symmetry of k > 1)
    templates: tuple[str, ...] = TEMPLATES  # training prompts; "{}" is replaced by the placeholder
    # Words of the data's captions that name the concept (e.g. [seven, "7"] for mnist-captions' 7s): each image's
    # own captions, these words replaced by the placeholder ("a thick seven" -> "a thick S*"), join the templates
    # as its training prompts, so v* learns in the caption grammar the base was trained on and the captions'
    # attributes (thickness, slant, size) explain what is not the concept. Empty: the templates alone.
    caption_words: tuple[str, ...] = ()


class Personalisation(Method, Generates):
    """What Textual Inversion and DreamBooth share: a text-conditioned base run (role ``base``), a few images
    of a concept, prompts as the condition, and the base's sampling."""

    parents = {"base": ParentRun(Denoiser, attribute="base")}
    default_source = "mnist-captions"
    parent_presets = {"base": "text_small"}  # the contract test's parent: a text-conditioned ddpm

    def __init__(self, config: Any, data_info: DataInfo, parents: Mapping[str, nn.Module] | None = None):
        super().__init__(config, data_info, parents)
        personalisation_base(self, data_info)

    @property
    def text_encoder(self) -> TextEncoder:
        """The base's text encoder: prompts are this run's condition."""
        return self.base.text_encoder

    @torch.no_grad()
    def sample(self, n: int, **options: Any) -> torch.Tensor:
        """The base's sampling (every sampler, prompt and guidance option), with what this run learned."""
        self.base.text_encoder._cache.clear()  # prompts cached before the last update are stale
        return self.base.sample(n, **options)


class TextualInversion(Personalisation):
    """Learned embeddings of a new word for a frozen text-conditioned diffusion run."""

    name = "textual-inversion"
    Config = TextualInversionConfig

    def __init__(self, config: TextualInversionConfig, data_info: DataInfo, parents: Mapping[str, nn.Module] | None = None):
        super().__init__(config, data_info, parents)
        encoder = self.text_encoder
        if not config.templates or any("{}" not in t for t in config.templates):
            raise ConfigError(f"model.templates={list(config.templates)}: every template needs '{{}}' where the placeholder goes")
        self.embedding = PlaceholderEmbedding(config.placeholder, self._initial_vectors(encoder))
        self.embedding.attach(encoder)
        # Loading a checkpoint restores the base tokenizer from its buffer: put the placeholder back.
        self.register_load_state_dict_post_hook(lambda module, keys: module.embedding.attach(module.base.text_encoder))

    def _initial_vectors(self, encoder: TextEncoder) -> torch.Tensor:
        """v* at step 0: the embedding of ``init_word`` (or the table's mean row), k times, plus ``init_noise``."""
        c = self.config
        table = token_embedding(encoder).weight.detach()  # (V, D)
        if c.init_word is None:
            start = table[: encoder.tokenizer.vocab_size].mean(0)  # (D,)
        else:
            pieces = encoder.tokenizer.backend.encode(c.init_word, add_special_tokens=False)
            if len(pieces.ids) != 1 or pieces.ids[0] == encoder.tokenizer.backend.token_to_id("[UNK]"):
                raise ConfigError(f"model.init_word={c.init_word!r} is {pieces.tokens} in the base's vocabulary: give "
                                  "one word the base knows as a single token (e.g. digit), or null")
            start = table[pieces.ids[0]]
        vectors = start.repeat(c.num_vectors, 1)  # (k, D)
        return vectors + c.init_noise * torch.randn_like(vectors)

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"main": [self.embedding.vectors]}

    def ema_targets(self) -> dict[str, nn.Module]:
        return {"embedding": self.embedding}

    def prompt_options(self, captions: list[str] | None) -> list[str]:
        """The training prompts of one image: the templates with the placeholder, then (with ``caption_words``)
        the image's captions that name the concept, with the placeholder in place of its name."""
        c = self.config
        options = [t.format(c.placeholder) for t in c.templates]
        if c.caption_words and captions:
            names = re.compile(r"\b(" + "|".join(re.escape(w) for w in c.caption_words) + r")\b", re.IGNORECASE)
            options += [names.sub(lambda m: c.placeholder, text) for text in captions if names.search(text)]
        return options

    def training_prompts(self, ctx, captions: list[list[str]] | None = None) -> list[str]:
        """One prompt per image (of its :meth:`prompt_options`), drawn through the step context."""
        picks = ctx.randint(0, 1 << 30).tolist()  # (n,)
        per_image = captions if captions is not None and self.config.caption_words else [None] * len(picks)
        return [(options := self.prompt_options(text))[k % len(options)] for k, text in zip(picks, per_image)]

    def training_step(self, batch: dict[str, torch.Tensor], ctx) -> dict[str, torch.Tensor]:
        """The base's diffusion loss on the concept images, prompted with the placeholder; only v* gets gradients."""
        base = self.base
        x0 = base._diffused(batch["image"])  # (n, C, H, W): images (ldm: latents)
        t = ctx.randint(0, base.config.num_timesteps)  # (n,)
        noise = ctx.randn(*x0.shape[1:])  # (n, C, H, W)
        # Not DDPM.encode_prompts: a frozen encoder runs there without gradients, and v* needs them.
        condition = base.text_encoder.encode(self.training_prompts(ctx, batch.get("captions")))
        loss, logs = base.loss(x0, t, noise, condition)
        ctx.optimize(loss)
        return {"loss": loss.detach(), **logs}

    def save_embeddings(self, path: str | Path) -> Path:
        """The learned placeholder as ``{token: tensor[num_vectors, dim]}`` safetensors."""
        return self.embedding.save(path)
