"""Reconstruction and sparsity metrics on batches of activations."""

from __future__ import annotations

import torch
from torch import Tensor


def explained_variance(target: Tensor, prediction: Tensor) -> float:
    """1 - (summed squared error) / (summed squared deviation of the target from its batch mean)."""
    target, prediction = target.reshape(-1, target.shape[-1]), prediction.reshape(-1, target.shape[-1])
    residual = (target - prediction).double().pow(2).sum()
    total = (target - target.mean(dim=0)).double().pow(2).sum()
    return float(1.0 - residual / total.clamp_min(1e-30))


def l0(latents: Tensor) -> float:
    """Mean number of nonzero latents per token."""
    return float((latents != 0).sum(dim=-1).float().mean())


@torch.no_grad()
def log_feature_density(fire_counts: Tensor, n_tokens: int) -> Tensor:
    """log10 of each latent's firing frequency, as SAELens stores it in sparsity.safetensors."""
    return torch.log10(fire_counts.double() / max(n_tokens, 1) + 1e-10).float()
