"""Batches of activations from tensors in memory."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from saelab.core.errors import ConfigError

Batch = Tensor | tuple[Tensor, Tensor] | dict[str, Tensor]
"""One batch: a tensor (input = target), an (input, target) pair, or tensors by hook name."""


@runtime_checkable
class ActivationSource(Protocol):
    """What the trainer reads: an iterator of batches whose position can be saved and restored."""

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TensorSource:
    """Rows of one tensor, an (input, target) pair or a dict of tensors, in batches, reshuffled each epoch.

    The order depends only on `seed` and the epoch, so the position (epoch, row) is the whole state.
    """

    def __init__(self, data: Batch, batch_size: int, shuffle: bool = True, seed: int = 0, loop: bool = True):
        self.data = data
        if isinstance(data, dict):
            self.columns = list(data.values())
        else:
            self.columns = list(data) if isinstance(data, tuple) else [data]
        self.n_rows = self.columns[0].shape[0]
        if any(c.shape[0] != self.n_rows for c in self.columns):
            rows = [c.shape[0] for c in self.columns]
            raise ConfigError(f"all tensors of a TensorSource need the same number of rows, got {rows}")
        if batch_size > self.n_rows:
            raise ConfigError(f"batch_size {batch_size} is larger than the data ({self.n_rows} rows)")
        self.batch_size, self.shuffle, self.seed, self.loop = batch_size, shuffle, seed, loop
        self.epoch, self.row = 0, 0

    def _order(self) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.n_rows)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n_rows, generator=generator)

    def _take(self, index: Tensor) -> Batch:
        if isinstance(self.data, dict):
            return {name: t[index] for name, t in self.data.items()}
        if isinstance(self.data, tuple):
            x, y = self.data  # an (input, target) pair
            return x[index], y[index]
        return self.data[index]

    def __iter__(self) -> Iterator[Batch]:
        order = self._order()
        while True:
            if self.row + self.batch_size > self.n_rows:  # drop the ragged tail so every batch is full
                if not self.loop:
                    return
                self.epoch, self.row = self.epoch + 1, 0
                order = self._order()
            index = order[self.row : self.row + self.batch_size]
            self.row += self.batch_size
            yield self._take(index)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "row": self.row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.row = int(state["epoch"]), int(state["row"])
