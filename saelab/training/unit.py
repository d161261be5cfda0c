"""One SAE being trained: its optimiser, activation scaler, firing statistics, and its part of each step."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from saelab.activations.source import Batch
from saelab.evals.metrics import explained_variance
from saelab.saes.base import SAE
from saelab.saes.outputs import TrainOutput
from saelab.training.batches import check_widths, select_inputs
from saelab.training.config import TrainConfig
from saelab.training.distributed import Distributed
from saelab.training.objectives import Objective, StepContext
from saelab.training.scaling import ActivationScaler

Forward = tuple[Tensor, Tensor, TrainOutput]
"""(input, target, output) of one SAE in one step, inputs and targets scaled as the SAE trains on them."""


@dataclass
class TrainingUnit:
    """An SAE with what training it needs: optimiser, scaler, objectives and running statistics."""

    name: str
    sae: SAE
    objectives: list[Objective]
    optimizer: torch.optim.Optimizer
    lr: float
    forward: Callable[[Tensor], TrainOutput]
    """`sae.training_forward`, compiled when train.compile asks."""
    scaler: ActivationScaler = field(default_factory=ActivationScaler)
    tokens_since_fired: Tensor = field(init=False)
    fire_counts: Tensor = field(init=False)
    window: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    """Metrics of the steps since the last log."""

    def __post_init__(self) -> None:
        self.tokens_since_fired = torch.zeros(self.sae.cfg.d_sae, dtype=torch.long, device=self.sae.device)
        self.fire_counts = torch.zeros(self.sae.cfg.d_sae, dtype=torch.float64, device=self.sae.device)

    @classmethod
    def create(cls, name: str, sae: SAE, objectives: list[Objective], lr: float, cfg: TrainConfig) -> TrainingUnit:
        optimizer = torch.optim.Adam(sae.parameters(), lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=True)
        forward = torch.compile(sae.training_forward) if cfg.compile else sae.training_forward
        return cls(name, sae.train(), objectives, optimizer, lr, forward)

    # ----- before training ---------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, inputs: Tensor, targets: Tensor, initial: SAE | None = None) -> None:
        """From a sample of raw inputs and targets: the activation scales, then b_dec (or, with `initial`, that
        saved SAE's weights, unfolded for the scaled activations the SAE trains on)."""
        self.scaler.estimate(self.sae, inputs, targets)
        if initial is not None:
            self.sae.load_state_dict(initial.state_dict())
            self.scaler.unfold_from(self.sae)
        else:
            self.sae.initialize_b_dec(self.scaler.scale_target(targets))

    # ----- one step ----------------------------------------------------------------------------------
    def forward_local(self, batch: Batch) -> Forward:
        """The SAE's training forward on its rows of a batch of activations (local training)."""
        x, target = select_inputs(batch, self.sae)
        check_widths(x, target, self.sae, self.name)
        x = self.scaler.scale_input(x.to(self.sae.device, self.sae.dtype))
        target = self.scaler.scale_target(target.to(self.sae.device, self.sae.dtype))
        return x, target, self.forward(x)

    def loss_terms(self, forward: Forward, step: int, dead_window_tokens: int) -> dict[str, Tensor]:
        """Each objective's weighted term (those that apply), by name."""
        _, target, out = forward
        dead_mask = self.tokens_since_fired >= dead_window_tokens
        ctx = StepContext(sae=self.sae, out=out, target=target, dead_mask=dead_mask, step=step)
        return {o.name: term for o in self.objectives if (term := o(ctx)) is not None}

    def update(self, lr_scale: float, max_grad_norm: float | None) -> None:
        """One optimiser step from the gradients in place, keeping decoder rows on the sphere if asked."""
        sae = self.sae
        if sae.normalize_decoder:
            sae.remove_parallel_decoder_grad()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * lr_scale
        self.optimizer.step()
        if sae.normalize_decoder:
            sae.normalize_decoder_rows()

    @torch.no_grad()
    def record(self, forward: Forward, terms: dict[str, Tensor], dist: Distributed) -> None:
        """After the update: non-gradient state (BatchTopK's threshold), firing statistics over every rank's
        tokens, and the step's metrics."""
        _, target, out = forward
        self.sae.update_after_step(out)
        per_latent = out.firing_counts()
        n_tokens = target.shape[0]
        if dist.data_parallel:
            totals = dist.sum(torch.cat([per_latent, per_latent.new_tensor([n_tokens])]))
            per_latent, n_tokens = totals[:-1], int(totals[-1])
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[per_latent > 0] = 0
        self.fire_counts += per_latent
        self.window["loss"].append(float(sum(t.detach() for t in terms.values())) if terms else 0.0)
        for name, term in terms.items():
            self.window[name].append(float(term.detach()))
        self.window["l0"].append(float(per_latent.sum()) / n_tokens)
        self.window["explained_variance"].append(explained_variance(target, out.output))

    def dead_fraction(self, dead_window_tokens: int) -> float:
        return float((self.tokens_since_fired >= dead_window_tokens).float().mean())

    # ----- results and checkpoints -------------------------------------------------------------------
    def final_sae(self) -> SAE:
        """A copy in eval mode, as it is saved: working on raw activations (the scales folded into the weights)
        with unit-norm decoder rows where the architecture allows it (`SAE.fold_W_dec_norm`), which SAEBench
        expects. Its outputs are those of the SAE being trained."""
        sae = self.sae.clone().eval()
        self.scaler.fold_into(sae)
        sae.fold_W_dec_norm()
        return sae

    def state_dict(self) -> dict[str, Any]:
        return {
            "sae": self.sae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "tokens_since_fired": self.tokens_since_fired,
            "fire_counts": self.fire_counts,
            **self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.tokens_since_fired.copy_(state["tokens_since_fired"])
        self.fire_counts.copy_(state["fire_counts"])
        self.scaler.load_state_dict(state)
