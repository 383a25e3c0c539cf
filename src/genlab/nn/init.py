"""Weight initialisations shared by several networks."""

from __future__ import annotations

from torch import nn

__all__ = ["dcgan_init_"]

_WEIGHTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
_NORMS = (nn.BatchNorm2d, nn.InstanceNorm2d)


def dcgan_init_(module: nn.Module) -> nn.Module:
    """DCGAN initialisation (Radford et al. 2016, sec. 4), in place on ``module`` and every submodule; returns it.

    Conv, transposed-conv and linear weights ~ N(0, 0.02), norm scales ~ N(1, 0.02), biases 0 (also
    pix2pix's, Isola et al. 2017, sec. 3.3). Draws from the global RNG in module order.
    """
    for m in module.modules():
        if isinstance(m, _WEIGHTED):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _NORMS) and m.weight is not None:  # InstanceNorm without affine has no parameters
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return module
