"""The FID Inception network: TensorFlow's 2015-12-05 Inception-v3 graph, rebuilt in PyTorch.

FID (Heusel et al. 2017), KID and the Inception Score are defined on this particular network, the
``inception-2015-12-05`` graph used by the reference TensorFlow code (TTUR, improved-gan). It differs
from torchvision's Inception-v3 in three places that change the numbers, so it is rebuilt here:

- 1008 output classes (ImageNet's 1000 plus 8 unused ones), ``fc`` on the 2048-d pool features;
- the average pools inside the A, C and E blocks ignore the zero padding (TensorFlow's
  ``AvgPool(padding="SAME")`` divides by the number of real pixels: ``count_include_pad=False``);
- the last E block (``Mixed_7c``) pools its pool branch with a 3x3 *max* pool, not an average pool.

The graph also carries its own preprocessing, which is part of the network here: it takes [0, 255]
pixels of any size, resizes them to 299x299 with TensorFlow 1's ``ResizeBilinear(align_corners=False)``
(see :func:`resize_bilinear_tf1`), then maps them to [-1, 1) by ``(p - 128) / 128``.

Module and parameter names follow torchvision's ``Inception3`` (``Conv2d_1a_3x3.conv.weight``,
``Mixed_5b.branch_pool.bn.running_var``, ``fc.weight``, ...), so the state dict of pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` (the TF weights ported to PyTorch) loads with ``strict=True``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from genlab.errors import ConfigError, DataError

__all__ = [
    "FID_WEIGHTS_URL",
    "FID_WEIGHTS_FILENAME",
    "FID_WEIGHTS_SHA256_PREFIX",
    "WEIGHTS_ENV_VAR",
    "INPUT_SIZE",
    "FEATURE_DIM",
    "NUM_CLASSES",
    "FIDInceptionV3",
    "resize_bilinear_tf1",
    "fid_inception_weights_path",
    "load_fid_inception",
]

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
# torch.hub's naming convention: the suffix of the file name is the start of the file's sha256.
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
WEIGHTS_ENV_VAR = "GENLAB_INCEPTION_WEIGHTS"

INPUT_SIZE = 299  # the graph's resize target
FEATURE_DIM = 2048  # pool_3 features, the FID feature space
NUM_CLASSES = 1008  # 1000 ImageNet classes + 8 unused outputs of the 2015 graph


def resize_bilinear_tf1(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize exactly as TensorFlow 1's ``ResizeBilinear(align_corners=False)``.

    TF1 maps output pixel ``i`` to input coordinate ``i * in_size / out_size`` (no half-pixel
    offset, unlike ``F.interpolate(align_corners=False)``), interpolates between ``floor`` and
    ``floor + 1`` and clamps the upper neighbour to the last pixel. This is the resize inside the FID
    graph (``tensorflow/core/kernels/resize_bilinear_op.cc``, ``LegacyScaler``), so matching it
    matters for small images (28 or 32 px upsampled to 299).
    """
    n, c, in_h, in_w = x.shape  # (N, C, H, W)
    out_h, out_w = size

    def taps(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # TF computes the scale and the source coordinate in float32.
        scale = torch.tensor(in_size / out_size, dtype=torch.float32)
        source = torch.arange(out_size, dtype=torch.float32) * scale  # (out,)
        lower = source.floor().long()  # (out,)
        upper = (lower + 1).clamp(max=in_size - 1)  # (out,)
        lerp = (source - lower.float()).to(device=x.device, dtype=x.dtype)  # (out,)
        return lower.to(x.device), upper.to(x.device), lerp

    y0, y1, y_lerp = taps(in_h, out_h)
    x0, x1, x_lerp = taps(in_w, out_w)
    top, bottom = x.index_select(2, y0), x.index_select(2, y1)  # (N, C, out_h, W) each
    top_left, top_right = top.index_select(3, x0), top.index_select(3, x1)  # (N, C, out_h, out_w)
    bottom_left, bottom_right = bottom.index_select(3, x0), bottom.index_select(3, x1)
    top = top_left + (top_right - top_left) * x_lerp  # (N, C, out_h, out_w)
    bottom = bottom_left + (bottom_right - bottom_left) * x_lerp
    return top + (bottom - top) * y_lerp[:, None]  # (N, C, out_h, out_w)


class BasicConv2d(nn.Module):
    """Convolution without bias, BatchNorm (TF's epsilon 0.001), ReLU: the graph's unit layer."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 "SAME" average pool that averages only real pixels, as TensorFlow does."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b-d): 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)  # (N, 64, 35, 35)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))  # (N, 64, 35, 35)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))  # (N, 96, 35, 35)
        branch_pool = self.branch_pool(_tf_avg_pool(x))  # (N, pool_features, 35, 35)
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], dim=1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction block (Mixed_6a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3(x)  # (N, 384, 17, 17)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))  # (N, 96, 17, 17)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, C_in, 17, 17)
        return torch.cat([branch3x3, branch3x3dbl, branch_pool], dim=1)


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b-e) with factorised 7x7 convolutions (1x7 then 7x1)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)  # (N, 192, 17, 17)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))  # (N, 192, 17, 17)
        branch7x7dbl = self.branch7x7dbl_1(x)
        branch7x7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(branch7x7dbl))
        branch7x7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(branch7x7dbl))  # (N, 192, 17, 17)
        branch_pool = self.branch_pool(_tf_avg_pool(x))  # (N, 192, 17, 17)
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], dim=1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction block (Mixed_7a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))  # (N, 320, 8, 8)
        branch7x7x3 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(branch7x7x3))  # (N, 192, 8, 8)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, C_in, 8, 8)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], dim=1)


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b, Mixed_7c) with split 1x3 / 3x1 branches.

    ``pool="max"`` reproduces the 2015 graph's last block (Mixed_7c), whose pool branch is a 3x3 max
    pool; every other pool branch in the graph is a padding-excluding average pool.
    """

    def __init__(self, in_channels: int, pool: Literal["avg", "max"] = "avg"):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)  # (N, 320, 8, 8)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], dim=1)  # (N, 768, 8, 8)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat(
            [self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], dim=1
        )  # (N, 768, 8, 8)
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _tf_avg_pool(x)
        branch_pool = self.branch_pool(pooled)  # (N, 192, 8, 8)
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], dim=1)  # (N, 2048, 8, 8)


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the TF 2015-12-05 graph: [-1, 1] images -> 2048-d pool features, 1008 logits.

    ``forward(x)`` returns the logits ``fc(features(x))``; ``features(x)`` returns the pool_3
    features used by FID and KID. ``x`` is (N, 1 or 3, H, W) in [-1, 1], any H and W: the network
    resizes to 299x299 itself (:meth:`preprocess`).
    """

    def __init__(self, input_size: int = INPUT_SIZE):
        super().__init__()
        # The graph resizes to 299; other sizes (>= 75) only serve fast tests and give non-standard numbers.
        if input_size < 75:
            raise ConfigError(f"FID Inception input_size must be >= 75 (the standard is 299), got {input_size}")
        self.input_size = input_size
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """The graph's own input pipeline: [-1, 1] images of any size -> (N, 3, 299, 299).

        The TF graph takes pixels p in [0, 255], resizes them (TF1 bilinear) and feeds
        ``(p - 128) / 128`` to the first convolution. A [-1, 1] image x is the pixel
        ``p = (x + 1) * 127.5``, so the network sees ``x * 255/256 - 1/256`` (resized).
        Grey images (1 channel) are repeated to 3 channels, as RGB conversion of a grey image does.
        """
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise DataError(f"FID Inception expects images (N, 1 or 3, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # (N, 3, H, W)
        pixels = (x + 1) * 127.5  # (N, 3, H, W) in [0, 255]
        size = (self.input_size, self.input_size)
        if pixels.shape[-2:] != size:
            pixels = resize_bilinear_tf1(pixels, size)  # (N, 3, 299, 299)
        return (pixels - 128) / 128

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """pool_3 features (N, 2048) of [-1, 1] images (N, 1 or 3, H, W)."""
        x = self.preprocess(x)  # (N, 3, 299, 299)
        x = self.Conv2d_1a_3x3(x)  # (N, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)  # (N, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)  # (N, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5b(x)  # (N, 256, 35, 35)
        x = self.Mixed_5c(x)  # (N, 288, 35, 35)
        x = self.Mixed_5d(x)  # (N, 288, 35, 35)
        x = self.Mixed_6a(x)  # (N, 768, 17, 17)
        x = self.Mixed_6b(x)  # (N, 768, 17, 17)
        x = self.Mixed_6c(x)  # (N, 768, 17, 17)
        x = self.Mixed_6d(x)  # (N, 768, 17, 17)
        x = self.Mixed_6e(x)  # (N, 768, 17, 17)
        x = self.Mixed_7a(x)  # (N, 1280, 8, 8)
        x = self.Mixed_7b(x)  # (N, 2048, 8, 8)
        x = self.Mixed_7c(x)  # (N, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (N, 2048): global average pool ("pool_3")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 1008) of [-1, 1] images (N, 1 or 3, H, W)."""
        return self.fc(self.features(x))  # (N, 1008)


