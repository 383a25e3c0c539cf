"""DiT: DDPM's diffusion with a Diffusion Transformer as the denoiser (Peebles & Xie 2023, SPEC D10).

Everything about the diffusion (noise schedule, eps/x0/v objectives, min-SNR weighting, learned
variance, samplers, classifier-free / classifier / rule guidance, DDIM inversion) is DDPM's, and so
is the config: a dit run is a ddpm run whose ``model.network`` is ``dit``, configured in
``model.dit`` (``model.unet.*`` keys are refused). The paper's finding that the transformer's
Gflops, not its inductive biases, drive sample quality is what the DiT_S/B/L/XL presets let one
reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from genlab.methods.ddpm import DDPM, DDPMConfig


@dataclass
class DiTMethodConfig(DDPMConfig):
    """DDPM's config with the denoiser fixed to the transformer in ``dit``."""

    network: Literal["dit"] = "dit"


class DiT(DDPM):
    """Diffusion exactly as DDPM, denoised by a DiT (patchify, transformer blocks, unpatchify)."""

    name = "dit"
    Config = DiTMethodConfig
