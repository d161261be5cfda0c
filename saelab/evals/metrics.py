"""Reconstruction, sparsity and geometry metrics on batches of activations (conventions as in SAELens)."""

from __future__ import annotations

import torch
from torch import Tensor


def _rows(*tensors: Tensor) -> list[Tensor]:
    return [t.reshape(-1, t.shape[-1]) for t in tensors]


def explained_variance(target: Tensor, prediction: Tensor) -> float:
    """1 - (summed squared error) / (summed squared deviation of the target from its batch mean)."""
    target, prediction = _rows(target, prediction)
    residual = (target - prediction).double().pow(2).sum()
    total = (target - target.mean(dim=0)).double().pow(2).sum()
    return float(1.0 - residual / total.clamp_min(1e-30))


def mse(target: Tensor, prediction: Tensor) -> float:
    """Mean over tokens and dimensions of the squared error."""
    return float((target - prediction).double().pow(2).mean())


def cosine_similarity(target: Tensor, prediction: Tensor) -> float:
    """Mean over tokens of the cosine between input and reconstruction."""
    target, prediction = _rows(target, prediction)
    return float(torch.nn.functional.cosine_similarity(target.double(), prediction.double(), dim=-1).mean())


def l2_norm_ratio(target: Tensor, prediction: Tensor) -> float:
    """Mean over tokens of ||x_hat|| / ||x|| (inputs with a norm below 1e-4 count as 1)."""
    target, prediction = _rows(target, prediction)
    norm_in = target.double().norm(dim=-1)
    norm_in = torch.where(norm_in.abs() < 1e-4, torch.ones_like(norm_in), norm_in)
    return float((prediction.double().norm(dim=-1) / norm_in).mean())


def relative_reconstruction_bias(target: Tensor, prediction: Tensor) -> float:
    """E||x_hat||^2 / E[x . x_hat] (Rajamanoharan et al. 2024, eq. 10): 1 when unbiased, < 1 when shrunk."""
    target, prediction = _rows(target.double(), prediction.double())
    return float(prediction.pow(2).sum(-1).mean() / (target * prediction).sum(-1).mean())


def l0(latents: Tensor) -> float:
    """Mean number of nonzero latents per token."""
    return float((latents != 0).float().sum(dim=-1).mean())


def l1(latents: Tensor) -> float:
    """Mean over tokens of the summed absolute latent activations."""
    return float(latents.double().abs().sum(dim=-1).mean())


@torch.no_grad()
def log_feature_density(fire_counts: Tensor, n_tokens: int) -> Tensor:
    """log10 of each latent's firing frequency, as SAELens stores it in sparsity.safetensors."""
    return torch.log10(fire_counts.double() / max(n_tokens, 1) + 1e-10).float()


def density_counts(fire_counts: Tensor, n_tokens: int, dense_threshold: float = 0.1) -> dict[str, int]:
    """Latents that never fired (dead) and that fired on more than `dense_threshold` of tokens (dense)."""
    frequency = fire_counts.double() / max(n_tokens, 1)
    return {"dead_latents": int((fire_counts == 0).sum()), "dense_latents": int((frequency > dense_threshold).sum())}


def kl_divergence(clean_logits: Tensor, other_logits: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """KL(clean || other) of the next-token distributions, per position, computed in `dtype` (differentiable:
    end-to-end training uses it as its loss, in float32, since a vocabulary-wide float64 copy per token is large)."""
    clean = clean_logits.to(dtype).log_softmax(-1)
    other = other_logits.to(dtype).log_softmax(-1)
    return (clean.exp() * (clean - other)).sum(-1)


def recovered_fraction(ablated: float, with_sae: float, clean: float) -> float:
    """(ablated - with_sae) / (ablated - clean): 1 when splicing the SAE costs nothing, 0 when it is as bad as
    zero-ablation. The CE-loss score; with clean = 0 it is the KL score."""
    return (ablated - with_sae) / (ablated - clean) if ablated != clean else float("nan")


@torch.no_grad()
def decoder_geometry(W_dec: Tensor, chunk: int = 4096) -> dict[str, Tensor]:
    """Norm of each decoder row and, for each row, its largest cosine with any other row."""
    norms = W_dec.norm(dim=-1)
    directions = W_dec / norms.clamp_min(1e-12).unsqueeze(-1)
    max_cos = torch.empty(W_dec.shape[0], dtype=W_dec.dtype, device=W_dec.device)
    for start in range(0, W_dec.shape[0], chunk):
        cos = directions[start : start + chunk] @ directions.T
        cos[torch.arange(cos.shape[0]), torch.arange(start, start + cos.shape[0])] = -1.0  # ignore self
        max_cos[start : start + chunk] = cos.max(dim=-1).values
    return {"decoder_norms": norms, "max_decoder_cosine": max_cos}
