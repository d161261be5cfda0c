"""Loss terms as small composable pieces; the trainer adds up whatever objectives it is given.

Each SAE's objectives read a `StepContext` and return a weighted term (or None when it does not apply), under
a name that logs and metrics share. Model-level objectives (end-to-end training) read the `SplicedRun` of the
model with every SAE spliced in. Local training: reconstruction + sparsity + auxiliary per SAE; end-to-end adds
KL to the clean model and downstream reconstruction, and may drop the local reconstruction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from saelab.core.errors import SaelabError
from saelab.saes.base import SAE
from saelab.saes.outputs import TrainOutput
from saelab.training.config import ObjectiveConfig
from saelab.training.schedules import warmup_factor

if TYPE_CHECKING:  # the end-to-end module builds on the objectives
    from saelab.training.e2e import SplicedRun


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

    def __call__(self, ctx: StepContext) -> Tensor | None:
        if self.coefficient == 0:
            return None
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
        return ctx.sae.sparsity_coefficient() * warmup_factor(ctx.step, self.warmup_steps) * penalty


@dataclass
class Auxiliary:
    """The architecture's auxiliary loss (gated's gate path, TopK's AuxK) times its coefficient."""

    name: str = "aux_loss"

    def __call__(self, ctx: StepContext) -> Tensor | None:
        loss = ctx.sae.auxiliary_loss(ctx.out, ctx.target, ctx.dead_mask)
        return None if loss is None else ctx.sae.aux_coefficient() * loss


class ModelObjective(Protocol):
    name: str

    def __call__(self, run: SplicedRun) -> Tensor | None: ...


@dataclass
class KLToClean:
    """KL divergence from the clean model's next-token distribution to the spliced model's."""

    coefficient: float = 1.0
    name: str = "kl_loss"

    def __call__(self, run: SplicedRun) -> Tensor:
        return self.coefficient * run.kl()


@dataclass
class DownstreamReconstruction:
    """Relative squared error of the spliced activations at hook points after the SAEs."""

    coefficient: float = 1.0
    name: str = "downstream_loss"

    def __call__(self, run: SplicedRun) -> Tensor | None:
        return self.coefficient * run.downstream_loss() if run.clean_downstream else None


def local_objectives(sparsity_warmup_steps: int = 0, reconstruction: float = 1.0) -> list[Objective]:
    """Reconstruction training of an SAE on its own input (or a transcoder on its target)."""
    return [Reconstruction(reconstruction), Sparsity(sparsity_warmup_steps), Auxiliary()]


def model_objectives(config: ObjectiveConfig) -> list[ModelObjective]:
    """The end-to-end terms the config asks for (none for local training)."""
    terms: list[ModelObjective] = []
    if config.kl > 0:
        terms.append(KLToClean(config.kl))
    if config.downstream > 0:
        terms.append(DownstreamReconstruction(config.downstream))
    return terms


class TrainingDiverged(SaelabError, RuntimeError):
    """The loss or the weights stopped being finite."""


def check_finite(unit_terms: Mapping[str, Mapping[str, Tensor]], model_terms: Mapping[str, Tensor], step: int) -> None:
    """Stop before any weight changes when a loss term is not finite, naming the SAE and the terms."""
    owners = [*((f"SAE '{n}'", t) for n, t in unit_terms.items()), ("the model-level loss", model_terms)]
    for owner, terms in owners:
        if terms and not all(torch.isfinite(t) for t in terms.values()):
            values = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
            total = float(sum(v.detach() for v in terms.values()))
            raise TrainingDiverged(
                f"training diverged: {owner} at step {step}: loss is {total} ({values}); "
                f"stopped before updating the weights, earlier checkpoints are kept (resume with a lower lr)"
            )
