"""Interventions on a model with SAEs spliced in: run it, read every SAE hook point, edit latents, steer."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from saelab.models.hooks import HookedModel
from saelab.saes.base import SAE
from saelab.splice import Edit, hooks_of, sae_hook_names, spliced


def run_with_saes(
    model: HookedModel,
    tokens: Tensor,
    saes: SAE | Sequence[SAE],
    error_term: bool = False,
    edit: Mapping[str, Edit] | None = None,
) -> Tensor:
    """Logits of `tokens` with `saes` spliced in (and `edit` applied)."""
    with torch.no_grad(), spliced(model, saes, error_term=error_term, edit=edit):
        return model.logits(tokens)


def run_with_cache_and_saes(
    model: HookedModel,
    tokens: Tensor,
    saes: SAE | Sequence[SAE],
    names: Sequence[str] | None = None,
    error_term: bool = False,
    edit: Mapping[str, Edit] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(logits, cache) with `saes` spliced in; `names` defaults to every SAE hook point."""
    names = sae_hook_names(saes) if names is None else list(names)
    with torch.no_grad(), spliced(model, saes, error_term=error_term, read=names, edit=edit) as cache:
        logits = model.logits(tokens)
        return logits, {name: cache[name] for name in names}


def ablate(latents: Sequence[int]) -> Edit:
    """An edit of `hook_sae_acts_post` that sets these latents to zero."""
    index = torch.as_tensor(list(latents), dtype=torch.long)

    def zero(values: Tensor) -> Tensor:
        values = values.clone()
        values[..., index.to(values.device)] = 0
        return values

    return zero


def clamp(latents: Sequence[int], value: float) -> Edit:
    """An edit of `hook_sae_acts_post` that holds these latents at `value` (at every position)."""
    index = torch.as_tensor(list(latents), dtype=torch.long)

    def hold(values: Tensor) -> Tensor:
        values = values.clone()
        values[..., index.to(values.device)] = value
        return values

    return hold


def steering_vector(sae: SAE, latent: int) -> Tensor:
    """The decoder direction of `latent`: what one unit of it adds to the SAE's output activation."""
    return sae.W_dec[latent].detach()


@contextmanager
def steer(
    model: HookedModel, sae: SAE, latent: int, coefficient: float, positions: slice | None = None
) -> Iterator[None]:
    """Within the block, `coefficient` times `latent`'s decoder direction is added at the SAE's output hook
    (at `positions` of each context, or every position)."""
    _, hook = hooks_of(sae)
    vector = coefficient * steering_vector(sae, latent)

    def add(activation: Tensor) -> Tensor:
        shift = vector.to(activation.device, activation.dtype)
        if positions is None:
            return activation + shift
        activation = activation.clone()
        activation[:, positions] += shift
        return activation

    with model.hooks(write={hook: add}):
        yield
