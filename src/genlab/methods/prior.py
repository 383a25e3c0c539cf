"""Autoregressive priors over the code maps of a trained VQ run (SPEC AE5; van den Oord et al. 2017,
"Neural Discrete Representation Learning", Section 3.2, and Esser et al. 2021 for the GPT prior).

A VQ autoencoder (vqvae, vqgan, vq-ae) turns an image into an (h, w) map of codes in [0, K). A prior
learns p(codes) = prod_i p(c_i | c_<i) in raster order by maximum likelihood (cross-entropy on the
codes of training images); generation samples codes one position at a time and decodes them with
the frozen VQ decoder. The VQ run is the "parent" (role ``codes``, see ``Method.parents``): named by
``model.codes``, built with its EMA weights by :mod:`genlab.runs`, frozen, kept in eval mode, saved
inside this run's checkpoints and never optimised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from genlab.errors import ConfigError
from genlab.methods.base import DataInfo, Method, ParentRun
from genlab.methods.capabilities import DiscreteCodes, Generates
from genlab.models.gpt import GPT, GPTConfig, KVCache
from genlab.models.pixelcnn import GatedPixelCNN, PixelCNNConfig
from genlab.noise import ImageNoise

def sample_from_logits(
    logits: torch.Tensor,
    generator: ImageNoise | torch.Generator | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> torch.Tensor:
    """Draw one index per row of logits (N, K) from softmax(logits / temperature), restricted to the top_k.

    temperature 0 is greedy decoding (argmax). The draw uses ``generator`` on its own device (a CPU
    generator draws on the CPU), so the same seed gives the same codes whatever the model's device;
    an :class:`~genlab.noise.ImageNoise` draws row i with image i's generator.
    """
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be a positive number of codes (or None for all), got {top_k}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature  # (N, K)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (N, 1): the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (N, K)
    if isinstance(generator, ImageNoise):
        return generator.multinomial(probs).to(logits.device)  # (N,)
    device = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(device), 1, generator=generator)[:, 0].to(logits.device)  # (N,)


def _code_shape(parent: nn.Module) -> tuple[int, int]:
    """The parent's (h, w) code map size (a property, or a method of no arguments)."""
    shape = parent.code_shape
    if callable(shape):
        shape = shape()
    return int(shape[0]), int(shape[1])


@dataclass
class PixelCNNPriorConfig:
    """A Gated PixelCNN prior over the codes of the VQ run in ``codes``."""

    codes: str | None = None  # the VQ run folder (vqvae, vqgan, vq-ae); `genlab train pixelcnn --codes RUN`
    net: PixelCNNConfig = field(default_factory=PixelCNNConfig)
    class_conditional: bool = False  # p(codes | class); needs a labelled data source
    temperature: float = 1.0  # default sampling temperature (0: greedy)
    top_k: int | None = None  # default: sample among the top_k most likely codes (None: all K)


@dataclass
class GPTPriorConfig:
    """A causal-transformer prior over the raster-scanned codes of the VQ run in ``codes``."""

    codes: str | None = None  # the VQ run folder (vqvae, vqgan, vq-ae); `genlab train gpt --codes RUN`
    net: GPTConfig = field(default_factory=GPTConfig)
    class_conditional: bool = False  # the start token is the class token; needs a labelled data source
    temperature: float = 1.0
    top_k: int | None = None


