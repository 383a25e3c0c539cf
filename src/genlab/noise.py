"""Per-image randomness for sampling: image i of a seed depends on (seed, i) only, not on the batch.

A sampler that draws its noise for a whole batch from one ``torch.Generator`` hands image i the
numbers that follow the draws of the images before it, so changing the batch size changes the
images. :class:`ImageNoise` holds one generator per image instead; every draw (``randn``, ``rand``,
``randint``, ``multinomial``) stacks per-image draws, so image i sees the same numbers in any batch.
Generators live on the CPU (a seed gives the same noise on every device); draws are moved to the
requested device.

    noise = ImageNoise.for_indices(seed, start, start + m)    # the images start .. start + m - 1 of a seed
    images = method.sample(m, generator=noise)
"""

from __future__ import annotations

from typing import Sequence

import torch

from genlab.errors import ConfigError

_MASK64 = (1 << 64) - 1


def _mix(seed: int, index: int) -> int:
    """A 63-bit seed for image ``index`` of ``seed`` (SplitMix64 finaliser of the pair, Steele et al. 2014)."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    for shift, multiplier in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        z = ((z ^ (z >> shift)) * multiplier) & _MASK64
    return (z ^ (z >> 31)) >> 1


class ImageNoise:
    """One CPU generator per image; draws of shape (n, *shape) whose row i comes from generator i."""

    def __init__(self, generators: Sequence[torch.Generator], device: torch.device | str | None = None):
        self.generators = list(generators)
        self.device = torch.device(device) if device is not None else None

    @classmethod
    def for_indices(cls, seed: int, start: int, stop: int, device: torch.device | str | None = None) -> "ImageNoise":
        """The noise of images ``start`` .. ``stop - 1`` of ``seed`` (what ``Run.sample`` uses per batch)."""
        return cls([torch.Generator().manual_seed(_mix(int(seed), i)) for i in range(start, stop)], device)

    @classmethod
    def from_generator(cls, generator: torch.Generator | None, n: int) -> "ImageNoise":
        """Noise for ``n`` images seeded by ``generator`` (torch's global RNG when None), one draw per image,
        so consecutive batches drawn with one generator get the same images as one large batch."""
        seeds = [int(torch.randint(0, 2**62, (1,), generator=generator, device=_device_of(generator)))
                 for _ in range(n)]
        return cls([torch.Generator().manual_seed(s) for s in seeds])

    @classmethod
    def of(cls, source: "ImageNoise | torch.Generator | None", n: int) -> "ImageNoise":
        """``source`` as the noise of ``n`` images: an ImageNoise (checked to hold n), or seeded from a generator."""
        if isinstance(source, ImageNoise):
            if len(source) != n:
                raise ConfigError(f"the noise holds {len(source)} images' generators, {n} images were asked for")
            return source
        return cls.from_generator(source, n)

    def __len__(self) -> int:
        return len(self.generators)

    def _out(self, draws: list[torch.Tensor], device) -> torch.Tensor:
        device = device if device is not None else self.device
        stacked = torch.stack(draws)  # (n, ...)
        return stacked if device is None else stacked.to(device)

    def randn(self, *shape: int, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """N(0, 1) draws (n, *shape)."""
        draws = self._out([torch.randn(shape, generator=g) for g in self.generators], device)
        return draws if dtype is None else draws.to(dtype)

    def rand(self, *shape: int, device=None) -> torch.Tensor:
        """U(0, 1) draws (n, *shape)."""
        return self._out([torch.rand(shape, generator=g) for g in self.generators], device)

    def randint(self, low: int, high: int, device=None) -> torch.Tensor:
        """One integer in [low, high) per image (n,)."""
        return self._out([torch.randint(low, high, (), generator=g) for g in self.generators], device)

    def multinomial(self, probs: torch.Tensor) -> torch.Tensor:
        """One category per image from its row of ``probs`` (n, K) -> (n,) long, on probs' device."""
        if len(probs) != len(self):
            raise ConfigError(f"{len(probs)} rows of probabilities for {len(self)} images")
        rows = probs.detach().float().cpu()
        return self._out([torch.multinomial(row, 1, generator=g)[0] for row, g in zip(rows, self.generators)],
                         probs.device)


def _device_of(generator: torch.Generator | None) -> torch.device:
    return torch.device("cpu") if generator is None else generator.device


def randn_like(x: torch.Tensor, noise: "ImageNoise | torch.Generator | None") -> torch.Tensor:
    """N(0, 1) noise like ``x`` (N, ...): per image from an ImageNoise, else from the generator (its device)."""
    if isinstance(noise, ImageNoise):
        return ImageNoise.of(noise, len(x)).randn(*x.shape[1:], device=x.device, dtype=x.dtype)
    if noise is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=noise, device=noise.device, dtype=x.dtype).to(x.device)
