"""Attribution graphs (Ameisen et al. 2025, "Circuit tracing"; circuit-tracer's algorithm) for one prompt, on any
Hugging Face model saelab hooks, with a cross-layer transcoder or transcoder set.

    graph = attribute(model, clt, "The capital of France is")
    graph.prune(0.8, 0.98); graph.scores()

Nodes, in this order (also the adjacency matrix's): the active latents ("features", by model layer, position,
latent; not at position 0, a special token prepended when the prompt does not start with one), one error per model
layer and position (what the transcoder misses of that MLP output; all of it in layers the transcoder does not
cover), one per token embedding, and the top logits of the last position (the fewest whose probabilities add up to
`desired_logit_prob`, at most `max_n_logits`). `adjacency[t, s]` is the direct linear effect of s on t in the
local replacement model (`saelab.analysis.local_replacement`): s's activation times the gradient of t's pre-activation
along frozen paths, for a feature target its pre-activation (without its encoder bias), for a logit target the
logit minus the mean logit (without the unembedding's bias). Errors and tokens have no inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.analysis.influence import Pruned, graph_scores, partial_influence, prune
from saelab.analysis.local_replacement import LOGITS, LocalReplacement
from saelab.core.errors import ConfigError
from saelab.models.hooks import HookedModel
from saelab.saes.clt import CrossLayerTranscoder


@dataclass
class AttributionGraph:
    """An attribution graph (see the module docstring for its nodes and edges)."""

    prompt: str
    tokens: list[int]
    token_strings: list[str]
    n_layers: int
    """Model layers (one error node per layer and position)."""
    features: Tensor
    """(F, 3): model layer, position and latent of each feature node, in node order."""
    activations: Tensor
    """(F,): their activations."""
    logit_tokens: list[int]
    logit_strings: list[str]
    logit_probabilities: Tensor
    adjacency: Tensor
    """(n, n): [target, source] direct effects."""
    n_active_features: int
    """Active latents on the prompt (more than `features` when `max_feature_nodes` limited them)."""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_positions(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_logits(self) -> int:
        return len(self.logit_tokens)

    @property
    def errors(self) -> slice:
        """Node indices of the error nodes: layer l, position c is `errors.start + l * n_positions + c`."""
        return slice(self.n_features, self.n_features + self.n_layers * self.n_positions)

    @property
    def token_nodes(self) -> slice:
        return slice(self.errors.stop, self.errors.stop + self.n_positions)

    @property
    def logit_nodes(self) -> slice:
        return slice(self.token_nodes.stop, self.token_nodes.stop + self.n_logits)

    def logit_weights(self) -> Tensor:
        """(n,): each logit node's probability, 0 for other nodes."""
        weights = torch.zeros(self.adjacency.shape[0], dtype=self.adjacency.dtype)
        weights[self.logit_nodes] = self.logit_probabilities.to(weights)
        return weights

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
        """The nodes and edges carrying these shares of the influence on the logits (`influence.prune`)."""
        n_kept = self.n_positions + self.n_logits
        return prune(self.adjacency, self.logit_weights(), self.n_features, n_kept, node_threshold, edge_threshold)

    def scores(self, pruned: Pruned | None = None) -> tuple[float, float]:
        """(replacement score, completeness score) of the graph, or of its pruned part (dropped nodes and edges
        set to zero). 1.0 when everything reaches the logits through features rather than errors."""
        adjacency = self.adjacency
        if pruned is not None:
            adjacency = adjacency * pruned.edges * pruned.nodes[:, None] * pruned.nodes[None, :]
        return graph_scores(adjacency, self.logit_weights(), self.errors, self.token_nodes)


