"""Activations built from planted sparse features: x = sum_i a_i * f_i (+ offset), with few a_i nonzero.

An SAE that works should recover the directions f_i as decoder rows; `feature_recovery` measures that.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from saelab.core.config import PYDANTIC, ConfigError
from saelab.synthetic.firing import (
    FiringProfile,
    apply_hierarchy,
    correlation_cholesky,
    correlation_factors,
    firing_probabilities,
    sample_firing,
)


@dataclass
class PlantedFeatures:
    """A dictionary of unit feature directions and how they fire."""

    __pydantic_config__ = PYDANTIC

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
    magnitude: Literal["uniform", "exponential", "constant"] = "uniform"
    """Distribution of active magnitudes: uniform in [min, max]; min + exponential with mean (max - min);
    constant (= max)."""
    firing: FiringProfile = "uniform"
    """How firing probabilities vary across features: uniform, zipfian, linear or random (mean kept)."""
    zipf_exponent: float = 1.0
    """Exponent of the zipfian profile."""
    correlation_rank: int = 0
    """Rank of the correlation between features' firing (0: independent)."""
    correlation_strength: float = 0.5
    """Share of each feature's latent firing variance that is shared through the correlation factors [0, 1)."""
    correlation_matrix: list[list[float]] | None = None
    """A full correlation matrix (n_features x n_features) of the latent Gaussian behind firing, instead of
    low-rank factors."""
    hierarchy: list[dict] = field(default_factory=list)
    """Parent/children groups, e.g. [{parent: 0, children: [1, 2], exclusive: true}]: children fire only with
    their parent, at most one of them when exclusive."""
    orthogonalize: bool = False
    """Exactly orthogonal directions when n_features <= d_in; otherwise spread them to lower the largest
    cosines between them."""
    seed: int = 0
    """Seed of the directions, the offset and the firing profile."""

    def __post_init__(self) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        self.features = feature_dictionary(self.n_features, self.d_in, self.orthogonalize, generator)
        offset = torch.randn(self.d_in, generator=generator)
        self.offset = offset / offset.norm() * self.offset_scale
        self.probabilities = firing_probabilities(
            self.n_features, self.mean_active, self.firing, self.zipf_exponent, self.seed
        )
        self.factors = (
            correlation_factors(self.n_features, self.correlation_rank, self.correlation_strength, self.seed)
            if self.correlation_rank > 0
            else None
        )
        self.cholesky = correlation_cholesky(self.correlation_matrix) if self.correlation_matrix is not None else None
        if self.cholesky is not None and self.cholesky.shape[0] != self.n_features:
            raise ConfigError(
                f"correlation_matrix is {self.cholesky.shape[0]}x{self.cholesky.shape[0]}, "
                f"n_features is {self.n_features}"
            )

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """`n` activation vectors and their true feature coefficients `(n, n_features)`."""
        active = sample_firing(n, self.probabilities, generator, self.factors, self.cholesky)
        if self.hierarchy:
            active = apply_hierarchy(active, self.hierarchy, generator)
        span = self.magnitude_max - self.magnitude_min
        if self.magnitude == "uniform":
            magnitudes = self.magnitude_min + span * torch.rand(n, self.n_features, generator=generator)
        elif self.magnitude == "exponential":
            uniform = torch.rand(n, self.n_features, generator=generator).clamp_min(1e-12)
            magnitudes = self.magnitude_min - span * uniform.log()
        else:
            magnitudes = torch.full((n, self.n_features), self.magnitude_max)
        coefficients = active * magnitudes
        return coefficients @ self.features + self.offset, coefficients


def feature_dictionary(
    n_features: int, d_in: int, orthogonalize: bool, generator: torch.Generator, steps: int = 200
) -> Tensor:
    """Unit feature directions `(n_features, d_in)`: random, or orthogonal (QR) when they fit in d_in, or
    spread apart by gradient steps on the squared cosines when they do not."""
    directions = torch.randn(n_features, d_in, generator=generator)
    directions = directions / directions.norm(dim=1, keepdim=True)
    if not orthogonalize:
        return directions
    if n_features <= d_in:
        q, _ = torch.linalg.qr(directions.T)
        return q.T.contiguous()
    directions.requires_grad_(True)
    optimizer = torch.optim.Adam([directions], lr=0.01)
    mask = ~torch.eye(n_features, dtype=torch.bool)
    for _ in range(steps):
        unit = directions / directions.norm(dim=1, keepdim=True)
        loss = (unit @ unit.T)[mask].pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (directions / directions.norm(dim=1, keepdim=True)).detach()


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
