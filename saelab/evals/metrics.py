"""Reconstruction, sparsity and geometry metrics on batches of activations (conventions as in SAELens)."""

from __future__ import annotations

import math
from collections.abc import Callable

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


def shrinkage_terms(target: Tensor, prediction: Tensor) -> Tensor:
    """Per token, in float64: ||x||, ||x_hat|| and x . x_hat, the three numbers every shrinkage metric is made of
    (small enough to keep for every token read, so the metrics can be taken over all tokens at the end)."""
    target, prediction = _rows(target.double(), prediction.double())
    return torch.stack([target.norm(dim=-1), prediction.norm(dim=-1), (target * prediction).sum(-1)], dim=-1)


def shrinkage(terms: Tensor) -> dict[str, float]:
    """SAEBench's shrinkage metrics from `shrinkage_terms` of every token: the mean norms in and out, the mean over
    tokens of ||x_hat|| / ||x|| (an input with a norm below 1e-4 counts as 1), and the relative reconstruction bias
    E||x_hat||^2 / E[x . x_hat] (Rajamanoharan et al. 2024, eq. 10: 1 when unbiased, < 1 when shrunk)."""
    norm_in, norm_out, dot = terms.double().unbind(-1)
    safe_in = torch.where(norm_in.abs() < 1e-4, torch.ones_like(norm_in), norm_in)
    return {
        "l2_norm_in": float(norm_in.mean()),
        "l2_norm_out": float(norm_out.mean()),
        "l2_ratio": float((norm_out / safe_in).mean()),
        "relative_reconstruction_bias": float(norm_out.pow(2).mean() / dot.mean()),
    }


def l2_norm_ratio(target: Tensor, prediction: Tensor) -> float:
    """Mean over tokens of ||x_hat|| / ||x|| (inputs with a norm below 1e-4 count as 1)."""
    return shrinkage(shrinkage_terms(target, prediction))["l2_ratio"]


def relative_reconstruction_bias(target: Tensor, prediction: Tensor) -> float:
    """E||x_hat||^2 / E[x . x_hat] (Rajamanoharan et al. 2024, eq. 10): 1 when unbiased, < 1 when shrunk."""
    return shrinkage(shrinkage_terms(target, prediction))["relative_reconstruction_bias"]


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


def density_metrics(fire_counts: Tensor, n_tokens: int) -> dict[str, float]:
    """SAEBench's density summaries: the fraction of latents that fired at least once (`frac_alive`), that fired on
    more than 1% / 10% of tokens (`freq_over_*`), and those latents' share of all firings (`normalized_freq_over_*`)."""
    frequency = fire_counts.double() / max(n_tokens, 1)
    total = frequency.sum()
    result = {"frac_alive": float((fire_counts > 0).double().mean())}
    for percent in (1, 10):
        over = frequency > percent / 100
        result[f"freq_over_{percent}_percent"] = float(over.double().mean())
        result[f"normalized_freq_over_{percent}_percent"] = float(frequency[over].sum() / total) if total > 0 else 0.0
    return result


