"""Initialisation helpers."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-6) -> Tensor:
    """The point minimising the summed Euclidean distance to `points (N, d)`, by Weiszfeld's iteration.

    More robust than the mean to the heavy-tailed outliers common in residual streams.
    """
    points = points.double()
    median = points.mean(dim=0)
    for _ in range(max_iter):
        distances = (points - median).norm(dim=1).clamp_min(1e-8)
        weights = 1.0 / distances
        new_median = (weights[:, None] * points).sum(dim=0) / weights.sum()
        shift = (new_median - median).norm()
        median = new_median
        if shift <= tol * median.norm().clamp_min(1.0):
            break
    return median.float()
