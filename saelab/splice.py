"""SAEs spliced into a model for analysis: read their latents, edit them, keep the model exact, steer.

Inside `with spliced(model, saes):` every forward pass of `model` runs each SAE at its hook point and passes
its output on. Each SAE adds named hook points of its own, under its output hook's name (SAELens's names):

    {hook}.hook_sae_input       what the SAE reads
    {hook}.hook_sae_acts_post   its latents
    {hook}.hook_sae_recons      its reconstruction (from the latents, edited or not)
    {hook}.hook_sae_error       activation - reconstruction of the unedited latents
    {hook}.hook_sae_output      what the model receives

With `error_term=True` the model receives reconstruction + error: without edits that is the clean activation
exactly, so the logits are the clean ones while every latent is visible; an edit of the latents then changes
the activation by exactly the change of the decoded reconstruction.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from saelab.core.config import closest
from saelab.models.hooks import HookedModel, UnknownHookError
from saelab.saes.base import SAE

def hooks_of(sae: SAE) -> tuple[str, str]:
    """(hook read, hook replaced): the same for an SAE, input and output hooks for a transcoder."""
    hook_in = sae.cfg.hook_name
    if hook_in is None:
        raise ValueError("splicing an SAE into the model needs its cfg.hook_name")
    return hook_in, (sae.cfg.hook_name_out if sae.cfg.transcoder and sae.cfg.hook_name_out else hook_in)


SAE_HOOKS = ("hook_sae_input", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error", "hook_sae_output")

Edit = Callable[[Tensor], Tensor]


def sae_hook_names(saes: SAE | Sequence[SAE]) -> list[str]:
    """Every SAE hook point of `saes` (see the module docstring)."""
    return [f"{hooks_of(sae)[1]}.{name}" for sae in _as_list(saes) for name in SAE_HOOKS]


def _as_list(saes: SAE | Sequence[SAE]) -> list[SAE]:
    return [saes] if isinstance(saes, SAE) else list(saes)


@contextmanager
def spliced(
    model: HookedModel,
    saes: SAE | Sequence[SAE],
    error_term: bool = False,
    read: Sequence[str] = (),
    edit: Mapping[str, Edit] | None = None,
) -> Iterator[dict[str, Tensor]]:
    """Within the block, `model`'s forward passes run through `saes`.

    `read` names SAE hook points or the model's own hook points; the yielded dict fills with their values.
    `edit` maps SAE hook points to functions applied there (e.g. `ablate([3])` at `...hook_sae_acts_post`).
    """
    saes = _as_list(saes)
    by_hook = {hooks_of(sae)[1]: sae for sae in saes}
    if len(by_hook) != len(saes):
        raise ValueError("two SAEs replace the same hook point: splice them one at a time")
    edit = dict(edit or {})
    valid = sae_hook_names(saes)

    def is_sae_hook(name: str) -> bool:
        return any(name.startswith(f"{hook}.") for hook in by_hook) or name.rsplit(".", 1)[-1].startswith("hook_sae")

    sae_reads = [name for name in read if is_sae_hook(name)]
    for name in [*edit, *sae_reads]:
        if name not in valid:
            hint = closest(name, valid)
            raise UnknownHookError(f"unknown SAE hook point '{name}'." + (f" Did you mean '{hint}'?" if hint else "")
                                   + f" Valid names: {', '.join(valid)}")
    model_reads = [name for name in read if name not in sae_reads]
    inputs_needed = [hooks_of(sae)[0] for sae in saes if hooks_of(sae)[0] != hooks_of(sae)[1]]

    def run_sae(sae: SAE, hook_out: str, cache: dict[str, Tensor]) -> Edit:
        def at(name: str, value: Tensor) -> Tensor:
            full = f"{hook_out}.{name}"
            if full in edit:  # on a copy, so that an in-place edit cannot reach the unedited values
                value = edit[full](value.clone())
            if full in sae_reads:
                cache[full] = value
            return value

        def replace(activation: Tensor) -> Tensor:
            hook_in = hooks_of(sae)[0]
            x = cache[hook_in] if hook_in != hook_out else activation
            x = at("hook_sae_input", x.to(sae.device, sae.dtype))
            latents = sae.encode(x)
            skip = sae.skip(x)
            clean = sae.decode(latents) if skip is None else sae.decode(latents) + skip
            edited = at("hook_sae_acts_post", latents)
            recons = clean if edited is latents else (sae.decode(edited) if skip is None else sae.decode(edited) + skip)
            recons = at("hook_sae_recons", recons)
            output = recons
            error_name = f"{hook_out}.hook_sae_error"
            if error_term or error_name in sae_reads or error_name in edit:
                error = activation.to(recons.dtype) - clean.detach()
                edited_error = at("hook_sae_error", error)
                if error_term:
                    output = _with_error(activation, recons, clean, error, edited_error)
            return at("hook_sae_output", output).to(activation.dtype)

        return replace

    # one dict for both: the model's hooks fill it with what is read, the SAEs add their own hook points
    with model.hooks(read=[*inputs_needed, *model_reads]) as cache:
        with model.hooks(write={hook: run_sae(sae, hook, cache) for hook, sae in by_hook.items()}):
            yield cache


def _with_error(activation: Tensor, recons: Tensor, clean: Tensor, error: Tensor, edited_error: Tensor) -> Tensor:
    """reconstruction + error, computed so that what was not edited stays exact."""
    if edited_error is not error:
        return recons + edited_error
    if recons is clean:  # nothing edited: the activation itself, bit for bit
        return activation
    return activation + (recons - clean).to(activation.dtype)  # moved by exactly the reconstruction's change


def run_with_saes(
    model: HookedModel, tokens: Tensor, saes: SAE | Sequence[SAE], error_term: bool = False,
    edit: Mapping[str, Edit] | None = None,
) -> Tensor:
    """Logits of `tokens` with `saes` spliced in (and `edit` applied)."""
    with torch.no_grad(), spliced(model, saes, error_term=error_term, edit=edit):
        return model.logits(tokens)


def run_with_cache_and_saes(
    model: HookedModel, tokens: Tensor, saes: SAE | Sequence[SAE], names: Sequence[str] | None = None,
    error_term: bool = False, edit: Mapping[str, Edit] | None = None,
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
def steer(model: HookedModel, sae: SAE, latent: int, coefficient: float, positions: slice | None = None) -> Iterator[None]:
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
