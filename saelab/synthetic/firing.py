"""How planted features fire: per-feature probabilities, correlated firing, hierarchies."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from saelab.core.config import ConfigError

FiringProfile = Literal["uniform", "zipfian", "linear", "random"]


def firing_probabilities(
    n_features: int, mean_active: float, profile: FiringProfile = "uniform", zipf_exponent: float = 1.0, seed: int = 0
) -> Tensor:
    """Per-feature firing probabilities whose sum is `mean_active` (capped at 1 each).

    uniform: all equal; zipfian: proportional to 1 / rank^exponent; linear: falling linearly from the first
    feature to the last; random: uniform random weights.
    """
    ranks = torch.arange(1, n_features + 1, dtype=torch.float64)
    if profile == "uniform":
        weights = torch.ones(n_features, dtype=torch.float64)
    elif profile == "zipfian":
        weights = ranks.pow(-zipf_exponent)
    elif profile == "linear":
        weights = (n_features + 1 - ranks) / n_features
    elif profile == "random":
        weights = torch.rand(n_features, generator=torch.Generator().manual_seed(seed + 17), dtype=torch.float64)
    else:
        raise ConfigError(f"unknown firing profile '{profile}' (uniform, zipfian, linear, random)")
    probabilities = weights / weights.sum() * mean_active
    # Cap at 1 and spread the excess over the others, so the mean stays as asked where possible.
    for _ in range(n_features):
        over = probabilities > 1
        if not over.any():
            break
        excess = float((probabilities[over] - 1).sum())
        probabilities[over] = 1.0
        room = ~over & (probabilities < 1)
        if not room.any():
            break
        probabilities[room] += excess * probabilities[room] / probabilities[room].sum()
    return probabilities.float()


def correlation_factors(n_features: int, rank: int, strength: float, seed: int = 0) -> Tensor:
    """Low-rank factors `(n_features, rank)` of a latent Gaussian whose correlation matrix is F F^T + diagonal:
    each row has norm sqrt(strength) in [0, 1), so features sharing a factor direction fire together."""
    if not 0 <= strength < 1:
        raise ConfigError(f"correlation strength must be in [0, 1), got {strength}")
    factors = torch.randn(n_features, rank, generator=torch.Generator().manual_seed(seed + 29))
    return factors / factors.norm(dim=1, keepdim=True) * math.sqrt(strength)


def correlation_cholesky(matrix: Sequence[Sequence[float]]) -> Tensor:
    """Cholesky factor of a full correlation matrix of the latent Gaussian (unit diagonal, positive definite)."""
    corr = torch.as_tensor(matrix, dtype=torch.float64)
    if corr.dim() != 2 or corr.shape[0] != corr.shape[1] or not torch.allclose(corr, corr.T):
        raise ConfigError("correlation_matrix must be a symmetric square matrix")
    if not torch.allclose(corr.diagonal(), torch.ones(corr.shape[0], dtype=torch.float64)):
        raise ConfigError("correlation_matrix must have ones on its diagonal")
    factor, info = torch.linalg.cholesky_ex(corr)
    if int(info) != 0:
        raise ConfigError("correlation_matrix must be positive definite")
    return factor.float()


def sample_firing(
    n: int,
    probabilities: Tensor,
    generator: torch.Generator,
    factors: Tensor | None = None,
    cholesky: Tensor | None = None,
) -> Tensor:
    """Boolean firing `(n, n_features)` with the given marginal probabilities. Correlated firing goes through a
    Gaussian copula, which keeps the marginals exact: z ~ N(0, C) with C = F F^T + diag(1 - |F_i|^2) for
    low-rank `factors`, or C = L L^T for a full matrix's `cholesky` factor; feature i fires when
    z_i < Phi^-1(p_i)."""
    n_features = probabilities.shape[0]
    if factors is None and cholesky is None:
        return torch.rand(n, n_features, generator=generator) < probabilities
    if cholesky is not None:
        z = torch.randn(n, n_features, generator=generator) @ cholesky.T
    else:
        assert factors is not None
        noise_scale = (1 - factors.pow(2).sum(dim=1)).clamp_min(0).sqrt()
        shared = torch.randn(n, factors.shape[1], generator=generator) @ factors.T
        z = shared + noise_scale * torch.randn(n, n_features, generator=generator)
    return z < torch.special.ndtri(probabilities.double().clamp(1e-12, 1 - 1e-12)).float()


def apply_hierarchy(active: Tensor, groups: Sequence[dict], generator: torch.Generator) -> Tensor:
    """Children fire only where their parent fires; within an `exclusive` group at most one child fires
    (a random one of those that would have). Groups: {"parent": i, "children": [j, ...], "exclusive": bool},
    applied in order, so list parents before the groups of their children for deeper trees."""
    active = active.clone()
    for group in groups:
        parent, children = int(group["parent"]), torch.as_tensor(group["children"], dtype=torch.long)
        active[:, children] &= active[:, parent : parent + 1]
        if group.get("exclusive", False):
            sub = active[:, children]
            scores = torch.rand(sub.shape, generator=generator).masked_fill(~sub, -1.0)
            winner = scores.argmax(dim=1, keepdim=True)
            keep = torch.zeros_like(sub).scatter_(1, winner, True) & sub
            active[:, children] = keep
    return active
