"""Linear probes on tensors of activations or SAE latents: logistic regression, its scores and metrics, and the
choice of a few columns (latents) worth probing. Shared by the absorption and sparse-probing evals.

Two ways to fit, as SAEBench has them:
- `train_probe`: one or several independent binary logistic-regression heads (one-vs-rest), trained jointly by
  minibatch Adam with an exponentially decaying learning rate, positive examples up-weighted to balance each
  head, optional L1 on the weights. For many columns (a model's width, an SAE's latents).
- `fit_logistic_regression`: one binary head fitted to convergence by full-batch L-BFGS, with the objective of
  scikit-learn's default `LogisticRegression` (L2, C = 1, optionally `class_weight="balanced"`). For a few columns
  (k-sparse probes), where an exact fit is cheap.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from scipy.stats import rankdata
from torch import Tensor


@dataclass
class LinearProbe:
    """Heads `weight @ x + bias`; a row of `weight` per head (one-vs-rest class)."""

    weight: Tensor
    """(n_heads, d) float32."""
    bias: Tensor
    """(n_heads,) float32."""

    def scores(self, x: Tensor) -> Tensor:
        """Logits `(n, n_heads)`: positive means the head predicts its class."""
        return x.float() @ self.weight.T + self.bias


def one_vs_rest_targets(labels: Tensor, n_classes: int) -> Tensor:
    """Targets `(n, n_classes)` in {0, 1} from class indices; an index of -1 (no class) is negative for every head."""
    targets = torch.zeros(len(labels), n_classes)
    rows = labels >= 0
    targets[rows.nonzero().squeeze(1), labels[rows].long()] = 1.0
    return targets


SMALL_STEP = 1 << 24
"""Multiply-adds per step below which a probe trains on one thread."""


@contextmanager
def _threads_for(work: int) -> Iterator[None]:
    """One thread for small steps: several threads gain nothing there, and on a busy machine their hand-offs cost
    10x (measured: 64 x 8 steps, 2 threads on 2 shared cores)."""
    before = torch.get_num_threads()
    if work < SMALL_STEP:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _as_matrix(targets: Tensor) -> Tensor:
    return (targets if targets.dim() == 2 else targets.unsqueeze(1)).float()


def train_probe(
    x: Tensor,
    targets: Tensor,
    epochs: int = 50,
    batch_size: int = 64,
    lr: float = 1e-2,
    lr_end: float = 1e-5,
    weight_decay: float = 1e-4,
    l1: float = 0.0,
    seed: int = 0,
) -> LinearProbe:
    """Logistic-regression heads for binary `targets` (n,) or (n, n_heads), trained jointly with Adam: binary
    cross-entropy with each head's positives weighted by #negatives / #positives, plus `l1` times the mean over
    heads of the sum of |weights|. The learning rate falls exponentially from `lr` to `lr_end` over the epochs;
    minibatches are shuffled with `seed`. (SAEBench's ground-truth probe: these defaults; its k-sparse L1 probe:
    batch 4096, weight_decay 1e-6, l1 0.01.)"""
    x, y = x.float(), _as_matrix(targets)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} rows of inputs but {len(y)} of targets")
    positives = y.sum(0)
    pos_weight = (len(y) - positives) / positives.clamp_min(1)
    generator = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(x.shape[1], y.shape[1])
    with torch.no_grad():  # a seeded start, independent of the global generator
        layer.weight.copy_((torch.rand(layer.weight.shape, generator=generator) * 2 - 1) / x.shape[1] ** 0.5)
        layer.bias.zero_()
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr, weight_decay=weight_decay)
    gamma = (lr_end / lr) ** (1 / max(1, epochs))
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    with torch.enable_grad(), _threads_for(min(batch_size, len(x)) * x.shape[1] * y.shape[1]):
        for _ in range(epochs):
            for rows in torch.randperm(len(x), generator=generator).split(batch_size):
                loss = loss_fn(layer(x[rows]), y[rows])
                if l1:
                    loss = loss + l1 * layer.weight.abs().sum(1).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            scheduler.step()
    return LinearProbe(layer.weight.detach().clone(), layer.bias.detach().clone())


def fit_logistic_regression(
    x: Tensor, y: Tensor, C: float = 1.0, balanced: bool = True, max_iter: int = 500, tol: float = 1e-7
) -> LinearProbe:
    """One binary head minimising C * sum_i w_i * log-loss_i + |weight|^2 / 2 (the bias not penalised), by
    L-BFGS in float64: scikit-learn's `LogisticRegression(C=C, class_weight="balanced" if balanced else None)`.
    `balanced` weights each example by n / (2 * size of its class). A ValueError when `y` has one class only."""
    x64, y64 = x.double(), y.double().reshape(-1)
    positives = float(y64.sum())
    if positives in (0.0, float(len(y64))):
        raise ValueError("logistic regression needs examples of both classes")
    n = len(y64)
    sample_weight = (
        torch.where(y64 > 0, n / (2 * positives), n / (2 * (n - positives))) if balanced else torch.ones(n).double()
    )
    weight = torch.zeros(x64.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12, line_search_fn="strong_wolfe"
    )

    def objective() -> Tensor:
        optimizer.zero_grad()
        logits = x64 @ weight + bias
        loss_terms = torch.nn.functional.binary_cross_entropy_with_logits(logits, y64, reduction="none")
        loss = C * (sample_weight * loss_terms).sum() + 0.5 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad(), _threads_for(x64.numel()):
        optimizer.step(objective)
    return LinearProbe(weight.detach().float().unsqueeze(0), bias.detach().float())


def binary_metrics(scores: Tensor, labels: Tensor, threshold: float = 0.0) -> dict[str, float]:
    """F1, precision, recall, accuracy of `scores > threshold` against boolean `labels`, and the ROC AUC of the
    scores (ties count half). Undefined ratios (no predicted or no true positives) are 0; AUC with one class NaN."""
    scores, labels = scores.detach().double().reshape(-1), labels.bool().reshape(-1)
    predicted = scores > threshold
    tp = int((predicted & labels).sum())
    precision = tp / int(predicted.sum()) if bool(predicted.any()) else 0.0
    recall = tp / int(labels.sum()) if bool(labels.any()) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos and n_neg:  # Mann-Whitney: the chance a random positive outscores a random negative
        ranks = torch.from_numpy(rankdata(scores.numpy()))
        auc = (float(ranks[labels].sum()) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    else:
        auc = float("nan")
    accuracy = float((predicted == labels).double().mean()) if len(labels) else float("nan")
    return {"f1": f1, "precision": precision, "recall": recall, "accuracy": accuracy, "auc": auc}


def top_k_by_mean_difference(x: Tensor, labels: Tensor, k: int, absolute: bool = True) -> Tensor:
    """Indices of the `k` columns whose mean over the positive rows differs most from their mean over the
    negative rows (by absolute difference, as SAEBench's sparse probing; `absolute=False`: the largest signed
    difference, columns higher on the positives), largest first."""
    labels = labels.bool().reshape(-1)
    if not bool(labels.any()) or bool(labels.all()):
        raise ValueError("ranking columns by mean difference needs rows of both classes")
    difference = x[labels].float().mean(0) - x[~labels].float().mean(0)
    if absolute:
        difference = difference.abs()
    return difference.topk(min(k, x.shape[1])).indices
