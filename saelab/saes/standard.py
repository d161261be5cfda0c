"""Standard SAE: ReLU latents and an L1 penalty weighted by decoder row norms (SAELens >= 3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.saes.base import SAE
from saelab.saes.config import SAEConfig
from saelab.saes.masking import where_positive
from saelab.saes.outputs import TrainOutput
from saelab.saes.registry import register


@dataclass
class StandardConfig(SAEConfig):
    l1_coefficient: float = 5.0
    """Weight of the L1 penalty, each latent weighted by its decoder row norm (gated: on the gate's ReLU'd
    pre-activations)."""
    lp_norm: float = 1.0
    """The p of the sparsity penalty (1 = L1)."""


class _ReLUWeightedL1(torch.autograd.Function):
    """`relu(pre)` and each token's sum of those latents times per-latent weights, with one backward for both.

    Autograd on the two written separately builds the L1's gradient as a (batch x d_sae) outer product, adds it to
    the latents' gradient, then applies the ReLU mask: three passes over the largest tensors of the step. Here the
    L1's gradient is added in the pass that creates the sum (`addr`), then masked: two passes.
    """

    @staticmethod
    def forward(ctx, pre: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        latents = torch.relu(pre)
        ctx.save_for_backward(latents, weights)
        ctx.set_materialize_grads(False)
        with torch.autocast(pre.device.type, enabled=False):  # outputs and gradients in one dtype: pre's
            return latents, latents @ weights

    @staticmethod
    def backward(ctx, grad_latents: Tensor | None, grad_sums: Tensor | None):
        latents, weights = ctx.saved_tensors
        if grad_sums is None:
            grad, grad_weights = grad_latents, None
        else:
            grad = (
                torch.outer(grad_sums, weights)
                if grad_latents is None
                else torch.addr(grad_latents, grad_sums, weights)
            )
            grad_weights = grad_sums @ latents if ctx.needs_input_grad[1] else None
        if grad is None:
            return None, grad_weights
        return where_positive(grad, latents), grad_weights


def relu_weighted_l1(pre: Tensor, W_dec: Tensor) -> tuple[Tensor, Tensor]:
    """(relu(pre), each token's L1 norm of those latents weighted by the decoder row norms) for `pre (..., d_sae)`:
    the standard SAE's latents and penalty (gated's gate and its penalty) in one autograd node."""
    flat = pre.reshape(-1, pre.shape[-1])
    latents, sums = _ReLUWeightedL1.apply(flat, W_dec.norm(dim=1).to(flat.dtype))
    return latents.reshape(pre.shape), sums.reshape(pre.shape[:-1])


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

    def training_latents(self, hidden_pre: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if self.cfg.lp_norm != 1:
            return super().training_latents(hidden_pre)
        latents, weighted_l1 = relu_weighted_l1(hidden_pre, self.W_dec)
        return latents, {"weighted_l1": weighted_l1}

    def sparsity_coefficient(self) -> float:
        return self.cfg.l1_coefficient

    def sparsity_loss(self, out: TrainOutput) -> Tensor:
        if "weighted_l1" in out.extras:  # computed with the latents by the training forward
            return out.extras["weighted_l1"].mean()
        return decoder_weighted_lp(out.latents, self.W_dec, self.cfg.lp_norm)