def kl_divergence(clean_logits: Tensor, other_logits: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """KL(clean || other) of the next-token distributions, per position, computed in `dtype` (differentiable:
    end-to-end training uses it as its loss, in float32, since a vocabulary-wide float64 copy per token is large)."""
    return kl_from_log_probs(clean_logits.to(dtype).log_softmax(-1), other_logits.to(dtype).log_softmax(-1))


def kl_from_log_probs(clean: Tensor, other: Tensor, clean_probs: Tensor | None = None) -> Tensor:
    """KL(clean || other) per position from log-probabilities; `clean_probs` is `clean.exp()` when the caller
    compares one clean distribution with several others and computes it once."""
    probs = clean.exp() if clean_probs is None else clean_probs
    return (probs * (clean - other)).sum(-1)


def recovered_fraction(ablated: float, with_sae: float, clean: float) -> float:
    """(ablated - with_sae) / (ablated - clean): 1 when splicing the SAE costs nothing, 0 when it is as bad as
    zero-ablation. The CE-loss score; with clean = 0 it is the KL score."""
    return (ablated - with_sae) / (ablated - clean) if ablated != clean else float("nan")


PAIRWISE_BLOCK_ENTRIES = 2**24
"""Entries of one block of a pairwise cosine matrix (64 MiB in float32): rows per block = this // number of rows."""


@torch.no_grad()
def pairwise_cosines(
    vectors: Tensor, chunk: int | None = None, top_pairs: int = 0, on_block: Callable[[], None] | None = None
) -> dict[str, Tensor]:
    """For each row of `vectors`, its largest cosine with any other row (`max_cosine`, NaN with a single row) and
    that row's index (`partner`); with `top_pairs`, the largest cosines over all pairs i < j, in decreasing order
    (`pair_cosines`, and `pairs` as (i, j) rows). The n x n matrix is never held: `chunk` rows at a time are
    compared with all n (default: as many rows as fit PAIRWISE_BLOCK_ENTRIES), and `on_block` is called after
    each block. Zero rows have cosine 0 with everything."""
    n = vectors.shape[0]
    chunk = chunk or max(1, PAIRWISE_BLOCK_ENTRIES // max(n, 1))
    directions = vectors.float() / vectors.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    max_cosine = torch.full((n,), float("nan"), device=vectors.device)
    partner = torch.full((n,), -1, dtype=torch.long, device=vectors.device)
    best = torch.empty(0, device=vectors.device)  # the top pairs so far: cosines and flat indices i * n + j
    best_flat = torch.empty(0, dtype=torch.long, device=vectors.device)
    columns = torch.arange(n, device=vectors.device)
    for start in range(0, n, chunk):
        block = directions[start : start + chunk] @ directions.T
        rows = torch.arange(start, start + block.shape[0], device=vectors.device)
        block[rows - start, rows] = -math.inf  # a row is not its own neighbour
        if n > 1:
            max_cosine[rows], partner[rows] = block.max(dim=-1)
        if top_pairs > 0:
            block.masked_fill_(columns <= rows.unsqueeze(1), -math.inf)  # each pair once: j > i
            # the block's top pairs are among its rows' own top pairs (a row-wise top-k is ~5x faster than a
            # top-k over the whole block on CPU)
            row_values, row_columns = block.topk(min(top_pairs, n), dim=-1)
            values, flat = row_values.reshape(-1).topk(min(top_pairs, row_values.numel()))
            best = torch.cat([best, values])
            best_flat = torch.cat([best_flat, rows[flat // row_values.shape[1]] * n + row_columns.reshape(-1)[flat]])
            order = best.argsort(descending=True, stable=True)[:top_pairs]
            best, best_flat = best[order], best_flat[order]
        if on_block is not None:
            on_block()
    result = {"max_cosine": max_cosine, "partner": partner}
    if top_pairs > 0:
        real = best > -math.inf  # fewer pairs than asked for
        result["pair_cosines"] = best[real]
        result["pairs"] = torch.stack([best_flat[real] // n, best_flat[real] % n], dim=-1)
    return result


def pairwise_blocks(n: int, chunk: int | None = None) -> int:
    """How many blocks `pairwise_cosines` computes for n rows (for progress bars)."""
    return math.ceil(n / (chunk or max(1, PAIRWISE_BLOCK_ENTRIES // max(n, 1))))


@torch.no_grad()
def decoder_geometry(
    W_dec: Tensor, chunk: int | None = None, top_pairs: int = 0, on_block: Callable[[], None] | None = None
) -> dict[str, Tensor]:
    """Norm of each decoder row and, for each row, its largest cosine with any other row (`max_decoder_cosine`)
    and which row that is (`max_decoder_cosine_partner`); with `top_pairs`, the most similar pairs of rows
    (`top_pair_cosines`, `top_pairs`). Memory: `chunk` x d_sae at a time (see `pairwise_cosines`)."""
    cosines = pairwise_cosines(W_dec, chunk, top_pairs, on_block)
    result = {
        "decoder_norms": W_dec.norm(dim=-1),
        "max_decoder_cosine": cosines["max_cosine"],
        "max_decoder_cosine_partner": cosines["partner"],
    }
    if top_pairs > 0:
        result["top_pair_cosines"], result["top_pairs"] = cosines["pair_cosines"], cosines["pairs"]
    return result
