"""Standard SAE: ReLU latents and an L1 penalty weighted by decoder row norms (SAELens >= 3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.saes.base import SAE
from saelab.saes.config import SAEConfig
from saelab.saes.outputs import TrainOutput
from saelab.saes.registry import register


@dataclass
class StandardConfig(SAEConfig):
    l1_coefficient: float = 5.0
    """Weight of the L1 penalty, each latent weighted by its decoder row norm (gated: on the gate's ReLU'd
    pre-activations)."""
    lp_norm: float = 1.0
    """The p of the sparsity penalty (1 = L1)."""


def decoder_weighted_lp(latents: Tensor, W_dec: Tensor, p: float) -> Tensor:
    """Mean over tokens of the Lp norm of latents scaled by their decoder row norms.

    Weighting by row norm stops the optimiser from shrinking latents and growing decoder rows to dodge
    the penalty, so the decoder need not be constrained to unit norm. The latents are ReLU outputs, never
    negative, so the L1 norm is a matrix-vector product (no |x| pass over the latents, forward or backward).
    """
    norms = W_dec.norm(dim=1).to(latents.dtype)  # bfloat16 latents under autocast
    if p == 1:
        return (latents.reshape(-1, latents.shape[-1]) @ norms).mean()
    return (latents * norms).norm(p=p, dim=-1).mean()


@register("standard")
class StandardSAE(SAE):
    config_class = StandardConfig
    cfg: StandardConfig

    def activate(self, hidden_pre: Tensor) -> Tensor:
        return torch.relu(hidden_pre)

    def sparsity_coefficient(self) -> float:
        return self.cfg.l1_coefficient

    def sparsity_loss(self, out: TrainOutput) -> Tensor:
        return decoder_weighted_lp(out.latents, self.W_dec, self.cfg.lp_norm)
