"""Control adherence: how well generated images follow the control map they were given (SPEC A2, A3).

The control map of each sample (:func:`genlab.data.controls.control_map`, the same function the
control run was trained on) is compared with the map that was asked for:

- ``edges`` and ``scribble``: F1 of the drawn pixels (maps > 0) with a tolerance of ``tolerance``
  pixels, as the boundary F-measure of edge benchmarks (Martin et al. 2004) in its simple form: a
  predicted pixel is correct when an asked-for pixel lies within the (2 tol + 1)^2 square around it
  (precision), an asked-for pixel is found when a predicted one lies within the same distance
  (recall); F1 = 2 P R / (P + R). The default is 0, the exact pixel F1: at 28 px the benchmarks'
  tolerance (0.75 % of the diagonal) is under a third of a pixel, and with 1 px the edges of two
  unrelated MNIST test digits already score 0.65 (exact: 0.24).
- ``mask`` and ``thickness``: intersection over union of the ink masks (maps > -1).

Scores are per image, (N,); two empty maps agree perfectly (1), one empty map scores 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from genlab.data.controls import control_map, dilate
from genlab.errors import ConfigError


def edge_f1(predicted: Tensor, target: Tensor, tolerance: int = 0) -> Tensor:
    """Per-image F1 (N,) of bool maps (N, 1, H, W), a pixel matching within ``tolerance`` px (chessboard)."""
    if predicted.shape != target.shape:
        raise ConfigError(f"edge maps of shapes {tuple(predicted.shape)} and {tuple(target.shape)}: they must match")
    predicted, target = predicted.bool(), target.bool()
    hits_p = (predicted & dilate(target, tolerance)).flatten(1).sum(1).double()  # predicted pixels near the target
    hits_t = (target & dilate(predicted, tolerance)).flatten(1).sum(1).double()  # target pixels found
    n_p, n_t = predicted.flatten(1).sum(1).double(), target.flatten(1).sum(1).double()
    precision = torch.where(n_p > 0, hits_p / n_p.clamp(min=1), torch.zeros_like(n_p))
    recall = torch.where(n_t > 0, hits_t / n_t.clamp(min=1), torch.zeros_like(n_t))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(precision))
    return torch.where((n_p == 0) & (n_t == 0), torch.ones_like(f1), f1)


def mask_iou(predicted: Tensor, target: Tensor) -> Tensor:
    """Per-image intersection over union (N,) of bool maps (N, 1, H, W); 1 when both are empty."""
    if predicted.shape != target.shape:
        raise ConfigError(f"masks of shapes {tuple(predicted.shape)} and {tuple(target.shape)}: they must match")
    predicted, target = predicted.bool(), target.bool()
    inter = (predicted & target).flatten(1).sum(1).double()
    union = (predicted | target).flatten(1).sum(1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def adherence(kind: str, samples: Tensor, control: Tensor, tolerance: int = 0) -> Tensor:
    """Per-image adherence (N,) of samples (N, C, H, W) in [-1, 1] to the control maps (N, 1, H, W) of ``kind``."""
    made = control_map(kind, samples)  # (N, 1, H, W)
    if kind in ("edges", "scribble"):
        return edge_f1(made > 0, control > 0, tolerance)
    return mask_iou(made > -1, control > -1)


def adherence_name(kind: str, tolerance: int = 0) -> str:
    """What :func:`adherence` measures for ``kind``, for tables and logs."""
    return f"{kind} F1 (tolerance {tolerance} px)" if kind in ("edges", "scribble") else f"{kind} IoU of ink masks"
