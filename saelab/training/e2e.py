"""End-to-end training: the SAEs run inside the frozen model, in place of the activations they read.

Per batch of contexts the model runs twice: clean (no gradients; its logits and downstream activations are the
targets) and spliced, where each SAE's output replaces its hook's activation at every non-special position.
Gradients reach the SAEs through the rest of the model; the model's weights are frozen and receive none.
Several SAEs are spliced in the same pass, so an SAE downstream of another reads the other's output.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.core.errors import ConfigError
from saelab.evals.metrics import kl_divergence
from saelab.saes.base import SAE
from saelab.splice import check_splice, spliced
from saelab.training.unit import Forward, TrainingUnit


@dataclass
class SplicedRun:
    """The clean and the spliced pass over one batch of contexts: what model-level losses and metrics read."""

    tokens: Tensor
    keep: Tensor
    """(batch, positions): positions spliced and counted (special tokens are neither)."""
    clean_logits: Tensor
    logits: Tensor
    clean_downstream: dict[str, Tensor]
    """Clean activations at the downstream hooks, one row per kept position."""
    downstream: dict[str, Tensor]
    """The same activations in the spliced pass (differentiable)."""

    def kl(self) -> Tensor:
        """Mean over kept positions of KL(clean || spliced) of the next-token distributions (differentiable)."""
        return kl_divergence(self.clean_logits[self.keep], self.logits[self.keep], dtype=torch.float32).mean()

    def downstream_loss(self) -> Tensor:
        """Sum over downstream hooks of the squared error of the spliced activations, relative to the clean
        activations' mean squared norm (so layers with large norms do not dominate)."""
        terms = [
            (self.downstream[h] - clean).pow(2).sum(-1).mean() / clean.pow(2).sum(-1).mean().clamp_min(1e-12)
            for h, clean in self.clean_downstream.items()
        ]
        return torch.stack(terms).sum()

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        """Whole-model effect of the splice: KL, CE-loss increase over the clean model, top-1 agreement."""
        counted = self.keep[:, :-1] & self.keep[:, 1:]
        targets = self.tokens[:, 1:][counted]

        def ce(logits: Tensor) -> float:
            return float(F.cross_entropy(logits[:, :-1][counted].float(), targets))

        agree = self.clean_logits[self.keep].argmax(-1) == self.logits[self.keep].argmax(-1)
        return {
            "kl": float(self.kl()),
            "ce_loss_increase": ce(self.logits) - ce(self.clean_logits),
            "top1_agreement": float(agree.float().mean()),
        }


class SplicedModel:
    """Runs the frozen model clean and with SAEs spliced in, for end-to-end objectives."""

    def __init__(self, model: Any, excluded_token_ids: Iterable[int] = (), downstream_hooks: Sequence[str] = ()):
        for name in downstream_hooks:
            model.hook_point(name)  # unknown names fail here, listing the valid ones
        self.model = model
        self.excluded = torch.tensor(sorted(set(excluded_token_ids)), dtype=torch.long)
        self.downstream_hooks = list(downstream_hooks)

    def _prepare(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        device = next(self.model.model.parameters()).device
        tokens = tokens.to(device)
        return tokens, ~torch.isin(tokens, self.excluded.to(device))

    @torch.no_grad()
    def clean_activations(self, tokens: Tensor, hooks: Sequence[str]) -> dict[str, Tensor]:
        """Clean activations at `hooks`, one row per kept position (to estimate scales before training)."""
        tokens, keep = self._prepare(tokens)
        acts = self.model.run_with_cache(tokens, list(dict.fromkeys(hooks)))
        return {name: value[keep] for name, value in acts.items()}

    def check(self, saes: Iterable[SAE]) -> None:
        """Refuse SAEs that cannot be spliced together (a missing hook point, two replacing one activation)."""
        check_splice(self.model, list(saes))

    def run(self, tokens: Tensor, units: Sequence[TrainingUnit]) -> tuple[dict[str, Forward], SplicedRun]:
        """Both passes over a batch of contexts `(batch, positions)`. Each unit's SAE runs its training forward
        (compiled when train.compile asks) on scaled activations; its output is scaled back before the model
        receives it."""
        tokens, keep = self._prepare(tokens)
        with torch.no_grad(), self.model.hooks(read=self.downstream_hooks) as cache:
            clean_logits = self.model.logits(tokens)
            clean_downstream = {h: cache[h][keep] for h in self.downstream_hooks}

        by_sae = {unit.sae: unit for unit in units}
        forwards: dict[str, Forward] = {}

        def train_forward(sae: SAE, x: Tensor, activation: Tensor) -> Tensor:
            unit = by_sae[sae]
            x = unit.scaler.scale_input(x.to(sae.dtype))
            target = unit.scaler.scale_target(activation.detach().to(sae.dtype))
            out = unit.forward(x)
            forwards[unit.name] = (x, target, out)
            return unit.scaler.unscale_output(out.output)

        saes = [unit.sae for unit in units]
        with spliced(self.model, saes, positions=keep, run=train_forward, read=self.downstream_hooks) as cache:
            logits = self.model.logits(tokens)
            downstream = {h: cache[h][keep] for h in self.downstream_hooks}
        missing = [u.name for u in units if u.name not in forwards]
        if missing:
            raise ConfigError(f"the forward pass never reached the hook point of SAE(s) {', '.join(missing)}")
        return forwards, SplicedRun(tokens, keep, clean_logits, logits, clean_downstream, downstream)
