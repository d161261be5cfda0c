"""Linear probes in torch (no scikit-learn), shared by the absorption and sparse-probing evals: logistic-regression
fitters, the probe they return, its metrics, and the choice of a few columns (latents) worth probing.

Three fitters, one `LinearProbe` (a row of weights and a bias per head):
- `fit_logistic`: one head fitted exactly (Newton's method in float64) to scikit-learn's
  `LogisticRegression(C=C, class_weight="balanced" if balanced else None)` objective. For a few columns (k-sparse
  probes): its cost grows with the cube of the width. The result depends on no seed or row order.
- `train_probe`: one or several independent heads (one-vs-rest), trained jointly by minibatch Adam with a decaying
  learning rate, positives up-weighted per head, optional L1: SAEBench's ground-truth probe and its k-sparse
  latent ranking in absorption. For many columns and many classes.
- `fit_logistic_sgd`: one head trained by AdamW, early-stopped on a validation set: SAEBench's full-width probe in
  sparse probing. For hundreds or thousands of columns.

Labels are 0/1 or boolean tensors `(n,)`; inputs are `(n, width)`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import Tensor

from saelab.core.errors import ConfigError


@dataclass
class LinearProbe:
    """Heads `x @ weight[h] + bias[h]`; a head predicts its class where its score is positive."""

    weight: Tensor
    """(n_heads, d): float32 from the trained fitters, float64 from the exact one."""
    bias: Tensor
    """(n_heads,), the dtype of `weight`."""

    def scores(self, x: Tensor) -> Tensor:
        """Logits `(n, n_heads)`, computed in the weights' dtype."""
        return x.to(self.weight.dtype) @ self.weight.T + self.bias


SMALL_STEP = 1 << 24
"""Multiply-adds per step below which a fit runs on one torch thread."""


@contextmanager
def _threads_for(work: int) -> Iterator[None]:
    """One intra-op thread while a fit's steps take fewer than SMALL_STEP multiply-adds: a fit is thousands of small
    operations, extra threads gain nothing there, and when another process holds a core each operation waits for
    them (measured 3 to 10 times slower on 2 shared cores)."""
    before = torch.get_num_threads()
    if work < SMALL_STEP:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _binary_labels(y: Tensor, n: int) -> Tensor:
    """`y` as booleans, after checking it holds one 0/1 label per row and both labels occur."""
    if y.shape != (n,):
        raise ConfigError(f"labels of shape {tuple(y.shape)} for {n} rows: expected one 0/1 label per row")
    values = set(torch.unique(y).tolist())
    if not values <= {0, 1}:
        raise ConfigError(f"probe labels must be 0 or 1, got {sorted(values)[:5]}")
    if len(values) < 2:
        raise ConfigError(f"a probe needs examples of both classes; got only label {int(values.pop())}")
    return y.bool()


def one_vs_rest_targets(labels: Tensor, n_classes: int) -> Tensor:
    """Targets `(n, n_classes)` in {0, 1} from class indices; an index of -1 (no class) is negative for every head."""
    targets = torch.zeros(len(labels), n_classes)
    rows = labels >= 0
    targets[rows.nonzero().squeeze(1), labels[rows].long()] = 1.0
    return targets


def top_k_by_mean_difference(x: Tensor, labels: Tensor, k: int, absolute: bool = True) -> Tensor:
    """Indices of the `k` columns of `x` whose mean over the label-1 rows differs most from their mean over the
    label-0 rows, largest first, ties in column order. `absolute`: by |difference|, SAEBench's choice of columns
    for k-sparse probes; else the largest signed difference (columns higher on the positives)."""
    labels = _binary_labels(labels.reshape(-1), len(x))
    difference = x[labels].double().mean(0) - x[~labels].double().mean(0)
    if absolute:
        difference = difference.abs()
    return torch.sort(difference, descending=True, stable=True).indices[: min(k, x.shape[1])]


