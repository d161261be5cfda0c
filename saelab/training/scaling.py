"""Activation scaling while an SAE trains: estimated once, applied to every batch, folded into the weights on saving.

With `normalize_activations: expected_average_only_in` an SAE trains on activations scaled so that their mean
norm is sqrt(width) (inputs and, for a transcoder, targets each by their own factor), so that coefficients and
learning rates carry over between models and layers. The saved SAE works on raw activations: the scales are
folded into its weights (`SAE.fold_activation_scale`), which leaves its latents unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from saelab.saes.base import SAE

SCALED = "expected_average_only_in"


@dataclass
class ActivationScaler:
    """Input and target scale factors of one SAE (1.0 each when its activations are not normalised). A dictionary
    over several layers reads the concatenation of their activations and scales each layer by its own factor
    (norms grow with depth: one factor would let the deepest layer dominate the loss)."""

    in_scale: list[float] = field(default_factory=lambda: [1.0])
    out_scale: list[float] = field(default_factory=lambda: [1.0])

    def estimate(self, sae: SAE, inputs: Tensor, targets: Tensor) -> None:
        """Set the factors from a sample of raw inputs and targets, if `sae` trains on scaled activations."""
        if sae.cfg.normalize_activations == SCALED:
            blocks = len(sae.cfg.input_hooks()) or 1
            self.in_scale, self.out_scale = _factors(inputs, blocks), _factors(targets, blocks)

    def scale_input(self, x: Tensor) -> Tensor:
        return _scaled(x, self.in_scale)

    def scale_target(self, y: Tensor) -> Tensor:
        return _scaled(y, self.out_scale)

    def unscale_output(self, y: Tensor) -> Tensor:
        """An output of the SAE in training back in raw activation units."""
        return _scaled(y, [1 / s for s in self.out_scale])

    def fold_into(self, sae: SAE) -> None:
        """Make `sae` (trained on scaled activations) work on raw ones; its config then says so."""
        if sae.cfg.normalize_activations == SCALED:
            sae.fold_activation_scale(*_as_arguments(self.in_scale, self.out_scale))
            sae.cfg.normalize_activations = "none"

    def unfold_from(self, sae: SAE) -> None:
        """The inverse of `fold_into` for an SAE saved for raw activations that now trains on scaled ones."""
        sae.fold_activation_scale(*_as_arguments([1 / s for s in self.in_scale], [1 / s for s in self.out_scale]))

    def state_dict(self) -> dict[str, Any]:
        return {"in_scale": _as_arguments(self.in_scale)[0], "out_scale": _as_arguments(self.out_scale)[0]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.in_scale, self.out_scale = _as_list(state["in_scale"]), _as_list(state["out_scale"])


def _factors(x: Tensor, blocks: int) -> list[float]:
    """Per block of the last dimension: sqrt(block width) / the mean norm of the block."""
    parts = x.reshape(-1, blocks, x.shape[-1] // blocks)
    return [math.sqrt(parts.shape[-1]) / float(n) for n in parts.norm(dim=-1).mean(dim=0)]


def _scaled(x: Tensor, factors: list[float]) -> Tensor:
    if len(factors) == 1:
        return x * factors[0]
    per_block = x.new_tensor(factors).repeat_interleave(x.shape[-1] // len(factors))
    return x * per_block


def _as_arguments(*scales: list[float]) -> tuple[float | list[float], ...]:
    """One float per scale when there is one block (the SAE interface's form), else the list."""
    return tuple(s[0] if len(s) == 1 else s for s in scales)


def _as_list(value: float | list[float]) -> list[float]:
    return [float(v) for v in value] if isinstance(value, list) else [float(value)]
