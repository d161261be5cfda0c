"""Evaluation of SAEs: reconstruction and sparsity metrics, and the eval suite (`run_suite`: core, geometry,
absorption, sparse probing, auto-interpretation)."""

from saelab.evals.metrics import explained_variance, l0
from saelab.evals.suite import EVALS, comparison_table, run_suite

__all__ = ["EVALS", "comparison_table", "explained_variance", "l0", "run_suite"]
