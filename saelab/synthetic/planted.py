"""Activations built from planted sparse features: x = sum_i a_i * f_i (+ offset), with few a_i nonzero.

An SAE that works should recover the directions f_i as decoder rows; `feature_recovery` measures that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor


@dataclass
class PlantedFeatures:
    """A dictionary of unit feature directions and how they fire."""

    d_in: int = 64
    """Width of the generated activations."""
    n_features: int = 128
    """Number of planted feature directions."""
    mean_active: float = 4.0
    """Expected number of active features per vector (each fires independently)."""
    magnitude_min: float = 0.5
    """Smallest magnitude of an active feature."""
    magnitude_max: float = 1.5
    """Largest magnitude of an active feature."""
    offset_scale: float = 0.0
    """Norm of a constant offset added to every vector (what b_dec should learn)."""
    seed: int = 0
    """Seed of the directions and the offset."""

    def __post_init__(self) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        directions = torch.randn(self.n_features, self.d_in, generator=generator)
        self.features = directions / directions.norm(dim=1, keepdim=True)
        offset = torch.randn(self.d_in, generator=generator)
        self.offset = offset / offset.norm() * self.offset_scale
        self.firing_probability = min(1.0, self.mean_active / self.n_features)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """`n` activation vectors and their true feature coefficients `(n, n_features)`."""
        active = torch.rand(n, self.n_features, generator=generator) < self.firing_probability
        span = self.magnitude_max - self.magnitude_min
        magnitudes = self.magnitude_min + span * torch.rand(n, self.n_features, generator=generator)
        coefficients = active * magnitudes
        return coefficients @ self.features + self.offset, coefficients


class SyntheticSource:
    """An endless, resumable stream of batches from planted features; batch i depends only on (seed, i)."""

    def __init__(self, features: PlantedFeatures, batch_size: int, seed: int = 0):
        self.features, self.batch_size, self.seed = features, batch_size, seed
        self.index = 0

    def __iter__(self) -> Iterator[Tensor]:
        while True:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.index)
            self.index += 1
            yield self.features.sample(self.batch_size, generator)[0]

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])


def feature_recovery(decoder: Tensor, true_features: Tensor) -> float:
    """Mean over true features of the best cosine similarity with any decoder row."""
    decoder = decoder.detach()
    learned = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
    truth = true_features / true_features.norm(dim=1, keepdim=True)
    return float((truth @ learned.T.to(truth)).max(dim=1).values.mean())
