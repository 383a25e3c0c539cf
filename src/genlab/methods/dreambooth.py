"""DreamBooth (Ruiz et al. 2023, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for
Subject-Driven Generation"; SPEC A5).

The denoiser of a text-conditioned diffusion run (ddpm, dit or ldm with a ``model.text`` section)
is fine-tuned on a few images of a subject, each prompted with a rare identifier and the subject's
class ("a sks digit"). Alone, this overfits and lets the class word drift towards the subject
("language drift"); the class-specific prior-preservation loss (the paper's eq. 2) keeps the class:

    L = E || eps - eps_theta(x_t, t, c("a sks digit")) ||^2 + lambda E || eps' - eps_theta(x'_t', t', c("a digit")) ||^2,

where x' are ``num_class_images`` images the base itself generated for the class prompt before any
update (with a list of class prompts, image i from prompt i mod P and trained with it: the prior of a class
the base knows under several names, e.g. every "the digit K") (stored in the run's checkpoint, so a resumed run keeps them). ``prior_preservation: false``
(or ``prior_weight`` lambda = 0) is plain fine-tuning on the subject.

The base run is the parent (role ``base``, ARCHITECTURE: "A child run"); unlike other children its
denoiser (and, with ``train_text_encoder``, a trainable text encoder) is what trains; the run samples
as its base does (every sampler, prompt and guidance option).

    genlab train dreambooth --base runs/t2i --data mnist-captions data.classes=[7] data.limit=10
    genlab sample runs/dreambooth-... --prompt "a sks digit" --out subject.png
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from genlab.errors import ConfigError
from genlab.methods.base import DataInfo
from genlab.methods.text_conditioning import is_trainable
from genlab.methods.textual_inversion import Personalisation
from genlab.noise import ImageNoise
from genlab.ranges import NonNegativeFloat, PositiveFloat, PositiveInt

CLASS_IMAGE_BATCH = 50  # class images generated per sampling batch


@dataclass
class DreamBoothConfig:
    """The base run, the subject's and the class's prompts, and the prior-preservation loss."""

    base: str | None = None  # run folder of a text-conditioned ddpm / dit / ldm run (required; --base RUN)
    instance_prompt: str = "a sks digit"  # the rare identifier and the class noun (the paper's "a [V] dog")
    # The class alone: what the prior-preservation images are generated from; a list spreads them over its prompts.
    class_prompt: str | tuple[str, ...] = "a digit"
    prior_preservation: bool = True
    prior_weight: NonNegativeFloat = 1.0  # lambda (the paper uses 1)
    num_class_images: PositiveInt = 100  # class images the base generates before the first update
    class_guidance_scale: PositiveFloat | None = None  # CFG when generating them (None: the conditional model)
    class_sample_steps: PositiveInt | None = None  # sampler steps for them (None: the base's model.sample_steps)
    class_seed: int = 0  # seed of the class images
    train_text_encoder: bool = False  # also fine-tune a trainable (tiny) text encoder, as the paper's Imagen setup


class DreamBooth(Personalisation):
    """Fine-tuning of a text-conditioned diffusion run on a subject, with the class-prior preservation loss."""

    name = "dreambooth"
    Config = DreamBoothConfig

    def __init__(self, config: DreamBoothConfig, data_info: DataInfo, parents: Mapping[str, nn.Module] | None = None):
        super().__init__(config, data_info, parents)
        encoder = self.text_encoder
        if config.train_text_encoder and not any(True for _ in encoder.parameters()):
            raise ConfigError(f"model.train_text_encoder=true, but the base's {type(encoder).__name__} has no weights to train")
        # The parent mechanism froze the base; DreamBooth trains its denoiser (and optionally its text encoder).
        self.networks = {self.base.network_name: self.base.backbone}
        if config.train_text_encoder:
            self.networks["text_encoder"] = encoder
        for network in self.networks.values():
            network.requires_grad_(True)
        n = config.num_class_images if config.prior_preservation else 0
        # The class images x' (made at the first step, then saved with the checkpoints): (n, C, H, W) in [-1, 1].
        self.register_buffer("class_images", torch.zeros(n, data_info.channels, data_info.image_size, data_info.image_size))
        self.register_buffer("class_images_made", torch.tensor(n == 0))

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"main": [p for network in self.networks.values() for p in network.parameters()]}

    def ema_targets(self) -> dict[str, nn.Module]:
        return {f"base_{name}": network for name, network in self.networks.items()}

    @torch.no_grad()
    def class_prompts(self, indices: list[int]) -> list[str]:
        """The class prompt of each class image: image i's is prompt i mod P of the list (or the one prompt)."""
        prompts = self.config.class_prompt
        prompts = (prompts,) if isinstance(prompts, str) else prompts
        return [prompts[i % len(prompts)] for i in indices]

    def make_class_images(self) -> torch.Tensor:
        """x': ``num_class_images`` samples of the (not yet updated) base for the class prompts, seeded by class_seed."""
        c = self.config
        n = len(self.class_images)
        options = {"steps": c.class_sample_steps, "guidance_scale": c.class_guidance_scale}
        chunks = []
        for start in range(0, n, CLASS_IMAGE_BATCH):  # image i's noise from its own generator, whatever the batch
            m = min(CLASS_IMAGE_BATCH, n - start)
            noise = ImageNoise.for_indices(c.class_seed, start, start + m, self.device)
            chunks.append(self.base.sample(m, generator=noise, prompts=self.class_prompts(range(start, start + m)),
                                           **options))
        self.class_images.copy_(torch.cat(chunks))
        self.class_images_made.fill_(True)
        return self.class_images

    def encode(self, prompts: list[str]):
        """Encodings of prompts, with gradients to the text encoder when it trains."""
        encoder = self.base.text_encoder
        if self.config.train_text_encoder and is_trainable(encoder):
            return encoder.encode(prompts)  # the frozen-encoder cache is bypassed while gradients are on
        return self.base.encode_prompts(prompts)

    def prior_loss_terms(self, x: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(subject loss, prior loss or None) of one batch of subject images x, the draws in this order:
        t, eps (subject), indices of class images, t', eps' (class)."""
        c, base = self.config, self.base
        x0 = base._diffused(x)  # (n, C, H, W)
        t = ctx.randint(0, base.config.num_timesteps)  # (n,)
        noise = ctx.randn(*x0.shape[1:])  # (n, C, H, W)
        subject, _ = base.loss(x0, t, noise, self.encode([c.instance_prompt] * len(x0)))
        if not c.prior_preservation:
            return subject, None
        pick = ctx.randint(0, len(self.class_images))  # (n,) which class images join this batch
        x0_class = base._diffused(self.class_images[pick])  # (n, C, H, W)
        t_class = ctx.randint(0, base.config.num_timesteps)
        noise_class = ctx.randn(*x0_class.shape[1:])
        prior, _ = base.loss(x0_class, t_class, noise_class, self.encode(self.class_prompts(pick.tolist())))
        return subject, prior

    def training_step(self, batch: dict[str, torch.Tensor], ctx) -> dict[str, torch.Tensor]:
        """L = subject loss + prior_weight * prior loss (Ruiz et al. eq. 2); the class images come first."""
        if not bool(self.class_images_made):
            self.make_class_images()
        subject, prior = self.prior_loss_terms(batch["image"], ctx)
        loss = subject if prior is None else subject + self.config.prior_weight * prior
        ctx.optimize(loss)
        logs = {"loss": loss.detach(), "subject_loss": subject.detach()}
        if prior is not None:
            logs["prior_loss"] = prior.detach()
        return logs
