"""How well a learned dictionary matches the true features."""

from __future__ import annotations

import torch
from torch import Tensor


def _cosines(learned: Tensor, true_features: Tensor) -> Tensor:
    learned = learned.detach().double()
    learned = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-12)
    truth = true_features.double() / true_features.double().norm(dim=1, keepdim=True)
    return truth @ learned.T.to(truth)  # (n_true, n_learned)


def optimal_matching(learned: Tensor, true_features: Tensor) -> tuple[Tensor, Tensor]:
    """(true index, learned index) pairs maximising the summed |cosine|, each used at most once (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    cos = _cosines(learned, true_features).abs().cpu().numpy()
    rows, cols = linear_sum_assignment(cos, maximize=True)
    return torch.as_tensor(rows), torch.as_tensor(cols)


def mcc(learned: Tensor, true_features: Tensor) -> float:
    """Mean |cosine| between true features and decoder rows under the optimal one-to-one matching (MCC as in
    the synthetic-SAE literature; 1 means every true feature has its own exact decoder row). A dictionary
    smaller than the truth leaves features unmatched: they count as 0."""
    rows, cols = optimal_matching(learned, true_features)
    matched = _cosines(learned, true_features).abs()[rows, cols]
    return float(matched.sum() / true_features.shape[0])


def feature_recall(learned: Tensor, true_features: Tensor, threshold: float = 0.9) -> Tensor:
    """Per true feature: whether some decoder row has cosine >= threshold with it (bool `(n_true,)`)."""
    return _cosines(learned, true_features).max(dim=1).values >= threshold
