"""Two models read on the same tokens, for model diffing (a crosscoder over a base model and its fine-tuned
version, Lindsey et al. 2024).

`model.compare_with` names the second model. A hook name with the COMPARED suffix (`blocks.5.hook_resid_post@compare`)
is that hook point of the second model; every other name is the first model's. Both models see the same token
contexts and the same positions are kept, so row i of every hook is the same token in both models.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from saelab.core.errors import ConfigError
from saelab.models.hook_points import HookPoint
from saelab.models.hooks import HookedModel

COMPARED = "@compare"
"""Suffix of a hook name read from the compared model (`model.compare_with`)."""


def is_compared(name: str) -> bool:
    return name.endswith(COMPARED)


def check_same_tokenizer(first: HookedModel, second: HookedModel, names: tuple[str, str]) -> None:
    """Refuse two models whose tokenizers differ: the same token ids must mean the same text to both."""
    a, b = first.tokenizer.get_vocab(), second.tokenizer.get_vocab()
    if a != b:
        differ = sorted(set(a.items()) ^ set(b.items()), key=str)[:3]
        raise ConfigError(
            f"model.compare_with '{names[1]}' has a different tokenizer from '{names[0]}' ({len(a)} vs {len(b)} "
            f"tokens; e.g. {', '.join(f'{t!r}={i}' for t, i in differ)}): both models must read the same tokens"
        )


class ModelPair:
    """The two models of a model-diffing run, read like one HookedModel by hook name (COMPARED names the second
    model's hooks). Only what a harvest needs: hook points, widths and cached activations."""

    def __init__(self, first: HookedModel, second: HookedModel, names: tuple[str, str] = ("model", "compare_with")):
        check_same_tokenizer(first, second, names)
        self.first, self.second = first, second
        self.tokenizer = first.tokenizer

    @property
    def model(self):
        """The first model's module (where the token ids go)."""
        return self.first.model

    def _route(self, name: str) -> tuple[HookedModel, str]:
        return (self.second, name.removesuffix(COMPARED)) if is_compared(name) else (self.first, name)

    def hook_point(self, name: str) -> HookPoint:
        model, own = self._route(name)
        return model.hook_point(own)

    def run_with_cache(self, input_ids: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
        """Activations at `names` (of either model) for the same token ids, in the order of `names`."""
        own = [n for n in names if not is_compared(n)]
        other = list(dict.fromkeys(n.removesuffix(COMPARED) for n in names if is_compared(n)))
        acts: dict[str, Tensor] = {}
        if own:
            acts.update(self.first.run_with_cache(input_ids.to(_device(self.first)), own))
        if other:
            values = self.second.run_with_cache(input_ids.to(_device(self.second)), other)
            acts.update({name + COMPARED: value for name, value in values.items()})
        return {name: acts[name] for name in names}

    def hook_widths(self, names: Sequence[str]) -> dict[str, int]:
        widths: dict[str, int] = {}
        for name in names:
            model, own = self._route(name)
            widths[name] = model.hook_widths([own])[own]
        return widths


def _device(model: HookedModel):
    return next(model.model.parameters()).device
