"""pix2pix: image-to-image translation with a conditional GAN (Isola et al. 2017, SPEC G6).

A U-Net generator G maps an input image a to an output b_hat; a PatchGAN discriminator D judges
the pair (a, b) by patches. The objective (paper eq. 4) is

    G* = arg min_G max_D  L_cGAN(G, D) + lambda * L_L1(G),   L_L1 = E ||b - G(a)||_1,  lambda = 100

with D trained on BCE (the D loss divided by 2 "to slow down the rate at which D learns", sec. 3.3)
and G on the non-saturating -log D(a, G(a)); both with Adam(lr 2e-4, betas (0.5, 0.999)).

Where the input a comes from is ``model.task``:

- ``paired``: a paired:PATH data source (batch["condition"], the A images);
- ``edges``: Sobel edges of the target (edges -> image);
- ``masked``: the target with a random square hole (or random patches) set to -1, plus the mask
  as an extra input channel (on MNIST, -1 is also the background, so the hole would otherwise be
  invisible); masked -> full;
- ``lowres``: 2x average-pooled then upsampled target (low-res -> high-res);
- ``grey2colour``: the luminance of an RGB target (grey -> colour).

pix2pix translates rather than samples: :meth:`Pix2Pix.translate` maps inputs to outputs and
:meth:`Pix2Pix.make_input` builds the input of a derived task from a target, so that
:func:`evaluate_pairs` can score test PSNR / SSIM of translate(make_input(b)) against b.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from genlab.data.paired import (
    apply_mask,
    luminance,
    lowres,
    patch_grid,
    random_patch_mask,
    sobel_edges,
    square_hole_mask,
)
from genlab.errors import ConfigError
from genlab.losses import discriminator_loss, generator_loss, l1_loss
from genlab.methods.base import DataInfo, Method, OptimizerSpec
from genlab.methods.capabilities import Translates
from genlab.models.patchgan import PatchDiscriminator, patchgan_receptive_field
from genlab.models.pix2pix import UNetGenerator, UNetGeneratorConfig, patchgan_layers_for

logger = logging.getLogger(__name__)
TASKS = ("edges", "masked", "lowres", "grey2colour", "paired")
_logged_fields: set[tuple[int, int]] = set()


@dataclass
class Pix2PixConfig:
    """The task (where inputs come from), the two networks, the loss weights and the optimiser."""

    task: Literal["edges", "masked", "lowres", "grey2colour", "paired"] = "edges"
    generator: UNetGeneratorConfig = field(default_factory=UNetGeneratorConfig)
    disc_base_channels: int = 64
    disc_layers: int | None = None  # None: receptive field ~70/256 of the image (3 layers at 256 px)
    disc_norm: Literal["batch", "instance", "none"] = "batch"
    spectral_norm: bool = False
    gan_loss: Literal["nonsaturating", "lsgan", "hinge"] = "nonsaturating"
    lambda_l1: float = 100.0
    d_loss_scale: float = 0.5  # the paper halves D's objective
    lr: float | None = None  # both networks; None: train.lr (2e-4 by default, the paper's value)
    betas: tuple[float, ...] = (0.5, 0.999)  # Adam betas of both networks (the paper's; not train.adam_betas)
    input_channels: int | None = None  # task=paired: channels of the A images; None: from the data
    edge_threshold: float | None = 0.25  # edges: binary at magnitude/4 > threshold; None: soft magnitude
    mask: Literal["square", "patches"] = "square"  # masked: one square hole, or random grid patches
    mask_fraction: float = 0.25  # masked: hidden share of the image (square: side = sqrt(fraction) * size)
    mask_patch: int = 4  # masked with mask=patches: patch side in pixels
    lowres_factor: int = 2
    lowres_upsample: Literal["nearest", "bilinear"] = "bilinear"


class Pix2Pix(Method, Translates):
    """Conditional GAN for paired image-to-image translation: U-Net G, PatchGAN D on concat(a, b), cGAN + lambda L1."""

    name = "pix2pix"
    Config = Pix2PixConfig

    def __init__(self, config: Pix2PixConfig, data_info: DataInfo):
        super().__init__(config, data_info)
        c, size, channels = config, data_info.image_size, data_info.channels
        if c.task not in TASKS:
            raise ConfigError(f"model.task={c.task!r} is not one of {', '.join(TASKS)}")
        if c.task == "grey2colour" and channels != 3:
            raise ConfigError(f"model.task=grey2colour needs RGB data, got {channels}-channel images; use cifar10 or data.channels=3")
        if c.lambda_l1 < 0 or c.d_loss_scale <= 0:
            raise ConfigError(f"model.lambda_l1 must be >= 0 and model.d_loss_scale > 0, got {c.lambda_l1}, {c.d_loss_scale}")
        if len(c.betas) != 2:
            raise ConfigError(f"model.betas must be two numbers (beta1, beta2), got {list(c.betas)}")
        if not 0.0 < c.mask_fraction < 1.0:
            raise ConfigError(f"model.mask_fraction must be in (0, 1), got {c.mask_fraction}")
        if c.lowres_factor < 2 or c.lowres_factor > size:
            raise ConfigError(f"model.lowres_factor={c.lowres_factor} must be in [2, image size {size}]")
        self.input_channels = self._input_channels(data_info)
        self.generator = UNetGenerator(c.generator, self.input_channels, channels, size)
        num_layers = c.disc_layers if c.disc_layers is not None else patchgan_layers_for(size)
        # D judges the pair: the input and a real or generated output, stacked as channels (paper sec. 3.1).
        self.discriminator = PatchDiscriminator(self.input_channels + channels, c.disc_base_channels, num_layers,
                                                c.disc_norm, c.spectral_norm)
        self.disc_layers = num_layers
        self.receptive_field = patchgan_receptive_field(num_layers)
        if (size, num_layers) not in _logged_fields:
            _logged_fields.add((size, num_layers))
            logger.info("pix2pix PatchGAN: %d layers, receptive field %dx%d px on %dx%d images",
                        num_layers, self.receptive_field, self.receptive_field, size, size)

    def _input_channels(self, data_info: DataInfo) -> int:
        """Channels of the generator's input a for the task."""
        c, channels = self.config, data_info.channels
        if c.task in ("edges", "grey2colour"):
            return 1
        if c.task == "masked":
            return channels + 1  # the masked image and the mask
        if c.task == "lowres":
            return channels
        from_data = getattr(data_info, "condition_channels", None)
        return c.input_channels or from_data or channels

    # ------------------------------------------------------------------ inputs

    def _mask_draws(self) -> int:
        """How many uniforms one image's mask needs."""
        if self.config.mask == "square":
            return 2
        rows, cols = patch_grid(self.data_info.image_size, self.data_info.image_size, self.config.mask_patch)
        return rows * cols

    def _derive_input(self, b: torch.Tensor, uniforms: torch.Tensor | None) -> torch.Tensor:
        """The derived task's input a for targets b (N, C, H, W) in [-1, 1]; ``uniforms`` drive the mask."""
        c = self.config
        if c.task == "edges":
            return sobel_edges(b, c.edge_threshold)  # (N, 1, H, W)
        if c.task == "grey2colour":
            return luminance(b)  # (N, 1, H, W)
        if c.task == "lowres":
            return lowres(b, c.lowres_factor, c.lowres_upsample)  # (N, C, H, W)
        if c.task == "masked":
            height, width = b.shape[-2:]
            if c.mask == "square":
                side = max(1, round(c.mask_fraction**0.5 * min(height, width)))
                mask = square_hole_mask(uniforms, height, width, side)
            else:
                mask = random_patch_mask(uniforms, height, width, c.mask_patch, c.mask_fraction)
            # (N, C + 1, H, W): hidden pixels at -1, and the mask itself (+1 hidden, -1 visible).
            return torch.cat([apply_mask(b, mask, -1.0), mask.to(b.dtype) * 2 - 1], dim=1)
        raise ConfigError("model.task=paired takes its inputs from the data (paired:PATH A images), not from the targets")

    @torch.no_grad()
    def make_input(self, b: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Input a of a derived task for targets b (N, C, H, W) in [-1, 1]; the mask noise comes from ``generator``."""
        uniforms = None
        if self.config.task == "masked":
            uniforms = torch.rand(b.shape[0], self._mask_draws(), generator=generator,
                                  device="cpu" if generator is None else generator.device).to(b.device)
        return self._derive_input(b, uniforms)

    def _batch_input(self, batch: dict[str, torch.Tensor], ctx) -> torch.Tensor:
        """The input a of a training batch: the paired condition, or derived from the image."""
        task = self.config.task
        if task == "paired":
            if "condition" not in batch:
                raise ConfigError("model.task=paired needs a paired:PATH data source (A and B folders); "
                                  "for other data use model.task=edges, masked, lowres or grey2colour")
            a = batch["condition"]
            if a.shape[1] != self.input_channels:
                raise ConfigError(f"the paired inputs have {a.shape[1]} channels but the generator takes "
                                  f"{self.input_channels}; set model.input_channels={a.shape[1]}")
            return a
        if "condition" in batch:
            raise ConfigError(f"the data has paired inputs (paired:PATH) but model.task={task} derives them from "
                              "the targets; set model.task=paired")
        uniforms = ctx.rand(self._mask_draws()) if task == "masked" else None
        return self._derive_input(batch["image"], uniforms)

    # ------------------------------------------------------------------ training

    def optimizer_groups(self) -> dict[str, OptimizerSpec]:
        c = self.config
        betas = tuple(c.betas)
        return {
            "generator": OptimizerSpec(list(self.generator.parameters()), lr=c.lr, betas=betas),
            "discriminator": OptimizerSpec(list(self.discriminator.parameters()), lr=c.lr, betas=betas),
        }

    def ema_targets(self) -> dict[str, nn.Module]:
        return {"generator": self.generator}

    def training_step(self, batch: dict[str, torch.Tensor], ctx) -> dict[str, torch.Tensor]:
        """One D update on (a, b) vs (a, G(a)), then one G update on cGAN + lambda L1 (paper eq. 4)."""
        c = self.config
        b = batch["image"]  # (n, C, H, W) in [-1, 1]
        a = self._batch_input(batch, ctx)  # (n, C', H, W)
        fake = self.generator(a)  # (n, C, H, W)

        real_logits = self.discriminator(torch.cat([a, b], dim=1))  # (n, 1, h, w)
        fake_logits = self.discriminator(torch.cat([a, fake.detach()], dim=1))
        loss_d = c.d_loss_scale * discriminator_loss(c.gan_loss, real_logits, fake_logits)
        ctx.optimize(loss_d, "discriminator")

        loss_gan = generator_loss(c.gan_loss, self.discriminator(torch.cat([a, fake], dim=1)))
        loss_l1 = l1_loss(fake, b)
        loss_g = loss_gan + c.lambda_l1 * loss_l1
        ctx.optimize(loss_g, "generator")
        return {
            "loss_d": loss_d.detach(),
            "loss_g": loss_g.detach(),
            "loss_gan": loss_gan.detach(),
            "l1": loss_l1.detach(),
            "d_real": torch.sigmoid(real_logits.detach()).mean(),
            "d_fake": torch.sigmoid(fake_logits.detach()).mean(),
        }

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def translate(self, a: torch.Tensor) -> torch.Tensor:
        """Inputs a (N, C', H, W) in [-1, 1] -> outputs b (N, C, H, W) in [-1, 1].

        For the masked task the visible pixels are pasted back from the input (only the hole is
        generated), the usual inpainting convention; G itself is trained on the whole image.
        """
        if a.ndim != 4 or a.shape[1] != self.input_channels:
            raise ConfigError(f"pix2pix ({self.config.task}) translates (N, {self.input_channels}, H, W) inputs, "
                              f"got {tuple(a.shape)}")
        a = a.to(self.device)
        b = self.generator(a).clamp(-1, 1)  # (N, C, H, W)
        if self.config.task == "masked":
            hidden = a[:, -1:] > 0  # (N, 1, H, W): the mask channel, +1 where hidden
            b = torch.where(hidden, b, a[:, :-1])
        return b

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, **options: Any) -> torch.Tensor:
        raise ConfigError("pix2pix translates: use genlab translate RUN --input ...")


@torch.no_grad()
def evaluate_pairs(
    method: Pix2Pix,
    images_b: torch.Tensor,
    generator: torch.Generator | None = None,
    images_a: torch.Tensor | None = None,
    batch_size: int = 256,
) -> dict[str, float]:
    """Test PSNR (dB) and SSIM of translate(a) against b, a = make_input(b) (or ``images_a`` for paired data).

    Images are floats in [-1, 1] (uint8 are converted); the method is scored in eval mode (no
    dropout). PSNR and SSIM are genlab's one definition (:mod:`genlab.metrics.image_quality`): the
    mean of per-image PSNRs, each image's MSE floored at 8-bit rounding noise (an exact match, which
    a masked hole on MNIST's black background can give, scores 58.92 dB instead of infinity), and
    SSIM with the 11x11 Gaussian window or its small-image rule. For masked and low-res tasks, the
    input image's own PSNR / SSIM (``psnr_input``, ``ssim_input``) is the do-nothing baseline.
    """
    from genlab.data.imageset import to_model_range
    from genlab.metrics import psnr, ssim

    def as_float(x: torch.Tensor) -> torch.Tensor:
        return to_model_range(x) if x.dtype == torch.uint8 else x.float()

    images_b = as_float(images_b)
    if images_a is None and method.config.task == "paired":
        raise ConfigError("evaluating a model.task=paired run needs the test inputs: pass images_a (the A images)")
    if images_a is not None and len(images_a) != len(images_b):
        raise ConfigError(f"images_a has {len(images_a)} images but images_b has {len(images_b)}")
    was_training = method.training
    method.eval()
    totals: dict[str, float] = {}
    try:
        for start in range(0, len(images_b), batch_size):
            b = images_b[start : start + batch_size].to(method.device)
            a = method.make_input(b, generator) if images_a is None else as_float(images_a[start : start + batch_size]).to(b.device)
            b_hat = method.translate(a)
            scores = {"psnr": psnr(b_hat, b, reduction="none"), "ssim": ssim(b_hat, b, reduction="none")}
            if method.config.task in ("lowres", "masked"):
                baseline = a[:, : b.shape[1]]
                scores["psnr_input"] = psnr(baseline, b, reduction="none")
                scores["ssim_input"] = ssim(baseline, b, reduction="none")
            for name, values in scores.items():
                totals[name] = totals.get(name, 0.0) + float(values.sum())
    finally:
        method.train(was_training)
    return {name: total / len(images_b) for name, total in totals.items()} | {"n": len(images_b)}
