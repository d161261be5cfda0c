"""Evaluation of SAEs: reconstruction and sparsity metrics."""

from saelab.evals.metrics import explained_variance, l0

__all__ = ["explained_variance", "l0"]
