"""Models that travel: genlab runs to and from other libraries' formats (SPEC P8).

- :mod:`genlab.interop.diffusers`: pixel DDPM runs <-> diffusers ``UNet2DModel`` + scheduler folders
  (``genlab export RUN --format diffusers OUT``, ``genlab import diffusers PATH``).

Nothing here imports the other library: the files are written and read directly (JSON configs and
safetensors), so exporting needs no extra package and importing never unpickles anything.
"""

from genlab.interop.diffusers import export_diffusers, import_diffusers

__all__ = ["export_diffusers", "import_diffusers"]
