"""Binary logistic-regression probes in torch (no scikit-learn): fit, predict, score, and pick input dimensions.

Two fitters, for the two regimes the probing evals need:
- `fit_logistic`: the exact minimiser of the L2-penalised log-loss (Newton's method in float64), the objective of
  scikit-learn's `LogisticRegression(penalty="l2", C=1/l2)`: the intercept is not penalised. For few inputs
  (k-sparse probes on k chosen dimensions): its cost grows with the cube of the width.
- `fit_logistic_sgd`: a linear layer trained with AdamW on minibatches, early-stopped on a validation set, the
  full-width probe of SAEBench's sparse probing. For hundreds or thousands of inputs.

Labels are 0/1 tensors (any dtype); inputs are `[n, width]`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.core.errors import ConfigError

Fit = TypeVar("Fit", bound=Callable)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block. A probe's fit is thousands of small operations
    (a few thousand rows at most): extra threads gain nothing there and, when another process holds a core, each
    operation waits for them, measured 3 to 10 times slower on 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _single_threaded(fit: Fit) -> Fit:
    @functools.wraps(fit)
    def wrapper(*args, **kwargs):
        with one_thread():
            return fit(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass
class LinearProbe:
    """A linear classifier: logit = x @ weight + bias; class 1 where the logit is positive."""

    weight: Tensor
    bias: float

    def logits(self, x: Tensor) -> Tensor:
        return x.to(self.weight) @ self.weight + self.bias

    def predict(self, x: Tensor) -> Tensor:
        """0/1 predictions (long)."""
        return (self.logits(x) > 0).long()


def _labels(y: Tensor, n: int) -> Tensor:
    if y.shape != (n,):
        raise ConfigError(f"labels of shape {tuple(y.shape)} for {n} rows: expected one 0/1 label per row")
    values = set(torch.unique(y).tolist())
    if not values <= {0, 1}:
        raise ConfigError(f"probe labels must be 0 or 1, got {sorted(values)[:5]}")
    if len(values) < 2:
        raise ConfigError("a probe needs examples of both labels; got only label " + str(values.pop()))
    return y.long()


def accuracy(probe: LinearProbe, x: Tensor, y: Tensor) -> float:
    """Fraction of rows whose prediction equals the 0/1 label."""
    return float((probe.predict(x) == y.to(torch.long)).double().mean())


def top_k_by_mean_difference(x: Tensor, y: Tensor, k: int) -> Tensor:
    """The `k` columns of `x` whose class means differ most, |mean(x[y=1]) - mean(x[y=0])|, largest first (ties: the
    lower index first). SAEBench's choice of dimensions for its k-sparse probes."""
    y = _labels(y, len(x)).bool()
    difference = (x[y].double().mean(0) - x[~y].double().mean(0)).abs()
    order = torch.sort(difference, descending=True, stable=True).indices
    return order[: min(k, x.shape[1])]


@_single_threaded
def fit_logistic(x: Tensor, y: Tensor, l2: float = 1.0, max_iter: int = 100, tol: float = 1e-10) -> LinearProbe:
    """Minimise sum_i log-loss_i + l2/2 * |w|^2 over (w, b) exactly (Newton steps with a backtracking line search,
    float64): scikit-learn's `LogisticRegression(C=1/l2)`. The minimum is unique for l2 > 0, so the result does not
    depend on a seed or on the row order."""
    if l2 <= 0:
        raise ConfigError(f"l2 must be positive (the optimum is unbounded on separable data), got {l2}")
    n, width = x.shape
    target = _labels(y, n).double()
    design = torch.cat([x.double(), torch.ones(n, 1, dtype=torch.float64)], dim=1)
    penalty = torch.full((width + 1,), float(l2), dtype=torch.float64)
    penalty[-1] = 0.0  # the intercept is not penalised
    theta = torch.zeros(width + 1, dtype=torch.float64)

    def loss(t: Tensor) -> float:
        z = design @ t
        return float((F.softplus(z) - target * z).sum() + 0.5 * (penalty * t * t).sum())

    current = loss(theta)
    for _ in range(max_iter):
        p = torch.sigmoid(design @ theta)
        gradient = design.T @ (p - target) + penalty * theta
        if float(gradient.abs().max()) <= tol * max(n, 1):
            break
        hessian = (design.T * (p * (1 - p))) @ design + torch.diag(penalty + 1e-12)
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
    return LinearProbe(weight=theta[:-1].float(), bias=float(theta[-1]))


@_single_threaded
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
    """A linear layer (zero-initialised) trained on (x, y) with binary cross-entropy and AdamW in shuffled
    minibatches; after each epoch its loss on (x_val, y_val) is measured, training stops after `patience` epochs
    without a lower one, and the weights of the best epoch are returned.

    SAEBench's full-width probe (AdamW, lr 0.01, batches of 250 of its 4000 texts, at most 100 epochs, patience 10),
    except that it stops on, and reports the best epoch of, the test set's accuracy. Batches shrink below
    `batch_size` so that an epoch has at least `min_batches_per_epoch` steps, as SAEBench's have: Adam moves each
    weight by about lr per step, and a few hundred steps in all cannot reach the weights a separable task needs."""
    y = _labels(y, len(x)).float()
    y_val = y_val.float()
    generator = torch.Generator().manual_seed(seed)
    weight = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=weight_decay)
    x, x_val = x.float(), x_val.float()
    batch_size = max(1, min(batch_size, -(-len(x) // min_batches_per_epoch)))
    best, best_loss, waited = LinearProbe(weight.detach().clone(), 0.0), math.inf, 0
    for _ in range(max_epochs):
        for batch in torch.randperm(len(x), generator=generator).split(batch_size):
            loss = F.binary_cross_entropy_with_logits(x[batch] @ weight + bias, y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        probe = LinearProbe(weight.detach().clone(), bias.item())
        validation_loss = float(F.binary_cross_entropy_with_logits(probe.logits(x_val), y_val))
        if validation_loss < best_loss:
            best, best_loss, waited = probe, validation_loss, 0
        else:
            waited += 1
            if waited >= patience:
                break
    return best
