"""Influence on the output, pruning and graph scores of an attribution graph's adjacency matrix (circuit-tracer's
definitions; Ameisen et al. 2025).

`adjacency[t, s]` is the direct effect of source node s on target node t. Each node's inputs are normalised to
shares (`|A[t, s]| / sum_s' |A[t, s']|`); a node's *influence* is the total weight of all paths from it to the
logits, each logit weighted by its probability: `w (Â + Â² + ...)` (the graph is acyclic, so the series ends).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


def normalized_inputs(adjacency: Tensor) -> Tensor:
    """Each row (a target's inputs) as absolute shares summing to 1 (rows without inputs stay 0)."""
    magnitudes = adjacency.abs()
    return magnitudes / magnitudes.sum(dim=1, keepdim=True).clamp(min=1e-10)


def influence(shares: Tensor, weights: Tensor, max_iterations: int = 1000) -> Tensor:
    """`weights (Â + Â² + ...)`: each node's influence through every path, for normalised inputs `shares`."""
    step = weights @ shares
    total = step.clone()
    for _ in range(max_iterations):
        if not step.any():
            return total
        step = step @ shares
        total += step
    raise RuntimeError(f"influence did not vanish after {max_iterations} steps: the graph has a cycle")


def partial_influence(rows: Tensor, row_nodes: Tensor, weights: Tensor, max_iterations: int = 1000) -> Tensor:
    """Influence from the rows computed so far (`rows[r]` is node `row_nodes[r]`'s inputs; nodes without a row
    count as having none): what ranks the features still to visit when only some become nodes."""
    shares = rows.abs()
    shares = shares / shares.sum(dim=1, keepdim=True).clamp(min=1e-8)
    step, total = weights.clone(), torch.zeros_like(weights)
    for _ in range(max_iterations):
        step = step[row_nodes] @ shares
        if not step.any():
            return total
        total += step
    raise RuntimeError(f"influence did not vanish after {max_iterations} steps: the graph has a cycle")


def threshold_for(scores: Tensor, fraction: float) -> Tensor:
    """The score above which the largest scores make up `fraction` of their total."""
    ordered = scores.sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum()
    at = min(int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype))), len(ordered) - 1)
    return ordered[at]


class Pruned(NamedTuple):
    nodes: Tensor
    """(n,) bool: the nodes kept."""
    edges: Tensor
    """(n, n) bool: the edges kept, [target, source]."""
    cumulative: Tensor
    """(n,): each node's place in the influence ranking, as the share of total influence of the nodes ranked
    before it and itself (the most influential node has the smallest; a viewer keeps nodes below a slider)."""


def prune(
    adjacency: Tensor, weights: Tensor, n_features: int, n_kept: int, node_threshold: float, edge_threshold: float
) -> Pruned:
    """Keep the nodes carrying `node_threshold` of the total influence (the last `n_kept` nodes, tokens and
    logits, always), then the edges carrying `edge_threshold` of the influence among those; then drop, until
    none is left, errors and features without an outgoing kept edge and features without an incoming one.
    Nodes are ordered features (the first `n_features`), errors, then the `n_kept` tokens and logits."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {value}")
    node_influence = influence(normalized_inputs(adjacency), weights)
    nodes = node_influence >= threshold_for(node_influence, node_threshold)
    nodes[-n_kept:] = True
    kept = adjacency.clone()
    kept[~nodes] = 0
    kept[:, ~nodes] = 0
    shares = normalized_inputs(kept)
    edge_scores = shares * (influence(shares, weights) + weights)[:, None]
    edges = edge_scores >= threshold_for(edge_scores.flatten(), edge_threshold)
    inner = slice(0, adjacency.shape[0] - n_kept)  # features and errors
    while True:
        edges[~nodes] = False
        edges[:, ~nodes] = False
        before = nodes.clone()
        nodes[inner] &= edges[:, inner].any(0)  # something reads it
        nodes[:n_features] &= edges[:n_features].any(1)  # a feature reads something
        if torch.equal(nodes, before):
            break
    order = node_influence.sort(descending=True)
    cumulative = torch.empty_like(node_influence)
    cumulative[order.indices] = order.values.cumsum(0) / order.values.sum()
    return Pruned(nodes, edges, cumulative)


def graph_scores(adjacency: Tensor, weights: Tensor, errors: slice, tokens: slice) -> tuple[float, float]:
    """(replacement score, completeness score). Replacement: the share of the tokens' and errors' influence that
    is the tokens'. Completeness: each node's share of inputs not from errors, averaged with weights
    influence + logit weight (nodes without inputs count as complete)."""
    shares = normalized_inputs(adjacency)
    node_influence = influence(shares, weights)
    from_tokens, from_errors = node_influence[tokens].sum(), node_influence[errors].sum()
    replacement = from_tokens / (from_tokens + from_errors)
    complete = 1 - shares[:, errors].sum(dim=1)
    weight = node_influence + weights
    return float(replacement), float((complete * weight).sum() / weight.sum())