def _hub_weights_path() -> Path:
    """Where torch.hub keeps downloaded weights (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILENAME


def fid_inception_weights_path(path: str | os.PathLike | None = None) -> Path:
    """Locate the FID Inception weights: ``path``, else ``$GENLAB_INCEPTION_WEIGHTS``, else the torch.hub cache.

    When neither is given and the cache is empty, downloads pytorch-fid's release file into the
    cache; a failed download (e.g. offline) raises a one-line :class:`DataError` saying what to
    download, from where, and where to put it.
    """
    how_to_fix = f"download {FID_WEIGHTS_URL} and set {WEIGHTS_ENV_VAR} to its path, or put it at {_hub_weights_path()}"
    if path is None:
        path = os.environ.get(WEIGHTS_ENV_VAR) or None
        source = f"${WEIGHTS_ENV_VAR}"
    else:
        source = "the given path"
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise DataError(f"FID Inception weights not found at {path} ({source}): {how_to_fix}")
        return path
    cached = _hub_weights_path()
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(cached), hash_prefix=FID_WEIGHTS_SHA256_PREFIX)
    except Exception as error:  # offline, proxy, HTTP error, bad hash: all end the same way for the user
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise DataError(f"could not download the FID Inception weights ({reason}): {how_to_fix}") from None
    return cached


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or of a ``.pth`` state dict (``torch.load(weights_only=True)``)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise DataError(f"cannot read FID Inception weights {path} ({reason}); re-download {FID_WEIGHTS_URL}") from None
    if not isinstance(state, dict):
        raise DataError(f"{path} holds a {type(state).__name__}, not a state dict; re-download {FID_WEIGHTS_URL}")
    return state


def load_fid_inception(path: str | os.PathLike | None = None) -> FIDInceptionV3:
    """The FID Inception network with the TF 2015-12-05 weights, frozen, in eval mode.

    Weights come from ``path``, else ``$GENLAB_INCEPTION_WEIGHTS``, else pytorch-fid's release file in
    the torch.hub cache (downloaded when missing); see :func:`fid_inception_weights_path`.
    """
    path = fid_inception_weights_path(path)
    state = _read_state_dict(path)
    with torch.device("meta"):  # no random initialisation: every tensor comes from the file
        model = FIDInceptionV3()
    # Some exports of the weights carry BatchNorm's ``num_batches_tracked`` counters and some don't;
    # they don't affect eval-mode outputs, so fill the missing ones to keep the load strict otherwise.
    for key in model.state_dict():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError:
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        shapes = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
        detail = f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shapes {shapes[:3]}"
        raise DataError(
            f"{path} is not the FID Inception state dict ({detail}); use {FID_WEIGHTS_URL}"
        ) from None
    model.requires_grad_(False)
    return model.eval()
