"""Loss terms as small composable pieces; the trainer adds up whatever objectives it is given.

Each objective reads a `StepContext` and returns its weighted term (or None when it does not apply), under
a name that logs and metrics share. Local SAE training uses reconstruction + sparsity + auxiliary; other
training modes add their own pieces to the list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from saelab.saes.base import SAE, TrainOutput
from saelab.training.schedules import warmup_factor


@dataclass
class StepContext:
    sae: SAE
    out: TrainOutput
    target: Tensor
    dead_mask: Tensor | None
    step: int


class Objective(Protocol):
    name: str

    def __call__(self, ctx: StepContext) -> Tensor | None: ...


@dataclass
class Reconstruction:
    """The architecture's reconstruction loss of the target (squared error; matryoshka sums prefixes)."""

    coefficient: float = 1.0
    name: str = "mse_loss"

    def __call__(self, ctx: StepContext) -> Tensor:
        return self.coefficient * ctx.sae.reconstruction_loss(ctx.out, ctx.target)


@dataclass
class Sparsity:
    """The architecture's sparsity penalty times its coefficient, warmed up linearly."""

    warmup_steps: int = 0
    name: str = "sparsity_loss"

    def __call__(self, ctx: StepContext) -> Tensor | None:
        penalty = ctx.sae.sparsity_loss(ctx.out)
        if penalty is None:
            return None
        return ctx.sae.sparsity_coefficient * warmup_factor(ctx.step, self.warmup_steps) * penalty


@dataclass
class Auxiliary:
    """The architecture's auxiliary loss (gated's gate path, TopK's AuxK) times its coefficient."""

    name: str = "aux_loss"

    def __call__(self, ctx: StepContext) -> Tensor | None:
        loss = ctx.sae.auxiliary_loss(ctx.out, ctx.target, ctx.dead_mask)
        return None if loss is None else ctx.sae.aux_coefficient * loss


def local_objectives(sparsity_warmup_steps: int = 0) -> list[Objective]:
    """Reconstruction training of an SAE on its own input (or a transcoder on its target)."""
    return [Reconstruction(), Sparsity(sparsity_warmup_steps), Auxiliary()]
