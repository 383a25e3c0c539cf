"""Latent diffusion (Rombach et al. 2022, Stable Diffusion's recipe; SPEC D11).

A frozen autoencoder (a ``kl-ae`` or ``vq-ae`` run, SPEC AE7) maps images to small latents; DDPM's
diffusion (any schedule, objective, sampler, classifier-free or rule guidance) runs on the scaled
latents z = encode(x) * latent_scale, whose unit variance keeps the noise schedule's signal-to-noise
ratios what they are for [-1, 1] pixels (the paper's sec. 4.3.2). Samples are decoded back:
x = decode(z / latent_scale). The denoiser is a U-Net (``network: unet``) or a DiT (``network: dit``),
its size-dependent shapes derived from the latent size unless the config fixes them.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from genlab.diffusion import parse_rule
from genlab.errors import ConfigError
from genlab.methods.base import DataInfo, ParentRun, checked_parents
from genlab.methods.capabilities import DiscreteCodes, LatentCodec, has
from genlab.methods.ddpm import DDPM, DDPMConfig

@dataclass
class LDMConfig(DDPMConfig):
    """DDPM's diffusion settings and denoiser (``network: unet`` or ``dit``, sized for the latents),
    and the autoencoder run.

    ``clip_denoised`` defaults to False: latents are not confined to [-1, 1].
    """

    autoencoder: str | None = None  # run folder of a kl-ae or vq-ae run (the frozen parent; its EMA weights)
    clip_denoised: bool = False


# Latents of training images kept by a CPU run: 30,000 mnist-pairs canvases' 14x14x4 latents take 94 MB.
LATENT_CACHE_BYTES = 512 * 2**20


class LatentCache:
    """The frozen autoencoder's latents of images met before, keyed by the images' bytes.

    Training meets every image once per epoch; encoding a 56 px canvas costs a third of a small latent
    U-Net's step, so each distinct image is encoded once. Each missing image is encoded on its own: a
    latent then does not depend on the batch that first met it (batched convolutions may round
    differently with the batch size), and a resumed run, whose cache starts empty, computes the same
    latents an uninterrupted run had cached. Once ``max_bytes`` are held, new images are encoded, not kept.
    """

    def __init__(self, encode, max_bytes: int):
        self.encode, self.max_bytes = encode, max_bytes
        self.latents: dict[bytes, torch.Tensor] = {}
        self.bytes = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) on the CPU -> encode(images) (N, c, h, w), from the cache where possible."""
        keys = [hashlib.blake2b(image.numpy().tobytes(), digest_size=16).digest() for image in images.detach().contiguous()]
        found = {}
        for key, image in zip(keys, images):
            if key in self.latents or key in found:
                continue
            latent = self.encode(image[None])[0]  # (c, h, w), alone: the same latent whatever the batch
            found[key] = latent
            if self.bytes + latent.numel() * latent.element_size() <= self.max_bytes:
                self.latents[key] = latent
                self.bytes += latent.numel() * latent.element_size()
        return torch.stack([self.latents.get(key, found.get(key)) for key in keys])


def _check_image_size(run: str | None, parent: nn.Module, data_info: DataInfo) -> None:
    """The data must have the autoencoder's channels, and its image size unless the autoencoder is fully
    convolutional (then any multiple of its downsampling factor f, so that no padding needs cropping back: a kl-ae
    trained on 28 px digits gives 14x14 latents of 56 px two-digit canvases)."""
    seen = parent.data_info
    if seen.channels == data_info.channels and seen.image_size == data_info.image_size:
        return
    trained = f"the autoencoder {run} was trained on {seen.channels}x{seen.image_size}px images, " \
              f"the data is {data_info.channels}x{data_info.image_size}px"
    if seen.channels != data_info.channels:
        raise ConfigError(f"{trained}: train ldm on data with the autoencoder's channels")
    if not getattr(parent, "fully_convolutional", False):
        raise ConfigError(f"{trained}, and its latent depends on the image size (a dense bottleneck or self-attention): "
                          "train ldm on the autoencoder's data, or an autoencoder on this data")
    if data_info.image_size % parent.f:
        raise ConfigError(f"{trained}: a fully convolutional autoencoder takes other sizes only as multiples of its "
                          f"downsampling factor f = {parent.f}; resize the data (data.image_size) or train an "
                          "autoencoder on this data")


