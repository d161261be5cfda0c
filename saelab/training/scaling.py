"""Activation scaling while an SAE trains: estimated once, applied to every batch, folded into the weights on saving.

With `normalize_activations: expected_average_only_in` an SAE trains on activations scaled so that their mean
norm is sqrt(width) (inputs and, for a transcoder, targets each by their own factor), so that coefficients and
learning rates carry over between models and layers. The saved SAE works on raw activations: the scales are
folded into its weights (`SAE.fold_activation_scale`), which leaves its latents unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from saelab.saes.base import SAE

SCALED = "expected_average_only_in"


@dataclass
class ActivationScaler:
    """Input and target scale factors of one SAE (1.0 each when its activations are not normalised)."""

    in_scale: float = 1.0
    out_scale: float = 1.0

    def estimate(self, sae: SAE, inputs: Tensor, targets: Tensor) -> None:
        """Set the factors from a sample of raw inputs and targets, if `sae` trains on scaled activations."""
        if sae.cfg.normalize_activations == SCALED:
            self.in_scale = math.sqrt(inputs.shape[-1]) / float(inputs.norm(dim=-1).mean())
            self.out_scale = math.sqrt(targets.shape[-1]) / float(targets.norm(dim=-1).mean())

    def scale_input(self, x: Tensor) -> Tensor:
        return x * self.in_scale

    def scale_target(self, y: Tensor) -> Tensor:
        return y * self.out_scale

    def unscale_output(self, y: Tensor) -> Tensor:
        """An output of the SAE in training back in raw activation units."""
        return y / self.out_scale

    def fold_into(self, sae: SAE) -> None:
        """Make `sae` (trained on scaled activations) work on raw ones; its config then says so."""
        if sae.cfg.normalize_activations == SCALED:
            sae.fold_activation_scale(self.in_scale, self.out_scale)
            sae.cfg.normalize_activations = "none"

    def unfold_from(self, sae: SAE) -> None:
        """The inverse of `fold_into` for an SAE saved for raw activations that now trains on scaled ones."""
        sae.fold_activation_scale(1 / self.in_scale, 1 / self.out_scale)

    def state_dict(self) -> dict[str, Any]:
        return {"in_scale": self.in_scale, "out_scale": self.out_scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.in_scale, self.out_scale = float(state["in_scale"]), float(state["out_scale"])
