"""Model diffing with a crosscoder over two models (Lindsey et al. 2024; Kissane et al. 2024): which latents
belong to one model, which to the other, and which both share.

A latent's decoder has one block per model. Its relative decoder norm `r = ||W_dec^B|| / (||W_dec^A|| + ||W_dec^B||)`
is ~0 for a latent only model A uses, ~1 for one only B uses, ~0.5 for one both use; for shared latents the cosine
between the two blocks says whether both models write the same direction.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from saelab.saes.crosscoder import Crosscoder

A_ONLY, B_ONLY, SHARED = 0.1, 0.9, (0.3, 0.7)
"""Thresholds on r of the summary's groups (Kissane et al.'s: A-only r < 0.1, B-only r > 0.9, shared 0.3-0.7)."""


def _blocks(crosscoder: Crosscoder, a: int, b: int) -> tuple[Tensor, Tensor]:
    n = crosscoder.n_layers
    if not (0 <= a < n and 0 <= b < n) or a == b:
        raise IndexError(f"blocks a={a}, b={b}: need two different blocks of the crosscoder's {n}")
    dec = crosscoder.W_dec.detach().reshape(crosscoder.cfg.d_sae, n, -1)
    return dec[:, a], dec[:, b]


def relative_decoder_norms(crosscoder: Crosscoder, a: int = 0, b: int = 1) -> Tensor:
    """`(d_sae,)`: each latent's decoder norm into block b over its norms into a and b (NaN for a dead decoder)."""
    dec_a, dec_b = _blocks(crosscoder, a, b)
    norm_a, norm_b = dec_a.norm(dim=-1), dec_b.norm(dim=-1)
    return norm_b / (norm_a + norm_b)


def decoder_cosines(crosscoder: Crosscoder, a: int = 0, b: int = 1) -> Tensor:
    """`(d_sae,)`: the cosine between each latent's decoder blocks a and b (0 where either is zero)."""
    dec_a, dec_b = _blocks(crosscoder, a, b)
    return F.cosine_similarity(dec_a, dec_b, dim=-1, eps=1e-12)


def diff_summary(crosscoder: Crosscoder, a: int = 0, b: int = 1) -> dict[str, Any]:
    """Counts of A-only (r < 0.1), B-only (r > 0.9) and shared (0.3 < r < 0.7) latents, and the shared latents'
    median decoder cosine."""
    r = relative_decoder_norms(crosscoder, a, b)
    shared = (r > SHARED[0]) & (r < SHARED[1])
    cosines = decoder_cosines(crosscoder, a, b)[shared]
    return {
        "latents": int(r.numel()),
        "a_only": int((r < A_ONLY).sum()),
        "b_only": int((r > B_ONLY).sum()),
        "shared": int(shared.sum()),
        "shared_median_cosine": float(cosines.median()) if cosines.numel() else float("nan"),
    }


__all__ = ["decoder_cosines", "diff_summary", "relative_decoder_norms"]
