"""The held-out contexts an SAE is evaluated on, and how its metrics read per source.

A run never trains on the held-out part of its dataset (see `saelab.data.tokens.iter_contexts`). A built-in
corpus of several sources holds out a fixed part of each, and an SAE is evaluated on each source's held-out
contexts apart (a group per source) and on all of them together; any other dataset is one group, its first
`data.heldout_contexts` contexts. `evaluate` computes the metrics of every group; the helpers here name the
core ones per source (`source/<source>/<metric>`, as a run logs them under eval/) and find the weakest source.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from itertools import islice
from typing import Any

from torch import Tensor

from saelab.data import builtin
from saelab.data.config import DataConfig
from saelab.data.tokens import ContextBatches

Groups = dict[str | None, list[Tensor]]
"""Batches of held-out contexts by source (the single key None: a dataset without sources)."""
PER_SOURCE = ("explained_variance", "l0", "ce_loss_score", "ce_loss_increase", "kl_div_with_sae", "kl_div_score")
"""The core metrics reported per source."""


def heldout_sources(data: DataConfig) -> list[str]:
    """The sources evaluated apart: those of a built-in corpus of several, else none."""
    names = builtin.sources(data.dataset) if builtin.is_builtin(data.dataset) else []
    return names if len(names) > 1 else []


def heldout_contexts(
    model, data: DataConfig, n_contexts: int, batch_contexts: int = 8, source: str | None = None
) -> list[Tensor]:
    """The first `n_contexts` held-out contexts of the dataset (of one source of a built-in corpus, or of all of
    them mixed), in batches."""
    config = dataclasses.replace(data, contexts_per_batch=min(batch_contexts, n_contexts))
    batches = ContextBatches(config, model.tokenizer, loop=False, part="heldout", source=source)
    return list(islice(batches, max(1, n_contexts // config.contexts_per_batch)))


def heldout_groups(model, data: DataConfig, n_contexts: int, batch_contexts: int = 8) -> Groups:
    """`n_contexts` held-out contexts of each source (a built-in corpus of several), or of the dataset."""
    sources: list[str | None] = [*heldout_sources(data)] or [None]
    return {source: heldout_contexts(model, data, n_contexts, batch_contexts, source) for source in sources}


def core_metrics(part: Mapping[str, Any]) -> dict[str, float]:
    """The PER_SOURCE metrics of one part of an `evaluate` result (the whole, or one source's)."""
    flat = {**part["reconstruction"], **part["sparsity"], **part.get("downstream", {})}
    return {name: flat[name] for name in PER_SOURCE if name in flat}


def by_source(result: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Source -> its core metrics, from an `evaluate` result (empty when it has no sources)."""
    return {source: core_metrics(part) for source, part in result.get("sources", {}).items()}


def flat_by_source(metrics: Mapping[str, float], prefix: str = "") -> dict[str, dict[str, float]]:
    """Source -> metrics, from flat `<prefix>source/<source>/<metric>` entries (a run's summary row, prefix
    'eval/')."""
    sources: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if key.startswith(prefix + "source/"):
            source, _, metric = key[len(prefix + "source/") :].rpartition("/")
            sources.setdefault(source, {})[metric] = value
    return sources


def worst_source(sources: Mapping[str, Mapping[str, float]]) -> str | None:
    """The source with the lowest CE-loss score (explained variance when not measured); None without sources."""
    if not sources:
        return None
    key = "ce_loss_score" if all("ce_loss_score" in m for m in sources.values()) else "explained_variance"
    return min(sources, key=lambda name: sources[name][key])
