"""DiT: DDPM's diffusion with a Diffusion Transformer as the denoiser (Peebles & Xie 2023, SPEC D10).

Everything about the diffusion (noise schedule, eps/x0/v objectives, min-SNR weighting, learned
variance, samplers, classifier-free / classifier / rule guidance, DDIM inversion) is inherited from
:class:`genlab.methods.ddpm.DDPM`; only the network differs. The paper's finding that the
transformer's Gflops, not its inductive biases, drive sample quality is what the DiT_S/B/L/XL
presets let one reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from genlab.errors import ConfigError
from genlab.methods.base import DataInfo
from genlab.methods.ddpm import DDPM, DDPMConfig
from genlab.models.dit import DiT as DiTNetwork
from genlab.models.dit import DiTConfig


@dataclass
class DiTMethodConfig(DDPMConfig):
    """DDPM's diffusion settings plus the transformer in ``dit``.

    The inherited ``unet`` fields are unused (the denoiser is the DiT) and ``patch_size`` must stay 1:
    the DiT cuts its own patches (``dit.patch_size``).
    """

    dit: DiTConfig = field(default_factory=DiTConfig)


def reject_pixel_patches(config: DDPMConfig) -> None:
    """Refuse DDPM's pixel patching (model.patch_size) for a DiT denoiser, which cuts its own patches."""
    if config.patch_size != 1:
        raise ConfigError(f"model.patch_size={config.patch_size}: a DiT cuts its own patches; "
                          "set model.dit.patch_size instead and leave model.patch_size=1")


def make_dit_network(method: DDPM, in_channels: int, out_channels: int, image_size: int) -> DiTNetwork:
    """The DiT denoiser of ``method`` (whose config has a ``dit`` section), for DDPM's network hook."""
    return DiTNetwork(method.config.dit, in_channels=in_channels, out_channels=out_channels, image_size=image_size,
                      num_classes=method.num_classes)


class DiT(DDPM):
    """Diffusion exactly as DDPM, denoised by a DiT (patchify, transformer blocks, unpatchify)."""

    name = "dit"
    Config = DiTMethodConfig
    network_name = "dit"  # the network is ``self.dit``, its EMA "ema_dit"

    def __init__(self, config: DiTMethodConfig, data_info: DataInfo):
        reject_pixel_patches(config)
        super().__init__(config, data_info)

    def _make_network(self, in_channels: int, out_channels: int, image_size: int) -> nn.Module:
        """The DiT for (N, in_channels, image_size, image_size) inputs (twice the channels out with learn_sigma)."""
        return make_dit_network(self, in_channels, out_channels, image_size)
