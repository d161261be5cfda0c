"""Activations from a live model: token contexts in, shuffled batches of activation rows out."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

import torch
from torch import Tensor

from saelab.activations.shuffle_buffer import ShuffleBuffer
from saelab.activations.source import Batch
from saelab.core.errors import ConfigError
from saelab.data.config import DataConfig
from saelab.data.tokens import excluded_token_ids, training_contexts
from saelab.models.hooks import HookedModel
from saelab.models.pair import COMPARED, ModelPair, is_compared

Models = HookedModel | ModelPair
"""A model, or two read on the same tokens (model diffing: hooks named '<hook>@compare' are the second's)."""


class Harvester:
    """Runs the model (only as deep as needed) and turns its activations at `hook_names` into rows: one per
    kept token position, positions outside [seq_start, seq_end) and special tokens left out. With a ModelPair both
    models read the same contexts and keep the same positions."""

    def __init__(
        self,
        model: Models,
        hook_names: Sequence[str],
        exclude_token_ids: Iterable[int] = (),
        seq_start: int = 0,
        seq_end: int | None = None,
    ):
        if not isinstance(model, ModelPair) and (compared := [n for n in hook_names if is_compared(n)]):
            raise ConfigError(
                f"hook '{compared[0]}' reads the compared model ('{COMPARED}'): name it in model.compare_with"
            )
        for name in hook_names:
            model.hook_point(name)  # unknown names fail here, listing the valid ones
        self.model, self.hook_names = model, list(hook_names)
        self.exclude_token_ids = torch.tensor(sorted(set(exclude_token_ids)), dtype=torch.long)
        self.seq_start, self.seq_end = seq_start, seq_end

    def __call__(self, tokens: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """({hook: (rows, width)}, token id of each row) for a batch of contexts `(batch, context_size)`."""
        device = next(self.model.model.parameters()).device
        acts = self.model.run_with_cache(tokens.to(device), self.hook_names)
        window = slice(self.seq_start, self.seq_end)
        tokens = tokens[:, window]
        keep = ~torch.isin(tokens, self.exclude_token_ids)
        rows = {}
        for name, value in acts.items():
            if value.dim() != 3:
                raise ConfigError(f"hook '{name}' gives shape {tuple(value.shape)}, expected (batch, position, width)")
            rows[name] = value[:, window][keep.to(value.device)].float()
        return rows, tokens[keep]


def concat_hooks(rows: dict[str, Tensor]) -> Tensor:
    """Rows of all hooks side by side, so one buffer shuffles them together."""
    return torch.cat(list(rows.values()), dim=-1)


def split_hooks(block: Tensor, widths: dict[str, int]) -> Batch:
    """The inverse of concat_hooks: a tensor for one hook, a dict by hook name for several."""
    parts = torch.split(block, list(widths.values()), dim=-1)
    if len(parts) == 1:
        return parts[0]
    return dict(zip(widths, parts, strict=True))


class ActivationStore:
    """Activation batches from a live model, mixed by a bounded shuffle buffer.

    Its state (token position, the buffer's rows and generator, harvested rows not yet buffered) is saved
    with checkpoints, so a resumed run continues with exactly the batches it would have seen.
    """

    def __init__(self, harvester: Harvester, contexts, batch_size: int, buffer_size: int, seed: int = 0):
        self.harvester, self.contexts = harvester, contexts
        self.buffer = ShuffleBuffer(buffer_size, batch_size, seed=seed)
        self.pending: Tensor | None = None  # harvested rows (hooks side by side) not yet in the buffer
        self.widths: dict[str, int] = {}

    def _harvest(self, tokens: Tensor) -> Tensor:
        rows, _ = self.harvester(tokens)
        self.widths = {name: value.shape[-1] for name, value in rows.items()}
        return concat_hooks(rows)

    def _next_block(self, contexts: Iterator[Tensor]) -> Tensor | None:
        """Harvested rows of the next batch of contexts, or None at the end of a finite stream."""
        tokens = next(contexts, None)
        return None if tokens is None else self._harvest(tokens)

    def __iter__(self) -> Iterator[Batch]:
        contexts = iter(self.contexts)
        while True:
            while not self.buffer.full:
                if self.pending is None or self.pending.shape[0] == 0:
                    block = self._next_block(contexts)
                    if block is None:  # a finite stream: serve what is left
                        for block in self.buffer.drain():
                            yield split_hooks(block, self.widths)
                        return
                    self.pending = block
                self.pending = self.pending[self.buffer.add(self.pending) :]
            yield split_hooks(self.buffer.draw(), self.widths)

    def state_dict(self) -> dict[str, Any]:
        return {
            "contexts": self.contexts.state_dict(),
            "buffer": self.buffer.state_dict(),
            "pending": self.pending,
            "widths": dict(self.widths),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.contexts.load_state_dict(state["contexts"])
        self.buffer.load_state_dict(state["buffer"])
        self.pending = state["pending"]
        self.widths = dict(state["widths"])


class GatheredActivationStore(ActivationStore):
    """An ActivationStore whose harvesting is split across ranks (module-parallel training): of every
    world-size consecutive batches of contexts, rank r runs the model on batch r, and the rows are all-gathered
    in batch order. Every rank then holds the same rows in the same order as one process harvesting alone,
    and its buffer (same seed) serves the same batches."""

    def __init__(self, harvester: Harvester, contexts, batch_size: int, buffer_size: int, seed: int, dist):
        super().__init__(harvester, contexts, batch_size, buffer_size, seed)
        self.dist = dist

    def _next_block(self, contexts: Iterator[Tensor]) -> Tensor | None:
        group = list(islice(contexts, self.dist.world_size))
        if len(group) < self.dist.world_size:  # a finite stream's ragged end: every rank stops here
            return None
        own = self._harvest(group[self.dist.rank])
        return torch.cat(self.dist.gather_rows(own))


def make_harvester(model: Models, data: DataConfig, hook_names: Sequence[str]) -> Harvester:
    """A Harvester for the data settings: special tokens dropped when asked, positions sliced."""
    excluded = excluded_token_ids(model.tokenizer, data.exclude_special_tokens)
    return Harvester(model, hook_names, excluded, data.seq_start, data.seq_end)


def model_activations(
    model: Models, data: DataConfig, hook_names: Sequence[str], batch_size: int, seed: int = 0, dist=None
) -> ActivationStore:
    """Shuffled batches of activations at `hook_names`, read from the model as training goes. With several
    processes (`dist`): data parallel, each rank its own contexts and buffer; module parallel, the harvest is
    split across ranks and gathered, so every rank sees the single-process stream."""
    harvester = make_harvester(model, data, hook_names)
    shard = (dist.rank, dist.world_size) if dist is not None and dist.data_parallel else (0, 1)
    contexts = training_contexts(data, model.tokenizer, shard=shard)
    if dist is not None and dist.module_parallel:
        return GatheredActivationStore(harvester, contexts, batch_size, data.shuffle_buffer, seed, dist)
    return ActivationStore(harvester, contexts, batch_size, data.shuffle_buffer, seed + 1_000_003 * shard[0])
