"""What each SAE reads out of a batch: its input and target rows, checked against its widths."""

from __future__ import annotations

import torch
from torch import Tensor

from saelab.activations.source import Batch
from saelab.core.errors import ConfigError
from saelab.saes.base import SAE


def select_inputs(batch: Batch, sae: SAE) -> tuple[Tensor, Tensor]:
    """The (input, target) pair an SAE trains on, picked out of a batch."""
    cfg = sae.cfg
    if isinstance(batch, Tensor):
        if cfg.transcoder:
            raise ConfigError("a transcoder needs (input, target) batches or batches keyed by hook name")
        return batch, batch
    if isinstance(batch, tuple):
        return batch[0], batch[1]
    if cfg.hook_name is None and len(batch) == 1:  # the only activations there are
        only = next(iter(batch.values()))
        return only, (_concatenated(batch, cfg.output_hooks()) if cfg.transcoder else only)
    return _concatenated(batch, cfg.input_hooks()), _concatenated(batch, cfg.output_hooks())


def _concatenated(batch: dict[str, Tensor], names: list[str]) -> Tensor:
    """The activations at `names`, side by side (a dictionary over several layers reads several hooks)."""
    if not names:
        raise ConfigError(f"the SAE names no hook point to read, and the batch has several: {', '.join(batch)}")
    tensors = [_read(batch, name) for name in names]
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=-1)


def _read(batch: dict[str, Tensor], name: str | None) -> Tensor:
    if name is None or name not in batch:
        raise ConfigError(f"SAE reads hook '{name}' but the batch has only: {', '.join(batch)}")
    return batch[name]


def check_widths(x: Tensor, target: Tensor, sae: SAE, name: str) -> None:
    """A clear error when the activations do not fit the SAE (wrong model, hook or layer)."""
    where = f" at '{sae.cfg.hook_name}'" if sae.cfg.hook_name else ""
    if x.shape[-1] != sae.cfg.d_in:
        raise ConfigError(
            f"SAE '{name}' takes inputs of width {sae.cfg.d_in} but the activations{where} have width {x.shape[-1]}"
        )
    if target.shape[-1] != sae.cfg.d_out:
        raise ConfigError(
            f"SAE '{name}' reconstructs width {sae.cfg.d_out} but its targets have width {target.shape[-1]}"
        )
