"""Gated SAE (Rajamanoharan et al. 2024): a gate decides which latents fire, a magnitude path how much.

Both paths share encoder directions; the magnitude path rescales them per latent by exp(r_mag).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saelab.saes.base import SAE
from saelab.saes.config import SAEConfig
from saelab.saes.masking import where_positive
from saelab.saes.outputs import TrainOutput
from saelab.saes.registry import register
from saelab.saes.standard import relu_weighted_l1


class _GatedLatents(torch.autograd.Function):
    """relu(magnitude pre-activations) where the gate is open, else 0; the gradient reaches the magnitude path only
    (the gate's step has none), where the latent is positive. Forward and backward are three passes with the
    masked select of `saes/masking.py`, where autograd on `where(gate > 0, relu(magnitude), 0)` took five."""

    @staticmethod
    def forward(ctx, gate_pre: Tensor, magnitude_pre: Tensor) -> Tensor:
        latents = where_positive(torch.relu(magnitude_pre), gate_pre)
        ctx.save_for_backward(latents)
        return latents

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:
        (latents,) = ctx.saved_tensors
        return None, where_positive(grad, latents)


@dataclass
class GatedConfig(SAEConfig):
    l1_coefficient: float = 3.0
    """Weight of the L1 penalty, each latent weighted by its decoder row norm (gated: on the gate's ReLU'd
    pre-activations)."""
    aux_coefficient: float = 1.0
    """Weight of the auxiliary loss: reconstructing the input from the gate path through a frozen decoder."""


@register("gated")
class GatedSAE(SAE):
    config_class = GatedConfig
    cfg: GatedConfig
    b_gate: nn.Parameter
    r_mag: nn.Parameter
    b_mag: nn.Parameter
    # As in the gated-SAE paper: unit-norm decoder rows. Measured here on planted features, the unconstrained
    # 0.1-norm start of the standard SAE leaves the gate too weakly penalised (L0 ~ 40 where 3 are planted).
    default_decoder_init_norm = 1.0
    default_normalize_decoder = True

    def create_encoder_biases(self) -> None:
        self.b_gate = self._empty(self.cfg.d_sae)
        self.r_mag = self._empty(self.cfg.d_sae)
        self.b_mag = self._empty(self.cfg.d_sae)

    def scale_encoder_biases(self, factors: Tensor) -> None:
        # W_enc's column scales both paths: the gate's sign is unchanged, the magnitude scales with the latent
        self.b_gate.mul_(factors)
        self.b_mag.mul_(factors)

    def gate_pre_activation(self, sae_in: Tensor) -> Tensor:
        return sae_in @ self.W_enc + self.b_gate

    def pre_activation(self, sae_in: Tensor) -> Tensor:
        """Magnitude-path pre-activations (the 'hidden_pre' of a gated SAE)."""
        return (sae_in @ self.W_enc) * self.r_mag.exp() + self.b_mag

    def _gated(self, projected: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Gate pre-activations, magnitude pre-activations and latents from `sae_in @ W_enc`, which both paths
        share: one encoder matmul forward and one backward, not two of each."""
        gate_pre = projected + self.b_gate
        magnitude_pre = torch.addcmul(self.b_mag, projected, self.r_mag.exp())
        return gate_pre, magnitude_pre, _GatedLatents.apply(gate_pre, magnitude_pre)

    def encode(self, x: Tensor) -> Tensor:
        return self._gated(self._sae_input(x) @ self.W_enc)[2]

    def training_forward(self, x: Tensor) -> TrainOutput:
        sae_in, projected = self._training_projection(x, None)
        gate_pre, magnitude_pre, latents = self._gated(projected)
        skip = self.skip(x)
        output = self.with_skip(self.decode(latents), skip)
        gate, weighted_l1 = relu_weighted_l1(gate_pre, self.W_dec)  # the gate, read by the auxiliary loss too
        extras = {"gate": gate, "weighted_l1": weighted_l1}
        return TrainOutput(sae_in, magnitude_pre, output, latents=latents, skip=skip, extras=extras)

    def sparsity_coefficient(self) -> float:
        return self.cfg.l1_coefficient

    def sparsity_loss(self, out: TrainOutput) -> Tensor:
        return out.extras["weighted_l1"].mean()

    def aux_coefficient(self) -> float:
        return self.cfg.aux_coefficient

    def auxiliary_loss(self, out: TrainOutput, target: Tensor, dead_mask: Tensor | None) -> Tensor:
        # The gate path alone must reconstruct the target through a frozen decoder, which gives the gate
        # weights a reconstruction gradient the Heaviside step would otherwise block.
        via_gate = out.extras["gate"] @ self.W_dec.detach() + self.b_dec.detach()
        if out.skip is not None:
            target = target - out.skip.detach()
        return (via_gate - target).pow(2).sum(dim=-1).mean()