def prompt_tokens(tokenizer, prompt: str | Sequence[int] | Tensor) -> Tensor:
    """The prompt's token ids, with a special token (BOS, else EOS or PAD) prepended unless it starts with one:
    the first position's activations are outliers, so it is left out of the graph's features."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
    else:
        ids = torch.as_tensor(prompt).flatten().tolist()
    if not ids or ids[0] not in tokenizer.all_special_ids:
        special = next(
            (t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None),
            None,
        )
        if special is None:
            raise ConfigError("the tokenizer has no BOS, EOS or PAD token to begin the prompt with")
        ids = [special, *ids]
    if len(ids) < 2:
        raise ConfigError("the prompt is empty")
    return torch.tensor(ids, dtype=torch.long)


def logit_targets(logits: Tensor, max_n_logits: int, desired_logit_prob: float) -> tuple[Tensor, Tensor]:
    """(token ids, probabilities): the most likely next tokens, the fewest whose probabilities add up to
    `desired_logit_prob`, at most `max_n_logits`."""
    probabilities = torch.softmax(logits.double(), dim=-1)
    top = probabilities.topk(min(max_n_logits, probabilities.shape[0]))
    cumulative = top.values.cumsum(0)
    keep = int(torch.searchsorted(cumulative, torch.tensor(desired_logit_prob, dtype=cumulative.dtype))) + 1
    return top.indices[:keep], top.values[:keep]


def attribute(
    model: HookedModel,
    clt: CrossLayerTranscoder,
    prompt: str | Sequence[int] | Tensor,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    batch_size: int = 64,
    max_feature_nodes: int | None = None,
    update_interval: int = 4,
    progress: bool = False,
) -> AttributionGraph:
    """The attribution graph of `prompt` (see the module docstring). `batch_size` targets share one backward pass.
    With `max_feature_nodes` below the number of active latents, features are visited greedily, the most
    influential on the rows computed so far first (re-ranked every `update_interval` batches); the others are no
    nodes, and their effects are no edges."""
    if batch_size < 1 or (max_feature_nodes is not None and max_feature_nodes < 0):
        raise ValueError("batch_size must be at least 1 and max_feature_nodes not negative")
    tokens = prompt_tokens(model.tokenizer, prompt).to(next(model.model.parameters()).device)
    local = LocalReplacement(model, clt, tokens, batch_size)
    unembedding = local.unembed.weight.to(local.dtype)
    ids, probabilities = logit_targets(local.logits, max_n_logits, desired_logit_prob)
    directions = unembedding[ids] - unembedding.mean(0)
    F, K, T = local.n_features, len(ids), local.n_pos
    n_all = local.n_sources + K
    wanted = F if max_feature_nodes is None else min(max_feature_nodes, F)
    rows = torch.zeros(K + wanted, n_all, dtype=local.dtype)
    row_nodes = torch.zeros(K + wanted, dtype=torch.long)
    for start in range(0, K, batch_size):
        batch = range(start, min(start + batch_size, K))
        rows[batch.start : batch.stop, : local.n_sources] = local.rows([(LOGITS, T - 1, directions[k]) for k in batch])
        row_nodes[batch.start : batch.stop] = torch.arange(batch.start, batch.stop) + local.n_sources
    active = local.active.cpu()  # (transcoder layer, position, latent) of each active latent
    layers = torch.tensor(clt.cfg.layers, dtype=torch.long)[active[:, 0]]  # model layers
    weights = torch.zeros(n_all, dtype=local.dtype)
    weights[local.n_sources :] = probabilities.to(local.dtype)
    visited = torch.zeros(F, dtype=torch.bool)
    done = K
    bar = tqdm(total=wanted, desc="attribution: feature rows", disable=not progress)
    while done < K + wanted:
        if wanted == F:
            queue = torch.arange(F)
        else:
            ranked = partial_influence(rows[:done], row_nodes[:done], weights)[:F].argsort(descending=True)
            queue = ranked[~visited[ranked]][: min(update_interval * batch_size, K + wanted - done)]
        for start in range(0, len(queue), batch_size):
            batch_features = queue[start : start + batch_size]
            last = done + len(batch_features) == K + wanted
            targets = [(int(layers[f]), int(active[f, 1]), local.encoders[int(f)]) for f in batch_features]
            rows[done : done + len(targets), : local.n_sources] = local.rows(targets, keep_graph=not last)
            row_nodes[done : done + len(targets)] = batch_features
            visited[batch_features] = True
            done += len(targets)
            bar.update(len(targets))
    bar.close()
    selected = visited.nonzero().squeeze(1)
    columns = torch.cat([selected, torch.arange(F, n_all)])
    ordered = rows[row_nodes.argsort()][:, columns]
    n = len(columns)
    adjacency = torch.zeros(n, n, dtype=local.dtype)
    adjacency[: len(selected)] = ordered[: len(selected)]
    adjacency[n - K :] = ordered[len(selected) :]
    features = active[selected].clone()
    features[:, 0] = layers[selected]
    text = model.tokenizer
    return AttributionGraph(
        prompt=prompt if isinstance(prompt, str) else text.decode(tokens.tolist()),
        tokens=tokens.tolist(),
        token_strings=[text.decode([t]) for t in tokens.tolist()],
        n_layers=local.n_layers,
        features=features,
        activations=local.values.cpu()[selected],
        logit_tokens=ids.tolist(),
        logit_strings=[text.decode([t]) for t in ids.tolist()],
        logit_probabilities=probabilities.cpu(),
        adjacency=adjacency.detach(),
        n_active_features=F,
        info={
            "model_name": clt.cfg.model_name,
            "hook_name": clt.cfg.hook_name,
            "hook_name_out": clt.cfg.hook_name_out,
            "architecture": clt.cfg.architecture,
            "max_n_logits": max_n_logits,
            "desired_logit_prob": desired_logit_prob,
            "batch_size": batch_size,
            "max_feature_nodes": max_feature_nodes,
        },
    )
