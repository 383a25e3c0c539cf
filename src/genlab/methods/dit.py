"""DiT: DDPM's diffusion with a Diffusion Transformer as the denoiser (Peebles & Xie 2023, SPEC D10).

Everything about the diffusion (noise schedule, eps/x0/v objectives, min-SNR weighting, learned
variance, samplers, classifier-free / classifier / rule guidance, DDIM inversion) is inherited from
:class:`genlab.methods.ddpm.DDPM`; only the network differs. The paper's finding that the
transformer's Gflops, not its inductive biases, drive sample quality is what the DiT_S/B/L/XL
presets let one reproduce.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from genlab.errors import ConfigError
from genlab.methods.base import DataInfo
from genlab.methods.ddpm import DDPM, DDPMConfig
from genlab.models.dit import DiT as DiTNetwork
from genlab.models.dit import DiTConfig
from genlab.models.unet import UNetConfig

# The smallest U-Net DDPM.__init__ can build; it is discarded at once (DDPM has no network-builder
# hook yet: see make_dit_denoiser).
_PLACEHOLDER_UNET = UNetConfig(base_channels=1, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(),
                               num_heads=1, dropout=0.0, norm_groups=1, mid_attention=False)


@dataclass
class DiTMethodConfig(DDPMConfig):
    """DDPM's diffusion settings plus the transformer in ``dit``.

    The inherited ``unet`` fields are unused (the denoiser is the DiT) and ``patch_size`` must stay 1:
    the DiT cuts its own patches (``dit.patch_size``).
    """

    dit: DiTConfig = field(default_factory=DiTConfig)


def placeholder_unet_config(config: DDPMConfig) -> DDPMConfig:
    """``config`` with the tiny throw-away U-Net, for DDPM.__init__ before the DiT replaces it."""
    return dataclasses.replace(config, unet=_PLACEHOLDER_UNET, patch_size=1)


def make_dit_denoiser(method: DDPM, dit_config: DiTConfig, channels: int, image_size: int) -> DiTNetwork:
    """Drop the U-Net DDPM.__init__ built and return the DiT denoiser for ``channels`` x ``image_size``^2 inputs.

    The output has twice the channels with learn_sigma (the prediction, then improved DDPM's v).
    """
    del method.unet
    outputs = 2 if method.config.learn_sigma else 1
    return DiTNetwork(dit_config, in_channels=channels, out_channels=outputs * channels, image_size=image_size,
                      num_classes=method.num_classes)


class DiT(DDPM):
    """Diffusion exactly as DDPM, denoised by a DiT (patchify, transformer blocks, unpatchify)."""

    name = "dit"
    Config = DiTMethodConfig

    def __init__(self, config: DiTMethodConfig, data_info: DataInfo):
        if config.patch_size != 1:
            raise ConfigError(f"model.patch_size={config.patch_size}: a DiT cuts its own patches; "
                              "set model.dit.patch_size instead and leave model.patch_size=1")
        super().__init__(placeholder_unet_config(config), data_info)
        self.config = config  # the user's config (its unet section is unused)
        self.dit = make_dit_denoiser(self, config.dit, data_info.channels, data_info.image_size)

    def network(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The DiT's output: (N, C, H, W) -> (N, C, H, W), or (N, 2C, H, W) with learn_sigma."""
        return self.dit(x_t, t, y)

    def ema_targets(self) -> dict[str, nn.Module]:
        return {"dit": self.dit}
