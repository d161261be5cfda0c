"""A shuffle buffer with a fixed memory bound.

Activations from one context are strongly correlated, so they are mixed before training: rows go into a
preallocated store of `capacity` rows; once it is full, each batch is drawn uniformly at random from it and
the freed slots take the next incoming rows. Memory is `capacity x width` values however long the stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from saelab.core.errors import ConfigError


class ShuffleBuffer:
    """Mixes a stream of row blocks `(n, width)` into random batches `(batch_size, width)`."""

    def __init__(self, capacity: int, batch_size: int, seed: int = 0):
        if capacity < batch_size:
            raise ConfigError(f"shuffle buffer capacity {capacity} is smaller than the batch size {batch_size}")
        self.capacity, self.batch_size = capacity, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.store: Tensor | None = None
        self.size = 0

    def add(self, rows: Tensor) -> int:
        """Copy as many leading rows as fit into the buffer; return how many were taken."""
        if self.store is None:
            self.store = torch.empty(self.capacity, *rows.shape[1:], dtype=rows.dtype, device=rows.device)
        if rows.shape[1:] != self.store.shape[1:]:
            raise ConfigError(
                f"rows of shape {tuple(rows.shape[1:])} pushed into a buffer of {tuple(self.store.shape[1:])}"
            )
        take = min(self.capacity - self.size, rows.shape[0])
        self.store[self.size : self.size + take] = rows[:take]
        self.size += take
        return take

    @property
    def full(self) -> bool:
        return self.size == self.capacity

    def drain(self) -> Iterator[Tensor]:
        """Yield the remaining full batches in random order (the end of a finite stream)."""
        while self.size >= self.batch_size:
            yield self.draw()

    def state_dict(self) -> dict[str, Any]:
        """The rows held and the random generator: enough to continue exactly."""
        rows = self.store[: self.size].clone() if self.store is not None else None
        return {"rows": rows, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.store, self.size = None, 0
        if state["rows"] is not None:
            self.add(state["rows"])

    def draw(self) -> Tensor:
        """A batch of distinct random rows, removed from the buffer."""
        assert self.store is not None
        n, b = self.size, self.batch_size
        chosen = torch.randperm(n, generator=self.generator)[:b]
        batch = self.store[chosen].clone()
        # Close the holes: rows from the tail that were not drawn move into drawn slots below the tail.
        keep = torch.ones(n, dtype=torch.bool)
        keep[chosen] = False
        tail = torch.arange(n - b, n)
        movers = tail[keep[tail]]
        holes = chosen[chosen < n - b]
        self.store[holes] = self.store[movers]
        self.size = n - b
        return batch