class CodePrior(Method, Generates):
    """Shared machinery of the priors: the frozen VQ parent, the likelihood loss, sampling options."""

    parents = {"codes": ParentRun(DiscreteCodes, attribute="parent")}

    def __init__(self, config: Any, data_info: DataInfo, parents: Mapping[str, nn.Module] | None = None):
        super().__init__(config, data_info, parents)
        info = self.parent.data_info
        if (info.channels, info.image_size) != (data_info.channels, data_info.image_size):
            raise ConfigError(f"the data is {data_info.channels}x{data_info.image_size}x{data_info.image_size} but the "
                              f"VQ run {config.codes} was trained on {info.channels}x{info.image_size}x{info.image_size}: "
                              "train the prior on the VQ run's data")
        self.num_codes = int(self.parent.codebook_size)
        self.code_shape = _code_shape(self.parent)
        if config.class_conditional and not data_info.num_classes:
            raise ConfigError("model.class_conditional=true needs a labelled data source (e.g. mnist, cifar10)")
        self.num_classes = data_info.num_classes if config.class_conditional else None

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"main": list(self.net.parameters())}

    def ema_targets(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def code_logits(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits (N, K, h, w) of p(c_i | c_<i) for every position of codes (N, h, w)."""
        raise NotImplementedError

    def nll(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean negative log-likelihood of codes (N, h, w), in nats per code."""
        return F.cross_entropy(self.code_logits(codes, labels), codes)

    def training_step(self, batch: dict[str, torch.Tensor], ctx) -> dict[str, torch.Tensor]:
        """Maximum likelihood of the parent's codes of the batch (cross-entropy, nats per code)."""
        with torch.no_grad():
            codes = self.parent.encode_codes(batch["image"]).long()  # (n, h, w)
        labels = batch["label"] if self.num_classes is not None else None
        loss = self.nll(codes, labels)
        ctx.optimize(loss)
        loss = loss.detach()
        # bits/dim of the code map: one dimension per code.
        return {"loss": loss, "bits_per_dim": loss / math.log(2)}

    def _sampling_options(self, n: int, generator, temperature, top_k, labels, unknown) -> tuple:
        """Validate sampling options; fill defaults from the config and draw labels if none are given."""
        if unknown:
            raise ConfigError(f"{self.name} sampling does not take {', '.join(sorted(unknown))}")
        temperature = self.config.temperature if temperature is None else float(temperature)
        top_k = self.config.top_k if top_k is None else int(top_k)
        if labels is not None:
            if self.num_classes is None:
                raise ConfigError("--class needs a class-conditional prior (train with model.class_conditional=true)")
            labels = torch.as_tensor(labels, dtype=torch.long).to(self.device)
            if labels.shape != (n,) or labels.min() < 0 or labels.max() >= self.num_classes:
                raise ConfigError(f"labels must be {n} class indices in [0, {self.num_classes}), got {labels.tolist()}")
        elif self.num_classes is not None:  # a class-conditional prior without --class: random classes
            labels = generator.randint(0, self.num_classes, device=self.device)
        return temperature, top_k, labels

    def sample_codes(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0,
                     top_k: int | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Autoregressive draw of n code maps (n, h, w) in raster order."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, n: int, *, generator: ImageNoise | torch.Generator | None = None, temperature: float | None = None,
               top_k: int | None = None, labels: torch.Tensor | None = None, **unknown: Any) -> torch.Tensor:
        """n images in [-1, 1]: codes drawn from the prior (image i's from its own generator of the
        ImageNoise), decoded by the frozen VQ decoder."""
        generator = ImageNoise.of(generator, n)
        temperature, top_k, labels = self._sampling_options(n, generator, temperature, top_k, labels, unknown)
        codes = self.sample_codes(n, generator, temperature, top_k, labels)  # (n, h, w)
        return self.parent.decode_codes(codes).clamp(-1, 1)


class PixelCNNPrior(CodePrior):
    """Gated PixelCNN prior over VQ codes (van den Oord et al. 2016, 2017)."""

    name = "pixelcnn"
    Config = PixelCNNPriorConfig

    def __init__(self, config: PixelCNNPriorConfig, data_info: DataInfo, parents: Mapping[str, nn.Module] | None = None):
        super().__init__(config, data_info, parents)
        self.net = GatedPixelCNN(config.net, self.num_codes, self.num_classes)

    def code_logits(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(codes, labels)  # (N, K, h, w)

    @torch.no_grad()
    def sample_codes(self, n, generator=None, temperature=1.0, top_k=None, labels=None) -> torch.Tensor:
        """One network pass per position, over the rows drawn so far: row i's logits never read rows below it."""
        h, w = self.code_shape
        codes = torch.zeros(n, h, w, dtype=torch.long, device=self.device)
        for i in range(h):
            for j in range(w):
                logits = self.net(codes[:, : i + 1], labels)[:, :, i, j]  # (n, K)
                codes[:, i, j] = sample_from_logits(logits, generator, temperature, top_k)
        return codes


class GPTPrior(CodePrior):
    """Causal-transformer prior over raster-scanned VQ codes (Esser et al. 2021, Section 3.2)."""

    name = "gpt"
    Config = GPTPriorConfig

    def __init__(self, config: GPTPriorConfig, data_info: DataInfo, parents: Mapping[str, nn.Module] | None = None):
        super().__init__(config, data_info, parents)
        h, w = self.code_shape
        self.net = GPT(config.net, self.num_codes, h * w, self.num_classes)

    def code_logits(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        n, h, w = codes.shape
        logits = self.net(codes.reshape(n, h * w), labels)  # (N, L, K), raster order
        return logits.transpose(1, 2).reshape(n, -1, h, w)  # (N, K, h, w)

    @torch.no_grad()
    def sample_codes(self, n, generator=None, temperature=1.0, top_k=None, labels=None) -> torch.Tensor:
        """L single-token passes with a key/value cache: each step feeds the code just drawn."""
        h, w = self.code_shape
        cache = KVCache(len(self.net.blocks))
        tokens = self.net.start_tokens(n, labels, self.device)  # (n,)
        codes = torch.empty(n, h * w, dtype=torch.long, device=self.device)
        for p in range(h * w):
            logits = self.net.step(tokens, cache)  # (n, K): p(c_p | start, c_<p)
            tokens = codes[:, p] = sample_from_logits(logits, generator, temperature, top_k)
        return codes.view(n, h, w)