class LDM(DDPM):
    """Diffusion on the scaled latents of a frozen kl-ae / vq-ae; samples are decoded to pixels."""

    name = "ldm"
    Config = LDMConfig
    parents = {"autoencoder": ParentRun(LatentCodec, attribute="autoencoder")}

    def __init__(self, config: LDMConfig, data_info: DataInfo, parents: Mapping[str, nn.Module] | None = None):
        parent = checked_parents(type(self), config, parents)["autoencoder"]
        _check_image_size(config.autoencoder, parent, data_info)
        with torch.no_grad():  # the latent shape for this image size, whatever the autoencoder's kind
            probe = parent.encode(torch.zeros(1, data_info.channels, data_info.image_size, data_info.image_size))
        c, h, w = probe.shape[1:]
        if h != w:
            raise ConfigError(f"the autoencoder's latents are {c}x{h}x{w}: ldm needs square latents")
        if config.network == "dit" and config.dit.patch_size is not None and h % config.dit.patch_size:
            raise ConfigError(f"model.dit.patch_size={config.dit.patch_size} must divide the latent size {h} "
                              f"(the autoencoder's latents are {c}x{h}x{w}): choose a divisor of {h}, e.g. 1")
        # The source names the captions a text encoder's tokenizer is trained on.
        latent_info = DataInfo(channels=c, image_size=h, num_classes=data_info.num_classes, source=data_info.source)
        super().__init__(config, latent_info, parents)  # the denoiser is built for the latents
        self.data_info = data_info  # the pixel data's: the CLI and evaluation rely on it
        self.latent_info = latent_info
        # Rombach et al.'s VQ-regularised models absorb the quantiser into the decoder: the diffused
        # latents are snapped to the codebook before decoding.
        self._decode_options = {"quantize": True} if has(parent, DiscreteCodes) else {}
        self._latent_cache: LatentCache | None = None  # made on first use: sampling-only runs never hold one


    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(c, h, w) of one latent."""
        d = self.latent_info
        return (d.channels, d.image_size, d.image_size)

    @property
    def latent_scale(self) -> torch.Tensor:
        """The autoencoder's 1 / std of its latents (a saved buffer of the parent)."""
        return self.autoencoder.latent_scale

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] -> scaled latents z = encode(x) * latent_scale (N, c, h, w)."""
        return self.autoencoder.encode(x) * self.latent_scale

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, c, h, w) -> images decode(z / latent_scale) clamped to [-1, 1] (N, C, H, W)."""
        return self._decode_unclamped(z).clamp(-1, 1)

    def _decode_unclamped(self, z: torch.Tensor) -> torch.Tensor:
        """decode(z / latent_scale) (N, C, H, W) without the clamp, which would stop rule gradients."""
        return self.autoencoder.decode(z / self.latent_scale, **self._decode_options)

    def _diffused(self, images: torch.Tensor) -> torch.Tensor:
        """DDPM's loss is taken on the scaled latents of the images (the autoencoder gets no gradient); on the
        CPU each distinct image is encoded once (:class:`LatentCache`)."""
        with torch.no_grad():
            if images.device.type != "cpu" or images.dtype != torch.float32:
                return self.encode_latents(images)  # (n, c, h, w)
            if self._latent_cache is None:
                self._latent_cache = LatentCache(self.encode_latents, LATENT_CACHE_BYTES)
            return self._latent_cache(images)

    @torch.no_grad()
    def invert(self, x0: torch.Tensor, steps: int | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM inversion of images: the latent noise z_T that DDIM maps back to encode(x0) * latent_scale."""
        return super().invert(self.encode_latents(x0.to(self.device)), steps=steps, labels=labels)

    @torch.no_grad()
    def sample(self, n: int, *, classifier: Any = None, **options: Any) -> torch.Tensor:
        """``n`` images (n, C, H, W) in [-1, 1]: DDPM.sample on the latents, decoded (see ``_finish``).

        Takes DDPM's options (sampler, steps, eta, labels, guidance_scale, negative_labels, rules,
        callback); ``noise`` is latent noise (n, c, h, w). ``rules`` judge the decoded image of the
        predicted latent x0, so "brightness" or "symmetry" keep their pixel meaning (the gradient flows
        through the frozen decoder). Classifier guidance is not offered: a noisy classifier scores
        noisy pixels, not noisy latents.
        """
        if classifier is not None:
            raise ConfigError("ldm sampling has no classifier guidance (a noisy classifier scores pixels, not latents): "
                              "use classifier-free guidance (--guidance-scale) or rules")
        return super().sample(n, **options)

    def _noise_shape(self) -> tuple[int, int, int]:
        """The sampler starts from latent noise (c, h, w)."""
        return self.latent_shape

    def _finish(self, x0: torch.Tensor) -> torch.Tensor:
        """Sampled latents (N, c, h, w), NOT clamped (they have unit variance, not the range [-1, 1]), decoded."""
        return self.decode_latents(x0)

    def _rule_guidance(self, denoise, rules: list):
        """DDPM's rule guidance with each rule judging decode(z0 / latent_scale) instead of the latent z0."""
        return super()._rule_guidance(denoise, [self._pixel_rule(parse_rule(r)) for r in rules])

    def _pixel_rule(self, rule):
        """A rule on predicted latents from a rule on images: rule(decode(z0 / latent_scale))."""
        fn = rule.fn

        def on_latents(z0: torch.Tensor, **params: Any) -> torch.Tensor:
            return fn(self._decode_unclamped(z0), **params)

        return dataclasses.replace(rule, fn=on_latents)