def fit_logistic(
    x: Tensor, y: Tensor, C: float = 1.0, balanced: bool = False, max_iter: int = 100, tol: float = 1e-10
) -> LinearProbe:
    """One head minimising C * sum_i s_i * log-loss_i + |w|^2 / 2 over (w, b), the intercept b not penalised,
    exactly (Newton steps with a backtracking line search, float64): scikit-learn's
    `LogisticRegression(C=C, class_weight="balanced" if balanced else None)`. s_i = 1, or with `balanced`
    n / (2 * size of row i's class). The minimum is unique for C > 0; the probe is float64."""
    if not 0 < C < math.inf:
        raise ConfigError(f"C must be positive and finite (the optimum is unbounded on separable data), got {C}")
    n, width = x.shape
    labels = _binary_labels(y.reshape(-1), n)
    target = labels.double()
    if balanced:
        positives = float(target.sum())
        sample_weight = torch.where(labels, n / (2 * positives), n / (2 * (n - positives))).double()
    else:
        sample_weight = torch.ones(n, dtype=torch.float64)
    design = torch.cat([x.double(), torch.ones(n, 1, dtype=torch.float64)], dim=1)
    # the objective divided by C (same minimiser): the gradient keeps the data's scale for the stopping test
    penalty = torch.full((width + 1,), 1 / C, dtype=torch.float64)
    penalty[-1] = 0.0
    theta = torch.zeros(width + 1, dtype=torch.float64)

    def loss(t: Tensor) -> float:
        z = design @ t
        return float((sample_weight * (F.softplus(z) - target * z)).sum() + 0.5 * (penalty * t * t).sum())

    with _threads_for(n * (width + 1) ** 2):
        current = loss(theta)
        for _ in range(max_iter):
            p = torch.sigmoid(design @ theta)
            gradient = design.T @ (sample_weight * (p - target)) + penalty * theta
            if float(gradient.abs().max()) <= tol * max(n, 1):
                break
            hessian = (design.T * (sample_weight * p * (1 - p))) @ design + torch.diag(penalty + 1e-12)
            step = torch.linalg.solve(hessian, gradient)
            slope = float(gradient @ step)
            scale = 1.0
            while scale > 1e-8:  # backtracking (Armijo): a full Newton step can overshoot far from the optimum
                candidate = loss(theta - scale * step)
                if candidate <= current - 1e-4 * scale * slope:
                    break
                scale /= 2
            else:
                break  # no decrease left at machine precision: converged
            theta, current = theta - scale * step, candidate
    return LinearProbe(theta[:-1].unsqueeze(0), theta[-1:].clone())


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
    x, y = x.float(), (targets if targets.dim() == 2 else targets.unsqueeze(1)).float()
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


def fit_logistic_sgd(
    x: Tensor,
    y: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    lr: float = 1e-2,
    weight_decay: float = 0.01,
    batch_size: int = 250,
    min_batches_per_epoch: int = 16,
    max_epochs: int = 100,
    patience: int = 10,
    seed: int = 0,
) -> LinearProbe:
    """One head (zero-initialised) trained on (x, y) with binary cross-entropy and AdamW in shuffled minibatches;
    after each epoch its loss on (x_val, y_val) is measured, training stops after `patience` epochs without a lower
    one, and the weights of the best epoch are returned.

    SAEBench's full-width probe (AdamW, lr 0.01, batches of 250 of its 4000 texts, at most 100 epochs, patience 10),
    except that it stops on, and reports the best epoch of, the test set's accuracy. Batches shrink below
    `batch_size` so that an epoch has at least `min_batches_per_epoch` steps, as SAEBench's have: Adam moves each
    weight by about lr per step, and a few hundred steps in all cannot reach the weights a separable task needs."""
    y = _binary_labels(y, len(x)).float()
    y_val = y_val.float()
    generator = torch.Generator().manual_seed(seed)
    weight = torch.zeros(1, x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=weight_decay)
    x, x_val = x.float(), x_val.float()
    batch_size = max(1, min(batch_size, -(-len(x) // min_batches_per_epoch)))
    best, best_loss, waited = LinearProbe(weight.detach().clone(), bias.detach().clone()), math.inf, 0
    with torch.enable_grad(), _threads_for(batch_size * x.shape[1]):
        for _ in range(max_epochs):
            for batch in torch.randperm(len(x), generator=generator).split(batch_size):
                loss = F.binary_cross_entropy_with_logits((x[batch] @ weight.T + bias).squeeze(1), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            probe = LinearProbe(weight.detach().clone(), bias.detach().clone())
            validation_loss = float(F.binary_cross_entropy_with_logits(probe.scores(x_val)[:, 0], y_val))
            if validation_loss < best_loss:
                best, best_loss, waited = probe, validation_loss, 0
            else:
                waited += 1
                if waited >= patience:
                    break
    return best


def accuracy(probe: LinearProbe, x: Tensor, y: Tensor, head: int = 0) -> float:
    """Fraction of rows where `head` predicts the 0/1 label (1 where its score is positive)."""
    return float(((probe.scores(x)[:, head] > 0).long() == y.long().reshape(-1)).double().mean())


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
    correct = float((predicted == labels).double().mean()) if len(labels) else float("nan")
    return {"f1": f1, "precision": precision, "recall": recall, "accuracy": correct, "auc": auc}
